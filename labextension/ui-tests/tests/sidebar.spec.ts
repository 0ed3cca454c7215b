/**
 * The GLM Workbench sidebar in a real JupyterLab, end to end: streaming with the thinking timer, stop,
 * code-block insertion, tool approval, the routing panel, saved history and failure states.
 * Each state is saved as a screenshot in the artifacts folder.
 */
import { expect, test } from '@jupyterlab/galata';
import type { Locator } from '@playwright/test';
import {
  cellCount,
  cellSource,
  chooseModel,
  isLocal,
  isScripted,
  openChat,
  pluginSettings,
  runOpenChat,
  send,
  shot,
  waitForApplication
} from './helpers';

/** What the scripted remote model (tests/ui/scripted_upstream.py) inserts with its tool call. */
const INSERTED_SOURCE = "print('inserted by the tool')";

test.use({ waitForApplication });

/** The remote backend's model: the scripted endpoint. */
const scripted = (chat: Locator) => chooseModel(chat, isScripted);
/** The local engine's model (the @local project's server). */
const local = (chat: Locator) => chooseModel(chat, isLocal);

async function lastAnswer(chat: Locator): Promise<Locator> {
  const answer = chat.locator('.glm-Message.glm-mod-assistant').last();
  await expect(answer).toBeVisible();
  return answer;
}

