import { describe, expect, it } from 'vitest';

import type { Message } from '../src/chatState';
import {
  conversationCost,
  formatCost,
  formatMoney,
  formatPrices,
  groupModels,
  hasCapability,
  modelOptionText,
  usableModel
} from '../src/models';
import type { ModelInfo, ServerStatus } from '../src/protocol';

/** GET glm/v1/models and glm/api/status as /work/notes/providers_contract.md has them: the local engine, a priced
 * OpenAI-kind provider, a free OpenRouter model, and a provider whose key is not set. */
const MODELS: ModelInfo[] = [
  {
    id: 'local/glm45-air-mini',
    object: 'model',
    owned_by: 'local',
    workbench: {
      provider: 'local',
      provider_kind: 'local',
      dialect: null,
      model: 'glm45-air-mini',
      context_length: 1024,
      capabilities: ['thinking', 'tools', 'routing'],
      prices: null,
      free: false,
      state: 'ready'
    }
  },
  {
    id: 'zai/glm-4.5-air',
    owned_by: 'zai',
    workbench: {
      provider: 'zai',
      provider_kind: 'openai',
      dialect: 'zai',
      model: 'glm-4.5-air',
      context_length: 131072,
      capabilities: ['tools', 'thinking'],
      prices: { input: 0.8, output: 2, currency: 'CNY', per_tokens: 1000000 },
      free: false,
      state: 'ready'
    }
  },
  {
    id: 'openrouter/z-ai/glm-4.5-air:free',
    owned_by: 'openrouter',
    workbench: {
      provider: 'openrouter',
      provider_kind: 'openai',
      dialect: 'openrouter',
      model: 'z-ai/glm-4.5-air:free',
      context_length: null,
      capabilities: ['thinking', 'tools'],
      prices: { input: 0, output: 0, currency: 'USD', per_tokens: 1000000 },
      free: true,
      state: 'ready'
    }
  },
  {
    id: 'vllm/glm-4.5-air',
    owned_by: 'vllm',
    workbench: {
      provider: 'vllm',
      provider_kind: 'openai',
      dialect: 'vllm',
      model: 'glm-4.5-air',
      context_length: 65536,
      capabilities: ['tools'],
      prices: null,
      free: false,
      state: 'key_missing'
    }
  }
];

const STATUS: ServerStatus = {
  backend: 'local',
  providers: [
    { name: 'local', kind: 'local', state: 'ready', models: ['local/glm45-air-mini'], error: null },
    { name: 'zai', kind: 'openai', dialect: 'zai', state: 'ready', models: ['zai/glm-4.5-air'], error: null },
    { name: 'openrouter', kind: 'openai', state: 'ready', models: ['openrouter/z-ai/glm-4.5-air:free'] },
    { name: 'vllm', kind: 'openai', state: 'key_missing', key_env: 'VLLM_TOKEN', error: 'set VLLM_TOKEN to the key' },
    { name: 'gpu-box', kind: 'workbench', state: 'unreachable', error: 'connection refused', models: [] }
  ]
};

const assistant = (cost?: { total: number; currency: string }): Message => ({
  kind: 'assistant',
  id: String(Math.random()),
  content: 'x',
  reasoning: '',
  toolCalls: [],
  status: 'done',
  routingRequested: false,
  timing: { start: 0, end: 1 },
  reasoningDeltas: 0,
  contentDeltas: 1,
  usage: {
    prompt_tokens: 1,
    completion_tokens: 1,
    total_tokens: 2,
    ...(cost ? { cost: { input: cost.total / 2, output: cost.total / 2, ...cost } } : {})
  }
});

