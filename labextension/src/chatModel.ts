/**
 * The sidebar's controller: one conversation at a time, its streaming answer, the tool-call loop, the
 * model list and the saved-conversation history.
 *
 * Owns behaviour over time (requests, cancellation, persistence); the state itself is folded by the pure
 * functions of chatState.ts / tools.ts, and the views only read `state` and call methods. Each change is
 * announced on `changed`; views batch re-renders per animation frame, so a fast stream stays cheap.
 */

import { UUID } from '@lumino/coreutils';
import { ISignal, Signal } from '@lumino/signaling';

import type { ConversationSummary, WorkbenchClient } from './api';
import {
  applyChunk,
  type AssistantMessage,
  type ContextBlock,
  type Conversation,
  conversationTitle,
  finishMessage,
  type Message,
  messagesForRegenerate,
  newAssistantMessage,
  toApiMessages,
  type ToolMessage
} from './chatState';
import { statusFailure, WorkbenchError } from './errors';
import type { ChatCompletionRequest, ModelInfo, ServerStatus, ThinkingMode } from './protocol';
import { approve, createToolMessage, latestToolMessages, NOTEBOOK_TOOLS, readyToContinue, reject, startRun, complete, fail } from './tools';

export interface ChatPreferences {
  collapseThinkingOnAnswer: boolean;
  thinkingMode: ThinkingMode;
  autoApproveTools: string[];
  enableTools: boolean;
  maxTokens: number;
  temperature: number;
  systemPrompt: string;
}

export const DEFAULT_PREFERENCES: ChatPreferences = {
  collapseThinkingOnAnswer: true,
  thinkingMode: 'auto',
  autoApproveTools: [],
  enableTools: true,
  maxTokens: 1024,
  temperature: 0.6,
  systemPrompt: ''
};

export interface ContextToggles {
  cell: boolean;
  selection: boolean;
  notebook: boolean;
}

/** What the model can reach in the notebook: context for a prompt and the tools it may call. */
export interface NotebookBridge {
  collectContext(toggles: ContextToggles): ContextBlock[];
  runTool(name: string, args: Record<string, unknown>): Promise<string>;
}

export interface ChatState {
  conversation: Conversation;
  history: ConversationSummary[];
  models: ModelInfo[];
  model: string;
  thinkingMode: ThinkingMode;
  context: ContextToggles;
  busy: boolean;
  /** A failure that is not tied to one answer (server unreachable, session expired, model loading). */
  failure: WorkbenchError | null;
  status: ServerStatus | null;
}

/** Tool rounds per user message, so a model that keeps calling tools cannot loop forever. */
const MAX_TOOL_ROUNDS = 8;

function emptyConversation(): Conversation {
  const now = Date.now();
  return { id: UUID.uuid4(), title: 'New conversation', created: now, updated: now, messages: [] };
}

export class ChatModel {
  private _state: ChatState;
  private readonly _changed = new Signal<this, void>(this);
  private abort: AbortController | null = null;
  private toolRounds = 0;
  private stopped = false;

  constructor(
    private readonly client: WorkbenchClient,
    private readonly bridge: NotebookBridge,
    public preferences: ChatPreferences = DEFAULT_PREFERENCES
  ) {
    this._state = {
      conversation: emptyConversation(),
      history: [],
      models: [],
      model: '',
      thinkingMode: preferences.thinkingMode,
      context: { cell: false, selection: false, notebook: false },
      busy: false,
      failure: null,
      status: null
    };
  }

