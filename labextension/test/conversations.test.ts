/** The controller's side of branches, versions and per-conversation settings (the tree itself: conversationTree). */
import { describe, expect, it } from 'vitest';

import type { WorkbenchClient } from '../src/api';
import { ChatModel, DEFAULT_PREFERENCES, type NotebookBridge } from '../src/chatModel';
import type { AssistantMessage, Conversation, Message } from '../src/chatState';
import { siblingPosition } from '../src/conversationTree';
import type { ChatCompletionChunk, ChatCompletionRequest } from '../src/protocol';

/** Answers every request with "answer N" (N counts requests), and keeps what was saved. */
class FakeClient {
  requests: ChatCompletionRequest[] = [];
  stored = new Map<string, Conversation>();
  async models() {
    return [{ id: 'glm-a' }, { id: 'glm-b' }];
  }
  async status() {
    return { backend: 'remote' };
  }
  async listConversations() {
    return [...this.stored.values()].map(({ id, title, created, updated }) => ({ id, title, created, updated }));
  }
  async getConversation(id: string) {
    return JSON.parse(JSON.stringify(this.stored.get(id))) as Conversation;
  }
  async saveConversation(c: Conversation) {
    this.stored.set(c.id, JSON.parse(JSON.stringify(c)));
  }
  chat(request: ChatCompletionRequest): AsyncGenerator<ChatCompletionChunk> {
    this.requests.push(request);
    const n = this.requests.length;
    return (async function* () {
      yield { id: `c${n}`, choices: [{ index: 0, delta: { content: `answer ${n}` }, finish_reason: null }] };
      yield { id: `c${n}`, choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] };
    })();
  }
}

const bridge: NotebookBridge = { collectContext: () => [], runTool: async () => '' };
const text = (m: Message) => (m.kind === 'user' ? m.text : m.kind === 'assistant' ? m.content : m.kind);

async function makeModel() {
  const client = new FakeClient();
  const model = new ChatModel(client as unknown as WorkbenchClient, bridge, { ...DEFAULT_PREFERENCES, enableTools: false });
  await model.refresh();
  return { client, model };
}

describe('conversations with branches', () => {
  it('edit and resend replaces the answers after the message and keeps the old branch', async () => {
    const { client, model } = await makeModel();
    await model.send('first');
    await model.send('second');
    const second = model.state.conversation.messages[2];
    await model.editMessage(second.id, 'second, edited');
    const shown = model.state.conversation.messages;
    expect(shown.map(text)).toEqual(['first', 'answer 1', 'second, edited', 'answer 3']);
    // the model saw the edited question after the first turn, not the old one
    expect(client.requests[2].messages.map(m => m.content)).toEqual(['first', 'answer 1', 'second, edited']);
    expect(siblingPosition(model.state.conversation.tree!, shown[2].id)).toEqual({ index: 1, count: 2 });
    model.showSibling(shown[2].id, 0);
    expect(model.state.conversation.messages.map(text)).toEqual(['first', 'answer 1', 'second', 'answer 2']);
    // the saved conversation holds both branches and shows the one chosen
    await new Promise(resolve => setTimeout(resolve, 0));
    const saved = client.stored.get(model.state.conversation.id)!;
    expect(saved.messages.map(text)).toEqual(['first', 'answer 1', 'second', 'answer 2']);
    expect(Object.keys(saved.tree!.nodes)).toHaveLength(6);
  });

  it('Regenerate keeps each answer as a version', async () => {
    const { model } = await makeModel();
    await model.send('q');
    await model.regenerate();
    await model.regenerate();
    const answer = model.state.conversation.messages[1] as AssistantMessage;
    expect(answer.content).toBe('answer 3');
    expect(siblingPosition(model.state.conversation.tree!, answer.id)).toEqual({ index: 2, count: 3 });
    model.showSibling(answer.id, 0);
    expect(model.state.conversation.messages.map(text)).toEqual(['q', 'answer 1']);
  });

  it('each conversation keeps its model, thinking mode, temperature, max tokens and thinking budget', async () => {
    const { client, model } = await makeModel();
    model.setModel('glm-b');
    model.setThinkingMode('off');
    model.setConversationSettings({ temperature: 0.1, maxTokens: 64, thinkingBudget: 512 });
    await model.send('tuned');
    expect(client.requests[0]).toMatchObject({ model: 'glm-b', temperature: 0.1, max_tokens: 64, thinking: { type: 'disabled' } });
    const tuned = model.state.conversation.id;
    model.newConversation();
    model.setModel('glm-a');
    model.setThinkingMode('on');
    await model.send('plain');
    expect(client.requests[1]).toMatchObject({ model: 'glm-a', temperature: DEFAULT_PREFERENCES.temperature });
    expect(client.requests[1].max_tokens).toBeUndefined();
    await model.openConversation(tuned);
    expect(model.state.model).toBe('glm-b');
    expect(model.state.thinkingMode).toBe('off');
    expect(model.effectiveSettings()).toEqual({ temperature: 0.1, maxTokens: 64, thinkingBudget: 512 });
  });

  it('opens a conversation saved before branches as one branch, and renames it', async () => {
    const { client, model } = await makeModel();
    const old = {
      id: 'old', title: 'old question', created: 1, updated: 2, model: 'glm-a',
      messages: [
        { kind: 'user', id: 'u', text: 'old question', context: [] },
        { kind: 'assistant', id: 'a', content: 'old answer', reasoning: '', toolCalls: [], status: 'done',
          routingRequested: false, timing: { start: 0 }, reasoningDeltas: 0, contentDeltas: 0 }
      ]
    } as unknown as Conversation;
    client.stored.set('old', old);
    await model.openConversation('old');
    expect(model.state.conversation.messages.map(text)).toEqual(['old question', 'old answer']);
    await model.regenerate();
    expect(siblingPosition(model.state.conversation.tree!, model.state.conversation.messages[1].id).count).toBe(2);
    await model.renameConversation('old', 'My name');
    expect(client.stored.get('old')).toMatchObject({ title: 'My name', titleEdited: true });
    await model.send('more'); // a named conversation keeps its name
    expect(model.state.conversation.title).toBe('My name');
  });
});