describe('model groups', () => {
  it('groups models by provider in the server order, with capabilities, price and state', () => {
    const groups = groupModels(MODELS, STATUS);
    expect(groups.map(g => g.provider)).toEqual(['local', 'zai', 'openrouter', 'vllm', 'gpu-box']);
    const [local, zai, openrouter, vllm, gpuBox] = groups;
    expect(local.models[0]).toMatchObject({
      id: 'local/glm45-air-mini',
      name: 'glm45-air-mini',
      capabilities: ['thinking', 'tools', 'routing'],
      price: null,
      contextLength: 1024,
      unavailable: null
    });
    expect(zai.models[0]).toMatchObject({ name: 'glm-4.5-air', capabilities: ['thinking', 'tools'] });
    expect(zai.models[0].price).toBe('¥0.8 in · ¥2 out per M tokens');
    expect(openrouter.models[0]).toMatchObject({ name: 'z-ai/glm-4.5-air:free', price: 'free', contextLength: null });
    // a provider whose key is not set: its models are listed, not usable, and say which variable to set
    expect(vllm.problem).toBe('set VLLM_TOKEN');
    expect(vllm.models[0].unavailable).toBe('set VLLM_TOKEN');
    // a provider the status lists without models: an empty group with its last error
    expect(gpuBox).toMatchObject({ kind: 'workbench', problem: 'unreachable: connection refused', models: [] });
  });

  it('treats bare model cards (older servers, vLLM) as one group of unknown capabilities', () => {
    const bare: ModelInfo[] = [{ id: 'glm-tiny', owned_by: 'workbench' }, { id: 'scripted-glm', max_model_len: 4096 }];
    const groups = groupModels(bare, { backend: 'remote' });
    expect(groups).toHaveLength(1);
    expect(groups[0].provider).toBeNull();
    expect(groups[0].models.map(m => [m.id, m.capabilities, m.price, m.unavailable])).toEqual([
      ['glm-tiny', null, null, null],
      ['scripted-glm', null, null, null]
    ]);
    expect(groups[0].models[1].contextLength).toBe(4096);
    expect(hasCapability(bare[0], 'routing')).toBeNull();
    expect(hasCapability(MODELS[1], 'routing')).toBe(false);
    expect(hasCapability(MODELS[0], 'routing')).toBe(true);
  });

  it('names what a model can do in the picker, or why it cannot be chosen', () => {
    const [local, zai, openrouter, vllm] = groupModels(MODELS, STATUS);
    expect(modelOptionText(local.models[0])).toBe('glm45-air-mini · thinking, tools, routing');
    expect(modelOptionText(local.models[0], '10M demo')).toBe('glm45-air-mini · 10M demo · thinking, tools, routing');
    expect(modelOptionText(zai.models[0])).toBe('glm-4.5-air · thinking, tools · ¥0.8 in · ¥2 out per M tokens');
    expect(modelOptionText(openrouter.models[0])).toBe('z-ai/glm-4.5-air:free · thinking, tools · free');
    expect(modelOptionText(vllm.models[0])).toBe('glm-4.5-air · set VLLM_TOKEN');
  });

  it('keeps the chosen model while it is usable, else takes the first usable one', () => {
    expect(usableModel(MODELS, STATUS, 'zai/glm-4.5-air')).toBe('zai/glm-4.5-air');
    expect(usableModel(MODELS, STATUS, 'vllm/glm-4.5-air')).toBe('local/glm45-air-mini');
    expect(usableModel(MODELS, STATUS, 'gone/model')).toBe('local/glm45-air-mini');
    expect(usableModel([MODELS[3]], STATUS, '')).toBe('vllm/glm-4.5-air'); // nothing usable: still show one
    expect(usableModel([], STATUS, 'x')).toBe('');
  });

  it('lets an idle engine (loaded when first asked) and a loading one be chosen, saying so', () => {
    const engine = (name: string, state: string): ModelInfo => ({
      ...MODELS[0],
      id: `${name}/glm45-air-mini`,
      workbench: { ...MODELS[0].workbench!, provider: name, state }
    });
    const status: ServerStatus = {
      providers: [
        { name: 'big', kind: 'local', state: 'idle' },
        { name: 'local', kind: 'local', state: 'loading' },
        { name: 'broken', kind: 'local', state: 'error', error: 'no model at /models/x' }
      ]
    };
    const [big, local, broken] = groupModels([engine('big', 'idle'), engine('local', 'loading'), engine('broken', 'error')], status);
    expect(big.models[0].unavailable).toBeNull();
    expect(modelOptionText(big.models[0])).toBe('glm45-air-mini · thinking, tools, routing · loads when first asked');
    expect(local.models[0].unavailable).toBeNull();
    expect(modelOptionText(local.models[0])).toMatch(/ · loading$/);
    expect(broken.models[0].unavailable).toBe('no model at /models/x');
    expect(usableModel([engine('broken', 'error'), engine('big', 'idle')], status, '')).toBe('big/glm45-air-mini');
  });
});

describe('money', () => {
  it('formats prices per million tokens, per thousand, and free', () => {
    expect(formatPrices({ input: 0.2, output: 1.1, currency: 'USD', per_tokens: 1000000 })).toBe(
      '$0.2 in · $1.1 out per M tokens'
    );
    expect(formatPrices({ input: 0.0005, output: 0.0015, currency: 'EUR', per_tokens: 1000 })).toBe(
      '€0.0005 in · €0.0015 out per 1K tokens'
    );
    expect(formatPrices({ input: 1, output: 2, currency: 'XTS', per_tokens: 1000000 })).toBe(
      '1 XTS in · 2 XTS out per M tokens'
    );
    expect(formatPrices({ input: 0, output: 0, currency: 'USD', per_tokens: 1000000 })).toBe('free');
    expect(formatPrices(null, true)).toBe('free');
    expect(formatPrices(null)).toBeNull();
  });

  it('formats an answer cost with two significant digits, cents above one unit, free at zero', () => {
    expect(formatCost({ input: 0.00012, output: 0.00034, total: 0.00046, currency: 'USD' })).toBe('$0.00046');
    expect(formatCost({ input: 0.0004, output: 0.0008, total: 0.0012, currency: 'CNY' })).toBe('¥0.0012');
    expect(formatCost({ input: 0, output: 0, total: 0, currency: 'USD' })).toBe('free');
    expect(formatCost(undefined)).toBeNull();
    expect(formatMoney(1.234, 'USD')).toBe('$1.23');
    expect(formatMoney(0.5, 'USD')).toBe('$0.50');
    expect(formatMoney(0.000000041, 'USD')).toBe('$0.000000041');
  });

  it('totals a conversation per currency; free when every priced answer was; null when none was priced', () => {
    expect(conversationCost([assistant(), assistant()])).toBeNull();
    expect(conversationCost([assistant({ total: 0, currency: 'USD' }), assistant()])).toBe('free');
    expect(
      conversationCost([
        assistant({ total: 0.00046, currency: 'USD' }),
        assistant(),
        assistant({ total: 0.00054, currency: 'USD' }),
        assistant({ total: 0.0012, currency: 'CNY' })
      ])
    ).toBe('$0.0010 + ¥0.0012');
  });
});
