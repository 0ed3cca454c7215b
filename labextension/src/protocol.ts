/**
 * Wire types of the server API the sidebar talks to: OpenAI chat completions with GLM's additions
 * (`reasoning_content`, `thinking`, the workbench's `routing` flag), the model list, the status and
 * routing endpoints and the conversation store. Types only; no behaviour.
 */

export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

export type ChatRole = 'system' | 'user' | 'assistant' | 'tool';

/** A message as the API takes it. */
export interface ApiMessage {
  role: ChatRole;
  content: string | null;
  reasoning_content?: string;
  tool_calls?: ToolCall[];
  tool_call_id?: string;
}

export interface ToolDefinition {
  type: 'function';
  function: { name: string; description: string; parameters: Record<string, unknown> };
}

export type ThinkingMode = 'auto' | 'on' | 'off';

export interface ChatCompletionRequest {
  model: string;
  messages: ApiMessage[];
  stream: true;
  stream_options?: { include_usage: boolean };
  /** budget_tokens: most reasoning tokens (models with the `thinking_budget` capability). */
  thinking?: { type: 'enabled' | 'disabled'; budget_tokens?: number };
  routing?: boolean;
  tools?: ToolDefinition[];
  tool_choice?: 'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } };
  max_tokens?: number;
  temperature?: number;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  completion_tokens_details?: { reasoning_tokens?: number };
  /** The workbench's local engine: request arrival to first token (queue and prefill), in seconds. */
  prompt_seconds?: number;
  /** The workbench's local engine: first generated token to the last, in seconds. */
  decode_seconds?: number;
  /** What the request cost, where the model is priced (zeros for a free model; absent for the local engine). */
  cost?: Cost;
}

export interface Cost {
  input: number;
  output: number;
  total: number;
  /** ISO 4217 code, e.g. USD, CNY. */
  currency: string;
}

export interface ToolCallDelta {
  index: number;
  id?: string;
  type?: 'function';
  function?: { name?: string; arguments?: string };
}

export interface ChatCompletionChunk {
  id: string;
  object?: string;
  model?: string;
  created?: number;
  choices: Array<{
    index: number;
    delta: {
      role?: ChatRole;
      content?: string | null;
      reasoning_content?: string | null;
      tool_calls?: ToolCallDelta[];
    };
    finish_reason?: string | null;
  }>;
  usage?: Usage | null;
}

/** thinking_budget: `thinking.budget_tokens` is honoured (local engines, OpenRouter, a workbench listing it). */
export type ModelCapability = 'thinking' | 'tools' | 'routing' | 'thinking_budget';

/** `idle`: a second local engine, loaded when first asked. */
export type ProviderState = 'ready' | 'loading' | 'idle' | 'unreachable' | 'key_missing' | 'error';

export interface Prices {
  /** Price of `per_tokens` input tokens. */
  input: number;
  output: number;
  currency: string;
  per_tokens: number;
}

/** The workbench's own fields of a model card (absent on other servers and older workbenches). */
export interface WorkbenchModelFields {
  provider: string;
  provider_kind?: 'local' | 'openai' | 'workbench' | string;
  dialect?: string | null;
  /** The name the provider itself uses. */
  model?: string;
  context_length?: number | null;
  capabilities?: string[];
  /** null: not priced (the local engine) or unknown. */
  prices?: Prices | null;
  free?: boolean;
  state?: ProviderState | string;
}

export interface ModelInfo {
  id: string;
  object?: string;
  owned_by?: string;
  /** Context length, as vLLM (`max_model_len`) or other servers name it. */
  max_model_len?: number;
  context_length?: number;
  workbench?: WorkbenchModelFields;
}

/** One provider in `glm/api/status` (never a key's value: the variable's name at most). */
export interface ProviderStatus {
  name: string;
  kind?: string;
  dialect?: string | null;
  state?: ProviderState | string;
  models?: string[];
  key_env?: string | null;
  error?: string | null;
}

export interface ServerStatus {
  backend?: string;
  model?: string;
  device?: string;
  state?: string;
  ready?: boolean;
  providers?: ProviderStatus[];
  [key: string]: unknown;
}

/** `RoutingTrace.to_dict()` of workbench/engine/routing.py, plus decoded token texts when the server adds them. */
export interface RoutingData {
  expert_ids: number[][][]; // [L][T][K]
  weights: number[][][]; // [L][T][K]
  token_ids: number[]; // [T]
  layer_ids: number[]; // [L]
  num_experts: number;
  top_k: number;
  prompt_len: number;
  tokens?: string[];
  meta?: Record<string, unknown>;
}
