/**
 * The agent loop in a real JupyterLab against the scripted model (tests/ui/scripted_upstream.py, "agent fix" and
 * "agent sleep"): step after step on its own (insert a cell with a typo, run it, read its error, edit it, run it
 * again), with approvals for the edits and auto-approved runs and reads; each step a card with its reasoning;
 * each change one undoable step; and Stop in the middle of a loop, interrupting the running cell.
 * Screenshots, light and dark, go to the artifacts folder.
 */
import { expect, test } from '@jupyterlab/galata';
import type { Locator } from '@playwright/test';
import { cellCount, cellSource, openChat, pluginSettings, send, shot, waitForApplication } from './helpers';

/** The scripted remote model, by its provider/model id. */
const SCRIPTED_MODEL = 'remote/scripted-glm';
const scripted = (id: string) => id === SCRIPTED_MODEL;
const BROKEN = 'values = [3, 4, 5]\nprint(sum(values) / len(value))';
const FIXED = 'values = [3, 4, 5]\nprint(sum(values) / len(values))';

test.use({ waitForApplication });

/** The sidebar's saved settings for a group of tests (galata serves the page's settings from this mock). */
const withSettings = (settings: Record<string, unknown>) => ({ mockSettings: pluginSettings(settings) });

/** Step `n` (1-based) of the conversation's cards. */
const stepCard = (chat: Locator, n: number) => chat.locator('.glm-StepCard').nth(n - 1);

test.describe('GLM Workbench agent loop', () => {
  test.use(withSettings({ autoApproveTools: ['run_cell', 'read_output'] }));

  test('inserts a cell, runs it, reads its error, edits and reruns it: approvals, auto-approved steps, cards', async ({
    page
  }) => {
    await page.notebook.createNew('agent.ipynb');
    await page.notebook.setCell(0, 'code', 'x = 1');
    const chat = await openChat(page, scripted);
    await send(chat, 'Agent fix: print the mean of my values');

    // step 1 changes the notebook: it waits for approval, and nothing happens before
    const insert = stepCard(chat, 1);
    await expect(insert).toContainText('Step 1');
    await expect(insert).toContainText('insert_cell');
    await expect(insert).toContainText('edits the notebook');
    await expect(insert).toContainText('waiting for approval');
    expect(await cellCount(page)).toBe(1);
    await expect(insert.locator('.glm-Thinking-label')).toHaveText(/^Thought for \d+\.\d s/); // its reasoning, under it
    await shot(page, '30-agent-step-pending');
    await insert.getByRole('button', { name: 'Approve' }).click();

    // steps 2 and 3 (run, read the output) are auto-approved and run on their own
    const run = stepCard(chat, 2);
    await expect(run).toContainText('run_cell');
    await expect(run).toContainText('(auto-approved)');
    await expect(run.locator('.glm-StepCard-summary')).toContainText('Ran with an error');
    const read = stepCard(chat, 3);
    await expect(read).toContainText('read_output');
    await expect(read).toContainText(/done \(auto-approved\) · \d+\.\d s/);
    await expect(read.locator('.glm-StepCard-summary')).toContainText('raised an error');
    await read.locator('.glm-ToolCall-result summary').click();
    await expect(read.locator('.glm-ToolCall-result pre')).toContainText("NameError: name 'value' is not defined");
    await expect(read.locator('.glm-ToolCall-result pre')).not.toContainText('\u001b[');

    // step 4 edits the cell: approval again
    const edit = stepCard(chat, 4);
    await expect(edit).toContainText('edit_cell');
    await expect(edit).toContainText('waiting for approval');
    await edit.locator('.glm-Thinking-header').click(); // the step's reasoning unfolds under its card
    await expect(edit.locator('.glm-Thinking-body')).toContainText('typo');
    await shot(page, '31-agent-step-error-read');
    expect(await cellSource(page, 1)).toBe(BROKEN);
    await edit.getByRole('button', { name: 'Approve' }).click();

    // step 5 reruns it (auto), then the model answers and the loop ends
    await expect(stepCard(chat, 5)).toContainText('run_cell');
    await expect(chat.locator('.glm-Message.glm-mod-assistant').last()).toContainText('the cell now prints 4.0');
    await expect(chat.getByRole('button', { name: 'Send message' })).toBeVisible();
    await expect(chat.locator('.glm-StepCard')).toHaveCount(5);
    expect(await cellSource(page, 1)).toBe(FIXED);
    expect(await cellSource(page, 0)).toBe('x = 1');
    await expect(page.locator('.jp-Cell').nth(1).locator('.jp-OutputArea-output')).toContainText('4.0');
    // call-only answers show no empty bubbles: the one answer bubble is the final answer
    await expect(chat.locator('.glm-Message.glm-mod-assistant')).toHaveCount(1);
    await shot(page, '32-agent-loop-done');
    await page.theme.setDarkTheme();
    await shot(page, '32-agent-loop-done-dark');
    await page.theme.setLightTheme();

    // each change is one undoable step: Ctrl+Z in the cell restores the source before the edit (not an empty cell)
    const editor = page.locator('.jp-Cell').nth(1).locator('.cm-content');
    await editor.click();
    await page.keyboard.press('Control+z');
    await expect.poll(() => cellSource(page, 1)).toBe(BROKEN);
    // and in command mode, z removes the inserted cell, and only it
    await page.keyboard.press('Escape');
    await page.keyboard.press('z');
    await expect.poll(() => cellCount(page)).toBe(1);
    expect(await cellSource(page, 0)).toBe('x = 1');
  });

});

