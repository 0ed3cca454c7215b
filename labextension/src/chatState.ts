/**
 * Conversation and message state of the chat sidebar, as pure functions over plain objects.
 *
 * Owns: folding streamed chunks into an assistant message (content, reasoning, tool calls by index,
 * usage, completion id), the timings behind "Thinking 3.2 s" / "Thought for 5.1 s" and tok/s, and the
 * conversion of the visible conversation back into API messages. Knows nothing of the DOM or of
 * JupyterLab, so it is unit-tested directly. Every update returns a new object (React compares identity).
 */

import type { ConversationTree } from './conversationTree';
import type { ApiMessage, ChatCompletionChunk, ThinkingMode, ToolCall, Usage } from './protocol';

export interface ContextBlock {
  /** What the block is, for the chip above the message, e.g. "Active cell [3]". */
  label: string;
  text: string;
}

export interface UserMessage {
  kind: 'user';
  id: string;
  text: string;
  context: ContextBlock[];
  /** Shown above the message, never sent (e.g. "Tool demo: ..."). */
  label?: string;
}

export type AssistantStatus = 'streaming' | 'done' | 'stopped' | 'error';

export interface Timing {
  /** When the request was sent (ms, performance.now() or Date.now(): any monotonic clock). */
  start: number;
  firstToken?: number;
  reasoningStart?: number;
  reasoningEnd?: number;
  end?: number;
}

export interface AssistantMessage {
  kind: 'assistant';
  id: string;
  completionId?: string;
  model?: string;
  content: string;
  reasoning: string;
  toolCalls: ToolCall[];
  status: AssistantStatus;
  error?: string;
  finishReason?: string;
  usage?: Usage;
  routingRequested: boolean;
  /** The answer came from the local engine, which records routing when asked (routingRequested says if it was). */
  routingPossible?: boolean;
  timing: Timing;
  /** Something the sidebar changed about the request and says so under the answer (a clamped max_tokens). */
  note?: string;
  /** Stream deltas counted as they come: one per token on this server, an estimate elsewhere. */
  reasoningDeltas: number;
  contentDeltas: number;
}

export type ToolStatus = 'pending' | 'approved' | 'running' | 'done' | 'rejected' | 'error';

export interface ToolMessage {
  kind: 'tool';
  id: string;
  call: ToolCall;
  status: ToolStatus;
  /** Parsed arguments, when they are valid JSON. */
  args?: Record<string, unknown>;
  autoApproved: boolean;
  /** What goes back to the model once settled. */
  result?: string;
  /** When the tool started and finished running (ms, Date.now()), for the step card's time. */
  started?: number;
  finished?: number;
}

export type Message = UserMessage | AssistantMessage | ToolMessage;

/** What a conversation asks its answers with, saved with it; unset fields follow the sidebar's preferences. */
export interface ConversationSettings {
  model?: string;
  thinkingMode?: ThinkingMode;
  temperature?: number;
  /** 0: as much as fits. */
  maxTokens?: number;
  /** Most reasoning tokens (sent as thinking.budget_tokens where the model honours it); unset: no cap. */
  thinkingBudget?: number;
}

export interface Conversation {
  id: string;
  title: string;
  /** The user named it: the title no longer follows the first question. */
  titleEdited?: boolean;
  created: number;
  updated: number;
  model?: string;
  /** The shown branch (pathOf(tree)); saved too, so readers that know no tree still read it. */
  messages: Message[];
  /** Every branch and answer version (absent in conversations saved before branches). */
  tree?: ConversationTree;
  settings?: ConversationSettings;
}

export function newAssistantMessage(
  id: string,
  now: number,
  options: { model?: string; routingRequested?: boolean; routingPossible?: boolean } = {}
): AssistantMessage {
  return {
    kind: 'assistant',
    id,
    model: options.model,
    content: '',
    reasoning: '',
    toolCalls: [],
    status: 'streaming',
    routingRequested: options.routingRequested ?? false,
    ...(options.routingPossible ? { routingPossible: true } : {}),
    timing: { start: now },
    reasoningDeltas: 0,
    contentDeltas: 0
  };
}

