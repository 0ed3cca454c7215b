import { describe, expect, it } from 'vitest';

import type { WorkbenchClient } from '../src/api';
import { ChatModel, DEFAULT_PREFERENCES, type NotebookBridge } from '../src/chatModel';
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
  constructor(private scripts: Script[], private serverStatus: Record<string, unknown> = { backend: 'local' }) {}
  async models() {
    return [{ id: 'glm-tiny' }];
  }
  async status() {
    return this.serverStatus;
  }
  async listConversations() {
    return [];
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
    model.setContext({ cell: true });
    model.setThinkingMode('off');
    await model.send('hello');
    const request = client.requests[0];
    expect(request.model).toBe('glm-tiny');
    expect(request.messages.at(-1)).toEqual({ role: 'user', content: 'Active cell [0]:\nx = 1\n\nhello' });
    expect(request.thinking).toEqual({ type: 'disabled' });
    expect(request.routing).toBe(true); // the server's backend is local
    expect(request.tools?.map(t => t.function.name)).toContain('insert_cell');
    expect(lastAssistant(model)).toMatchObject({ content: 'Hi', status: 'done', routingRequested: true });
    expect(model.state.busy).toBe(false);
    expect(client.saved.at(-1)?.title).toBe('hello');
  });

  it('asks for routing only from a local backend and omits thinking in auto mode', async () => {
    const { client, model } = await makeModel([() => say(chunk({ content: 'x' }))], DEFAULT_PREFERENCES, {
      backend: 'remote'
    });
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
});
