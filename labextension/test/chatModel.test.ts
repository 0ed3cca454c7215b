import { describe, expect, it } from 'vitest';

import type { WorkbenchClient } from '../src/api';
import { ChatModel, CONTINUE_PROMPT, DEFAULT_PREFERENCES, type NotebookBridge, TOOL_DEMO } from '../src/chatModel';
import type { AssistantMessage, Conversation, ToolMessage } from '../src/chatState';
import { WorkbenchError } from '../src/errors';
import type { ChatCompletionChunk, ChatCompletionRequest } from '../src/protocol';

type Script = (request: ChatCompletionRequest, signal: AbortSignal) => AsyncGenerator<ChatCompletionChunk>;

const chunk = (delta: ChatCompletionChunk['choices'][0]['delta'], finish: string | null = null): ChatCompletionChunk => ({
  id: 'chatcmpl-1',
  choices: [{ index: 0, delta, finish_reason: finish }]
});

/** A stand-in for the HTTP client: answers each chat request with the next script. */
class FakeClient {
  requests: ChatCompletionRequest[] = [];
  saved: Conversation[] = [];
  constructor(private scripts: Script[], public serverStatus: Record<string, unknown> = { backend: 'local' }) {}
  modelList: Array<Record<string, unknown>> = [{ id: 'glm-tiny' }];
  async models() {
    return this.modelList;
  }
  async status() {
    return this.serverStatus;
  }
  conversations: Conversation[] = [];
  async listConversations() {
    return this.conversations.map(({ id, title, created, updated }) => ({ id, title, created, updated }));
  }
  async getConversation(id: string) {
    return this.conversations.find(c => c.id === id)!;
  }
  async saveConversation(c: Conversation) {
    this.saved.push(c);
  }
  chat(request: ChatCompletionRequest, signal: AbortSignal) {
    this.requests.push(request);
    const script = this.scripts.shift();
    if (!script) {
      throw new Error('no more scripted answers');
    }
    return script(request, signal);
  }
}

class FakeBridge implements NotebookBridge {
  calls: Array<{ name: string; args: Record<string, unknown> }> = [];
  collectContext() {
    return [{ label: 'Active cell [0]', text: 'x = 1' }];
  }
  async runTool(name: string, args: Record<string, unknown>) {
    this.calls.push({ name, args });
    if (name === 'run_cell') {
      throw new Error('kernel died');
    }
    return `ran ${name}`;
  }
}

async function* say(...parts: ChatCompletionChunk[]) {
  for (const part of parts) {
    yield part;
  }
}

