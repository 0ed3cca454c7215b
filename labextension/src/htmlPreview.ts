/**
 * Front-end answers, previewed: which code blocks are HTML pages, and the document a sandboxed frame shows.
 *
 * Owns the pure part of the HTML preview (detection and the `srcdoc` text); the frame itself is
 * components/HtmlPreview.tsx. Isolation comes from the frame's `sandbox="allow-scripts"` without
 * `allow-same-origin` (an opaque origin: no cookie, no storage, no token, no DOM of the parent); the
 * Content-Security-Policy put first in the document is a second layer that refuses every connection
 * (fetch, XHR, WebSocket, EventSource) and every form or frame target, so the page cannot talk to the
 * server's `glm/` API even where a browser let an opaque origin through.
 */

/** Code-block languages that are HTML pages. */
const HTML_LANGS = new Set(['html', 'htm', 'xhtml', 'html5']);

/** A block that is a whole document, whatever its fence says (``` with no language, ```xml...). */
const WHOLE_DOCUMENT = /^\s*(?:<!--[\s\S]*?-->\s*)*(?:<!doctype\s+html\b|<html[\s>])/i;

/** Whether a code block gets a Preview action: an ```html block, or any block that is a whole HTML document. */
export function isPreviewableHtml(code: string, lang: string): boolean {
  if (HTML_LANGS.has(lang.trim().toLowerCase())) {
    return code.trim().length > 0;
  }
  return WHOLE_DOCUMENT.test(code);
}

/**
 * The policy of every preview: scripts and styles inline or from https (front-end answers load libraries from
 * CDNs), images, fonts and media inline or from https, and no connection, form, frame, worker or <base> at all.
 */
export const PREVIEW_CSP = [
  "default-src 'none'",
  "script-src 'unsafe-inline' 'unsafe-eval' https: data: blob:",
  "style-src 'unsafe-inline' https: data:",
  'img-src data: blob: https:',
  'font-src data: https:',
  'media-src data: blob: https:',
  "connect-src 'none'",
  "worker-src 'none'",
  "frame-src 'none'",
  "object-src 'none'",
  "form-action 'none'",
  "base-uri 'none'"
].join('; ');

/** Message type the preview's own script posts to the parent: its content height, a number, nothing else. */
export const PREVIEW_HEIGHT_MESSAGE = 'glm-html-preview-height';

/**
 * Reports the page's height to the frame's parent so the frame can fit it (the parent reads only a number from
 * its own frame's window: see HtmlPreview.tsx). Runs before the page's scripts, which may replace the body.
 */
const HEIGHT_REPORTER =
  '<script>(function(){var last=-1;function report(){var d=document.documentElement,b=document.body;' +
  'var h=Math.max(d?d.scrollHeight:0,b?b.scrollHeight:0);if(h!==last){last=h;' +
  `parent.postMessage({type:'${PREVIEW_HEIGHT_MESSAGE}',height:h},'*');}}` +
  "addEventListener('load',report);setInterval(report,500);})();</script>";

function headPrelude(): string {
  return (
    `<meta http-equiv="Content-Security-Policy" content="${PREVIEW_CSP}">` +
    '<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">' +
    HEIGHT_REPORTER
  );
}

/**
 * The `srcdoc` of a preview. A whole document keeps its own structure with the policy inserted first in its
 * <head> (a policy meta applies only to what comes after it); a fragment (markup, CSS and scripts without
 * <html>) is wrapped in a minimal page.
 */
export function previewDocument(code: string): string {
  if (WHOLE_DOCUMENT.test(code)) {
    const head = /<head(?:\s[^>]*)?>/i.exec(code);
    if (head) {
      const at = head.index + head[0].length;
      return code.slice(0, at) + headPrelude() + code.slice(at);
    }
    const html = /<html(?:\s[^>]*)?>/i.exec(code);
    if (html) {
      const at = html.index + html[0].length;
      return code.slice(0, at) + `<head>${headPrelude()}</head>` + code.slice(at);
    }
    const doctype = /<!doctype\s+html[^>]*>/i.exec(code)!;
    const at = doctype.index + doctype[0].length;
    return code.slice(0, at) + `<head>${headPrelude()}</head>` + code.slice(at);
  }
  return (
    `<!DOCTYPE html><html><head>${headPrelude()}` +
    '<style>body{font-family:system-ui,sans-serif;margin:8px;}</style>' +
    `</head><body>${code}</body></html>`
  );
}

/** The frame's height for a reported content height (px): at least `min`, at most `max`. */
export function previewHeight(reported: unknown, min = 120, max = 600): number | null {
  if (typeof reported !== 'number' || !Number.isFinite(reported) || reported < 0) {
    return null;
  }
  return Math.min(max, Math.max(min, Math.ceil(reported)));
}
