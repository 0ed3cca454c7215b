/**
 * The routing views in a real JupyterLab, light and dark: the sidebar's routing tab (a local answer's trace,
 * titled by its question, expert ids on the categorical palette) and the notebook's routing widget
 * (workbench.widgets.show_routing, drawn by the extension's themed renderer). Screenshots of each go to the
 * artifacts folder as routing-*.png; look at them after a change to these views.
 */
import { expect, test } from '@jupyterlab/galata';
import type { Locator } from '@playwright/test';
import { isLocal, openChat, pluginSettings, send, shot, waitForApplication } from './helpers';

const QUESTION = 'Write a function that reverses a string';

test.use({
  // Short answers, no tool definitions to prefill: these tests are about the routing of whatever comes back, so
  // every answer records it (without keepRouting only answers given while a routing view is open do).
  mockSettings: pluginSettings({ maxTokens: 24, enableTools: false, keepRouting: true }),
  viewport: { width: 1400, height: 900 },
  waitForApplication
});

/** The sum of the RGB channels of an element's background (plotly paints it on its .main-svg). */
async function brightness(svg: Locator): Promise<number> {
  const colour = await svg.evaluate(el => getComputedStyle(el).backgroundColor);
  const [r, g, b] = colour.match(/\d+/g)!.map(Number);
  return r + g + b;
}

