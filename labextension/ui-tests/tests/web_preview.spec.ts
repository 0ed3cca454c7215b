/**
 * Front-end answers previewed in a sandboxed frame, the web_fetch tool reading a page from a local server, and
 * inline completion in a notebook cell, each in a real JupyterLab against the scripted remote model
 * (tests/ui/scripted_upstream.py). Screenshots of each flow, light and dark, go to the artifacts folder.
 */
import { expect, test, type IJupyterLabPageFixture } from '@jupyterlab/galata';
import * as http from 'http';
import type { AddressInfo } from 'net';
import { cellSource, isScripted, openChat, pluginSettings, send, shot, waitForApplication } from './helpers';

test.use({ waitForApplication });

/** The sum of the RGB channels of the chat sidebar's background (under 300: a dark theme is applied). */
async function sidebarBrightness(page: IJupyterLabPageFixture): Promise<number> {
  return page.evaluate(() => {
    const sidebar = document.querySelector('.glm-ChatSidebar');
    const colour = sidebar ? getComputedStyle(sidebar).backgroundColor : 'rgb(255, 255, 255)';
    return (colour.match(/\d+/g) ?? []).slice(0, 3).map(Number).reduce((a, b) => a + b, 0);
  });
}

/** The same shot in the light and the dark theme (the page goes back to light). */
async function shotBothThemes(page: IJupyterLabPageFixture, name: string, settle?: () => Promise<void>): Promise<void> {
  await shot(page, `${name}-light`);
  await page.theme.setDarkTheme();
  // the theme's stylesheet lands after the command returns: wait until the sidebar is dark
  await expect.poll(() => sidebarBrightness(page)).toBeLessThan(300);
  await settle?.();
  await shot(page, `${name}-dark`);
  await page.theme.setLightTheme();
  await expect.poll(() => sidebarBrightness(page)).toBeGreaterThan(600);
}