test.describe('GLM Workbench sidebar', () => {
  test('streams thinking with a live timer, then the answer', async ({ page }) => {
    const chat = await openChat(page);
    await scripted(chat);
    await chat.getByLabel('Thinking mode').selectOption('on');
    await send(chat, 'Please think, then write an add function');

    const label = chat.locator('.glm-Thinking-label');
    await expect(label).toHaveText(/^Thinking \d+\.\d s$/);
    const first = await label.textContent();
    await page.waitForTimeout(400);
    expect(await label.textContent(), 'the timer runs while the model thinks').not.toBe(first);
    await expect(chat.locator('.glm-Thinking-body')).toContainText('adds two numbers');
    await shot(page, '01-thinking-live');

    const answer = await lastAnswer(chat);
    await expect(answer).toContainText('It adds two numbers.');
    await expect(label).toHaveText(/^Thought for \d+\.\d s · \d+ tokens$/);
    // collapsed once the answer started (default setting), expands on click
    const header = chat.locator('.glm-Thinking-header');
    await expect(header).toHaveAttribute('aria-expanded', 'false');
    await expect(chat.locator('.glm-Thinking-body')).toHaveCount(0);
    await header.click();
    await expect(header).toHaveAttribute('aria-expanded', 'true');
    await expect(chat.locator('.glm-Thinking-body')).toContainText('plain def with two parameters');
    // usage and speed under the answer; the code block is highlighted with its actions
    await expect(answer.locator('.glm-Usage')).toHaveText(/\d+ tokens · [\d.]+ tok\/s/);
    await expect(answer.locator('.glm-CodeBlock code')).toContainText('def add(a, b):');
    await expect(answer.locator('.glm-CodeBlock-insert')).toBeVisible();
    await shot(page, '02-answer-with-thought');
  });

  test('a very long thinking trace stays responsive', async ({ page }) => {
    const chat = await openChat(page);
    await scripted(chat);
    await send(chat, 'ponder this for a long time');
    const body = chat.locator('.glm-Thinking-body');
    await expect(body).toContainText('step 1500');
    // while it streams only the tail is in the DOM, however long the trace has grown
    expect((await body.textContent())!.length).toBeLessThanOrEqual(20002);
    const header = chat.locator('.glm-Thinking-header');
    await header.click();
    await expect(header).toHaveAttribute('aria-expanded', 'false');
    await expect(chat.locator('.glm-Thinking-label')).toHaveText(/^Thinking \d+\.\d s$/);
    await shot(page, '13-long-trace-collapsed-while-streaming');
    await expect(await lastAnswer(chat)).toContainText('Done pondering.');
    await expect(chat.locator('.glm-Thinking-label')).toHaveText(/^Thought for \d+\.\d s · \d+ tokens$/);
    await header.click();
    await expect(body).toContainText('step 2499: still pondering.');
    await expect(body).toContainText('step 0: still pondering.');
  });

  test('Escape stops a long answer', async ({ page }) => {
    const chat = await openChat(page);
    await scripted(chat);
    await send(chat, 'Give me a long answer');
    const answer = await lastAnswer(chat);
    await expect(answer).toContainText('word5');
    await shot(page, '03-long-answer-streaming');
    await chat.getByRole('textbox', { name: 'Message' }).press('Escape');
    await expect(answer.locator('.glm-Note')).toHaveText('Stopped.');
    await expect(chat.getByLabel('Send message')).toBeVisible();
    const stoppedText = await answer.locator('.glm-Markdown').textContent();
    await page.waitForTimeout(1000);
    expect(await answer.locator('.glm-Markdown').textContent(), 'no text arrives after stop').toBe(stoppedText);
    expect(stoppedText).not.toContain('word300');
    await shot(page, '04-long-answer-stopped');
  });

  test('inserts a code block below the active cell', async ({ page }) => {
    await page.notebook.createNew('insert.ipynb');
    await page.notebook.setCell(0, 'code', 'x = 1');
    const chat = await openChat(page);
    await scripted(chat);
    await send(chat, 'think and write an add function');
    const answer = await lastAnswer(chat);
    await expect(answer).toContainText('It adds two numbers.');
    await answer.locator('.glm-CodeBlock-insert').first().click();
    await expect.poll(() => cellCount(page)).toBe(2);
    expect(await cellSource(page, 1)).toBe('def add(a, b):\n    return a + b');
    expect(await cellSource(page, 0)).toBe('x = 1');
    await shot(page, '05-code-inserted');
  });

  test('asks before a tool call and runs it once approved', async ({ page }) => {
    await page.notebook.createNew('tools.ipynb');
    await page.notebook.setCell(0, 'code', 'y = 2');
    const chat = await openChat(page);
    await scripted(chat);
    await send(chat, 'Use a tool to add a cell');
    const call = chat.locator('.glm-ToolCall');
    await expect(call).toContainText('insert_cell');
    await expect(call).toContainText('waiting for approval');
    await expect(call.locator('.glm-ToolCall-args')).toContainText('inserted by the tool');
    expect(await cellCount(page), 'nothing happens before approval').toBe(1);
    await shot(page, '06-tool-call-pending');
    await call.getByRole('button', { name: 'Approve' }).click();
    await expect(call).toContainText('done');
    await expect.poll(() => cellCount(page)).toBe(2);
    expect(await cellSource(page, 1)).toBe(INSERTED_SOURCE);
    // the result went back to the model, which answered
    await expect(chat.locator('.glm-Message.glm-mod-assistant').last()).toContainText('the new cell is in the notebook');
    await shot(page, '07-tool-call-approved');
  });

  test('explains an error from the cell context menu', async ({ page }) => {
    await page.notebook.createNew('error.ipynb');
    await page.notebook.setCell(0, 'code', 'total = 1 / 0');
    await page.notebook.runCell(0, true);
    await expect(page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')).toContainText(
      'ZeroDivisionError'
    );
    const chat = await openChat(page);
    await scripted(chat);
    await page.notebook.selectCells(0);
    const cell = await page.notebook.getCellLocator(0);
    await cell!.click({ button: 'right' });
    await page.getByRole('menuitem', { name: 'Explain / Fix This Error (GLM)' }).click();
    const question = chat.locator('.glm-Message.glm-mod-user').last();
    await expect(question).toContainText('Explain this error and fix the code.');
    await expect(question.locator('.glm-ContextChip', { hasText: 'Error' })).toHaveAttribute('title', /ZeroDivisionError/);
    await expect(question.locator('.glm-ContextChip', { hasText: 'Cell' })).toHaveAttribute('title', /total = 1 \/ 0/);
    await expect(await lastAnswer(chat)).toContainText('Hello from the scripted model.');
    await shot(page, '12-explain-error');
  });

  test('keeps conversations across reloads', async ({ page }) => {
    const chat = await openChat(page);
    await scripted(chat);
    const title = `Remember me ${Date.now()}`;
    await send(chat, title);
    await expect(await lastAnswer(chat)).toContainText('Hello from the scripted model.');
    await expect(chat.getByLabel('Send message')).toBeVisible();
    await page.reload();
    const again = await openChat(page);
    // the sidebar reopens the conversation the user was in
    await expect(again.locator('.glm-Message.glm-mod-user')).toContainText(title);
    await expect(again.locator('.glm-Message.glm-mod-assistant')).toContainText('Hello from the scripted model.');
    await again.getByLabel('New conversation').click();
    await expect(again.locator('.glm-Message')).toHaveCount(0);
    await again.getByLabel('Past conversations').click();
    const item = again.locator('.glm-History-item', { hasText: title });
    await expect(item).toBeVisible();
    // a date (today: the time) beside the title, and JupyterLab's own delete icon
    await expect(item.locator('.glm-History-date')).toHaveText(/\d{1,2}[:.]\d{2}/);
    await expect(item.getByRole('button', { name: `Delete conversation ${title}` }).locator('svg')).toBeVisible();
    await shot(page, '09-history');
    await item.locator('.glm-History-open').click();
    await expect(again.locator('.glm-Message.glm-mod-user')).toContainText(title);
    await expect(again.locator('.glm-Message.glm-mod-assistant')).toContainText('Hello from the scripted model.');
  });

  test('says when an answer was cut off, continues it, and shows the server\'s speed', async ({ page }) => {
    const chat = await openChat(page);
    await scripted(chat);
    await send(chat, 'cut this one short');
    const answer = await lastAnswer(chat);
    const note = answer.locator('.glm-CutOff');
    await expect(note).toContainText('Cut off: the answer reached its token limit');
    // the scripted server's usage: 0.1 s of decode per token after the first
    await expect(answer.locator('.glm-Usage')).toHaveText(/^\d+ tokens · 10\.0 tok\/s · prompt 12 in 0\.25 s/);
    await expect(answer.locator('.glm-Usage')).toHaveAttribute('title', /measured by the server/);
    await shot(page, '14-cut-off');
    await note.getByRole('button', { name: 'Continue' }).click();
    await expect(chat.locator('.glm-Message.glm-mod-user').last()).toHaveText('Continue from where you stopped.');
    await expect(chat.locator('.glm-Message.glm-mod-assistant')).toHaveCount(2);
    await expect(chat.getByRole('meter', { name: 'Context used' })).toContainText('Context:');
  });

  test('a wide code block scrolls inside itself and keeps its Copy button in view', async ({ page }) => {
    const chat = await openChat(page);
    await scripted(chat);
    // the composer's placeholder fits, without scroll arrows
    const input = chat.getByRole('textbox', { name: 'Message' });
    const box = await input.evaluate(el => ({
      overflowX: el.scrollWidth > el.clientWidth,
      overflowY: el.scrollHeight > el.clientHeight
    }));
    expect(box).toEqual({ overflowX: false, overflowY: false });
    await send(chat, 'show me something wide');
    const answer = await lastAnswer(chat);
    await expect(answer).toContainText('That is all.');
    const pre = answer.locator('.glm-CodeBlock-pre');
    expect(await pre.evaluate(el => el.scrollWidth > el.clientWidth), 'the code block scrolls').toBe(true);
    const log = chat.getByRole('log', { name: 'Conversation' });
    expect(await log.evaluate(el => el.scrollWidth <= el.clientWidth), 'the message list does not').toBe(true);
    const copy = answer.getByRole('button', { name: 'Copy code' });
    const sidebar = await page.locator('.glm-ChatSidebar').boundingBox();
    const button = await copy.boundingBox();
    expect(button!.x + button!.width).toBeLessThanOrEqual(sidebar!.x + sidebar!.width);
    await shot(page, '15-wide-code-block');
  });

  test('opens with Alt+Shift+G, and no shortcut collides with JupyterLab\'s', async ({ page }) => {
    const warnings: string[] = [];
    page.on('console', message => {
      if (/shortcut/i.test(message.text())) {
        warnings.push(message.text());
      }
    });
    await page.reload();
    await page.evaluate(() => (window.jupyterapp.shell as any).collapseRight());
    await expect(page.locator('.glm-Chat')).toBeHidden();
    await page.keyboard.press('Alt+Shift+G');
    await expect(page.locator('.glm-Chat')).toBeVisible();
    expect(warnings).toEqual([]);
    const sidebar = page.locator('.glm-ChatSidebar');
    await expect
      .poll(() => sidebar.evaluate(el => el.getBoundingClientRect().width), { message: 'the sidebar opens wide enough' })
      .toBeGreaterThanOrEqual(350);
  });

  test('titles the auto-approved tools in the settings editor', async ({ page }) => {
    await page.getByRole('menuitem', { name: 'Settings' }).click();
    await page.locator('.lm-Menu-itemLabel', { hasText: /^Settings Editor$/ }).click();
    await page.locator('.jp-PluginList-entry-label-text', { hasText: /^GLM Workbench$/ }).click();
    const tools = page.getByRole('group', { name: 'Auto-approved tools' });
    await expect(tools).toBeVisible();
    await expect(tools.getByRole('checkbox')).toHaveCount(7);
    await expect(tools).toContainText('read_cells');
    await expect(tools).toContainText('web_fetch');
    await shot(page, '17-settings-auto-approved-tools');
  });

  test('shows failure states and recovers', async ({ page }) => {
    // The server answers "model still loading" (503) for a moment.
    const models = /\/glm\/v1\/models(\?|$)/;
    await page.route(models, route =>
      route.fulfill({
        status: 503,
        contentType: 'application/json',
        body: JSON.stringify({ error: { message: 'loading weights 40%', type: 'server_error' } })
      })
    );
    await page.reload();
    await runOpenChat(page);
    const chat = page.locator('.glm-Chat');
    const banner = chat.getByRole('alert');
    await expect(banner).toContainText('Model still loading');
    await expect(banner).toContainText('loading weights 40%');
    await shot(page, '10-model-loading');
    await page.unroute(models);
    await banner.getByRole('button', { name: 'Retry' }).click();
    await expect(chat.getByRole('alert')).toHaveCount(0);
    await expect(chat.locator('.glm-ModelPicker option').first()).not.toHaveText('no model');
  });

  test('follows the dark theme', async ({ page }) => {
    await page.theme.setDarkTheme();
    const chat = await openChat(page);
    await scripted(chat);
    await send(chat, 'think about colours');
    await expect(await lastAnswer(chat)).toContainText('It adds two numbers.');
    const background = await chat.evaluate(el => getComputedStyle(el.closest('.glm-ChatSidebar')!).backgroundColor);
    const [r, g, b] = background.match(/\d+/g)!.map(Number);
    expect(r + g + b, `a dark background, got ${background}`).toBeLessThan(3 * 100);
    await shot(page, '11-dark-theme');
    await page.theme.setLightTheme();
  });
});

