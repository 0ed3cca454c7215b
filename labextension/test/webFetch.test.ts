import { describe, expect, it } from 'vitest';

import { checkWebUrl, formatChars, webFetchSummary, webFetchToolResult } from '../src/webFetch';

describe('checkWebUrl', () => {
  it('takes http and https URLs', () => {
    expect(checkWebUrl(' https://example.org/a ')).toBe('https://example.org/a');
    expect(checkWebUrl('http://127.0.0.1:8000/page.html')).toBe('http://127.0.0.1:8000/page.html');
  });

  it('refuses other schemes, non-URLs and missing values with a reason', () => {
    expect(() => checkWebUrl('file:///etc/passwd')).toThrow(/only http and https/);
    expect(() => checkWebUrl('gopher://x')).toThrow(/only http and https/);
    expect(() => checkWebUrl('example.org')).toThrow(/not a URL/);
    expect(() => checkWebUrl(undefined)).toThrow(/non-empty string/);
    expect(() => checkWebUrl(42)).toThrow(/non-empty string/);
  });
});

describe('web_fetch results', () => {
  const page = {
    url: 'http://a.test/start',
    final_url: 'http://a.test/page',
    title: 'A page',
    text: '# Heading\n\nSome text.',
    links: ['http://a.test/1', { text: 'Two', url: 'http://a.test/2' }, { href: 'http://a.test/3' }, { nothing: 1 }],
    truncated: true
  };

  it('gives the model a header, the text and the links', () => {
    const result = webFetchToolResult(page);
    expect(result).toBe(
      'Title: A page\nURL: http://a.test/page\nSize: 21 characters (truncated by the server)\n\n# Heading\n\nSome text.\n\n' +
        'Links (3 of 3):\n- http://a.test/1\n- [Two](http://a.test/2)\n- http://a.test/3'
    );
  });

  it('reads the card summary back from the result', () => {
    expect(webFetchSummary(webFetchToolResult(page))).toEqual({
      title: 'A page',
      url: 'http://a.test/page',
      chars: 21,
      truncated: true
    });
    const plain = webFetchToolResult({ ...page, title: null, links: undefined, truncated: false });
    expect(webFetchSummary(plain)).toEqual({ title: '(none)', url: 'http://a.test/page', chars: 21, truncated: false });
    expect(webFetchSummary('Error: refused')).toBeNull();
    expect(webFetchSummary(undefined)).toBeNull();
  });

  it('formats sizes', () => {
    expect(formatChars(999)).toBe('999 characters');
    expect(formatChars(1234)).toBe('1.2k characters');
    expect(formatChars(45678)).toBe('46k characters');
  });
});