test.describe('HTML preview and web_fetch', () => {
  test('previews an HTML answer in a sandboxed frame: the script runs, the parent is out of reach', async ({ page }) => {
    const chat = await openChat(page, isScripted);
    await send(chat, 'Make an html page with a counter');
    const answer = chat.locator('.glm-Message.glm-mod-assistant').last();
    await expect(answer).toContainText('Open the preview to try it.');
    const block = answer.locator('.glm-CodeBlock').first();
    await expect(block.locator('.glm-CodeBlock-lang')).toHaveText('html');
    // code first; Preview renders it
    await expect(block.locator('.glm-CodeBlock-pre')).toBeVisible();
    await block.getByRole('button', { name: 'Preview this HTML' }).click();
    const frameElement = block.locator('iframe.glm-HtmlPreview-frame');
    await expect(frameElement).toHaveAttribute('sandbox', 'allow-scripts');
    await expect(block.locator('.glm-CodeBlock-pre')).toHaveCount(0);

    const frame = block.frameLocator('iframe.glm-HtmlPreview-frame');
    await expect(frame.locator('#status')).toHaveText('The script ran');
    await frame.locator('#add').click();
    await frame.locator('#add').click();
    await expect(frame.locator('#count')).toHaveText('2');
    // the page's own probes, written into its DOM once its fetch settled
    await expect(frame.locator('#probe')).not.toContainText('"fetch":"pending"');
    const probe = JSON.parse((await frame.locator('#probe').textContent()) ?? '{}');
    expect(probe.cookie === '' || String(probe.cookie).startsWith('threw'), `cookie: ${probe.cookie}`).toBe(true);
    expect(probe.parentDocument, 'window.parent.document throws').toMatch(/^threw/);
    expect(probe.storage, 'no storage in an opaque origin').toMatch(/^threw/);
    expect(probe.fetch, "the parent's glm/api/status is out of reach").toMatch(/^failed/);
    // ...while the parent itself reaches it (the probe would have succeeded without the sandbox)
    const parentStatus = await page.evaluate(async () => {
      const settings = window.jupyterapp.serviceManager.serverSettings;
      const response = await fetch(`${settings.baseUrl}glm/api/status`, { credentials: 'include' });
      return response.status;
    });
    expect(parentStatus).toBe(200);
    // the frame grew to its content (the page reports a height, nothing else)
    await expect.poll(async () => (await frameElement.boundingBox())?.height ?? 0).toBeGreaterThan(200);

    await frameElement.scrollIntoViewIfNeeded();
    await shotBothThemes(page, 'web-01-html-preview');

    await block.getByRole('button', { name: 'Show the code' }).click();
    await expect(block.locator('iframe')).toHaveCount(0);
    await expect(block.locator('.glm-CodeBlock-pre code')).toContainText('<!DOCTYPE html>');
  });

  test('web_fetch reads a page from a local server once approved, and its card sums it up', async ({ page }) => {
    const requests: string[] = [];
    const server = http.createServer((req, res) => {
      requests.push(req.url ?? '');
      if (req.url === '/start') {
        res.writeHead(302, { Location: '/page.html' });
        res.end();
        return;
      }
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
      res.end(
        '<!DOCTYPE html><html><head><title>Local test page</title></head><body><main>' +
          '<h1>Mixture of experts</h1><p>Each token is routed to a few experts out of many.</p>' +
          '<p>See <a href="/more.html">more</a>.</p></main></body></html>'
      );
    });
    await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as AddressInfo).port;
    try {
      await page.notebook.createNew('fetch.ipynb');
      const chat = await openChat(page, isScripted);
      await send(chat, `Please fetch http://127.0.0.1:${port}/start and tell me about it`);
      const card = chat.locator('.glm-ToolCall');
      await expect(card).toContainText('web_fetch');
      await expect(card).toContainText('waiting for approval');
      await expect(card.locator('.glm-ToolCall-args')).toContainText(`http://127.0.0.1:${port}/start`);
      expect(requests, 'nothing is fetched before approval').toEqual([]);
      await shot(page, 'web-02-fetch-pending');

      await card.getByRole('button', { name: 'Approve' }).click();
      await expect(card).toContainText('done');
      expect(requests).toEqual(['/start', '/page.html']);
      const summary = card.locator('.glm-WebFetch');
      await expect(summary.locator('.glm-WebFetch-title')).toHaveText('Local test page');
      await expect(summary.locator('.glm-WebFetch-url')).toContainText(`http://127.0.0.1:${port}/page.html`);
      await expect(summary.locator('.glm-WebFetch-url')).toContainText('(redirected)');
      await expect(summary.locator('.glm-WebFetch-size')).toHaveText(/^\d+ characters$/);
      await card.locator('.glm-ToolCall-result summary').click();
      await expect(card.locator('.glm-ToolCall-result pre')).toContainText('Each token is routed to a few experts');
      // the result went back to the model, which answered
      await expect(chat.locator('.glm-Message.glm-mod-assistant').last()).toContainText(
        'I read the page titled Local test page.'
      );
      await shotBothThemes(page, 'web-03-fetch-done');
    } finally {
      await new Promise(resolve => server.close(resolve));
    }
  });
});

test.describe('Inline completion', () => {
  // The scripted model is a remote one: inline completion is off for it unless the setting says on.
  test.use({ mockSettings: pluginSettings({ inlineCompletion: 'on', inlineCompletionDelay: 100 }) });

  test('shows streamed ghost text from the model, and Tab accepts it', async ({ page }) => {
    const debug: string[] = [];
    page.on('console', message => {
      if (message.text().startsWith('GLM Workbench inline completion:')) {
        debug.push(message.text());
      }
    });
    await page.notebook.createNew('inline.ipynb');
    await openChat(page, isScripted); // the sidebar's model is the one that completes
    await page.notebook.enterCellEditingMode(0);
    await page.keyboard.type('def add(a, b):');
    await page.keyboard.press('Enter');
    // JupyterLab indents after the colon once it knows the notebook's language; before that, the test does
    if (!(await cellSource(page, 0)).endsWith('    ')) {
      await page.keyboard.type('    ');
    }
    await page.keyboard.type('ret');
    const ghost = page.locator('.jp-GhostText');
    await expect(ghost).toHaveText('urn a + b');
    expect(await cellSource(page, 0), 'ghost text is not in the cell until accepted').toBe('def add(a, b):\n    ret');
    await expect.poll(() => debug.some(line => /first token after \d+ ms, done after \d+ ms/.test(line))).toBe(true);
    console.log(debug.join('\n')); // the latency the debug log shows, in the test's output
    await shotBothThemes(page, 'web-04-inline-ghost', async () => {
      await expect(ghost).toHaveText('urn a + b');
    });

    await page.keyboard.press('Tab');
    await expect(ghost).toHaveCount(0);
    expect(await cellSource(page, 0)).toBe('def add(a, b):\n    return a + b');
    await shot(page, 'web-05-inline-accepted');
  });
});
