import { describe, expect, it } from 'vitest';
import type { RoutingData } from '../src/protocol';
import { newAssistantMessage } from '../src/chatState';
import {
  checkRouting,
  expertLoad,
  routingTitle,
  tokenExperts,
  tokenIndices,
  tokenLabels,
  topExpertGrid
} from '../src/routingData';

// 2 MoE layers (model layers 1 and 2), 3 tokens (2 prompt + 1 generated), top-2 of 4 experts.
const trace: RoutingData = {
  expert_ids: [
    [[0, 1], [0, 2], [3, 0]],
    [[2, 3], [2, 1], [1, 2]]
  ],
  weights: [
    [[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]],
    [[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]]
  ],
  token_ids: [11, 12, 13],
  layer_ids: [1, 2],
  num_experts: 4,
  top_k: 2,
  prompt_len: 2,
  tokens: ['def', ' f', '\n']
};

describe('routing panel data', () => {
  it('counts expert load per layer over a token range', () => {
    expect(expertLoad(trace, 'all')).toEqual([
      [1, 1 / 3, 1 / 3, 1 / 3],
      [0, 2 / 3, 1, 1 / 3]
    ]);
    expect(expertLoad(trace, 'generated')).toEqual([
      [1, 0, 0, 1],
      [0, 1, 1, 0]
    ]);
    for (const row of expertLoad(trace, 'prompt')) {
      expect(row.reduce((a, b) => a + b)).toBeCloseTo(trace.top_k);
    }
  });

  it('builds the token x layer grid and token ranges', () => {
    expect(tokenIndices(trace, 'prompt')).toEqual([0, 1]);
    expect(tokenIndices(trace, 'generated')).toEqual([2]);
    expect(topExpertGrid(trace, [0, 1, 2])).toEqual([
      [0, 0, 3],
      [2, 2, 1]
    ]);
  });

  it('lists one token\'s experts per layer, heaviest first', () => {
    expect(tokenExperts(trace, 2)).toEqual([
      { layer: 1, experts: [{ id: 0, weight: 0.8 }, { id: 3, weight: 0.2 }] },
      { layer: 2, experts: [{ id: 1, weight: 0.6 }, { id: 2, weight: 0.4 }] }
    ]);
  });

  it('labels tokens by text, escaping whitespace, or by id', () => {
    expect(tokenLabels(trace)).toEqual(['def', ' f', '\\n']);
    expect(tokenLabels({ ...trace, tokens: undefined })).toEqual(['#11', '#12', '#13']);
  });

  it('rejects malformed traces with a clear message', () => {
    expect(() => checkRouting({ ...trace, layer_ids: [1] })).toThrow(/layer_ids/);
    expect(() => checkRouting({ ...trace, token_ids: [1, 2] })).toThrow(/one row per token/);
    expect(() => checkRouting(trace)).not.toThrow();
  });
});

describe('routing tab title', () => {
  const user = (id: string, text: string) => ({ kind: 'user' as const, id, text, context: [] });
  const answer = (id: string, completionId: string) => ({
    ...newAssistantMessage(id, 0),
    completionId,
    status: 'done' as const
  });

  it('names the question the answer answered, shortened to fit a tab', () => {
    const messages = [
      user('u1', 'hello'),
      answer('a1', 'chatcmpl-1'),
      user('u2', 'Write a Python function that reverses a string.\nThanks'),
      answer('a2', 'chatcmpl-2')
    ];
    expect(routingTitle(messages, 'chatcmpl-1').label).toBe('Routing: hello');
    const second = routingTitle(messages, 'chatcmpl-2');
    expect(second.label).toBe('Routing: Write a Python function that re…');
    expect(second.label.length).toBeLessThanOrEqual('Routing: '.length + 32);
    expect(second.caption).toBe('Expert routing of the answer to: Write a Python function that reverses a string. Thanks');
  });

  it('falls back to a plain title when the answer is not in the conversation', () => {
    expect(routingTitle([user('u1', 'hi')], 'chatcmpl-9')).toEqual({
      label: 'Expert routing',
      caption: 'Expert routing of completion chatcmpl-9'
    });
    expect(routingTitle([answer('a1', 'chatcmpl-1')], 'chatcmpl-1').label).toBe('Expert routing');
  });
});
