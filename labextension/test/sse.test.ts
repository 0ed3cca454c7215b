import { describe, expect, it } from 'vitest';
import { parseChatEvent, readChatStream, SSEParser, StreamError } from '../src/sse';

const chunk = (content: string, id = 'chatcmpl-1') =>
  JSON.stringify({ id, choices: [{ index: 0, delta: { content } }] });

/** Feed `text` to a parser in the given pieces and collect the events' data. */
function feedInPieces(pieces: string[]): string[] {
  const parser = new SSEParser();
  const out: string[] = [];
  for (const piece of pieces) {
    out.push(...parser.feed(piece).map(e => e.data));
  }
  out.push(...parser.finish().map(e => e.data));
  return out;
}

describe('SSEParser', () => {
  const stream = `data: ${chunk('Hel')}\n\ndata: ${chunk('lo')}\n\ndata: [DONE]\n\n`;

  it('parses whole events', () => {
    expect(feedInPieces([stream])).toEqual([chunk('Hel'), chunk('lo'), '[DONE]']);
  });

  it('gives the same events however the stream is cut', () => {
    const whole = feedInPieces([stream]);
    for (let cut = 1; cut < stream.length; cut++) {
      expect(feedInPieces([stream.slice(0, cut), stream.slice(cut)])).toEqual(whole);
    }
    // one character at a time
    expect(feedInPieces(stream.split(''))).toEqual(whole);
  });

  it('handles CRLF and CR line ends, also when CRLF is split between reads', () => {
    const crlf = stream.replace(/\n/g, '\r\n');
    const whole = feedInPieces([crlf]);
    expect(whole).toEqual([chunk('Hel'), chunk('lo'), '[DONE]']);
    for (let cut = 1; cut < crlf.length; cut++) {
      expect(feedInPieces([crlf.slice(0, cut), crlf.slice(cut)])).toEqual(whole);
    }
    expect(feedInPieces([stream.replace(/\n/g, '\r')])).toEqual(whole);
  });

  it('skips comments and joins multi-line data', () => {
    const events = new SSEParser().feed(': keep-alive\n\nevent: note\nid: 7\ndata: a\ndata:b\n\n');
    expect(events).toEqual([{ event: 'note', data: 'a\nb', id: '7' }]);
  });

  it('does not dispatch an event without a terminating blank line', () => {
    expect(feedInPieces(['data: partial'])).toEqual([]);
  });
});

describe('parseChatEvent', () => {
  it('recognises [DONE] and chunks', () => {
    expect(parseChatEvent({ event: 'message', data: '[DONE]', id: '' })).toBe('done');
    const parsed = parseChatEvent({ event: 'message', data: chunk('x'), id: '' });
    expect(parsed).not.toBe('done');
    expect((parsed as { id: string }).id).toBe('chatcmpl-1');
  });

  it('throws StreamError for an error object and for non-JSON data', () => {
    const error = JSON.stringify({ error: { message: 'engine failed', type: 'server_error', code: null } });
    expect(() => parseChatEvent({ event: 'message', data: error, id: '' })).toThrowError(/engine failed/);
    expect(() => parseChatEvent({ event: 'message', data: '{oops', id: '' })).toThrowError(StreamError);
  });
});

describe('readChatStream', () => {
  function bodyOf(parts: Uint8Array[]): ReadableStream<Uint8Array> {
    return new ReadableStream({
      start(controller) {
        parts.forEach(p => controller.enqueue(p));
        controller.close();
      }
    });
  }

  it('decodes UTF-8 characters split across reads and stops at [DONE]', async () => {
    const text = `data: ${chunk('思考 ✓')}\n\ndata: [DONE]\n\ndata: ${chunk('after done')}\n\n`;
    const bytes = new TextEncoder().encode(text);
    // cut inside the 3-byte character '思'
    const cut = new TextEncoder().encode(text.slice(0, text.indexOf('思'))).length + 1;
    const contents: string[] = [];
    for await (const c of readChatStream(bodyOf([bytes.slice(0, cut), bytes.slice(cut)]))) {
      contents.push(c.choices[0].delta.content ?? '');
    }
    expect(contents).toEqual(['思考 ✓']);
  });

  it('ends cleanly when the body ends without [DONE]', async () => {
    const bytes = new TextEncoder().encode(`data: ${chunk('a')}\n\n`);
    const seen = [];
    for await (const c of readChatStream(bodyOf([bytes]))) {
      seen.push(c);
    }
    expect(seen).toHaveLength(1);
  });
});
