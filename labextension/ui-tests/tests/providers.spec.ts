/**
 * Providers side by side in the sidebar, against a real workbench server with three providers (see
 * jupyter_server_test_config.py, backend `providers`): `local` (the engine on a tiny checkpoint), `hosted` (the
 * scripted endpoint of tests/ui/scripted_upstream.py as a priced OpenAI-kind provider) and `zai` (its key's
 * variable not set). The picker groups them with capabilities and prices, a remote answer shows its thinking and
 * cost, switching to the local model keeps the conversation and shows tokens and time, the routing button is
 * offered on local answers only, and a free model without thinking disables the thinking switch. Screenshots in light and dark go to the artifacts folder as providers-*.png.
 */
import { expect, test } from '@jupyterlab/galata';
import type { Locator, Request } from '@playwright/test';
import { openChat, pluginSettings, send, shot, waitForApplication } from './helpers';

const HOSTED = 'hosted/scripted-glm';
/** The same endpoint as a free model without the thinking capability. */
const FREE = 'hosted/scripted-chat';
/** jupyter_server_test_config.py's PROVIDERS_PRICES: USD per million input / output tokens. */
const PRICES = { input: 2, output: 8 };
const QUESTION = 'Please think, then write an add function';

test.use({
  // short local answers and no tool definitions to prefill: the tiny checkpoint's context is small
  mockSettings: pluginSettings({ maxTokens: 24, enableTools: false }),
  viewport: { width: 1400, height: 900 },
  waitForApplication
});

/** The picker drawn open (a listbox: the browser's own drop-down is not in screenshots), saved as `name`. */
async function shotPicker(chat: Locator, name: string): Promise<void> {
  const picker = chat.locator('.glm-ModelPicker');
  await picker.evaluate(el => el.setAttribute('size', '8'));
  await shot(chat.locator('.glm-Header'), name);
  await picker.evaluate(el => el.removeAttribute('size'));
}

/** The sidebar's cost format (src/models.ts formatMoney), for the expected figure. */
function dollars(amount: number): string {
  const digits = Math.min(10, Math.max(2, 1 - Math.floor(Math.log10(amount))));
  return `$${amount.toFixed(digits)}`;
}

