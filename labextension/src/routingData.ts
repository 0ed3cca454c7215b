/**
 * Numbers behind the routing panel, computed from `RoutingTrace.to_dict()`: per-layer expert load,
 * the token x layer grid of top experts, and one token's experts in every layer; and the panel's title.
 *
 * Pure and unit-tested; the panel only hands the results to plotly.
 */

import type { Message, UserMessage } from './chatState';
import type { RoutingData } from './protocol';

export type TokenRange = 'all' | 'prompt' | 'generated';

export function checkRouting(data: RoutingData): void {
  const L = data.expert_ids?.length ?? 0;
  if (!L || data.layer_ids?.length !== L) {
    throw new Error('The routing trace has no layers, or its layer_ids do not match expert_ids.');
  }
  const T = data.token_ids?.length ?? 0;
  if (data.expert_ids.some(layer => layer.length !== T)) {
    throw new Error('The routing trace is malformed: every layer must have one row per token.');
  }
}

export function tokenIndices(data: RoutingData, range: TokenRange): number[] {
  const T = data.token_ids.length;
  const [start, stop] = range === 'prompt' ? [0, data.prompt_len] : range === 'generated' ? [data.prompt_len, T] : [0, T];
  return Array.from({ length: Math.max(0, stop - start) }, (_, i) => start + i);
}

/**
 * Expert load per layer: z[l][e] is the share of the tokens in range that layer l routed to expert e
 * (one token counts once per expert among its top-k, so each row sums to top_k).
 */
export function expertLoad(data: RoutingData, range: TokenRange): number[][] {
  const tokens = tokenIndices(data, range);
  return data.expert_ids.map(layer => {
    const counts = new Array<number>(data.num_experts).fill(0);
    for (const t of tokens) {
      for (const e of layer[t]) {
        counts[e] += 1;
      }
    }
    return counts.map(c => (tokens.length ? c / tokens.length : 0));
  });
}

/** z[l][i] = the top-1 expert of token tokens[i] in layer l. */
export function topExpertGrid(data: RoutingData, tokens: number[]): number[][] {
  return data.expert_ids.map(layer => tokens.map(t => layer[t][0]));
}

/** A readable label per token: its text when the server sent it, else its id. */
export function tokenLabels(data: RoutingData): string[] {
  return data.token_ids.map((id, t) => {
    const text = data.tokens?.[t];
    return text !== undefined ? JSON.stringify(text).slice(1, -1) || '∅' : `#${id}`;
  });
}

export interface LayerExperts {
  layer: number;
  experts: Array<{ id: number; weight: number }>;
}

/** The experts of token t in each MoE layer, highest weight first. */
export function tokenExperts(data: RoutingData, t: number): LayerExperts[] {
  return data.expert_ids.map((layer, l) => ({
    layer: data.layer_ids[l],
    experts: layer[t]
      .map((id, k) => ({ id, weight: data.weights[l]?.[t]?.[k] ?? 0 }))
      .sort((a, b) => b.weight - a.weight)
  }));
}

/** The longest tab title: about what fits a main-area tab. */
const TITLE_CHARS = 32;

/**
 * The routing tab's title and caption for the answer `completionId` in `messages`: the question it answered
 * (the user message before it), shortened to fit a tab, e.g. "Routing: Write a Python function th…".
 * Falls back to "Expert routing" when the answer is no longer in the conversation.
 */
export function routingTitle(messages: Message[], completionId: string): { label: string; caption: string } {
  const at = messages.findIndex(m => m.kind === 'assistant' && m.completionId === completionId);
  const question = messages
    .slice(0, Math.max(at, 0))
    .reverse()
    .find((m): m is UserMessage => m.kind === 'user');
  const text = at >= 0 && question ? question.text.replace(/\s+/g, ' ').trim() : '';
  if (!text) {
    return { label: 'Expert routing', caption: `Expert routing of completion ${completionId}` };
  }
  const short = text.length > TITLE_CHARS ? `${text.slice(0, TITLE_CHARS - 1).trimEnd()}…` : text;
  return { label: `Routing: ${short}`, caption: `Expert routing of the answer to: ${text}` };
}
