import { describe, expect, it } from 'vitest';
import {
  answerParts,
  applyChunk,
  completionTokens,
  contextTokens,
  conversationTitle,
  finishMessage,
  isCutOff,
  isThinking,
  type Message,
  messagesForRegenerate,
  newAssistantMessage,
  reasoningTokens,
  thinkingSeconds,
  toApiMessages,
  tokensPerSecond,
  visibleReasoning
} from '../src/chatState';
import type { ChatCompletionChunk } from '../src/protocol';

const delta = (d: ChatCompletionChunk['choices'][0]['delta'], extra: Partial<ChatCompletionChunk> = {}) =>
  ({ id: 'chatcmpl-42', model: 'glm-tiny', choices: [{ index: 0, delta: d }], ...extra }) as ChatCompletionChunk;

describe('assistant message state', () => {
  it('separates reasoning from content and times the thinking', () => {
    let m = newAssistantMessage('a1', 1000, { routingRequested: true });
    m = applyChunk(m, delta({ role: 'assistant' }), 1000);
    expect(m.timing.firstToken).toBeUndefined();
    m = applyChunk(m, delta({ reasoning_content: 'Let me ' }), 1200);
    m = applyChunk(m, delta({ reasoning_content: 'think.' }), 1500);
    expect(isThinking(m)).toBe(true);
    expect(thinkingSeconds(m, 4400)).toBeCloseTo(3.2); // live timer runs on the clock
    m = applyChunk(m, delta({ content: 'Hi' }), 6300);
    m = applyChunk(m, delta({ content: '!' }), 6400);
    expect(isThinking(m)).toBe(false);
    expect(thinkingSeconds(m, 99999)).toBeCloseTo(5.1); // fixed once the answer started
    expect(m.reasoning).toBe('Let me think.');
    expect(m.content).toBe('Hi!');
    expect(m.completionId).toBe('chatcmpl-42');
    expect(m.model).toBe('glm-tiny');
    expect(reasoningTokens(m)).toBe(2);
    expect(completionTokens(m)).toBe(4);
  });

  it('does not mutate the message it was given', () => {
    const m = newAssistantMessage('a1', 0);
    const next = applyChunk(m, delta({ content: 'x' }), 5);
    expect(m.content).toBe('');
    expect(m.timing.firstToken).toBeUndefined();
    expect(next).not.toBe(m);
  });

  it('assembles tool calls from deltas by index', () => {
    let m = newAssistantMessage('a1', 0);
    m = applyChunk(m, delta({ tool_calls: [{ index: 0, id: 'call_a', type: 'function', function: { name: 'insert_cell', arguments: '' } }] }), 1);
    m = applyChunk(m, delta({ tool_calls: [{ index: 1, id: 'call_b', function: { name: 'run_', arguments: '{"ind' } }] }), 2);
    m = applyChunk(m, delta({ tool_calls: [{ index: 0, function: { arguments: '{"source": "1+1"}' } }] }), 3);
    m = applyChunk(m, delta({ tool_calls: [{ index: 1, function: { name: 'cell', arguments: 'ex": 0}' } }] }), 4);
    m = applyChunk(m, { id: 'chatcmpl-42', choices: [{ index: 0, delta: {}, finish_reason: 'tool_calls' }] }, 5);
    expect(m.toolCalls).toEqual([
      { id: 'call_a', type: 'function', function: { name: 'insert_cell', arguments: '{"source": "1+1"}' } },
      { id: 'call_b', type: 'function', function: { name: 'run_cell', arguments: '{"index": 0}' } }
    ]);
    expect(m.finishReason).toBe('tool_calls');
  });

  it('gives id-less tool calls an id when the message ends', () => {
    let m = newAssistantMessage('a7', 0);
    m = applyChunk(m, delta({ tool_calls: [{ index: 0, function: { name: 'list_variables', arguments: '{}' } }] }), 1);
    m = finishMessage(m, 2, 'done');
    expect(m.toolCalls[0].id).toBe('call_a7_0');
  });

  it('prefers server usage for token counts and measures tok/s from the first token', () => {
    let m = newAssistantMessage('a1', 0);
    m = applyChunk(m, delta({ content: 'a' }), 1000);
    m = applyChunk(m, delta({ content: 'b' }), 1500);
    m = applyChunk(m, { id: 'chatcmpl-42', choices: [], usage: { prompt_tokens: 5, completion_tokens: 21, total_tokens: 26, completion_tokens_details: { reasoning_tokens: 7 } } }, 1900);
    m = finishMessage(m, 3000, 'done');
    expect(completionTokens(m)).toBe(21);
    expect(reasoningTokens(m)).toBe(7);
    // no decode time from the server: the whole request as the browser saw it (21 tokens in 3 s), never the
    // first-to-last window of a burst
    expect(tokensPerSecond(m)).toBeCloseTo(7);
  });

  it("takes tok/s from the server's decode seconds when it sends them", () => {
    let m = newAssistantMessage('a1', 0);
    // the whole answer arrives in one burst after a long silence: the browser's window would say 22000 tok/s
    m = applyChunk(m, delta({ content: 'a b c' }), 940);
    m = applyChunk(m, delta({ content: ' d' }), 941);
    m = applyChunk(m, { id: 'c', choices: [], usage: { prompt_tokens: 5, completion_tokens: 23, total_tokens: 28, prompt_seconds: 0.1, decode_seconds: 0.8 } }, 941);
    m = finishMessage(m, 942, 'done');
    expect(tokensPerSecond(m)).toBeCloseTo(22 / 0.8);
    expect(contextTokens(m)).toBe(28);
  });

  it('gives no rate for a one-token answer timed by the server', () => {
    let m = newAssistantMessage('a1', 0);
    m = applyChunk(m, { id: 'c', choices: [], usage: { prompt_tokens: 5, completion_tokens: 1, total_tokens: 6, decode_seconds: 0 } }, 5);
    m = finishMessage(m, 10, 'done');
    expect(tokensPerSecond(m)).toBeNull();
  });

  it('says an answer was cut off only when it ended at its token limit', () => {
    let m = newAssistantMessage('a1', 0);
    m = applyChunk(m, delta({ content: 'half' }), 1);
    m = applyChunk(m, { id: 'c', choices: [{ index: 0, delta: {}, finish_reason: 'length' }] }, 2);
    expect(isCutOff(finishMessage(m, 3, 'done'))).toBe(true);
    expect(isCutOff(finishMessage(m, 3, 'stopped'))).toBe(false);
  });

  it('ends thinking when the stream ends inside reasoning (stopped)', () => {
    let m = newAssistantMessage('a1', 0);
    m = applyChunk(m, delta({ reasoning_content: 'hmm' }), 100);
    m = finishMessage(m, 2100, 'stopped');
    expect(isThinking(m)).toBe(false);
    expect(thinkingSeconds(m, 50000)).toBeCloseTo(2.0);
    expect(tokensPerSecond(m)).toBeNull();
  });
});

