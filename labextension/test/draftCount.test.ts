/** The context meter's count of the draft: debounced, stale counts cancelled, silent fallback where the server
 * cannot count (draftCount.ts), and the request ChatModel.setDraft asks it to count. */

import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

import type { WorkbenchClient } from '../src/api';
import { ChatModel, DEFAULT_PREFERENCES } from '../src/chatModel';
import { type Draft, DRAFT_COUNT_DELAY_MS, DraftCounter } from '../src/draftCount';
import { WorkbenchError } from '../src/errors';
import type { ChatCompletionRequest } from '../src/protocol';

const ask = (model: string, text: string): Draft => ({
  model,
  build: () => ({ model, messages: [{ role: 'user', content: text }], stream: true })
});

/** A count function whose answers the test releases one by one. */
function fakeCount() {
  const calls: Array<{ request: ChatCompletionRequest; signal: AbortSignal; answer(n: number): void; fail(e: unknown): void }> =
    [];
  const count = (request: ChatCompletionRequest, signal: AbortSignal) =>
    new Promise<number>((resolve, reject) => calls.push({ request, signal, answer: resolve, fail: reject }));
  return { calls, count };
}

describe('DraftCounter', () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it('counts once typing pauses, only the latest draft', async () => {
    const { calls, count } = fakeCount();
    const shown: Array<number | null> = [];
    const counter = new DraftCounter(count, tokens => shown.push(tokens));
    counter.update(ask('m', 'H'));
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS - 100);
    counter.update(ask('m', 'He'));
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS - 100);
    counter.update(ask('m', 'Hello'));
    expect(calls).toHaveLength(0); // still typing: nothing asked
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS);
    expect(calls.map(c => c.request.messages[0].content)).toEqual(['Hello']);
    calls[0].answer(42);
    await vi.runAllTimersAsync();
    expect(shown).toEqual([42]);
  });

  it('cancels a count under way when the draft changes, and drops its late answer', async () => {
    const { calls, count } = fakeCount();
    const shown: Array<number | null> = [];
    const counter = new DraftCounter(count, tokens => shown.push(tokens));
    counter.update(ask('m', 'first'));
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS);
    counter.update(ask('m', 'first, longer'));
    expect(calls[0].signal.aborted).toBe(true);
    calls[0].answer(10); // the stale answer arrives anyway
    await vi.runAllTimersAsync();
    calls[1].answer(20);
    await vi.runAllTimersAsync();
    expect(shown).toEqual([20]);
    counter.update(null); // the draft was sent or cleared: back to the usage
    expect(shown).toEqual([20, null]);
  });

  it('falls back silently where the server cannot count (400/404), and stops asking for that model', async () => {
    const { calls, count } = fakeCount();
    const shown: Array<number | null> = [];
    const counter = new DraftCounter(count, tokens => shown.push(tokens));
    counter.update(ask('zai/glm-4.5-air', 'a'));
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS);
    calls[0].fail(new WorkbenchError('bad-request', 'no tokenizer for this provider', 400));
    await vi.runAllTimersAsync();
    expect(shown).toEqual([null]);
    counter.update(ask('zai/glm-4.5-air', 'ab'));
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS * 2);
    expect(calls).toHaveLength(1); // not asked again for that model
    counter.update(ask('local/glm45-air-mini', 'ab'));
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS);
    expect(calls).toHaveLength(2); // another model still is
    calls[1].fail(new WorkbenchError('backend', 'Backend error (HTTP 502)', 502));
    await vi.runAllTimersAsync();
    counter.update(ask('local/glm45-air-mini', 'abc'));
    vi.advanceTimersByTime(DRAFT_COUNT_DELAY_MS);
    expect(calls).toHaveLength(3); // a passing failure: asked again on the next change
  });
});

describe('ChatModel.setDraft', () => {
  it('counts the request sending the draft would make, and shows the count in state.draftTokens', async () => {
    const counted: ChatCompletionRequest[] = [];
    let refuse = false;
    const client = {
      models: async () => [{ id: 'glm-tiny' }],
      status: async () => ({ backend: 'local' }),
      listConversations: async () => [],
      countTokens: async (request: ChatCompletionRequest) => {
        counted.push(request);
        if (refuse) {
          throw new WorkbenchError('bad-request', 'cannot count', 400);
        }
        return 77;
      }
    };
    let collected = 0;
    const bridge = {
      collectContext: () => {
        collected += 1;
        return [];
      },
      runTool: async () => ''
    };
    const model = new ChatModel(client as unknown as WorkbenchClient, bridge, DEFAULT_PREFERENCES);
    await model.refresh();
    vi.useFakeTimers();
    try {
      model.setDraft('How long');
      model.setDraft('How long is this?');
      expect(collected).toBe(0); // typing never waits on the notebook's context: read once the pause comes
      await vi.advanceTimersByTimeAsync(DRAFT_COUNT_DELAY_MS);
      expect(collected).toBe(1);
      expect(counted).toHaveLength(1);
      expect(counted[0].model).toBe('glm-tiny');
      expect(counted[0].messages.at(-1)).toMatchObject({ role: 'user', content: 'How long is this?' });
      expect(counted[0].tools?.length).toBeGreaterThan(0);
      expect(model.state.draftTokens).toBe(77);
      refuse = true;
      model.setDraft('How long is this now?');
      await vi.advanceTimersByTimeAsync(DRAFT_COUNT_DELAY_MS);
      expect(model.state.draftTokens).toBeNull(); // the meter goes back to the last answer's usage
    } finally {
      vi.useRealTimers();
    }
  });
});
