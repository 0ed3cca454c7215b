import { describe, expect, it } from 'vitest';

import { isPreviewableHtml, PREVIEW_CSP, previewDocument, previewHeight } from '../src/htmlPreview';

describe('isPreviewableHtml', () => {
  it('takes html blocks, whatever their case', () => {
    expect(isPreviewableHtml('<p>hi</p>', 'html')).toBe(true);
    expect(isPreviewableHtml('<p>hi</p>', 'HTML')).toBe(true);
    expect(isPreviewableHtml('<p>hi</p>', 'htm')).toBe(true);
  });

  it('takes a whole document in a block of any language', () => {
    expect(isPreviewableHtml('<!DOCTYPE html>\n<html><body>x</body></html>', '')).toBe(true);
    expect(isPreviewableHtml('  <html lang="en"><body>x</body></html>', 'xml')).toBe(true);
    expect(isPreviewableHtml('<!-- a page -->\n<!doctype html><p>x</p>', '')).toBe(true);
  });

  it('leaves other code alone', () => {
    expect(isPreviewableHtml('print("<html>")', 'python')).toBe(false);
    expect(isPreviewableHtml('<div>fragment</div>', '')).toBe(false);
    expect(isPreviewableHtml('body { color: red }', 'css')).toBe(false);
    expect(isPreviewableHtml('   ', 'html')).toBe(false);
    expect(isPreviewableHtml('const html = 1;', 'javascript')).toBe(false);
  });
});

describe('previewDocument', () => {
  const csp = `<meta http-equiv="Content-Security-Policy" content="${PREVIEW_CSP}">`;

  it('wraps a fragment in a page whose first element is the policy', () => {
    const doc = previewDocument('<button id="b">go</button><script>b.textContent = "ran"</script>');
    expect(doc.startsWith(`<!DOCTYPE html><html><head>${csp}`)).toBe(true);
    expect(doc).toContain('<body><button id="b">go</button><script>b.textContent = "ran"</script></body>');
  });

  it('puts the policy first in the head of a whole document', () => {
    const page = '<!DOCTYPE html>\n<html lang="en">\n<head>\n<title>T</title>\n<script>fetch("/x")</script></head><body></body></html>';
    const doc = previewDocument(page);
    expect(doc.indexOf(csp)).toBe(page.indexOf('<head>') + '<head>'.length);
    expect(doc.indexOf(csp)).toBeLessThan(doc.indexOf('fetch('));
    expect(doc).toContain('<title>T</title>');
  });

  it('adds a head to a document that has none, before any of its content', () => {
    const doc = previewDocument('<html><body><script>1</script></body></html>');
    expect(doc.startsWith(`<html><head>${csp}`)).toBe(true);
    const bare = previewDocument('<!doctype html><p>x</p>');
    expect(bare.startsWith(`<!doctype html><head>${csp}`)).toBe(true);
  });

  it('refuses every connection and form, and allows no same-origin escape hatch', () => {
    expect(PREVIEW_CSP).toContain("connect-src 'none'");
    expect(PREVIEW_CSP).toContain("form-action 'none'");
    expect(PREVIEW_CSP).toContain("default-src 'none'");
    expect(PREVIEW_CSP).not.toContain("'self'");
  });
});

describe('previewHeight', () => {
  it('clamps the reported height and ignores anything but a number', () => {
    expect(previewHeight(50)).toBe(120);
    expect(previewHeight(300.2)).toBe(301);
    expect(previewHeight(10000)).toBe(600);
    expect(previewHeight('300')).toBeNull();
    expect(previewHeight(Number.NaN)).toBeNull();
    expect(previewHeight(-1)).toBeNull();
  });
});
