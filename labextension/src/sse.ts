/**
 * Server-sent events: an incremental parser for the `text/event-stream` format and the OpenAI
 * chat-completions stream that rides on it.
 *
 * Owns byte/text framing only (no DOM, no JupyterLab): network reads arrive in arbitrary pieces, so an
 * event, a line, a CRLF pair or a multi-byte UTF-8 character may be split across reads. Follows the
 * WHATWG "interpret an event stream" rules: lines end in LF, CR or CRLF; a blank line dispatches; lines
 * starting with ':' are comments (keep-alives); multiple `data:` lines join with '\n'.
 */

import type { ChatCompletionChunk } from './protocol';

export interface ServerSentEvent {
  /** The `event:` field; 'message' when the server sent none. */
  event: string;
  data: string;
  /** The last `id:` seen on the stream (sticky across events, as the spec says). */
  id: string;
}

export class SSEParser {
  private buffer = '';
  private dataLines: string[] = [];
  private eventType = '';
  private lastEventId = '';
  private sawData = false;

  /** Feed decoded text; returns the events completed by it, in order. */
  feed(text: string): ServerSentEvent[] {
    this.buffer += text;
    const events: ServerSentEvent[] = [];
    let start = 0;
    for (let i = 0; i < this.buffer.length; i++) {
      const ch = this.buffer.charCodeAt(i);
      if (ch !== 10 && ch !== 13) {
        continue;
      }
      // A CR at the very end may be the first half of a CRLF split across reads: wait for more text.
      if (ch === 13 && i === this.buffer.length - 1) {
        break;
      }
      this.processLine(this.buffer.slice(start, i), events);
      if (ch === 13 && this.buffer.charCodeAt(i + 1) === 10) {
        i++;
      }
      start = i + 1;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  /** End of stream: per the spec an event not terminated by a blank line is dropped. */
  finish(): ServerSentEvent[] {
    const events: ServerSentEvent[] = [];
    if (this.buffer.endsWith('\r')) {
      this.processLine(this.buffer.slice(0, -1), events);
    }
    this.buffer = '';
    this.dataLines = [];
    this.sawData = false;
    return events;
  }

  private processLine(line: string, events: ServerSentEvent[]): void {
    if (line === '') {
      if (this.sawData) {
        events.push({ event: this.eventType || 'message', data: this.dataLines.join('\n'), id: this.lastEventId });
      }
      this.dataLines = [];
      this.eventType = '';
      this.sawData = false;
      return;
    }
    if (line.startsWith(':')) {
      return;
    }
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) {
      value = value.slice(1);
    }
    switch (field) {
      case 'data':
        this.dataLines.push(value);
        this.sawData = true;
        break;
      case 'event':
        this.eventType = value;
        break;
      case 'id':
        if (!value.includes('\0')) {
          this.lastEventId = value;
        }
        break;
      default:
        // 'retry' and unknown fields: nothing for a fetch-based reader to do.
        break;
    }
  }
}

/** An error the server reported inside the stream (OpenAI shape `{"error": {...}}`). */
export class StreamError extends Error {
  constructor(
    message: string,
    readonly type: string = 'server_error',
    readonly code: string | null = null
  ) {
    super(message);
    this.name = 'StreamError';
  }
}

/**
 * Turn one SSE event of a chat-completions stream into a chunk, `'done'` for the `[DONE]` sentinel, or
 * throw `StreamError` for an in-stream error object or data that is not JSON.
 */
export function parseChatEvent(event: ServerSentEvent): ChatCompletionChunk | 'done' {
  const data = event.data.trim();
  if (data === '[DONE]') {
    return 'done';
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(data);
  } catch {
    throw new StreamError(`The server sent a stream event that is not JSON: ${data.slice(0, 200)}`);
  }
  if (typeof parsed !== 'object' || parsed === null) {
    throw new StreamError(`The server sent a stream event that is not an object: ${data.slice(0, 200)}`);
  }
  const error = (parsed as { error?: { message?: string; type?: string; code?: string | null } }).error;
  if (error) {
    throw new StreamError(error.message ?? 'The backend reported an error.', error.type, error.code ?? null);
  }
  return parsed as ChatCompletionChunk;
}

/**
 * Read a fetch body as a chat-completions stream: yields chunks until `[DONE]` or the end of the body.
 * Decodes UTF-8 incrementally so characters split across reads survive.
 */
export async function* readChatStream(
  body: ReadableStream<Uint8Array>
): AsyncGenerator<ChatCompletionChunk, void, undefined> {
  const reader = body.getReader();
  const decoder = new TextDecoder('utf-8');
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
      const events = parser.feed(text);
      if (done) {
        events.push(...parser.finish());
      }
      for (const event of events) {
        const chunk = parseChatEvent(event);
        if (chunk === 'done') {
          return;
        }
        yield chunk;
      }
      if (done) {
        return;
      }
    }
  } finally {
    // Cancelling the reader (when the consumer stops early) closes the connection, which cancels the
    // generation on the server.
    reader.cancel().catch(() => undefined);
  }
}