test.describe('GLM Workbench agent loop, stopped', () => {
  test.use(withSettings({ autoApproveTools: ['insert_cell', 'run_cell'] }));
  // galata's kernel tracking proxies POST /api/kernels/* and reads a JSON body, which an interrupt (204) lacks
  test.use({ kernels: null, sessions: null });

  test('Stop in the middle of a loop ends it at once and interrupts the running cell', async ({ page }) => {
    await page.notebook.createNew('agent-stop.ipynb');
    // a started kernel: the interrupt must reach a running cell, not a kernel still starting
    await page.notebook.setCell(0, 'code', 'started = True');
    await page.notebook.runCell(0, true);
    const chat = await openChat(page, scripted);
    await send(chat, 'Agent sleep: wait a minute');
    const run = stepCard(chat, 2);
    await expect(run).toContainText('running…');
    await expect(page.locator('.jp-Cell').nth(1).locator('.jp-InputPrompt')).toContainText('[*]');
    const stopInterrupt = chat.getByRole('button', { name: 'Stop and interrupt the kernel' });
    await expect(stopInterrupt).toBeVisible();
    await expect(chat.getByRole('button', { name: 'Stop generating' })).toBeVisible();
    await shot(page, '33-agent-loop-running');
    await page.theme.setDarkTheme();
    await shot(page, '33-agent-loop-running-dark');
    await page.theme.setLightTheme();

    await stopInterrupt.click();
    await expect(chat.getByRole('button', { name: 'Send message' })).toBeVisible(); // the sidebar is free at once
    await expect(page.locator('.jp-Cell').nth(1).locator('.jp-OutputArea-output')).toContainText('KeyboardInterrupt', {
      timeout: 45 * 1000
    });
    await expect(run).toContainText('done');
    await expect(chat.locator('.glm-LoopNotice')).toHaveText(
      'Stopped by you after 2 tool steps; the running cell was interrupted. Nothing more is sent to the model.'
    );
    await expect(chat.locator('.glm-LoopContinue')).toHaveCount(0);
    await page.waitForTimeout(1000); // a continuation would have started by now
    await expect(chat.locator('.glm-StepCard')).toHaveCount(2);
    await expect(chat).not.toContainText('The cell finished sleeping.');
    await shot(page, '34-agent-loop-stopped');
  });
});

test.describe('GLM Workbench agent loop, step limit', () => {
  test.use(withSettings({ maxToolSteps: 2, autoApproveTools: ['insert_cell', 'run_cell', 'read_output', 'edit_cell'] }));

  test('pauses at the step limit, says so plainly, and Continue goes on', async ({ page }) => {
    await page.notebook.createNew('agent-limit.ipynb');
    const chat = await openChat(page, scripted);
    await send(chat, 'Agent fix: print the mean of my values');
    const notice = chat.locator('.glm-LoopNotice');
    await expect(notice).toContainText('Paused after 2 tool steps: the step limit is 2');
    await expect(chat.locator('.glm-StepCard')).toHaveCount(2);
    await expect(chat.getByRole('button', { name: 'Send message' })).toBeVisible();
    await shot(page, '35-agent-loop-step-limit');
    await page.theme.setDarkTheme();
    await shot(page, '35-agent-loop-step-limit-dark');
    await page.theme.setLightTheme();
    await notice.getByRole('button', { name: 'Continue' }).click();
    await expect(chat.locator('.glm-StepCard')).toHaveCount(4); // steps 3 and 4, then the limit again
    await expect(notice).toContainText('Paused after 2 tool steps');
    await notice.getByRole('button', { name: 'Continue' }).click();
    await expect(chat.locator('.glm-Message.glm-mod-assistant').last()).toContainText('the cell now prints 4.0');
    await expect(chat.locator('.glm-StepCard')).toHaveCount(5);
    await expect(notice).toHaveCount(0);
  });
});
