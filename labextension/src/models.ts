/**
 * The model list as the sidebar shows it: models grouped by provider with their capabilities, prices and
 * state, and the money figures of answers and conversations ("$0.00046", "¥0.0012", "free").
 *
 * Pure functions over the wire types of `glm/v1/models` (each model's `workbench` fields), `glm/api/status`
 * (`providers`) and `usage.cost`; no DOM, no JupyterLab, so they are unit-tested directly. A server that sends
 * bare model cards (an older workbench, vLLM, any OpenAI-compatible server) gives one group whose models'
 * capabilities are unknown (null), never "none".
 */

import type { Message } from './chatState';
import type { Cost, ModelCapability, ModelInfo, Prices, ProviderStatus, ServerStatus } from './protocol';

export const CAPABILITIES: readonly ModelCapability[] = ['thinking', 'tools', 'routing', 'thinking_budget'];

/** One entry of the model picker. */
export interface ModelEntry {
  id: string;
  /** The name within its provider (the id without the `provider/` prefix). */
  name: string;
  /** What the model can do; null when the server does not say (bare model cards). */
  capabilities: ModelCapability[] | null;
  /** "free", "$0.2 in · $1.1 out per M tokens", or null when not priced (the local engine) or unknown. */
  price: string | null;
  contextLength: number | null;
  state: string;
  /** Why the model cannot be chosen now (the key variable to set, the provider's last error); null when it can. */
  unavailable: string | null;
}

/** The models of one provider. */
export interface ModelGroup {
  /** null for a server without workbench fields (one group, no provider names). */
  provider: string | null;
  kind: string | null;
  /** What is wrong with the whole provider (its key is missing, it is unreachable); null when ready. */
  problem: string | null;
  models: ModelEntry[];
}

const CURRENCY_SYMBOLS: Record<string, string> = { USD: '$', CNY: '¥', RMB: '¥', EUR: '€', GBP: '£' };

/** The capabilities a model card names, or null when it has no workbench fields. */
export function modelCapabilities(model: ModelInfo | undefined): ModelCapability[] | null {
  const caps = model?.workbench?.capabilities;
  if (!Array.isArray(caps)) {
    return null;
  }
  return CAPABILITIES.filter(c => caps.includes(c));
}

/** Whether the model has a capability: true, false, or null when the server does not say. */
export function hasCapability(model: ModelInfo | undefined, capability: ModelCapability): boolean | null {
  const caps = modelCapabilities(model);
  return caps === null ? null : caps.includes(capability);
}

/** A number as people write prices: at most 4 significant digits, no trailing zeros (0.2, 1.1, 0.0375). */
function plainNumber(value: number): string {
  return String(Number(value.toPrecision(4)));
}

function withCurrency(amount: string, currency: string): string {
  const symbol = CURRENCY_SYMBOLS[currency.toUpperCase()];
  return symbol ? `${symbol}${amount}` : `${amount} ${currency}`;
}

/** "free", or "$0.2 in · $1.1 out per M tokens" (per_tokens 1 000 000; "per 1K tokens" for 1000). */
export function formatPrices(prices: Prices | null | undefined, free = false): string | null {
  if (free) {
    return 'free';
  }
  if (!prices || typeof prices.input !== 'number' || typeof prices.output !== 'number') {
    return null;
  }
  if (prices.input === 0 && prices.output === 0) {
    return 'free';
  }
  const per = prices.per_tokens || 1_000_000;
  const unit = per === 1_000_000 ? 'M' : per === 1000 ? '1K' : per.toLocaleString('en-US');
  const currency = prices.currency || 'USD';
  return (
    `${withCurrency(plainNumber(prices.input), currency)} in · ` +
    `${withCurrency(plainNumber(prices.output), currency)} out per ${unit} tokens`
  );
}

/**
 * An amount of money small enough to be a request's cost, with two significant digits below one unit
 * ("$0.00046", "¥0.0012") and cents above ("$1.25"); zero is "free".
 */
export function formatMoney(amount: number, currency: string): string {
  if (!(amount > 0)) {
    return 'free';
  }
  if (amount >= 1) {
    return withCurrency(amount.toFixed(2), currency);
  }
  const digits = Math.min(10, Math.max(2, 1 - Math.floor(Math.log10(amount))));
  return withCurrency(amount.toFixed(digits), currency);
}

/** One answer's cost as shown under it, or null when the answer carries none (the local engine). */
export function formatCost(cost: Cost | null | undefined): string | null {
  if (!cost || typeof cost.total !== 'number') {
    return null;
  }
  return formatMoney(cost.total, cost.currency || 'USD');
}

/** The conversation's cost so far: each currency's total ("$0.0012", "$0.0012 + ¥0.004"); "free" when every
 * priced answer was free; null when no answer carried a cost. */
