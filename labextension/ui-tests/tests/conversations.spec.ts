/**
 * Conversations you can work with, end to end against the scripted model: edit and resend with the old branch
 * reachable (and still there after a reload), answer versions after Regenerate, the conversation's settings and
 * export to a notebook, history search, and the context meter's warning near the limit (on the providers
 * server, whose scripted model has a 32 768-token context). Screenshots in the light and the dark theme.
 */
import { expect, test, type IJupyterLabPageFixture } from '@jupyterlab/galata';
import type { Locator } from '@playwright/test';
import {
  isScripted,
  openChat,
  pluginSettings,
  runOpenChat,
  sendAndWait,
  shot,
  waitForApplication
} from './helpers';

test.use({
  waitForApplication,
  // no tool descriptions in the requests: these flows are about the conversation
  mockSettings: pluginSettings({ enableTools: false })
});

/** Wait until the whole page (the menu bar and the sidebar, not only the main area) wears the theme. */
async function themeApplied(page: IJupyterLabPageFixture, dark: boolean): Promise<void> {
  await page.waitForFunction(wantDark => {
    // whether an element's background is dark; null where it has none of its own (transparent)
    const dim = (el: Element) => {
      const rgb = getComputedStyle(el).backgroundColor.match(/[\d.]+/g)?.map(Number) ?? [];
      return rgb.length < 3 || rgb[3] === 0 ? null : rgb[0] + rgb[1] + rgb[2] < 300;
    };
    const checked = ['.lm-MenuBar', '.glm-ChatSidebar', '.jp-SideBar']
      .map(selector => document.querySelector(selector))
      .filter((el): el is Element => el !== null)
      .map(dim)
      .filter(d => d !== null);
    return checked.length > 0 && checked.every(d => d === wantDark);
  }, dark);
}

/** The state in the light theme, then the same in the dark one (back to light after). */
async function shots(page: IJupyterLabPageFixture, name: string): Promise<void> {
  await shot(page, `${name}-light`);
  await page.theme.setDarkTheme();
  await themeApplied(page, true);
  await shot(page, `${name}-dark`);
  await page.theme.setLightTheme();
  await themeApplied(page, false);
}

const users = (chat: Locator) => chat.locator('.glm-Message.glm-mod-user');
const answers = (chat: Locator) => chat.locator('.glm-Message.glm-mod-assistant');