test.describe('Routing panel (local engine) @local', () => {
  // Short answers from the tiny random-weight model, and no tool definitions to prefill: the test is about
  // the routing of whatever it says, and the machines are slow. keepRouting: the first answer records its routing
  // (by default only answers given while a routing view is open do; test/chatModel.test.ts covers that).
  test.use({ mockSettings: pluginSettings({ maxTokens: 24, enableTools: false, keepRouting: true }) });

  test('shows the expert routing of a local answer', async ({ page }) => {
    const chat = await openChat(page);
    await local(chat);
    await chat.getByLabel('Thinking mode').selectOption('off');
    await send(chat, 'hello');
    const answer = await lastAnswer(chat);
    const experts = answer.getByRole('button', { name: 'Show expert routing of this answer' });
    await expect(experts).toBeVisible({ timeout: 60 * 1000 });
    await experts.click();
    const panel = page.locator('.glm-RoutingPanel');
    await expect(panel.locator('.glm-Routing-summary')).toContainText('MoE layers');
    // plotly drew both heatmaps
    await expect(panel.locator('.glm-Plot .heatmaplayer')).toHaveCount(2);
    await panel.locator('.glm-Token').first().click();
    const detail = panel.locator('.glm-TokenDetail');
    await expect(detail).toBeVisible();
    expect(await detail.locator('tbody tr').count()).toBeGreaterThan(0);
    await expect(detail.locator('.glm-ExpertChip').first()).toHaveText(/^e\d+/);
    await shot(page, '08-routing-panel');
  });
});

test.describe('Maximum tokens per answer (local engine) @local', () => {
  // more than any context: the sidebar asks again for what fits and says so
  test.use({ mockSettings: pluginSettings({ maxTokens: 1000000, enableTools: false }) });

  test('lowers a max_tokens that does not fit to what fits, with a note', async ({ page }) => {
    const chat = await openChat(page);
    await local(chat);
    await chat.getByLabel('Thinking mode').selectOption('off');
    await send(chat, 'hello');
    const answer = await lastAnswer(chat);
    await expect(answer.locator('.glm-Note.glm-mod-info')).toContainText(/lowered to \d+: what fits/);
    await expect(answer.locator('.glm-Markdown')).not.toBeEmpty({ timeout: 60 * 1000 }); // it is answering
    await shot(page, '16-max-tokens-lowered');
    // a random-weight model may go on to the end of the context: enough seen (it may also have ended by itself)
    await chat.getByRole('textbox', { name: 'Message' }).press('Escape');
    await expect(answer).toHaveClass(/glm-mod-(stopped|done)/);
    await expect(answer.locator('.glm-Note.glm-mod-error')).toHaveCount(0);
  });
});
