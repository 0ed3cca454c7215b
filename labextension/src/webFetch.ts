/**
 * The sidebar's `web_fetch` tool: the page is read by the server (`POST {base}glm/api/tools/web_fetch`, which
 * refuses private addresses, caps size and time and turns HTML into Markdown), never by the browser.
 *
 * Owns the call, the text the model gets back (a short header, then the page's text and links) and the summary
 * the tool card shows, read back from that header so the card and the model see the same facts.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type { WorkbenchClient } from './api';
import { errorMessageFromBody, unreachableError } from './errors';

/** What the server answers (the web-fetch endpoint's contract). */
export interface WebFetchResult {
  url: string;
  final_url: string;
  title: string | null;
  text: string;
  links?: unknown[];
  truncated: boolean;
}

/** Links listed for the model after the text, at most. */
const MAX_LINKS = 30;

/** Check a URL before it goes to the server, with an error the model can act on. */
export function checkWebUrl(value: unknown): string {
  if (typeof value !== 'string' || !value.trim()) {
    throw new Error('argument "url" must be a non-empty string, e.g. "https://example.org/page"');
  }
  const url = value.trim();
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error(`"${url.slice(0, 200)}" is not a URL; give a full http(s) URL such as https://example.org/page`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new Error(`only http and https URLs can be fetched, not ${parsed.protocol}`);
  }
  return url;
}

/** A link of the answer as "text: url" (the server may send strings or {text, url|href} objects). */
function linkLine(link: unknown): string | null {
  if (typeof link === 'string') {
    return link;
  }
  if (link && typeof link === 'object') {
    const l = link as { text?: unknown; url?: unknown; href?: unknown };
    const href = typeof l.url === 'string' ? l.url : typeof l.href === 'string' ? l.href : null;
    if (!href) {
      return null;
    }
    const text = typeof l.text === 'string' ? l.text.trim() : '';
    return text ? `[${text}](${href})` : href;
  }
  return null;
}

/** The tool's result for the model: a header the card reads back (see `webFetchSummary`), the text, the links. */
export function webFetchToolResult(result: WebFetchResult): string {
  const links = (result.links ?? []).map(linkLine).filter((l): l is string => !!l);
  const lines = [
    `Title: ${result.title?.trim() || '(none)'}`,
    `URL: ${result.final_url || result.url}`,
    `Size: ${result.text.length} characters${result.truncated ? ' (truncated by the server)' : ''}`,
    '',
    result.text
  ];
  if (links.length) {
    lines.push('', `Links (${Math.min(links.length, MAX_LINKS)} of ${links.length}):`);
    lines.push(...links.slice(0, MAX_LINKS).map(l => `- ${l}`));
  }
  return lines.join('\n');
}

export interface WebFetchSummary {
  title: string;
  url: string;
  chars: number;
  truncated: boolean;
}

/** The card's summary of a `web_fetch` result; null for a result that is not one (an error, a refusal). */
export function webFetchSummary(result: string | undefined): WebFetchSummary | null {
  const m = /^Title: (.*)\nURL: (.*)\nSize: (\d+) characters( \(truncated by the server\))?\n/.exec(result ?? '');
  if (!m) {
    return null;
  }
  return { title: m[1], url: m[2], chars: Number(m[3]), truncated: !!m[4] };
}

/** "12.3k characters" and the like. */
export function formatChars(chars: number): string {
  return chars >= 10000 ? `${(chars / 1000).toFixed(0)}k characters` : chars >= 1000 ? `${(chars / 1000).toFixed(1)}k characters` : `${chars} characters`;
}

/**
 * Fetch a page through the server. Its refusals (a private address, too big, too slow, an HTTP error of the page)
 * come back as errors with the server's reason, which is what the model and the card need to see; 401 and 403 are
 * the server's own answers too (a refusal, or an expired Jupyter session), so they keep their text.
 */
export async function webFetch(client: WorkbenchClient, url: string, signal?: AbortSignal): Promise<WebFetchResult> {
  const endpoint = URLExt.join(client.settings.baseUrl, 'glm', 'api/tools/web_fetch');
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(
      endpoint,
      { method: 'POST', body: JSON.stringify({ url: checkWebUrl(url) }), headers: { 'Content-Type': 'application/json' }, signal },
      client.settings
    );
  } catch (error) {
    if ((error as Error)?.name === 'AbortError') {
      throw error;
    }
    throw unreachableError(error);
  }
  const text = await response.text().catch(() => '');
  if (response.status === 404 && !errorMessageFromBody(text)) {
    throw new Error('this server has no web_fetch endpoint (glm/api/tools/web_fetch): update GLM Workbench');
  }
  if (!response.ok) {
    throw new Error(errorMessageFromBody(text) || `the server refused the fetch (HTTP ${response.status})`);
  }
  let body: WebFetchResult | null = null;
  try {
    body = JSON.parse(text) as WebFetchResult;
  } catch {
    // reported below
  }
  if (!body || typeof body.text !== 'string') {
    throw new Error('the server answered web_fetch with something that is not a page');
  }
  return body;
}