test.describe('Conversations', () => {
  test('edit and resend replaces the answers after it and keeps the old branch, across a reload', async ({ page }) => {
    const chat = await openChat(page, isScripted);
    const tag = Date.now();
    await sendAndWait(chat, `echo first ${tag}`);
    await sendAndWait(chat, 'echo second');
    await expect(answers(chat).last()).toHaveText(/You said: echo second/);

    const second = users(chat).nth(1);
    await second.hover();
    await second.getByRole('button', { name: 'Edit message' }).click();
    await chat.getByRole('textbox', { name: 'Edited message' }).fill('echo second, edited');
    await shots(page, 'conv-01-editing');
    await chat.locator('.glm-EditMessage-send').click();
    await expect(chat.getByLabel('Send message')).toBeVisible();
    await expect(users(chat)).toHaveCount(2);
    await expect(answers(chat)).toHaveCount(2);
    await expect(users(chat).nth(1).locator('.glm-Message-text')).toHaveText('echo second, edited');
    await expect(answers(chat).last()).toContainText('You said: echo second, edited');
    const nav = users(chat).nth(1).getByRole('group', { name: 'Edit 2 of 2' });
    await expect(nav).toHaveText(/2\/2/);
    await shots(page, 'conv-02-edited');

    // ‹ : the old message and its answer, untouched
    await nav.getByRole('button', { name: 'Previous branch' }).click();
    await expect(users(chat).nth(1).locator('.glm-Message-text')).toHaveText('echo second');
    await expect(answers(chat).last()).toContainText('You said: echo second');
    await expect(answers(chat).last()).not.toContainText('edited');
    await expect(users(chat).nth(1).getByRole('group', { name: 'Edit 1 of 2' })).toBeVisible();

    // a reload reopens the conversation on the branch shown, with the other one still reachable
    await page.waitForTimeout(500); // the save after switching is one request; let it reach the server
    await page.reload();
    const again = page.locator('.glm-Chat');
    await runOpenChat(page);
    await expect(users(again).first()).toContainText(`echo first ${tag}`);
    await expect(users(again).nth(1).locator('.glm-Message-text')).toHaveText('echo second');
    await users(again).nth(1).getByRole('button', { name: 'Next branch' }).click();
    await expect(users(again).nth(1).locator('.glm-Message-text')).toHaveText('echo second, edited');
    await expect(answers(again).last()).toContainText('You said: echo second, edited');
  });

  test('Regenerate keeps every answer as a version; history finds conversations by their text', async ({ page }) => {
    const chat = await openChat(page, isScripted);
    await sendAndWait(chat, 'give me a version');
    const first = (await answers(chat).last().locator('.glm-Markdown').textContent()) ?? '';
    expect(first).toMatch(/Answer version \d+\./);
    for (let i = 0; i < 2; i++) {
      await chat.getByRole('button', { name: 'Regenerate answer' }).click();
      await expect(chat.getByLabel('Send message')).toBeVisible();
    }
    await expect(answers(chat)).toHaveCount(1);
    const nav = answers(chat).getByRole('group', { name: 'Answer version 3 of 3' });
    await expect(nav).toHaveText(/3\/3/);
    const third = (await answers(chat).locator('.glm-Markdown').textContent()) ?? '';
    expect(third).not.toBe(first);
    await shots(page, 'conv-03-versions');
    await nav.getByRole('button', { name: 'Previous version' }).click();
    await nav.page().getByRole('group', { name: 'Answer version 2 of 3' }).getByRole('button', { name: 'Previous version' }).click();
    await expect(answers(chat).locator('.glm-Markdown')).toHaveText(first);
    await expect(answers(chat).getByRole('group', { name: 'Answer version 1 of 3' })).toBeVisible();

    // history: a date beside each title, a search over titles and text
    await chat.getByLabel('Past conversations').click();
    const search = chat.getByRole('searchbox', { name: 'Search conversations' });
    await search.fill('version');
    await expect(chat.locator('.glm-History-item', { hasText: 'give me a version' })).toBeVisible();
    await expect(chat.locator('.glm-History-item').first().locator('.glm-History-date')).toHaveText(/\d{1,2}[:.]\d{2}/);
    await shots(page, 'conv-04-history-search');
    await search.fill('no conversation says this');
    await expect(chat.locator('.glm-History-item')).toHaveCount(0);
    await expect(chat.locator('.glm-History-empty')).toContainText('No conversation matches');
  });

  test('the conversation popover keeps its settings and exports it to a notebook', async ({ page }) => {
    const chat = await openChat(page, isScripted);
    await sendAndWait(chat, 'think, then write an add function');
    await expect(answers(chat).last()).toContainText('It adds two numbers.');
    await chat.getByRole('button', { name: 'Conversation settings and export' }).click();
    const popover = chat.getByRole('dialog', { name: 'This conversation' });
    await popover.getByLabel('Temperature of this conversation').fill('0.3');
    await popover.getByLabel('Maximum tokens per answer in this conversation').fill('512');
    await shots(page, 'conv-05-settings');
    await popover.getByRole('button', { name: 'To notebook' }).click();

    // the notebook opens: the question as Markdown, the prose as Markdown, the Python block as a code cell
    await page.waitForFunction(() => (window.jupyterapp.shell.currentWidget as any)?.context?.path?.endsWith('.ipynb'));
    const cells = await page.evaluate(async () => {
      const panel = window.jupyterapp.shell.currentWidget as any;
      await panel.context.ready;
      const list = panel.content.model.cells;
      const out: Array<{ type: string; source: string }> = [];
      for (let i = 0; i < list.length; i++) {
        out.push({ type: list.get(i).type, source: list.get(i).sharedModel.getSource() });
      }
      return out;
    });
    expect(cells.map(c => c.type)).toEqual(['markdown', 'markdown', 'markdown', 'code', 'markdown']);
    expect(cells[1].source).toContain('> think, then write an add function');
    expect(cells[3].source).toBe('def add(a, b):\n    return a + b');
    expect(cells[4].source).toBe('It adds two numbers.');
    await expect(page.locator('.jp-Notebook .jp-MarkdownCell h1').first()).toHaveText(/think, then write an add function/);
    await expect(page.locator('.jp-Notebook .jp-MarkdownCell blockquote').first()).toBeVisible();
    await shots(page, 'conv-06-exported-notebook');

    // the next answer is asked with the conversation's settings (the request the sidebar sends)
    const request = page.waitForRequest(r => r.url().includes('/glm/v1/chat/completions'));
    await runOpenChat(page);
    await sendAndWait(chat, 'and once more');
    const body = (await request).postDataJSON();
    expect(body).toMatchObject({ temperature: 0.3, max_tokens: 512 });
  });
});

test.describe('Context meter @providers', () => {
  test('shows the tokens used of the context as a bar, with a warning near the limit', async ({ page }) => {
    const chat = await openChat(page, id => id === 'hosted/scripted-glm');
    await sendAndWait(chat, 'hello there');
    const meter = chat.getByRole('meter', { name: 'Context used' });
    await expect(meter).toHaveText(/^Context: 1\d \/ 32,768 tokens$/);
    await expect(meter.locator('.glm-ContextMeter-warning')).toHaveCount(0);
    await sendAndWait(chat, 'crowd the context');
    await expect(meter).toContainText(/Context: 30,0\d\d \/ 32,768 tokens/);
    await expect(meter).toHaveClass(/glm-mod-full/);
    await expect(meter.locator('.glm-ContextMeter-warning')).toContainText('Near the limit');
    await shots(page, 'conv-07-context-meter');
  });
});