describe('conversation to API messages', () => {
  const base: Message[] = [
    { kind: 'user', id: 'u1', text: 'Fix this', context: [{ label: 'Active cell [2]', text: 'print(x' }] }
  ];

  it('puts context before the user text and keeps reasoning', () => {
    let a = newAssistantMessage('a1', 0);
    a = applyChunk(a, delta({ reasoning_content: 'r' }), 1);
    a = applyChunk(a, delta({ content: 'Done.' }), 2);
    a = finishMessage(a, 3, 'done');
    const api = toApiMessages([...base, a], 'You are helpful.');
    expect(api).toEqual([
      { role: 'system', content: 'You are helpful.' },
      { role: 'user', content: 'Active cell [2]:\nprint(x\n\nFix this' },
      { role: 'assistant', content: 'Done.', reasoning_content: 'r' }
    ]);
  });

  it('sends only settled tool calls with their results', () => {
    let a = newAssistantMessage('a1', 0);
    a = applyChunk(a, delta({ tool_calls: [
      { index: 0, id: 'c1', function: { name: 'list_variables', arguments: '{}' } },
      { index: 1, id: 'c2', function: { name: 'run_cell', arguments: '{"index":0}' } }
    ] }), 1);
    a = finishMessage(a, 2, 'done');
    const messages: Message[] = [
      ...base,
      a,
      { kind: 'tool', id: 't1', call: a.toolCalls[0], status: 'done', autoApproved: true, result: 'x: int' },
      { kind: 'tool', id: 't2', call: a.toolCalls[1], status: 'pending', autoApproved: false }
    ];
    const api = toApiMessages(messages);
    expect(api[1].tool_calls?.map(c => c.id)).toEqual(['c1']);
    expect(api[2]).toEqual({ role: 'tool', tool_call_id: 'c1', content: 'x: int' });
    expect(api).toHaveLength(3);
  });

  it('drops failed answers that produced nothing', () => {
    const failed = finishMessage(newAssistantMessage('a1', 0), 1, 'error', 'boom');
    expect(toApiMessages([...base, failed])).toHaveLength(1);
  });

  it('titles a conversation by its first line and cuts for regenerate', () => {
    const a = finishMessage(newAssistantMessage('a1', 0), 1, 'done');
    expect(conversationTitle([...base, a])).toBe('Fix this');
    expect(conversationTitle([])).toBe('New conversation');
    expect(messagesForRegenerate([...base, a])).toEqual(base);
  });
});

describe('tool-call markup in what the model wrote', () => {
  it('shows calls the server passed on as text as unusable calls, never as tags', () => {
    const parts = answerParts(
      'Sure.\n<tool_call>factorial\n<arg_key>n</arg_key>\n<arg_value>5</arg_value>\n</tool_call>\nDone</arg_value>'
    );
    expect(parts).toEqual([
      { kind: 'text', text: 'Sure.\n' },
      { kind: 'unusable-call', name: 'factorial', args: 'n=5' },
      { kind: 'text', text: '\nDone' }
    ]);
  });

  it('handles a call cut off by the token limit and stray markup in the reasoning', () => {
    expect(answerParts('<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par')).toEqual([
      { kind: 'unusable-call', name: 'get_weather', args: 'city=Par' }
    ]);
    expect(visibleReasoning('The user asks</arg_value>\n<arg_key>width</arg_key>')).toBe('The user asks\nwidth');
    expect(answerParts('Use `a < b` and <b>bold</b>.')).toEqual([{ kind: 'text', text: 'Use `a < b` and <b>bold</b>.' }]);
  });
});
