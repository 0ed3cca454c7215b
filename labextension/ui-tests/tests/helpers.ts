/**
 * Scaffolding shared by the browser tests, once for every spec: where screenshots go, the wait for JupyterLab to
 * start, the sidebar's mocked settings, opening the chat and choosing a model, sending a message, and reading the
 * active notebook. What a single spec needs stays in that spec.
 */
import { expect, galata, type IJupyterLabPage, type IJupyterLabPageFixture } from '@jupyterlab/galata';
import type { Locator, Page } from '@playwright/test';
import * as fs from 'fs';
import * as path from 'path';

/** Where screenshots go: $GLM_UI_ARTIFACTS (tests/ui/test_browser.py sets it), else ui-tests/artifacts/. */
export const ARTIFACTS = process.env.GLM_UI_ARTIFACTS || path.resolve(__dirname, '..', 'artifacts');
fs.mkdirSync(ARTIFACTS, { recursive: true });

/** What a screenshot can be taken of: a page (galata's or Playwright's) or one element of it. */
interface IScreenshotTarget {
  screenshot(options: { path: string }): Promise<unknown>;
}

/** Save a screenshot of `target` as ARTIFACTS/`name`.png (no wait of its own: the caller waits for the state). */
export async function shot(target: IScreenshotTarget, name: string): Promise<void> {
  await target.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

/**
 * galata's wait for JupyterLab with more time than its 15 s (the machines are small and shared): the splash screen
 * gone (120 s), then the Launcher tab active (90 s). Use as `test.use({ waitForApplication })`.
 */
export const waitForApplication = async (
  {}: object,
  use: (wait: (page: Page, helpers: IJupyterLabPage) => Promise<void>) => Promise<void>
): Promise<void> => {
  await use(async (page, helpers) => {
    await page.locator('#jupyterlab-splash').waitFor({ state: 'detached', timeout: 120 * 1000 });
    await helpers.waitForCondition(() => helpers.activity.isTabActive('Launcher'), 90 * 1000);
  });
};

/** galata's mocked settings with the sidebar's own (`glm-workbench:plugin`) set to `settings`: for `mockSettings`. */
export function pluginSettings(settings: Record<string, unknown>): Record<string, unknown> {
  return { ...galata.DEFAULT_SETTINGS, 'glm-workbench:plugin': settings };
}

/** Whether a picker id names the scripted model (bare, or `provider/scripted-glm` on a server with providers). */
export const isScripted = (id: string): boolean => id === 'scripted-glm' || id.endsWith('/scripted-glm');
/** Whether a picker id names a model other than the scripted one: the local engine's, on the @local server. */
export const isLocal = (id: string): boolean => !isScripted(id) && id !== '';

/** Run the sidebar's open-chat command, and wait for nothing: for a page whose model list may not come. */
export async function runOpenChat(page: IJupyterLabPageFixture): Promise<void> {
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('glm-workbench:open-chat');
  });
}

/** Choose the first model of the picker that `match` accepts (fails, listing them, if none does); returns its id. */
export async function chooseModel(chat: Locator, match: (id: string) => boolean): Promise<string> {
  const ids = await chat.locator('.glm-ModelPicker option').evaluateAll(options =>
    options.map(o => (o as HTMLOptionElement).value)
  );
  const id = ids.find(match);
  expect(id, `a model matching the test among ${ids.join(', ')}`).toBeTruthy();
  await chat.locator('.glm-ModelPicker').selectOption(id!);
  return id!;
}

/**
 * Open the chat sidebar and wait until it is visible and its model list has arrived (GET glm/v1/models: the first
 * option is no longer 'no model'); with `model`, then choose the first model it accepts (see chooseModel).
 */
export async function openChat(page: IJupyterLabPageFixture, model?: (id: string) => boolean): Promise<Locator> {
  await runOpenChat(page);
  const chat = page.locator('.glm-Chat');
  await expect(chat).toBeVisible();
  await expect(chat.locator('.glm-ModelPicker option').first()).not.toHaveText('no model');
  if (model) {
    await chooseModel(chat, model);
  }
  return chat;
}

/** Type `text` into the message box and press Enter; returns at once, while the answer may still be streaming. */
export async function send(chat: Locator, text: string): Promise<void> {
  const input = chat.getByRole('textbox', { name: 'Message' });
  await input.fill(text);
  await input.press('Enter');
}

/** send, then wait until the answer is over: the Send button is back in place of Stop. */
export async function sendAndWait(chat: Locator, text: string): Promise<void> {
  await send(chat, text);
  await expect(chat.getByLabel('Send message')).toBeVisible();
}

/** The source of cell `index` of the active notebook, read from its model (not the editor's DOM). */
export async function cellSource(page: IJupyterLabPageFixture, index: number): Promise<string> {
  return page.evaluate(i => {
    const panel = window.jupyterapp.shell.currentWidget as any;
    return panel.content.model.cells.get(i).sharedModel.getSource();
  }, index);
}

/** The number of cells of the active notebook, read from its model (poll it: no wait of its own). */
export async function cellCount(page: IJupyterLabPageFixture): Promise<number> {
  return page.evaluate(() => (window.jupyterapp.shell.currentWidget as any).content.model.cells.length);
}