  get state(): ChatState {
    return this._state;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  private update(patch: Partial<ChatState>): void {
    this._state = { ...this._state, ...patch };
    this._changed.emit();
  }

  private setMessages(messages: Message[]): void {
    const conversation = {
      ...this._state.conversation,
      messages,
      title: conversationTitle(messages),
      updated: Date.now(),
      model: this._state.model || this._state.conversation.model
    };
    this.update({ conversation });
  }

  private replaceMessage(id: string, replace: (m: Message) => Message): void {
    this.setMessages(this._state.conversation.messages.map(m => (m.id === id ? replace(m) : m)));
  }

  setPreferences(preferences: ChatPreferences): void {
    const thinkingChanged = preferences.thinkingMode !== this.preferences.thinkingMode;
    this.preferences = preferences;
    this.update(thinkingChanged ? { thinkingMode: preferences.thinkingMode } : {});
  }

  setModel(model: string): void {
    this.update({ model });
  }

  setThinkingMode(thinkingMode: ThinkingMode): void {
    this.update({ thinkingMode });
  }

  setContext(context: Partial<ContextToggles>): void {
    this.update({ context: { ...this._state.context, ...context } });
  }

  dismissFailure(): void {
    this.update({ failure: null });
  }

  private reportFailure(error: unknown): void {
    const failure =
      error instanceof WorkbenchError ? error : new WorkbenchError('backend', (error as Error)?.message ?? String(error));
    this.update({ failure });
  }

  /** Load the model list, server status and history; shows a failure state when the server is not there. */
  async refresh(): Promise<void> {
    try {
      const [models, status, history] = await Promise.all([
        this.client.models(),
        this.client.status().catch(() => null),
        this.client.listConversations().catch(() => this._state.history)
      ]);
      const model = models.some(m => m.id === this._state.model) ? this._state.model : (models[0]?.id ?? '');
      const failure = statusFailure(status);
      this.update({ models, status, history, model, failure });
      if (failure?.kind === 'loading') {
        this.pollWhileLoading();
      }
    } catch (error) {
      this.reportFailure(error);
    }
  }

  /** How often the status is asked again while the model loads (ms). */
  loadingPollMs = 2000;
  private polling = false;

  /** Ask the status until the model stops loading, then refresh once more (which clears the banner). */
  private pollWhileLoading(): void {
    if (this.polling) {
      return;
    }
    this.polling = true;
    const tick = async () => {
      const status = await this.client.status().catch(() => null);
      if (status && statusFailure(status)?.kind === 'loading') {
        this.update({ status, failure: statusFailure(status) }); // the banner says what the load waits for now
        setTimeout(() => void tick(), this.loadingPollMs);
        return;
      }
      this.polling = false;
      await this.refresh();
    };
    setTimeout(() => void tick(), this.loadingPollMs);
  }

  /** Whether answers from this model come from the local engine, which can record routing. */
  supportsRouting(modelId: string = this._state.model): boolean {
    const info = this._state.models.find(m => m.id === modelId);
    if (info?.routing !== undefined) {
      return info.routing;
    }
    // One backend per server: its status names it when the model card does not.
    return (info?.backend ?? this._state.status?.backend) === 'local';
  }

  async send(text: string, extraContext: ContextBlock[] = []): Promise<void> {
    const trimmed = text.trim();
    if (!trimmed || this._state.busy) {
      return;
    }
    const context = [...extraContext, ...this.bridge.collectContext(this._state.context)];
    this.toolRounds = 0;
    this.stopped = false;
    this.setMessages([
      ...this._state.conversation.messages,
      { kind: 'user', id: UUID.uuid4(), text: trimmed, context }
    ]);
    await this.generate();
  }

  async regenerate(): Promise<void> {
    if (this._state.busy) {
      return;
    }
    this.toolRounds = 0;
    this.stopped = false;
    this.setMessages(messagesForRegenerate(this._state.conversation.messages));
    await this.generate();
  }

  /** Stop the answer being generated (cancels it on the server) and any tool loop. */
  stop(): void {
    this.stopped = true;
    this.abort?.abort();
    const messages = this._state.conversation.messages.map(m =>
      m.kind === 'tool' && (m.status === 'pending' || m.status === 'approved')
        ? reject(m, 'The user stopped the conversation before this call ran.')
        : m
    );
    this.setMessages(messages);
    if (!this.abort) {
      this.update({ busy: false });
      void this.save();
    }
  }

  private buildRequest(messages: Message[]): ChatCompletionRequest {
    const request: ChatCompletionRequest = {
      model: this._state.model,
      messages: toApiMessages(messages, this.preferences.systemPrompt || undefined),
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: this.preferences.maxTokens,
      temperature: this.preferences.temperature
    };
    if (this._state.thinkingMode !== 'auto') {
      request.thinking = { type: this._state.thinkingMode === 'on' ? 'enabled' : 'disabled' };
    }
    if (this.supportsRouting()) {
      request.routing = true;
    }
    if (this.preferences.enableTools) {
      request.tools = NOTEBOOK_TOOLS;
    }
    return request;
  }

  /** Stream one assistant turn, then run its tool calls and continue while the model keeps calling tools. */
  private async generate(): Promise<void> {
    const request = this.buildRequest(this._state.conversation.messages);
    const id = UUID.uuid4();
    let message = newAssistantMessage(id, Date.now(), { model: request.model, routingRequested: !!request.routing });
    this.setMessages([...this._state.conversation.messages, message]);
    this.update({ busy: true, failure: null });
    const abort = new AbortController();
    this.abort = abort;
    try {
      for await (const chunk of this.client.chat(request, abort.signal)) {
        message = applyChunk(message, chunk, Date.now());
        this.replaceMessage(id, () => message);
      }
      message = finishMessage(message, Date.now(), 'done');
    } catch (error) {
      if (abort.signal.aborted) {
        message = finishMessage(message, Date.now(), 'stopped');
      } else {
        const text = error instanceof Error ? error.message : String(error);
        message = finishMessage(message, Date.now(), 'error', text);
        if (error instanceof WorkbenchError && error.kind !== 'backend' && error.kind !== 'bad-request') {
          this.reportFailure(error);
        }
      }
    } finally {
      this.abort = null;
    }
    this.replaceMessage(id, () => message);
    if (message.status === 'done' && message.toolCalls.length && !this.stopped) {
      this.toolRounds += 1;
      await this.startToolCalls(message);
      return;
    }
    this.update({ busy: false });
    await this.save();
    await this.refreshHistory();
  }

  private async startToolCalls(message: AssistantMessage): Promise<void> {
    const auto = new Set(this.preferences.autoApproveTools);
    const tools = message.toolCalls.map(call => createToolMessage(call, auto));
    this.setMessages([...this._state.conversation.messages, ...tools]);
    await Promise.all(tools.filter(t => t.status === 'approved').map(t => this.runTool(t.id)));
    await this.continueIfReady();
  }

  approveTool(id: string): void {
    this.replaceMessage(id, m => approve(m as ToolMessage));
    void this.runTool(id).then(() => this.continueIfReady());
  }

  rejectTool(id: string): void {
    this.replaceMessage(id, m => reject(m as ToolMessage));
    void this.continueIfReady();
  }

  /** Approve this call and every later call of the same tool. */
  alwaysApproveTool(id: string): void {
    const message = this._state.conversation.messages.find(m => m.id === id) as ToolMessage | undefined;
    if (!message) {
      return;
    }
    const name = message.call.function.name;
    if (!this.preferences.autoApproveTools.includes(name)) {
      this.preferences = { ...this.preferences, autoApproveTools: [...this.preferences.autoApproveTools, name] };
      this._autoApproveChanged.emit(this.preferences.autoApproveTools);
    }
    this.approveTool(id);
  }

  private readonly _autoApproveChanged = new Signal<this, string[]>(this);
  /** Emitted when the user turns on auto-approve from a call, so the setting can be saved. */
  get autoApproveChanged(): ISignal<this, string[]> {
    return this._autoApproveChanged;
  }

  private async runTool(id: string): Promise<void> {
    const current = this._state.conversation.messages.find(m => m.id === id) as ToolMessage | undefined;
    if (!current || current.status !== 'approved') {
      return;
    }
    this.replaceMessage(id, m => startRun(m as ToolMessage));
    try {
      const result = await this.bridge.runTool(current.call.function.name, current.args ?? {});
      this.replaceMessage(id, m => complete(m as ToolMessage, result));
    } catch (error) {
      this.replaceMessage(id, m => fail(m as ToolMessage, error instanceof Error ? error.message : String(error)));
    }
  }

  private async continueIfReady(): Promise<void> {
    const messages = this._state.conversation.messages;
    if (!readyToContinue(messages)) {
      return;
    }
    if (this.stopped || this.toolRounds >= MAX_TOOL_ROUNDS) {
      this.update({ busy: false });
      await this.save();
      return;
    }
    // Guard against two settles racing into two continuations.
    const last = latestToolMessages(messages).map(m => m.id).join(',');
    if (this.continuedAfter === last) {
      return;
    }
    this.continuedAfter = last;
    await this.generate();
  }
  private continuedAfter = '';

  newConversation(): void {
    if (this._state.busy) {
      this.stop();
    }
    this.update({ conversation: emptyConversation() });
  }

  async openConversation(id: string): Promise<void> {
    if (this._state.busy) {
      this.stop();
    }
    try {
      const conversation = await this.client.getConversation(id);
      this.update({ conversation, model: this.knownModel(conversation.model) });
    } catch (error) {
      this.reportFailure(error);
    }
  }

  private knownModel(model: string | undefined): string {
    return model && this._state.models.some(m => m.id === model) ? model : this._state.model;
  }

  async deleteConversation(id: string): Promise<void> {
    try {
      await this.client.deleteConversation(id);
      if (this._state.conversation.id === id) {
        this.update({ conversation: emptyConversation() });
      }
      await this.refreshHistory();
    } catch (error) {
      this.reportFailure(error);
    }
  }

  private async refreshHistory(): Promise<void> {
    try {
      this.update({ history: await this.client.listConversations() });
    } catch {
      // the history list is a convenience; the failure banner is for the chat itself
    }
  }

  private async save(): Promise<void> {
    const { conversation } = this._state;
    if (!conversation.messages.length) {
      return;
    }
    try {
      await this.client.saveConversation(conversation);
    } catch (error) {
      this.reportFailure(
        new WorkbenchError(
          error instanceof WorkbenchError ? error.kind : 'backend',
          `This conversation could not be saved: ${(error as Error).message}`
        )
      );
    }
  }
}