/** Fold one stream chunk into the message. */
export function applyChunk(message: AssistantMessage, chunk: ChatCompletionChunk, now: number): AssistantMessage {
  const next: AssistantMessage = { ...message, timing: { ...message.timing } };
  if (chunk.id && !next.completionId) {
    next.completionId = chunk.id;
  }
  if (chunk.model && !next.model) {
    next.model = chunk.model;
  }
  if (chunk.usage) {
    next.usage = chunk.usage;
  }
  const choice = chunk.choices?.[0];
  if (!choice) {
    return next;
  }
  const delta = choice.delta ?? {};
  const reasoning = delta.reasoning_content ?? '';
  const content = delta.content ?? '';
  const toolDeltas = delta.tool_calls ?? [];
  if (reasoning || content || toolDeltas.length) {
    next.timing.firstToken ??= now;
  }
  if (reasoning) {
    next.timing.reasoningStart ??= now;
    next.reasoning += reasoning;
    next.reasoningDeltas += 1;
  }
  if ((content || toolDeltas.length) && next.timing.reasoningStart !== undefined) {
    // The answer (or a tool call) started: thinking is over.
    next.timing.reasoningEnd ??= now;
  }
  if (content) {
    next.content += content;
    next.contentDeltas += 1;
  }
  if (toolDeltas.length) {
    const calls = next.toolCalls.map(call => ({ ...call, function: { ...call.function } }));
    for (const td of toolDeltas) {
      let call = calls[td.index];
      if (!call) {
        call = { id: '', type: 'function', function: { name: '', arguments: '' } };
        calls[td.index] = call;
      }
      if (td.id) {
        call.id = td.id;
      }
      if (td.function?.name) {
        call.function.name += td.function.name;
      }
      if (td.function?.arguments) {
        call.function.arguments += td.function.arguments;
      }
    }
    next.toolCalls = calls;
  }
  if (choice.finish_reason) {
    next.finishReason = choice.finish_reason;
  }
  return next;
}

/** Close the message: the stream ended, was stopped by the user, or failed. */
export function finishMessage(
  message: AssistantMessage,
  now: number,
  status: Exclude<AssistantStatus, 'streaming'>,
  error?: string
): AssistantMessage {
  const timing = { ...message.timing, end: message.timing.end ?? now };
  if (timing.reasoningStart !== undefined && timing.reasoningEnd === undefined) {
    timing.reasoningEnd = now;
  }
  // Calls that never got an id (some servers omit it) still need one to pair with their results.
  const toolCalls = message.toolCalls
    .filter(call => call !== undefined)
    .map((call, i) => (call.id ? call : { ...call, id: `call_${message.id}_${i}` }));
  return { ...message, status, error, timing, toolCalls };
}

/** Seconds spent thinking so far (live while reasoning streams, fixed once it ended). */
export function thinkingSeconds(message: AssistantMessage, now: number): number {
  const { reasoningStart, reasoningEnd } = message.timing;
  if (reasoningStart === undefined) {
    return 0;
  }
  return Math.max(0, ((reasoningEnd ?? now) - reasoningStart) / 1000);
}

export function isThinking(message: AssistantMessage): boolean {
  return message.status === 'streaming' && message.timing.reasoningStart !== undefined &&
    message.timing.reasoningEnd === undefined;
}

/** Reasoning tokens: the server's count when it sends one, else the number of reasoning deltas. */
export function reasoningTokens(message: AssistantMessage): number {
  return message.usage?.completion_tokens_details?.reasoning_tokens ?? message.reasoningDeltas;
}

/** Generated tokens: the server's usage when present, else counted deltas. */
export function completionTokens(message: AssistantMessage): number {
  return message.usage?.completion_tokens ?? message.reasoningDeltas + message.contentDeltas;
}

/**
 * Decode speed, or null while there is too little to measure.
 *
 * The server's own clock when it sends one (`usage.decode_seconds`, first generated token to the last: the
 * workbench's engine does), so every client shows the same figure. Otherwise the whole request as the browser
 * saw it: a slower figure, never an inflated one (tokens that arrive in one burst after a silent wait would
 * make the first-to-last window tiny: "22000 tok/s").
 */
export function tokensPerSecond(message: AssistantMessage): number | null {
  const tokens = completionTokens(message);
  const decode = message.usage?.decode_seconds;
  if (typeof decode === 'number') {
    // The first token ends the prompt's time and starts the window, so it is not counted inside it.
    return decode > 0 && tokens >= 2 ? (tokens - 1) / decode : null;
  }
  const { start, end } = message.timing;
  if (end === undefined || end <= start || tokens < 2) {
    return null;
  }
  return tokens / ((end - start) / 1000);
}

/** Tokens the conversation holds after this answer (prompt + completion, the server's counts), if known. */
export function contextTokens(message: AssistantMessage): number | null {
  return message.usage ? message.usage.prompt_tokens + message.usage.completion_tokens : null;
}

/** The answer stopped at its token limit (max_tokens, or the end of the context). */
export function isCutOff(message: AssistantMessage): boolean {
  return message.status === 'done' && message.finishReason === 'length';
}