/** Wait until `check` holds (the model works through promises). */
async function until(check: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (check()) {
      return;
    }
    await new Promise(resolve => setTimeout(resolve, 5));
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function makeModel(scripts: Script[], preferences = DEFAULT_PREFERENCES, status?: Record<string, unknown>) {
  const client = new FakeClient(scripts, status);
  const bridge = new FakeBridge();
  const model = new ChatModel(client as unknown as WorkbenchClient, bridge, preferences);
  await model.refresh();
  expect(model.state.failure).toBeNull();
  return { client, bridge, model };
}

const lastAssistant = (model: ChatModel) =>
  [...model.state.conversation.messages].reverse().find(m => m.kind === 'assistant') as AssistantMessage;
const tools = (model: ChatModel) => model.state.conversation.messages.filter(m => m.kind === 'tool') as ToolMessage[];

describe('ChatModel', () => {
  it('sends the conversation with context, thinking mode, tools and routing, and saves it', async () => {
    const { client, model } = await makeModel([() => say(chunk({ content: 'Hi' }), chunk({}, 'stop'))]);
    model.routingViewOpen = true; // a routing view is open: answers record their routing
    model.setContext({ cell: true });
    model.setThinkingMode('off');
    await model.send('hello');
    const request = client.requests[0];
    expect(request.model).toBe('glm-tiny');
    expect(request.messages.at(-1)).toEqual({ role: 'user', content: 'Active cell [0]:\nx = 1\n\nhello' });
    expect(request.thinking).toEqual({ type: 'disabled' });
    expect(request.routing).toBe(true); // the server's backend is local
    expect(request.tools?.map(t => t.function.name)).toContain('insert_cell');
    expect(lastAssistant(model)).toMatchObject({ content: 'Hi', status: 'done', routingRequested: true, routingPossible: true });
    expect(model.state.busy).toBe(false);
    expect(client.saved.at(-1)?.title).toBe('hello');
  });

  it('asks for routing only while a routing view is open, or always when the keepRouting setting says so', async () => {
    const answer = () => say(chunk({ content: 'x' }), chunk({}, 'stop'));
    const { client, model } = await makeModel([answer, answer, answer]);
    await model.send('no routing view open');
    expect(client.requests[0].routing).toBeUndefined(); // an answer without a trace costs the engine less
    expect(lastAssistant(model)).toMatchObject({ routingRequested: false, routingPossible: true });
    model.routingViewOpen = true;
    await model.send('a routing view is open');
    expect(client.requests[1].routing).toBe(true);
    model.routingViewOpen = false;
    model.setPreferences({ ...DEFAULT_PREFERENCES, keepRouting: true });
    await model.send('the setting keeps it');
    expect(client.requests[2].routing).toBe(true);
  });

  it('asks for routing only from a local backend and omits thinking in auto mode', async () => {
    const { client, model } = await makeModel([() => say(chunk({ content: 'x' }))], DEFAULT_PREFERENCES, {
      backend: 'remote'
    });
    model.routingViewOpen = true;
    await model.send('hi');
    expect(client.requests[0].routing).toBeUndefined();
    expect(client.requests[0].thinking).toBeUndefined();
  });

  it('waits for approval, runs approved calls, and sends the results back until the model answers', async () => {
    const call = (id: string, name: string, args: string) => ({ index: 0, id, type: 'function' as const, function: { name, arguments: args } });
    const { client, bridge, model } = await makeModel([
      () => say(chunk({ tool_calls: [call('c1', 'insert_cell', '{"source": "1+1"}')] }), chunk({}, 'tool_calls')),
      () => say(chunk({ content: 'Inserted.' }), chunk({}, 'stop'))
    ]);
    await model.send('add a cell');
    expect(tools(model)).toHaveLength(1);
    expect(tools(model)[0].status).toBe('pending');
    expect(bridge.calls).toEqual([]); // nothing runs before approval
    expect(model.state.busy).toBe(true);

    model.approveTool(tools(model)[0].id);
    await until(() => lastAssistant(model).content === 'Inserted.' && !model.state.busy, 'the final answer');
    expect(bridge.calls).toEqual([{ name: 'insert_cell', args: { source: '1+1' } }]);
    expect(tools(model)[0]).toMatchObject({ status: 'done', result: 'ran insert_cell' });
    const second = client.requests[1].messages;
    expect(second.at(-2)?.tool_calls?.[0].id).toBe('c1');
    expect(second.at(-1)).toEqual({ role: 'tool', tool_call_id: 'c1', content: 'ran insert_cell' });
  });

  it('auto-approves per tool, reports tool failures to the model, and remembers "always allow"', async () => {
    const twoCalls = () =>
      say(
        chunk({ tool_calls: [
          { index: 0, id: 'a', type: 'function', function: { name: 'list_variables', arguments: '{}' } },
          { index: 1, id: 'b', type: 'function', function: { name: 'run_cell', arguments: '{"index": 0}' } }
        ] }),
        chunk({}, 'tool_calls')
      );
    const { client, bridge, model } = await makeModel(
      [twoCalls, () => say(chunk({ content: 'ok' }))],
      { ...DEFAULT_PREFERENCES, autoApproveTools: ['list_variables'] }
    );
    const remembered: string[][] = [];
    model.autoApproveChanged.connect((_, names) => remembered.push(names));
    await model.send('go');
    await until(() => tools(model)[0]?.status === 'done', 'the auto-approved call');
    expect(tools(model)[1].status).toBe('pending');
    model.alwaysApproveTool(tools(model)[1].id);
    await until(() => lastAssistant(model).content === 'ok', 'the answer after the tools');
    expect(bridge.calls.map(c => c.name)).toEqual(['list_variables', 'run_cell']);
    expect(tools(model)[1]).toMatchObject({ status: 'error', result: 'Error: kernel died' });
    expect(remembered).toEqual([['list_variables', 'run_cell']]);
    expect(client.requests[1].messages.filter(m => m.role === 'tool')).toHaveLength(2);
  });

  it('stops a stream: the answer keeps what came and the sidebar is free again', async () => {
    let release: () => void = () => undefined;
    const slow: Script = async function* (_request, signal) {
      yield chunk({ content: 'partial' });
      await new Promise<void>(resolve => {
        release = resolve;
        signal.addEventListener('abort', () => resolve());
      });
      if (signal.aborted) {
        throw new DOMException('aborted', 'AbortError');
      }
      yield chunk({ content: ' never' });
    };
    const { model } = await makeModel([slow]);
    const sending = model.send('long');
    await until(() => lastAssistant(model)?.content === 'partial', 'the first chunk');
    model.stop();
    await sending;
    release();
    expect(lastAssistant(model)).toMatchObject({ content: 'partial', status: 'stopped' });
    expect(model.state.busy).toBe(false);
  });

  it('stop while a call waits for approval rejects it and asks the model nothing more', async () => {
    const { client, bridge, model } = await makeModel([
      () => say(chunk({ tool_calls: [{ index: 0, id: 'c1', type: 'function', function: { name: 'read_cells', arguments: '{}' } }] }))
    ]);
    await model.send('read');
    expect(tools(model)[0].status).toBe('pending');
    model.stop();
    expect(tools(model)[0]).toMatchObject({ status: 'rejected' });
    expect(model.state.busy).toBe(false);
    await new Promise(resolve => setTimeout(resolve, 20));
    expect(client.requests).toHaveLength(1);
    expect(bridge.calls).toEqual([]);
  });

  it('agent loop: runs step after step on its own, pauses at the step limit with a notice, and Continue goes on', async () => {
    const runStep = (i: number) => () =>
      say(
        chunk({ reasoning_content: `step ${i} reasoning` }),
        chunk({ tool_calls: [{ index: 0, id: `c${i}`, type: 'function', function: { name: 'run_cell', arguments: '{"index": 0}' } }] }),
        chunk({}, 'tool_calls')
      );
    const { client, bridge, model } = await makeModel(
      [runStep(1), runStep(2), runStep(3), () => say(chunk({ content: 'Fixed.' }), chunk({}, 'stop'))],
      { ...DEFAULT_PREFERENCES, autoApproveTools: ['run_cell'], maxToolSteps: 2 }
    );
    await model.send('fix my cell');
    await until(() => !model.state.busy, 'the loop to pause');
    expect(client.requests).toHaveLength(2); // two steps, then no third request
    expect(bridge.calls).toHaveLength(2);
    expect(model.state.loopNotice).toMatchObject({ canContinue: true });
    expect(model.state.loopNotice?.text).toMatch(/^Paused after 2 tool steps: the step limit is 2/);
    const timed = tools(model)[0];
    expect(timed.started).toBeTypeOf('number');
    expect(timed.finished! >= timed.started!).toBe(true);

    await model.continueLoop();
    await until(() => lastAssistant(model).content === 'Fixed.' && !model.state.busy, 'the answer after Continue');
    expect(model.state.loopNotice).toBeNull();
    expect(bridge.calls).toHaveLength(3);
    expect(client.requests).toHaveLength(4);
    // the third step's result went back before the final answer
    expect(client.requests[3].messages.at(-1)).toMatchObject({ role: 'tool', tool_call_id: 'c3' });
  });

  it('agent loop: Stop during a running step ends the loop at once, interrupts the kernel if asked, and sends nothing more', async () => {
    let finishRun: (text: string) => void = () => undefined;
    let interrupted = 0;
    const { client, bridge, model } = await makeModel(
      [
        () =>
          say(
            chunk({ tool_calls: [{ index: 0, id: 'c1', type: 'function', function: { name: 'run_cell', arguments: '{"index": 0}' } }] }),
            chunk({}, 'tool_calls')
          ),
        () => say(chunk({ content: 'should never be asked' }))
      ],
      { ...DEFAULT_PREFERENCES, autoApproveTools: ['run_cell'] }
    );
    bridge.runTool = (name, args) => {
      bridge.calls.push({ name, args });
      return new Promise<string>(resolve => (finishRun = resolve));
    };
    (bridge as NotebookBridge).interruptKernel = async () => {
      interrupted += 1;
      finishRun('Ran with an error: cell 0.\nKeyboardInterrupt');
    };
    const sending = model.send('run a long cell');
    await until(() => tools(model)[0]?.status === 'running', 'the step to run');
    model.stop({ interruptKernel: true });
    expect(model.state.busy).toBe(false); // at once, not when the cell ends
    await sending;
    await until(() => tools(model)[0].status === 'done', 'the interrupted run to settle');
    expect(interrupted).toBe(1);
    await new Promise(resolve => setTimeout(resolve, 20));
    expect(client.requests).toHaveLength(1); // the loop did not go on
    expect(model.state.busy).toBe(false);
    expect(model.state.loopNotice).toEqual({
      text: 'Stopped by you after 1 tool step; the running cell was interrupted. Nothing more is sent to the model.',
      canContinue: false
    });
    await model.continueLoop(); // nothing to continue after a Stop
    expect(client.requests).toHaveLength(1);
  });

  it('agent loop: Stop without interrupting leaves the kernel alone', async () => {
    let interrupted = 0;
    const { model, bridge } = await makeModel([
      () => say(chunk({ tool_calls: [{ index: 0, id: 'c1', type: 'function', function: { name: 'read_cells', arguments: '{}' } }] }))
    ]);
    (bridge as NotebookBridge).interruptKernel = async () => {
      interrupted += 1;
    };
    await model.send('read');
    model.stop();
    expect(interrupted).toBe(0);
  });

  it('shows failures that are not one answer\'s fault as a banner', async () => {
    const expired: Script = () => {
      throw new WorkbenchError('session-expired', 'Your Jupyter session has expired.', 403);
    };
    const { model } = await makeModel([async function* (r, s) {
      yield* expired(r, s);
    }]);
    await model.send('hi');
    expect(model.state.failure?.kind).toBe('session-expired');
    expect(lastAssistant(model).status).toBe('error');
  });

  it('shows "model loading" from the server status and clears it once the model is ready', async () => {
    const client = new FakeClient([], { backend: 'local', state: 'loading' });
    const model = new ChatModel(client as unknown as WorkbenchClient, new FakeBridge(), DEFAULT_PREFERENCES);
    model.loadingPollMs = 5;
    await model.refresh();
    expect(model.state.failure?.kind).toBe('loading');
    (client as unknown as { serverStatus: Record<string, unknown> }).serverStatus = { backend: 'local', state: 'ready' };
    await until(() => model.state.failure === null, 'the banner to clear');
  });

  it('regenerates the last answer from the same user message', async () => {
    const { client, model } = await makeModel([
      () => say(chunk({ content: 'first' })),
      () => say(chunk({ content: 'second' }))
    ]);
    await model.send('q');
    await model.regenerate();
    const kinds = model.state.conversation.messages.map(m => m.kind);
    expect(kinds).toEqual(['user', 'assistant']);
    expect(lastAssistant(model).content).toBe('second');
    expect(client.requests[1].messages).toEqual(client.requests[0].messages);
  });

  it('sends no max_tokens by default: the server gives the room left in the context', async () => {
    const { client, model } = await makeModel([() => say(chunk({ content: 'x' }))]);
    expect(DEFAULT_PREFERENCES.maxTokens).toBe(0);
    await model.send('Write a Python function that reverses a string.');
    expect('max_tokens' in client.requests[0]).toBe(false);
  });

  it('lowers an explicit max_tokens that does not fit to what fits, and says so under the answer', async () => {
    const refusal: Script = () => {
      throw new WorkbenchError(
        'bad-request',
        "This model's maximum context length is 1024 tokens. However, you requested 1571 tokens (547 in the " +
          'messages, 1024 in the completion). Lower max_tokens or shorten the messages.',
        400
      );
    };
    const { client, model } = await makeModel(
      [async function* (r, s) { yield* refusal(r, s); }, () => say(chunk({ content: 'fits' }), chunk({}, 'stop'))],
      { ...DEFAULT_PREFERENCES, maxTokens: 1024 }
    );
    await model.send('hi');
    expect(client.requests.map(r => r.max_tokens)).toEqual([1024, 477]);
    const answer = lastAssistant(model);
    expect(answer).toMatchObject({ content: 'fits', status: 'done' });
    expect(answer.note).toMatch(/lowered to 477.*1024-token context.*547 tokens/);
  });

  it('leaves other refusals alone (no retry)', async () => {
    const refusal: Script = () => {
      throw new WorkbenchError('bad-request', 'temperature must be a number', 400);
    };
    const { client, model } = await makeModel([async function* (r, s) { yield* refusal(r, s); }], {
      ...DEFAULT_PREFERENCES,
      maxTokens: 100
    });
    await model.send('hi');
    expect(client.requests).toHaveLength(1);
    expect(lastAssistant(model)).toMatchObject({ status: 'error', error: 'temperature must be a number' });
  });

  it('knows the context length from the model card or the local status', async () => {
    const { model, client } = await makeModel([], DEFAULT_PREFERENCES, { backend: 'local', model: 'glm-tiny', context_limit: 1024 });
    expect(model.contextLength()).toBe(1024);
    client.modelList = [{ id: 'glm-tiny', max_model_len: 131072 }];
    await model.refresh();
    expect(model.contextLength()).toBe(131072);
  });

  it('marks the bundled model as the demo, by id or by the checkpoint folder', async () => {
    const { model, client } = await makeModel([], DEFAULT_PREFERENCES, {
      backend: 'local', model: 'my-name', model_path: '/site-packages/workbench/models/glm45-air-mini'
    });
    expect(model.isDemoModel('glm45-air-mini')).toBe(true);
    expect(model.isDemoModel('glm-tiny')).toBe(false);
    client.modelList = [{ id: 'my-name' }];
    await model.refresh();
    expect(model.isDemoModel('my-name')).toBe(true);
  });

  it('"Try tools" names read_cells in tool_choice once; the model answers the result freely', async () => {
    const { client, bridge, model } = await makeModel(
      [
        () => say(chunk({ tool_calls: [{ index: 0, id: 'c1', type: 'function', function: { name: 'read_cells', arguments: '{"width": 3}' } }] }), chunk({}, 'tool_calls')),
        () => say(chunk({ content: 'Read.' }), chunk({}, 'stop'))
      ],
      { ...DEFAULT_PREFERENCES, enableTools: false }
    );
    await model.tryTools();
    expect(client.requests[0].tool_choice).toEqual({ type: 'function', function: { name: 'read_cells' } });
    expect(client.requests[0].tools?.map(t => t.function.name)).toEqual(['read_cells']);
    expect(client.requests[0].tools?.map(t => t.function.name)).toContain('read_cells');
    const user = model.state.conversation.messages[0];
    expect(user).toMatchObject({ kind: 'user', text: TOOL_DEMO.prompt, label: TOOL_DEMO.label });
    expect(tools(model)[0].status).toBe('pending');
    model.approveTool(tools(model)[0].id);
    await until(() => lastAssistant(model).content === 'Read.' && !model.state.busy, 'the answer after the tool');
    expect(bridge.calls).toEqual([{ name: 'read_cells', args: { width: 3 } }]);
    expect(client.requests[1].tool_choice).toBeUndefined();
    expect(client.requests[0].messages.at(-1)?.content).toBe(TOOL_DEMO.prompt); // the label is not sent
  });

  it('Continue asks for the rest of a cut-off answer', async () => {
    const { client, model } = await makeModel([
      () => say(chunk({ content: 'half' }), chunk({}, 'length')),
      () => say(chunk({ content: 'rest' }), chunk({}, 'stop'))
    ]);
    await model.send('long one');
    expect(lastAssistant(model).finishReason).toBe('length');
    await model.continueAnswer();
    expect(client.requests[1].messages.at(-1)).toEqual({ role: 'user', content: CONTINUE_PROMPT });
    expect(client.requests[1].messages.at(-2)).toMatchObject({ role: 'assistant', content: 'half' });
  });

  it('reopens the last conversation on the first refresh after a reload', async () => {
    const client = new FakeClient([]);
    client.conversations = [{ id: 'conv-1', title: 'old', created: 1, updated: 2, messages: [
      { kind: 'user', id: 'u', text: 'old question', context: [] }
    ] }];
    const model = new ChatModel(client as unknown as WorkbenchClient, new FakeBridge(), DEFAULT_PREFERENCES);
    model.restoreConversationId = 'conv-1';
    await model.refresh();
    expect(model.state.conversation.id).toBe('conv-1');
    model.newConversation();
    await model.refresh(); // only once: a later refresh leaves the new conversation alone
    expect(model.state.conversation.id).not.toBe('conv-1');
  });

  it('cuts a tool result to what the context can still take, and says so', async () => {
    const { model, client } = await makeModel(
      [() => say(chunk({ content: 'x' }), { id: 'c', choices: [], usage: { prompt_tokens: 500, completion_tokens: 68, total_tokens: 568 } })],
      DEFAULT_PREFERENCES,
      { backend: 'local', model: 'glm-tiny', context_limit: 1024 }
    );
    await model.send('hi');
    const fitted = model.fitToolResult('x'.repeat(5000));
    // (1024 - 568 - 256 answer tokens) * 2 characters
    expect(fitted.startsWith('x'.repeat(400) + '\n[... 4600 more characters left out')).toBe(true);
    expect(model.fitToolResult('short')).toBe('short');
    client.serverStatus = { backend: 'remote' }; // no context length known: unchanged
    await model.refresh();
    expect(model.fitToolResult('y'.repeat(5000))).toHaveLength(5000);
  });

  it('sends without the notebook tools when only their descriptions make the messages too long', async () => {
    const full: Script = () => {
      throw new WorkbenchError(
        'bad-request',
        "This model's maximum context length is 1024 tokens, but the messages take 1100 tokens. Shorten the conversation.",
        400
      );
    };
    const { client, model } = await makeModel([
      async function* (r, s) { yield* full(r, s); },
      () => say(chunk({ content: 'explained' }), chunk({}, 'stop'))
    ]);
    await model.send('Explain this error and fix the code.');
    expect(client.requests[0].tools).toBeDefined();
    expect(client.requests[1].tools).toBeUndefined();
    const answer = lastAssistant(model);
    expect(answer).toMatchObject({ content: 'explained', status: 'done' });
    expect(answer.note).toMatch(/without the notebook tools.*1100 tokens.*1024-token context/);
  });

  it('gives up when the conversation itself is too long (no tools to drop)', async () => {
    const full: Script = () => {
      throw new WorkbenchError(
        'bad-request',
        "This model's maximum context length is 1024 tokens, but the messages take 1100 tokens. Shorten the conversation.",
        400
      );
    };
    const { client, model } = await makeModel([async function* (r, s) { yield* full(r, s); }], {
      ...DEFAULT_PREFERENCES,
      enableTools: false
    });
    await model.send('hi');
    expect(client.requests).toHaveLength(1);
    expect(lastAssistant(model)).toMatchObject({ status: 'error' });
  });

  describe('with providers (glm/v1/models workbench fields)', () => {
    const card = (id: string, provider: string, kind: string, capabilities: string[], state = 'ready') => ({
      id,
      owned_by: provider,
      workbench: {
        provider,
        provider_kind: kind,
        model: id.slice(provider.length + 1),
        context_length: kind === 'local' ? 1024 : 131072,
        capabilities,
        prices: kind === 'local' ? null : { input: 0.2, output: 1.1, currency: 'USD', per_tokens: 1000000 },
        free: false,
        state
      }
    });
    const LOCAL = card('local/glm45-air-mini', 'local', 'local', ['thinking', 'tools', 'routing', 'thinking_budget']);
    const REMOTE = card('hosted/glm-4.5-air', 'hosted', 'openai', ['thinking', 'tools']);
    const PLAIN = card('hosted/plain-chat', 'hosted', 'openai', ['tools']);
    const LOCKED = card('zai/glm-4.5-air', 'zai', 'openai', ['thinking', 'tools'], 'key_missing');

    async function providerModel(scripts: Script[]) {
      const client = new FakeClient(scripts, { backend: 'local', providers: [] });
      client.modelList = [LOCKED, LOCAL, REMOTE, PLAIN];
      const model = new ChatModel(client as unknown as WorkbenchClient, new FakeBridge(), DEFAULT_PREFERENCES);
      await model.refresh();
      return { client, model };
    }

    it('starts on the first model that can answer, never one whose key is missing', async () => {
      const { model } = await providerModel([]);
      expect(model.state.model).toBe('local/glm45-air-mini');
      expect(model.isDemoModel()).toBe(true);
      expect(model.contextLength()).toBe(1024);
    });

    it('switching model keeps the conversation: the next question goes to the new model with the same history', async () => {
      const answer = (text: string) => () => say(chunk({ content: text }), chunk({}, 'stop'));
      const { client, model } = await providerModel([answer('from remote'), answer('from local')]);
      model.setModel('hosted/glm-4.5-air');
      await model.send('first question');
      const conversationId = model.state.conversation.id;
      model.setModel('local/glm45-air-mini');
      await model.send('second question');
      expect(model.state.conversation.id).toBe(conversationId);
      expect(client.requests.map(r => r.model)).toEqual(['hosted/glm-4.5-air', 'local/glm45-air-mini']);
      // (the fake notebook adds its active cell above each question: the last line is the question)
      expect(client.requests[1].messages.map(m => [m.role, m.content?.split('\n').at(-1)])).toEqual([
        ['user', 'first question'],
        ['assistant', 'from remote'],
        ['user', 'second question']
      ]);
      const answers = model.state.conversation.messages.filter(m => m.kind === 'assistant') as AssistantMessage[];
      expect(answers.map(a => a.model)).toEqual(['hosted/glm-4.5-air', 'local/glm45-air-mini']);
    });

    it('offers routing only on a model with the routing capability, whatever the server backend', async () => {
      const answer = () => say(chunk({ content: 'x' }), chunk({}, 'stop'));
      const { client, model } = await providerModel([answer, answer]);
      model.routingViewOpen = true;
      model.setModel('hosted/glm-4.5-air');
      await model.send('remote');
      expect(client.requests[0].routing).toBeUndefined();
      expect(lastAssistant(model)).toMatchObject({ routingRequested: false });
      expect(lastAssistant(model).routingPossible).toBeUndefined();
      model.setModel('local/glm45-air-mini');
      await model.send('local');
      expect(client.requests[1].routing).toBe(true);
      expect(lastAssistant(model)).toMatchObject({ routingRequested: true, routingPossible: true });
    });

    it('sends the thinking switch only to a model that thinks', async () => {
      const answer = () => say(chunk({ content: 'x' }), chunk({}, 'stop'));
      const { client, model } = await providerModel([answer, answer]);
      model.setThinkingMode('on');
      model.setModel('hosted/plain-chat');
      expect(model.supportsThinking()).toBe(false);
      await model.send('no thinking here');
      expect(client.requests[0].thinking).toBeUndefined();
      model.setModel('hosted/glm-4.5-air');
      expect(model.supportsThinking()).toBe(true);
      await model.send('think');
      expect(client.requests[1].thinking).toEqual({ type: 'enabled' });
    });

    it('sends the thinking budget only to a model that honours it, and never with thinking off', async () => {
      const answer = () => say(chunk({ content: 'x' }), chunk({}, 'stop'));
      const { client, model } = await providerModel([answer, answer, answer, answer]);
      model.setConversationSettings({ thinkingBudget: 256 });
      expect(model.effectiveSettings().thinkingBudget).toBe(256);
      model.setModel('hosted/glm-4.5-air'); // thinking, no thinking_budget: the cap would be ignored
      expect(model.supportsThinkingBudget()).toBe(false);
      model.setThinkingMode('on');
      await model.send('remote');
      expect(client.requests[0].thinking).toEqual({ type: 'enabled' });
      model.setModel('local/glm45-air-mini');
      expect(model.supportsThinkingBudget()).toBe(true);
      await model.send('local, capped');
      expect(client.requests[1].thinking).toEqual({ type: 'enabled', budget_tokens: 256 });
      expect(client.saved.at(-1)?.settings?.thinkingBudget).toBe(256); // saved with the conversation
      model.setThinkingMode('off');
      await model.send('no thinking');
      expect(client.requests[2].thinking).toEqual({ type: 'disabled' });
      model.setThinkingMode('on');
      model.setConversationSettings({ thinkingBudget: undefined }); // empty field: no cap
      await model.send('uncapped');
      expect(client.requests[3].thinking).toEqual({ type: 'enabled' });
      expect(client.saved.at(-1)?.settings?.thinkingBudget).toBeUndefined();
    });

    it('offers the notebook tools only to a model that can call them', async () => {
      const answer = () => say(chunk({ content: 'x' }), chunk({}, 'stop'));
      const { client, model } = await providerModel([answer, answer]);
      const NO_TOOLS = card('hosted/text-only', 'hosted', 'openai', ['thinking']);
      const withoutTools = new FakeClient([answer], { backend: 'local', providers: [] });
      withoutTools.modelList = [NO_TOOLS];
      const plain = new ChatModel(withoutTools as unknown as WorkbenchClient, new FakeBridge(), DEFAULT_PREFERENCES);
      await plain.refresh();
      await plain.send('no tools here');
      expect(withoutTools.requests[0].tools).toBeUndefined();
      model.setModel('hosted/plain-chat'); // capabilities: tools
      await model.send('tools here');
      expect(client.requests[0].tools?.length).toBeGreaterThan(0);
    });

    it('keeps each answer\'s cost from usage.cost', async () => {
      const cost = { input: 0.00012, output: 0.00034, total: 0.00046, currency: 'USD' };
      const usage = { prompt_tokens: 600, completion_tokens: 300, total_tokens: 900, cost };
      const { model } = await providerModel([
        () => say(chunk({ content: 'x' }), chunk({}, 'stop'), { id: 'chatcmpl-1', choices: [], usage })
      ]);
      model.setModel('hosted/glm-4.5-air');
      await model.send('priced');
      expect(lastAssistant(model).usage?.cost).toEqual(cost);
    });

    it('shows the status\'s "loading" banner only while a model of the loading provider is chosen', async () => {
      const client = new FakeClient([], {
        state: 'loading',
        message: 'compiling CPU kernels',
        providers: [{ name: 'local', state: 'loading' }, { name: 'hosted', state: 'ready' }]
      });
      client.modelList = [{ ...LOCAL, workbench: { ...LOCAL.workbench, state: 'loading' } }, REMOTE];
      const model = new ChatModel(client as unknown as WorkbenchClient, new FakeBridge(), DEFAULT_PREFERENCES);
      model.loadingPollMs = 60_000; // no second look during the test
      await model.refresh();
      expect(model.state.model).toBe('local/glm45-air-mini');
      expect(model.state.failure?.kind).toBe('loading');
      model.setModel('hosted/glm-4.5-air');
      expect(model.state.failure).toBeNull(); // the hosted model answers while the local engine loads
      model.setModel('local/glm45-air-mini');
      expect(model.state.failure?.kind).toBe('loading');
    });

    it('reopens a conversation saved under a bare model name on that model', async () => {
      const { client, model } = await providerModel([]);
      model.setModel('hosted/plain-chat');
      client.conversations = [{ id: 'c1', title: 't', created: 1, updated: 1, model: 'glm-4.5-air', messages: [] }];
      await model.openConversation('c1');
      expect(model.state.model).toBe('hosted/glm-4.5-air'); // not zai/glm-4.5-air: its key is missing
    });
  });
});