test.describe('Providers side by side @providers', () => {
  test('grouped picker, a priced remote answer, then the local model in the same conversation', async ({ page }) => {
    const chatRequests: Array<{ model: string; messages: Array<{ role: string; content: string | null }> }> = [];
    page.on('request', (request: Request) => {
      if (request.method() === 'POST' && request.url().includes('/glm/v1/chat/completions')) {
        chatRequests.push(request.postDataJSON());
      }
    });
    const chat = await openChat(page);
    const picker = chat.locator('.glm-ModelPicker');
    await expect(picker.locator('optgroup')).toHaveCount(3);

    // one group per provider, each model with what it can do and what it costs
    const groups = await picker.locator('optgroup').evaluateAll(els =>
      els.map(g => ({
        label: g.getAttribute('label'),
        options: [...g.querySelectorAll('option')].map(o => ({ value: o.value, text: o.textContent, disabled: o.disabled }))
      }))
    );
    expect(groups.map(g => g.label)).toEqual(['local', 'hosted', 'zai (set GLM_UI_UNSET_KEY)']);
    const [local, hosted, zai] = groups;
    expect(local.options).toHaveLength(1);
    expect(local.options[0].value).toMatch(/^local\//);
    expect(local.options[0].text).toContain('thinking, tools, routing');
    expect(local.options[0].disabled).toBe(false);
    expect(hosted.options).toEqual([
      { value: HOSTED, text: 'scripted-glm · thinking, tools · $2 in · $8 out per M tokens', disabled: false },
      { value: FREE, text: 'scripted-chat · tools · free', disabled: false }
    ]);
    expect(zai.options).toEqual([{ value: 'zai/glm-4.5-air', text: 'glm-4.5-air · set GLM_UI_UNSET_KEY', disabled: true }]);
    const localId = local.options[0].value;
    await shotPicker(chat, 'providers-picker-light');
    // the local engine is the first provider: chosen at start
    await expect(picker).toHaveValue(localId);
    const card = chat.getByLabel('Chosen model');
    await expect(card).toContainText('local');
    await expect(card.locator('.glm-Badge')).toHaveText(['thinking', 'tools', 'routing', 'thinking_budget']);
    // the local engine honours a thinking budget: the conversation's ⚙ offers it
    const settings = chat.getByRole('button', { name: 'Conversation settings and export' });
    await settings.click();
    const budget = chat.getByLabel('Thinking budget of this conversation, in tokens');
    await expect(budget).toBeVisible();
    await expect(budget).toHaveAttribute('placeholder', 'no cap');
    await shot(chat.getByRole('dialog', { name: 'This conversation' }), 'providers-thinking-budget');
    await settings.click();
    // the context meter counts the message being typed (the local engine counts it: glm/api/count_tokens)
    const meter = chat.getByRole('meter', { name: 'Context used' });
    await expect(meter).toHaveAttribute('aria-valuenow', '0');
    await chat.getByRole('textbox', { name: 'Message' }).fill('How many tokens does this question take?');
    await expect.poll(async () => Number(await meter.getAttribute('aria-valuenow'))).toBeGreaterThan(0);
    await chat.getByRole('textbox', { name: 'Message' }).fill('');
    await expect(meter).toHaveAttribute('aria-valuenow', '0');

    // the remote model: thinking shown, its cost under the answer and in the conversation's total
    await picker.selectOption(HOSTED);
    await expect(card.locator('.glm-Badge')).toHaveText(['thinking', 'tools']);
    await settings.click(); // a model that would ignore the budget: no field
    await expect(chat.getByRole('dialog', { name: 'This conversation' })).toBeVisible();
    await expect(budget).toHaveCount(0);
    await settings.click();
    await expect(card).toContainText('$2 in · $8 out per M tokens');
    await chat.getByLabel('Thinking mode').selectOption('on');
    await send(chat, QUESTION);
    const remoteAnswer = chat.locator('.glm-Message.glm-mod-assistant').first();
    await expect(remoteAnswer).toContainText('It adds two numbers.');
    await expect(remoteAnswer.locator('.glm-Thinking-label')).toHaveText(/^Thought for \d+\.\d s · \d+ tokens$/);
    const usage = remoteAnswer.locator('.glm-Usage');
    await expect(usage.locator('.glm-Usage-model')).toHaveText(HOSTED);
    const usageText = (await usage.textContent())!;
    const completion = Number(/^(\d+) tokens/.exec(usageText)![1]);
    const prompt = Number(/prompt (\d+)/.exec(usageText)![1]);
    const cost = dollars((prompt * PRICES.input + completion * PRICES.output) / 1e6);
    await expect(usage.locator('.glm-Usage-cost')).toHaveText(cost);
    await expect(chat.getByLabel('Conversation cost')).toHaveText(`Total: ${cost}`);
    // no routing from a plain OpenAI-compatible endpoint: no Experts button
    await expect(remoteAnswer.getByRole('button', { name: 'Show expert routing of this answer' })).toHaveCount(0);
    await shot(page, 'providers-remote-light');

    // switch to the local engine: the same conversation goes on, its answer shows tokens and time, no cost
    await picker.selectOption(localId);
    await chat.getByLabel('Thinking mode').selectOption('off');
    await send(chat, 'And now in one line?');
    const localAnswer = chat.locator('.glm-Message.glm-mod-assistant').nth(1);
    await expect(localAnswer.locator('.glm-Usage')).toBeVisible({ timeout: 90 * 1000 });
    await expect(chat.locator('.glm-Message.glm-mod-user')).toHaveCount(2);
    await expect(localAnswer.locator('.glm-Usage')).toHaveText(
      /^\d+ tokens? · [\d.]+ tok\/s · prompt \d+ in [\d.]+ s · \d+\.\d s total · local\//
    );
    await expect(localAnswer.locator('.glm-Usage-model')).toHaveText(localId);
    await expect(localAnswer.locator('.glm-Usage-cost')).toHaveCount(0);
    await expect(remoteAnswer.locator('.glm-Usage-model')).toHaveText(HOSTED);
    await expect(chat.getByLabel('Conversation cost')).toHaveText(`Total: ${cost}`);
    expect(chatRequests.map(r => r.model)).toEqual([HOSTED, localId]);
    const history = chatRequests[1].messages.filter(m => m.role !== 'system');
    expect(history.map(m => m.role)).toEqual(['user', 'assistant', 'user']);
    expect(history[0].content).toContain(QUESTION);
    expect(history[1].content).toContain('It adds two numbers.');
    // routing is offered where the answer's model records it: the local one
    await expect(localAnswer.getByRole('button', { name: 'Show expert routing of this answer' })).toBeVisible();
    await shot(page, 'providers-local-light');

    await page.evaluate(async () => {
      await window.jupyterapp.commands.execute('apputils:change-theme', { theme: 'JupyterLab Dark' });
    });
    await expect(page.locator('body')).toHaveAttribute('data-jp-theme-light', 'false');
    await page.waitForTimeout(500); // the theme's stylesheet swap settles
    await shot(page, 'providers-local-dark');

    // a free model without thinking: the thinking switch is off limits and says why; its answer costs nothing
    await picker.selectOption(FREE);
    const thinking = chat.getByLabel('Thinking mode');
    await expect(thinking).toBeDisabled();
    await expect(thinking).toHaveAttribute('title', /has no thinking mode/);
    await expect(card.locator('.glm-ModelCard-price')).toHaveText('free');
    await send(chat, 'hello');
    const freeAnswer = chat.locator('.glm-Message.glm-mod-assistant').nth(2);
    await expect(freeAnswer).toContainText('Hello from the scripted model.');
    await expect(freeAnswer.locator('.glm-Usage-cost')).toHaveText('free');
    await expect(freeAnswer.locator('.glm-Usage-model')).toHaveText(FREE);
    expect(chatRequests[2].model).toBe(FREE);
    expect(chatRequests[2]).not.toHaveProperty('thinking'); // never a switch the model does not have
    await expect(chat.getByLabel('Conversation cost')).toHaveText(`Total: ${cost}`);
    await shot(page, 'providers-free-dark');
    await shotPicker(chat, 'providers-picker-dark');
  });
});