/** One piece of an answer's text: prose, or a tool call the server could not use, shown as such. */
export type AnswerPart = { kind: 'text'; text: string } | { kind: 'unusable-call'; name: string; args: string };

const CALL_BLOCK = /<tool_call>([\s\S]*?)(?:<\/tool_call>|$)/g;
const STRAY_MARKUP = /<\/?(?:tool_call|arg_key|arg_value)>/g;

/** `name(key=value, ...)` from the text of a call block, however malformed. */
function describeCall(body: string): { name: string; args: string } {
  const name = body.trim().split(/[\s<]/)[0] || '?';
  const args: string[] = [];
  const pair = /<arg_key>([\s\S]*?)<\/arg_key>\s*<arg_value>([\s\S]*?)(?:<\/arg_value>|$)/g;
  for (const m of body.matchAll(pair)) {
    const value = m[2].trim();
    args.push(`${m[1].trim()}=${value.length > 60 ? `${value.slice(0, 57)}...` : value}`);
  }
  return { name, args: args.join(', ') };
}

/**
 * Split an answer into prose and the tool calls the server passed on as text (a call to a tool that was not
 * offered, a malformed one, one cut off by the token limit: GLM's format says they stay text), so that the
 * sidebar shows them as "unusable tool call", never as raw `<tool_call>` markup; stray markup is dropped.
 */
export function answerParts(content: string): AnswerPart[] {
  const parts: AnswerPart[] = [];
  let last = 0;
  const pushText = (text: string) => {
    const clean = text.replace(STRAY_MARKUP, '');
    if (clean.trim()) {
      parts.push({ kind: 'text', text: clean });
    }
  };
  for (const m of content.matchAll(CALL_BLOCK)) {
    pushText(content.slice(last, m.index));
    parts.push({ kind: 'unusable-call', ...describeCall(m[1]) });
    last = m.index! + m[0].length;
  }
  pushText(content.slice(last));
  return parts;
}

/** Reasoning as shown: tool-call markup a model wrote there is dropped (the text between the tags stays). */
export function visibleReasoning(reasoning: string): string {
  return reasoning.replace(STRAY_MARKUP, '');
}

/** The user's text with its context blocks, as the model sees it. */
export function userContent(message: UserMessage): string {
  if (!message.context.length) {
    return message.text;
  }
  const blocks = message.context.map(block => `${block.label}:\n${block.text}`);
  return `${blocks.join('\n\n')}\n\n${message.text}`;
}

/**
 * The conversation as API messages. Stopped or failed answers are sent with what they produced
 * (the user saw it); tool results are sent only once settled, and unsettled calls are dropped together
 * with their results so the model never sees a call without an answer.
 */
export function toApiMessages(messages: Message[], systemPrompt?: string): ApiMessage[] {
  const out: ApiMessage[] = [];
  if (systemPrompt) {
    out.push({ role: 'system', content: systemPrompt });
  }
  const settled = new Set(
    messages
      .filter((m): m is ToolMessage => m.kind === 'tool' && isSettled(m.status))
      .map(m => m.call.id)
  );
  for (const message of messages) {
    if (message.kind === 'user') {
      out.push({ role: 'user', content: userContent(message) });
    } else if (message.kind === 'assistant') {
      if (message.status === 'error' && !message.content && !message.toolCalls.length) {
        continue;
      }
      const api: ApiMessage = { role: 'assistant', content: message.content };
      if (message.reasoning) {
        api.reasoning_content = message.reasoning;
      }
      const calls = message.toolCalls.filter(call => settled.has(call.id));
      if (calls.length) {
        api.tool_calls = calls;
      }
      out.push(api);
    } else if (settled.has(message.call.id)) {
      out.push({ role: 'tool', tool_call_id: message.call.id, content: message.result ?? '' });
    }
  }
  return out;
}

export function isSettled(status: ToolStatus): boolean {
  return status === 'done' || status === 'rejected' || status === 'error';
}

/** A short title from the first user message. */
export function conversationTitle(messages: Message[]): string {
  const first = messages.find((m): m is UserMessage => m.kind === 'user');
  if (!first) {
    return 'New conversation';
  }
  const line = first.text.trim().split('\n')[0] ?? '';
  return line.length > 60 ? `${line.slice(0, 57)}...` : line || 'New conversation';
}

/** Drop the last answer (and what followed the last user message) so it can be generated again. */
export function messagesForRegenerate(messages: Message[]): Message[] {
  let lastUser = -1;
  messages.forEach((m, i) => {
    if (m.kind === 'user') {
      lastUser = i;
    }
  });
  return lastUser === -1 ? messages : messages.slice(0, lastUser + 1);
}
