import { describe, expect, it } from 'vitest';

import {
  buildCompletionMessages,
  cellsAbove,
  cleanCompletion,
  COMPLETION_SYSTEM_PROMPT,
  CURSOR,
  DEFAULT_INLINE_SETTINGS,
  GlmInlineCompletionProvider,
  inlineCompletionAllowed,
  modelProvider,
  readInlineSettings
} from '../src/inlineCompletion';
import type { WorkbenchClient } from '../src/api';
import type { ChatCompletionChunk, ChatCompletionRequest, ModelInfo } from '../src/protocol';

const card = (id: string, provider?: string): ModelInfo =>
  (provider ? { id, workbench: { provider, provider_kind: provider === 'local' ? 'local' : 'openai' } } : { id }) as ModelInfo;

describe('when inline completion runs', () => {
  const auto = DEFAULT_INLINE_SETTINGS;

  it('auto: on for the local engine, off for a remote provider', () => {
    const models = [card('local/glm45-air-mini', 'local'), card('openrouter/z-ai/glm-4.5-air', 'openrouter')];
    expect(inlineCompletionAllowed(auto, { model: 'local/glm45-air-mini', models, status: null }).allowed).toBe(true);
    const remote = inlineCompletionAllowed(auto, { model: 'openrouter/z-ai/glm-4.5-air', models, status: null });
    expect(remote.allowed).toBe(false);
    expect(remote.reason).toMatch(/remote model \(provider openrouter\)/);
  });

  it('auto without provider cards: the status names the backend', () => {
    const models = [card('glm45-air-mini')];
    const local = { model: 'glm45-air-mini', models, status: { backend: 'local', model: 'glm45-air-mini' } };
    expect(inlineCompletionAllowed(auto, local).allowed).toBe(true);
    const remote = { model: 'scripted-glm', models: [card('scripted-glm')], status: { backend: 'remote' } };
    expect(modelProvider(remote)).toBe('remote');
    expect(inlineCompletionAllowed(auto, remote).allowed).toBe(false);
  });

  it('a provider id prefix counts when the cards carry provider data', () => {
    const models = [{ id: 'zai/glm-4.5-air', workbench: {} } as unknown as ModelInfo];
    expect(modelProvider({ model: 'zai/glm-4.5-air', models, status: null })).toBe('zai');
  });

  it('auto leaves the bundled demo model out; on includes it', () => {
    const demo = { model: 'glm45-air-mini', models: [], status: { backend: 'local' }, demo: true };
    const auto_ = inlineCompletionAllowed(auto, demo);
    expect(auto_.allowed).toBe(false);
    expect(auto_.reason).toMatch(/bundled demo model/);
    expect(inlineCompletionAllowed({ ...auto, mode: 'on' }, demo).allowed).toBe(true);
  });

  it('on and off override, and no model means no completion', () => {
    const remote = { model: 'scripted-glm', models: [], status: { backend: 'remote' } };
    expect(inlineCompletionAllowed({ ...auto, mode: 'on' }, remote).allowed).toBe(true);
    const local = { model: 'm', models: [], status: { backend: 'local' } };
    expect(inlineCompletionAllowed({ ...auto, mode: 'off' }, local).allowed).toBe(false);
    expect(inlineCompletionAllowed({ ...auto, mode: 'on' }, { ...local, model: '' }).allowed).toBe(false);
  });

  it('reads its settings, falling back on bad values', () => {
    const values: Record<string, unknown> = { inlineCompletion: 'on', inlineCompletionDelay: 50, inlineCompletionMaxTokens: 0 };
    expect(readInlineSettings(k => values[k])).toEqual({ mode: 'on', delayMs: 50, maxTokens: 64 });
    expect(readInlineSettings(() => undefined)).toEqual(DEFAULT_INLINE_SETTINGS);
  });
});

describe('the completion prompt', () => {
  it('has the system prompt, the cells above and the cell with the cursor', () => {
    const messages = buildCompletionMessages({
      prefix: 'def add(a, b):\n    ',
      suffix: '\n\nprint(add(1, 2))',
      cellsAbove: [
        { type: 'markdown', source: '# Sums' },
        { type: 'code', source: 'import math' },
        { type: 'code', source: '   ' }
      ],
      language: 'python'
    });
    expect(messages[0]).toEqual({ role: 'system', content: COMPLETION_SYSTEM_PROMPT });
    expect(messages[1].role).toBe('user');
    expect(messages[1].content).toBe(
      'Cells above the current one:\n[markdown cell]\n# Sums\n\nimport math\n\n' +
        `Current python cell (complete at ${CURSOR}):\ndef add(a, b):\n    ${CURSOR}\n\nprint(add(1, 2))`
    );
  });

  it('keeps the end of long context and the start of a long suffix', () => {
    const messages = buildCompletionMessages({
      prefix: 'p'.repeat(5000) + 'END',
      suffix: 'START' + 's'.repeat(5000),
      cellsAbove: [{ type: 'code', source: 'a'.repeat(10000) + 'LAST' }],
      language: 'python'
    });
    const text = messages[1].content!;
    expect(text).toContain(`aLAST\n\nCurrent python cell`);
    expect(text).toContain(`END${CURSOR}START`);
    expect(text.length).toBeLessThan(6000 + 3000 + 1000 + 200);
  });

  it('takes the cells above the active one of a notebook, none elsewhere', () => {
    const cell = (type: string, source: string) => ({ model: { type, sharedModel: { getSource: () => source } } });
    const panel = { content: { widgets: [cell('code', 'a'), cell('markdown', 'b'), cell('code', 'c')], activeCellIndex: 2 } };
    expect(cellsAbove(panel)).toEqual([
      { type: 'code', source: 'a' },
      { type: 'markdown', source: 'b' }
    ]);
    expect(cellsAbove({ content: { ...panel.content, activeCellIndex: 0 } })).toEqual([]);
    expect(cellsAbove({})).toEqual([]);
    expect(cellsAbove(null)).toEqual([]);
  });
});