export function conversationCost(messages: Message[]): string | null {
  const totals = new Map<string, number>();
  for (const m of messages) {
    const cost = m.kind === 'assistant' ? m.usage?.cost : undefined;
    if (cost && typeof cost.total === 'number') {
      const currency = cost.currency || 'USD';
      totals.set(currency, (totals.get(currency) ?? 0) + cost.total);
    }
  }
  if (!totals.size) {
    return null;
  }
  const paid = [...totals].filter(([, total]) => total > 0);
  return paid.length ? paid.map(([currency, total]) => formatMoney(total, currency)).join(' + ') : 'free';
}

/**
 * Why a provider in this state cannot answer now, or null when it can: ready, loading, idle (an engine that loads
 * when first asked) and states this sidebar does not know yet are left to the server to answer or refuse.
 */
export function providerProblem(state: string | undefined, provider: ProviderStatus | undefined): string | null {
  switch (state) {
    case 'key_missing':
      return provider?.key_env ? `set ${provider.key_env}` : (provider?.error ?? 'its API key is not set');
    case 'unreachable':
      return provider?.error ? `unreachable: ${provider.error}` : 'unreachable';
    case 'error':
      return provider?.error ?? 'error: see the Jupyter server log';
    default:
      return null;
  }
}

/** The model's id without its provider's prefix (`zai/glm-4.5-air` → `glm-4.5-air`). */
export function modelName(model: ModelInfo): string {
  const provider = model.workbench?.provider;
  if (model.workbench?.model) {
    return model.workbench.model;
  }
  return provider && model.id.startsWith(`${provider}/`) ? model.id.slice(provider.length + 1) : model.id;
}

function entry(model: ModelInfo, provider: ProviderStatus | undefined): ModelEntry {
  const wb = model.workbench;
  const context = wb?.context_length ?? model.max_model_len ?? model.context_length ?? null;
  const state = wb?.state ?? provider?.state ?? 'ready';
  return {
    id: model.id,
    name: modelName(model),
    capabilities: modelCapabilities(model),
    price: wb ? formatPrices(wb.prices, wb.free) : null,
    contextLength: typeof context === 'number' && context > 0 ? context : null,
    state,
    unavailable: providerProblem(state, provider)
  };
}

/**
 * The picker's groups: one per provider in the server's order (local first), each model with what it can do
 * and cost; providers the status lists without models (a key not set) get an empty group that says why.
 * Models without workbench fields go in one group of their own (provider null).
 */
export function groupModels(models: ModelInfo[], status: ServerStatus | null): ModelGroup[] {
  const providers = new Map((status?.providers ?? []).map(p => [p.name, p]));
  const groups = new Map<string | null, ModelGroup>();
  for (const model of models) {
    const name = model.workbench?.provider ?? null;
    let group = groups.get(name);
    if (!group) {
      const provider = name === null ? undefined : providers.get(name);
      group = {
        provider: name,
        kind: model.workbench?.provider_kind ?? provider?.kind ?? null,
        problem: providerProblem(provider?.state, provider),
        models: []
      };
      groups.set(name, group);
    }
    group.models.push(entry(model, name === null ? undefined : providers.get(name)));
  }
  for (const provider of providers.values()) {
    if (!groups.has(provider.name)) {
      groups.set(provider.name, {
        provider: provider.name,
        kind: provider.kind ?? null,
        problem: providerProblem(provider.state, provider) ?? 'no models listed',
        models: []
      });
    }
  }
  return [...groups.values()];
}

/** A model the user can choose now: the current one while it stays usable, else the first usable one. */
export function usableModel(models: ModelInfo[], status: ServerStatus | null, current: string): string {
  const entries = groupModels(models, status).flatMap(g => g.models);
  const usable = entries.filter(e => e.unavailable === null);
  if (usable.some(e => e.id === current)) {
    return current;
  }
  return usable[0]?.id ?? entries[0]?.id ?? '';
}

/** The picker's text for a model: its name (and `tag`, e.g. "10M demo"), capabilities and price, or why it
 * cannot be chosen. */
export function modelOptionText(model: ModelEntry, tag?: string): string {
  const name = tag ? `${model.name} · ${tag}` : model.name;
  if (model.unavailable) {
    return `${name} · ${model.unavailable}`;
  }
  const parts = [name];
  if (model.capabilities?.length) {
    parts.push(model.capabilities.join(', '));
  }
  if (model.price) {
    parts.push(model.price);
  }
  if (model.state === 'loading') {
    parts.push('loading');
  } else if (model.state === 'idle') {
    parts.push('loads when first asked');
  }
  return parts.join(' · ');
}