test.describe('Routing views @local', () => {
  test('the routing tab of a local answer, titled by its question, in light and dark', async ({ page }) => {
    const chat = await openChat(page, isLocal);
    await chat.getByLabel('Thinking mode').selectOption('off');
    await send(chat, QUESTION);
    const experts = chat
      .locator('.glm-Message.glm-mod-assistant')
      .last()
      .getByRole('button', { name: 'Show expert routing of this answer' });
    await expect(experts).toBeVisible({ timeout: 90 * 1000 });
    await experts.click();

    // titled by the question (it read "Experts 588646d9")
    const tab = page.locator('.lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current');
    await expect(tab).toContainText('Routing: Write a function that rev');
    const panel = page.locator('.glm-RoutingPanel');
    await expect(panel.locator('.glm-Plot .heatmaplayer')).toHaveCount(2);
    // expert ids are categories: a colour bar that names them, and the id written in each cell
    const grid = panel.locator('.glm-Plot').nth(1);
    await expect(grid.locator('.colorbar .cbaxis text').first()).toHaveText(/^e\d+$/);
    await expect(grid.locator('.heatmaplayer text').first()).toHaveText(/^\d+$/);
    await panel.locator('.glm-Token').last().click();
    await expect(panel.locator('.glm-TokenDetail')).toBeVisible();
    const light = await brightness(panel.locator('.glm-Plot .main-svg').first());
    expect(light, 'a light figure in the light theme').toBeGreaterThan(3 * 200);
    await shot(page, 'routing-tab-light');

    await page.theme.setDarkTheme();
    // redrawn in the dark theme's colours, not left white
    await expect.poll(() => brightness(panel.locator('.glm-Plot .main-svg').first())).toBeLessThan(3 * 100);
    await expect.poll(() => brightness(panel.locator('.glm-Plot .main-svg').nth(1))).toBeLessThan(3 * 100);
    await shot(page, 'routing-tab-dark');
    await page.theme.setLightTheme();
  });

  test('the notebook routing widget follows the theme and keeps its labels clear', async ({ page, tmpPath }) => {
    test.setTimeout(300 * 1000);
    const source = [
      'from workbench.engine import Engine',
      'from workbench.models import default_model_path',
      'from workbench.widgets import show_routing',
      '',
      'engine = Engine.from_pretrained(default_model_path(), dtype="float32", kernels="torch")',
      'prompt = engine.tokenizer.encode("def reverse(text):\\n    return")',
      'trace = engine.generate(prompt, max_new_tokens=12, temperature=0.0, routing=True).routing',
      'show_routing(trace, engine.tokenizer)'
    ].join('\n');
    const notebook = {
      cells: [{ cell_type: 'code', execution_count: null, metadata: {}, outputs: [], source }],
      metadata: { kernelspec: { display_name: 'Python 3', language: 'python', name: 'python3' } },
      nbformat: 4,
      nbformat_minor: 5
    };
    const file = `${tmpPath}/routing_widget.ipynb`;
    await page.contents.uploadContent(JSON.stringify(notebook), 'text', file);
    await page.notebook.openByPath(file);
    await page.notebook.run();

    const output = page.locator('.jp-OutputArea-output').first();
    const figure = output.locator('.glm-RoutingFigure');
    await expect(figure.locator('.heatmaplayer')).toHaveCount(1, { timeout: 120 * 1000 });
    // the title is whole, and the prompt / generated labels sit above the cells, not on them
    await expect(figure.locator('.gtitle')).toContainText('First-choice expert per token and layer');
    const plotArea = await figure.locator('.nsewdrag').first().boundingBox();
    const generated = await figure.locator('.annotation', { hasText: 'generated →' }).boundingBox();
    expect(generated!.y + generated!.height, 'the label ends above the cells').toBeLessThanOrEqual(plotArea!.y + 1);
    const title = await figure.locator('.gtitle').boundingBox();
    const box = await figure.locator('.main-svg').first().boundingBox();
    expect(title!.x).toBeGreaterThanOrEqual(box!.x);
    expect(title!.x + title!.width).toBeLessThanOrEqual(box!.x + box!.width);
    expect(title!.y, 'the title starts inside the figure').toBeGreaterThanOrEqual(box!.y);
    expect(title!.y + title!.height, 'the title ends above the labels').toBeLessThanOrEqual(generated!.y);
    expect(await brightness(figure.locator('.main-svg').first())).toBeGreaterThan(3 * 200);
    await output.scrollIntoViewIfNeeded();
    await shot(output, 'routing-widget-light');

    // the expert card: its token axis does not run into the table title below it
    await output.locator('.lm-TabBar-tab', { hasText: 'Expert card' }).click();
    const card = output.locator('.glm-RoutingFigure').filter({ has: page.locator('.table') });
    await expect(card.locator('.table')).toHaveCount(1, { timeout: 60 * 1000 });
    const ticks = await card.locator('.xtick').last().boundingBox();
    const tableTitle = await card.locator('.annotation', { hasText: 'contexts' }).boundingBox();
    expect(ticks!.y + ticks!.height, 'tick labels end above the table title').toBeLessThanOrEqual(tableTitle!.y);
    const cardTitle = await card.locator('.gtitle').boundingBox();
    const barsTitle = await card.locator('.annotation', { hasText: 'most frequent tokens' }).boundingBox();
    expect(cardTitle!.y + cardTitle!.height, 'the title ends above the bars title').toBeLessThanOrEqual(barsTitle!.y);
    await shot(output, 'routing-widget-expert-card-light');

    await page.theme.setDarkTheme();
    await expect.poll(() => brightness(card.locator('.main-svg').first())).toBeLessThan(3 * 100);
    await shot(output, 'routing-widget-expert-card-dark');
    await output.locator('.lm-TabBar-tab', { hasText: 'Tokens x layers' }).click();
    await expect.poll(() => brightness(figure.locator('.main-svg').first())).toBeLessThan(3 * 100);
    await shot(output, 'routing-widget-dark');
    // the load tab: its title clear of the two subplot titles under it
    await output.locator('.lm-TabBar-tab', { hasText: 'Load' }).click();
    const load = output.locator('.glm-RoutingFigure').filter({ hasText: 'imbalance per layer' });
    await expect(load.locator('.heatmaplayer')).toHaveCount(1, { timeout: 60 * 1000 });
    const loadTitle = await load.locator('.gtitle').boundingBox();
    const subplotTitle = await load.locator('.annotation', { hasText: 'relative load' }).boundingBox();
    expect(loadTitle!.y + loadTitle!.height).toBeLessThanOrEqual(subplotTitle!.y);
    await shot(output, 'routing-widget-load-dark');
    for (const [tabName, mark] of [
      ['Co-activation', 'Co-activation at layer'],
      ['Locality', 'Routing locality per layer']
    ]) {
      await output.locator('.lm-TabBar-tab', { hasText: tabName }).click();
      const view = output.locator('.glm-RoutingFigure').filter({ hasText: mark });
      await expect.poll(() => brightness(view.locator('.main-svg').first())).toBeLessThan(3 * 100);
      await shot(output, `routing-widget-${tabName.toLowerCase()}-dark`);
    }
    await shot(page, 'routing-notebook-dark');
    await page.theme.setLightTheme();
  });
});