describe('cleanCompletion', () => {
  it('keeps a plain continuation as it is', () => {
    expect(cleanCompletion('return a + b', 'def f(a, b):\n    ')).toBe('return a + b');
  });

  it('drops a fence around the code, and waits while one is arriving', () => {
    expect(cleanCompletion('```python\nreturn a + b\n```\nThis adds.', '    ', true)).toBe('return a + b');
    expect(cleanCompletion('``', '')).toBe('');
    expect(cleanCompletion('```pyth', '')).toBe('');
    expect(cleanCompletion('```python\nret', '')).toBe('ret');
  });

  it('drops the current line when the model repeats it', () => {
    expect(cleanCompletion('x = compute(1, 2)', 'import m\nx = comp')).toBe('ute(1, 2)');
    expect(cleanCompletion('total = sum(values)', 'def f():\n    total = ')).toBe('sum(values)');
  });

  it('drops a cursor marker and, at the end, trailing whitespace', () => {
    expect(cleanCompletion(`a${CURSOR}b`, '')).toBe('ab');
    expect(cleanCompletion('return 1\n\n', '', true)).toBe('return 1');
    expect(cleanCompletion('return 1\n', '')).toBe('return 1\n');
  });
});

/** A client whose chat stream is scripted, recording requests and whether they were aborted. */
function scriptedClient(pieces: string[]) {
  const requests: ChatCompletionRequest[] = [];
  const signals: AbortSignal[] = [];
  const client = {
    async *chat(body: ChatCompletionRequest, signal: AbortSignal): AsyncGenerator<ChatCompletionChunk, void, undefined> {
      requests.push(body);
      signals.push(signal);
      for (const piece of pieces) {
        await new Promise(r => setTimeout(r, 1));
        if (signal.aborted) {
          throw Object.assign(new Error('aborted'), { name: 'AbortError' });
        }
        yield { id: 'c', choices: [{ index: 0, delta: { content: piece } }] };
      }
    }
  } as unknown as WorkbenchClient;
  return { client, requests, signals };
}

describe('GlmInlineCompletionProvider', () => {
  const choice = () => ({ model: 'local/m', models: [card('local/m', 'local')], status: null });
  const request = { text: 'def add(a, b):\n    ret', offset: 'def add(a, b):\n    ret'.length, mimeType: 'text/x-ipython' };

  it('streams the cleaned continuation of the selected model, thinking off', async () => {
    const { client, requests } = scriptedClient(['return', ' a + b']);
    const provider = new GlmInlineCompletionProvider(client, choice, () => ({ ...DEFAULT_INLINE_SETTINGS, delayMs: 0 }));
    const list = await provider.fetch(request, { widget: {} as never, triggerKind: 1 });
    expect(list.items).toHaveLength(1);
    const item = list.items[0];
    expect(item.isIncomplete).toBe(true);
    const texts: string[] = [];
    for await (const { response } of provider.stream(item.token!)) {
      texts.push(response.insertText);
    }
    expect(texts.at(-1)).toBe('urn a + b');
    expect(requests[0]).toMatchObject({ model: 'local/m', stream: true, max_tokens: 64, thinking: { type: 'disabled' } });
    expect(requests[0].tools).toBeUndefined();
  });

  it('cancels the request in flight when typing goes on', async () => {
    const { client, signals } = scriptedClient(['a', 'b', 'c', 'd']);
    const provider = new GlmInlineCompletionProvider(client, choice, () => ({ ...DEFAULT_INLINE_SETTINGS, delayMs: 0 }));
    const first = await provider.fetch(request, { widget: {} as never, triggerKind: 1 });
    const stream = provider.stream(first.items[0].token!);
    await stream.next();
    await provider.fetch({ ...request, text: request.text + 'u', offset: request.offset + 1 }, { widget: {} as never, triggerKind: 1 });
    expect(signals[0].aborted).toBe(true);
    const rest: unknown[] = [];
    for await (const r of stream) {
      rest.push(r);
    }
    expect(rest).toEqual([]); // a cancelled stream ends quietly
  });

  it('asks nothing while typing goes on within the pause, nor for a remote model in auto mode', async () => {
    const { client, requests } = scriptedClient(['x']);
    const provider = new GlmInlineCompletionProvider(client, choice, () => ({ ...DEFAULT_INLINE_SETTINGS, delayMs: 50 }));
    const first = provider.fetch(request, { widget: {} as never, triggerKind: 1 });
    const second = provider.fetch(request, { widget: {} as never, triggerKind: 1 });
    expect((await first).items).toEqual([]);
    expect((await second).items).toHaveLength(1);
    expect(requests).toHaveLength(1);

    const remote = new GlmInlineCompletionProvider(
      client,
      () => ({ model: 'openrouter/x', models: [card('openrouter/x', 'openrouter')], status: null }),
      () => DEFAULT_INLINE_SETTINGS
    );
    expect((await remote.fetch(request, { widget: {} as never, triggerKind: 0 })).items).toEqual([]);
    expect(requests).toHaveLength(1);
  });
});
