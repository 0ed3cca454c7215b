/**
 * A newcomer's first minutes: `glm-workbench` started as the README says (fresh HOME and workspace, the bundled
 * model, every setting at its default; see playwright.config.js), driven only through what a user sees.
 *
 * - the sidebar is open on first launch, and the first message with default settings gets an answer;
 * - the bundled model is labelled as the 10M demo where the user meets it, with the way to a real model;
 * - the tool-approval flow can be seen on it ("Try tools"), and the speed shown is the server's.
 *
 * Screenshots (light and dark) go to the artifacts folder.
 */
import { expect, type Locator, type Page, test } from '@playwright/test';
import { send, shot } from './helpers';

const TOKEN = process.env.GLM_FIRST_CONTACT_TOKEN ?? '';

// The first answer may wait for the model to load (and, on a new machine, for the CPU kernels to compile).
test.setTimeout(300 * 1000);

/** What `glm-workbench` opens in the browser: JupyterLab on the quickstart notebook. */
const QUICKSTART = '01_quickstart.ipynb';

async function openLab(page: Page): Promise<Locator> {
  await page.goto(`/lab/tree/${QUICKSTART}?token=${TOKEN}`);
  await page.locator('#jupyterlab-splash').waitFor({ state: 'detached', timeout: 120 * 1000 });
  const chat = page.locator('.glm-Chat');
  // no click: on first launch the sidebar opens by itself
  await expect(chat).toBeVisible({ timeout: 60 * 1000 });
  await expect(chat.locator('.glm-ModelPicker option').first()).toHaveText(/glm45-air-mini/, { timeout: 120 * 1000 });
  // The quickstart notebook is on screen and the notebook the tools act on (after a reload JupyterLab restores it a
  // moment after the sidebar, and a tool that runs before then finds no notebook open): a click into it, as a user
  // who reads it does.
  const firstCell = page.locator('.jp-NotebookPanel .jp-Cell').first();
  await expect(firstCell).toBeVisible({ timeout: 120 * 1000 });
  await firstCell.locator('.jp-InputPrompt').click();
  return chat;
}

async function useTheme(page: Page, theme: string): Promise<void> {
  await page.getByRole('menuitem', { name: 'Settings' }).click();
  await page.locator('.lm-Menu-itemLabel', { hasText: /^Theme$/ }).hover();
  await page.locator('.lm-Menu-itemLabel', { hasText: new RegExp(`^${theme}$`) }).click();
}

/** Wait for the answer to end, and check it ended well. */
async function finishedAnswer(chat: Locator): Promise<Locator> {
  const answer = chat.locator('.glm-Message.glm-mod-assistant').last();
  await expect(answer).toBeVisible();
  await expect(answer).not.toHaveAttribute('aria-busy', 'true', { timeout: 240 * 1000 });
  await expect(answer.locator('.glm-Note.glm-mod-error')).toHaveCount(0);
  await expect(answer).toHaveClass(/glm-mod-done/);
  return answer;
}

test.describe('First contact with glm-workbench @first-contact', () => {
  test('the first message with default settings gets an answer', async ({ page }) => {
    const warnings: string[] = [];
    page.on('console', message => {
      if (/shortcut/i.test(message.text())) {
        warnings.push(message.text());
      }
    });
    const chat = await openLab(page);
    const sidebar = page.locator('.glm-ChatSidebar');
    await expect
      .poll(() => sidebar.evaluate(el => el.getBoundingClientRect().width), { message: 'the sidebar opens wide enough' })
      .toBeGreaterThanOrEqual(350);
    await expect(chat.locator('.glm-Header-name')).toHaveText('GLM Chat');

    await send(chat, 'Write a Python function that reverses a string.');
    const answer = await finishedAnswer(chat);
    const text = (await answer.locator('.glm-Markdown, .glm-Thinking, .glm-UnusableCall').allTextContents()).join('');
    expect(text.trim().length, 'the model said something').toBeGreaterThan(0);
    await expect(answer.locator('.glm-Usage')).toHaveText(/\d+ tokens? · [\d.]+ tok\/s · prompt \d+ in [\d.]+ s/);
    // how full the conversation is, out of the bundled model's 1024 tokens
    await expect(chat.getByRole('meter', { name: 'Context used' })).toHaveText(/Context: [\d,]+ \/ 1,024 tokens/);
    await shot(page, 'fc-01-first-answer-default-settings');
    expect(warnings, 'no shortcut collides with JupyterLab’s').toEqual([]);
  });

  test('the demo model says what it is, and its tool flow can be tried', async ({ page }) => {
    const chat = await openLab(page);
    await expect(chat.locator('.glm-ModelPicker option').first()).toHaveText(/^glm45-air-mini · 10M demo/);
    const notice = chat.getByRole('note', { name: 'Demo model' });
    await expect(notice).toContainText('10M-parameter demo model');
    await expect(notice).toContainText('writes no useful code');
    await shot(page, 'fc-02-demo-empty-state');

    // one click to how to connect a real model
    await notice.getByRole('button', { name: 'Connect a real model' }).click();
    const dialog = page.locator('.jp-Dialog');
    await expect(dialog).toContainText('--GLMWorkbench.model_path');
    await expect(dialog).toContainText('export OPENROUTER_API_KEY'); // the hosted model, one variable away
    await expect(dialog).toContainText('05_real_glm45_air.ipynb');
    await shot(page, 'fc-03-connect-a-real-model');
    await dialog.getByRole('button', { name: 'Close' }).click();

    // the tool-approval flow on the demo model: read_cells named in tool_choice
    await notice.getByRole('button', { name: 'Try tools' }).click();
    await expect(chat.locator('.glm-Message-label')).toHaveText(/Tool demo/);
    const call = chat.locator('.glm-ToolCall');
    await expect(call).toContainText('read_cells', { timeout: 240 * 1000 });
    await expect(call).toContainText('waiting for approval');
    await shot(page, 'fc-04-try-tools-pending');
    await call.getByRole('button', { name: 'Approve' }).click();
    await expect(call).toContainText('done');
    const answer = await finishedAnswer(chat);
    // the speed is the server's (its engine's decode seconds), and believable
    const usage = answer.locator('.glm-Usage');
    await expect(usage).toHaveAttribute('title', /measured by the server/);
    const rate = Number((await usage.textContent())!.match(/([\d.]+) tok\/s/)![1]);
    expect(rate).toBeGreaterThan(0);
    expect(rate, 'a 10M model on a CPU, not thousands of tok/s').toBeLessThan(2000);
    await shot(page, 'fc-05-try-tools-done-light');

    // the same sidebar in the dark theme (Settings > Theme, as a user switches it)
    await useTheme(page, 'JupyterLab Dark');
    await expect(page.locator('body')).toHaveAttribute('data-jp-theme-light', 'false');
    await page.waitForTimeout(500); // the theme's stylesheet applies
    await shot(page, 'fc-06-try-tools-done-dark');
    await useTheme(page, 'JupyterLab Light');
  });
});
