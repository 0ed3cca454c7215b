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
  type ConversationSettings,
  conversationTitle,
  finishMessage,
  type Message,
  messagesForRegenerate,
  newAssistantMessage,
  toApiMessages,
  type ToolMessage
} from './chatState';
import { emptyTree, pathBefore, pathOf, savedTree, selectSibling, treeFromMessages, withPath } from './conversationTree';
import { DraftCounter } from './draftCount';
import { statusFailure, WorkbenchError } from './errors';
import { hasCapability, modelName, usableModel } from './models';
import type { ChatCompletionChunk, ChatCompletionRequest, ModelInfo, ServerStatus, ThinkingMode } from './protocol';
import { approve, createToolMessage, latestToolMessages, NOTEBOOK_TOOLS, readyToContinue, reject, startRun, complete, fail } from './tools';
import {
  addSteps,
  DEFAULT_MAX_TOOL_STEPS,
  limitNotice,
  type LoopRun,
  nextAction,
  startLoop,
  stoppedNotice,
  stopLoop
} from './agentLoop';

export interface ChatPreferences {
  collapseThinkingOnAnswer: boolean;
  thinkingMode: ThinkingMode;
  autoApproveTools: string[];
  enableTools: boolean;
  /** 0: as much as fits (no max_tokens sent: the server gives the room left in the context). */
  maxTokens: number;
  temperature: number;
  systemPrompt: string;
  /** Record every local answer's expert routing, not only while a routing view is open (each then costs more). */
  keepRouting: boolean;
  /** Tool steps the model may take on its own after one message before the loop pauses with Continue. */
  maxToolSteps: number;
}

export const DEFAULT_PREFERENCES: ChatPreferences = {
  collapseThinkingOnAnswer: true,
  thinkingMode: 'auto',
  autoApproveTools: [],
  enableTools: true,
  maxTokens: 0,
  temperature: 0.6,
  systemPrompt: '',
  keepRouting: false,
  maxToolSteps: DEFAULT_MAX_TOOL_STEPS
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
  /** Interrupt the notebook's kernel (Stop, when the user asks for it). */
  interruptKernel?(): Promise<void>;
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
  /** Said under the last step when the agent loop paused at its step limit (with Continue) or was stopped. */
  loopNotice: { text: string; canContinue: boolean } | null;
  /** The prompt tokens of the conversation with the message being typed (the server's count); null: not counted
   * (no draft, or a provider that cannot count), the context meter shows the last answer's usage. */
  draftTokens: number | null;
}

/** The model this package ships: a 10M-parameter demo (workbench/models/glm45-air-mini), not a coding assistant. */
export const BUNDLED_MODEL_ID = 'glm45-air-mini';

/** What "Try tools" asks, and the tool it makes the model call (tool_choice names it: the demo model never
 * saw the notebook tools, so asked freely it would not call one). */
export const TOOL_DEMO = {
  prompt: 'Read the cells of my notebook.',
  tool: 'read_cells',
  label: 'Tool demo: read_cells requested with tool_choice'
} as const;

/** The text Continue sends after an answer that was cut off. */
export const CONTINUE_PROMPT = 'Continue from where you stopped.';

/** The numbers of a "maximum context length" refusal (ours and vLLM's wording). */
const CONTEXT_REFUSAL = /maximum context length is (\d+) tokens[\s\S]*?\((\d+) in the messages, (\d+) in the completion\)/;

export function parseContextRefusal(message: string): { limit: number; prompt: number; asked: number } | null {
  const m = CONTEXT_REFUSAL.exec(message);
  return m ? { limit: Number(m[1]), prompt: Number(m[2]), asked: Number(m[3]) } : null;
}

/** The workbench server's refusal of messages that alone fill the context. */
const MESSAGES_REFUSAL = /maximum context length is (\d+) tokens, but the messages take (\d+) tokens/;

/**
 * The request changed so that the context can take it, after the server refused it for its length, with a note
 * saying what changed; null when nothing the sidebar chose can make it fit (the conversation itself is too long).
 *
 * - an explicit max_tokens larger than the room left: lowered to the room;
 * - messages that fill the context only with the notebook tools' descriptions (about 550 tokens, half of the demo
 *   model's context): sent without tools.
 */
export function fitToContext(
  request: ChatCompletionRequest,
  error: unknown
): { request: ChatCompletionRequest; note: string } | null {
  if (!(error instanceof WorkbenchError) || error.kind !== 'bad-request') {
    return null;
  }
  const refusal = request.max_tokens ? parseContextRefusal(error.message) : null;
  const room = refusal ? refusal.limit - refusal.prompt : 0;
  if (refusal && room >= 1 && room < request.max_tokens!) {
    return {
      request: { ...request, max_tokens: room },
      note:
        `Maximum tokens per answer (${request.max_tokens}) lowered to ${room}: what fits in the model's ` +
        `${refusal.limit}-token context after the conversation's ${refusal.prompt} tokens.`
    };
  }
  const full = MESSAGES_REFUSAL.exec(error.message);
  if (full && request.tools && !request.tool_choice) {
    const { tools: _dropped, ...withoutTools } = request;
    return {
      request: withoutTools,
      note:
        `Sent without the notebook tools: with their descriptions the messages (${full[2]} tokens) do not fit ` +
        `in the model's ${full[1]}-token context.`
    };
  }
  return null;
}

/** Tokens kept free for the answer after a tool result, and a cautious characters-per-token for code. */
const TOOL_RESULT_ANSWER_ROOM = 256;
const TOOL_RESULT_CHARS_PER_TOKEN = 2;
const TOOL_RESULT_MIN_CHARS = 200;


function emptyConversation(): Conversation {
  const now = Date.now();
  return { id: UUID.uuid4(), title: 'New conversation', created: now, updated: now, messages: [], tree: emptyTree() };
}

/** A saved conversation as the sidebar holds it: its tree (one branch for one saved before branches) and the
 * shown branch of that tree as `messages`. */
export function openedConversation(saved: Conversation): Conversation {
  const tree = savedTree(saved);
  return { ...saved, tree, messages: pathOf(tree) };
}

export class ChatModel {
  private _state: ChatState;
  private readonly _changed = new Signal<this, void>(this);
  private abort: AbortController | null = null;
  /** The agent loop of the latest message: its steps, limit and whether Stop ended it. */
  private loop: LoopRun = startLoop();
  /** A tool the next request names in tool_choice (the tool demo); cleared once that request is built. */
  private forcedTool: string | null = null;
  /** Counts the message being typed for the context meter (debounced, cancellable, silent on failure). */
  private readonly draftCounter = new DraftCounter(
    (request, signal) => this.client.countTokens(request, signal),
    tokens => {
      if (tokens !== this._state.draftTokens) {
        this.update({ draftTokens: tokens });
      }
    }
  );
  /** A saved conversation to reopen on the first refresh (the last one of the previous session). */
  restoreConversationId: string | null = null;

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
      status: null,
      loopNotice: null,
      draftTokens: null
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

  /** Show these messages; the tree keeps what they replace as another branch (conversationTree.withPath). */
  private setMessages(messages: Message[]): void {
    const current = this._state.conversation;
    const conversation = {
      ...current,
      messages,
      tree: withPath(current.tree ?? treeFromMessages(current.messages), messages),
      title: current.titleEdited ? current.title : conversationTitle(messages),
      updated: Date.now(),
      model: this._state.model || current.model
    };
    this.update({ conversation });
  }

  /** The conversation's own settings, with its model and thinking mode as chosen now. */
  private settingsPatch(patch: ConversationSettings): void {
    const conversation = this._state.conversation;
    this.update({ conversation: { ...conversation, settings: { ...conversation.settings, ...patch } } });
  }

  /** Temperature, max tokens and thinking budget of this conversation (saved with it); undefined follows the
   * preferences (for the budget: no cap). */
  setConversationSettings(patch: Pick<ConversationSettings, 'temperature' | 'maxTokens' | 'thinkingBudget'>): void {
    this.settingsPatch(patch);
    void this.save();
  }

  /** The temperature, max tokens and thinking budget (null: no cap) answers of this conversation are asked with. */
  effectiveSettings(): { temperature: number; maxTokens: number; thinkingBudget: number | null } {
    const settings = this._state.conversation.settings ?? {};
    const budget = settings.thinkingBudget;
    return {
      temperature: settings.temperature ?? this.preferences.temperature,
      maxTokens: settings.maxTokens ?? this.preferences.maxTokens,
      thinkingBudget: typeof budget === 'number' && Number.isInteger(budget) && budget >= 1 ? budget : null
    };
  }

  /**
   * Edit a sent message and send it again: the path up to it, then the new text, then a new answer. The old
   * message and everything after it stay as the other branch (‹ 1/2 › on the message).
   */
  async editMessage(id: string, text: string): Promise<void> {
    const trimmed = text.trim();
    const conversation = this._state.conversation;
    const old = conversation.messages.find(m => m.id === id);
    if (!trimmed || this._state.busy || old?.kind !== 'user') {
      return;
    }
    const tree = conversation.tree ?? treeFromMessages(conversation.messages);
    this.beginLoop();
    this.setMessages([...pathBefore(tree, id), { ...old, id: UUID.uuid4(), text: trimmed }]);
    await this.generate();
  }

  /** Show another branch or answer version: the sibling `index` of message `id`. */
  showSibling(id: string, index: number): void {
    const conversation = this._state.conversation;
    if (this._state.busy || !conversation.tree) {
      return;
    }
    const tree = selectSibling(conversation.tree, id, index);
    if (tree === conversation.tree) {
      return;
    }
    this.update({ conversation: { ...conversation, tree, messages: pathOf(tree) } });
    void this.save();
  }

  /** Name a conversation (the current one or one of the history); an empty title follows the first question. */
  async renameConversation(id: string, title: string): Promise<void> {
    const name = title.trim().slice(0, 200);
    try {
      if (this._state.conversation.id === id) {
        const conversation = this._state.conversation;
        this.update({
          conversation: {
            ...conversation,
            title: name || conversationTitle(conversation.messages),
            titleEdited: !!name
          }
        });
        await this.save();
      } else {
        const saved = await this.client.getConversation(id);
        await this.client.saveConversation({
          ...saved,
          title: name || conversationTitle(openedConversation(saved).messages),
          titleEdited: !!name
        });
      }
      await this.refreshHistory();
    } catch (error) {
      this.reportFailure(error);
    }
  }

  private replaceMessage(id: string, replace: (m: Message) => Message): void {
    this.setMessages(this._state.conversation.messages.map(m => (m.id === id ? replace(m) : m)));
  }

  setPreferences(preferences: ChatPreferences): void {
    const thinkingChanged = preferences.thinkingMode !== this.preferences.thinkingMode;
    this.preferences = preferences;
    this.update(thinkingChanged ? { thinkingMode: preferences.thinkingMode } : {});
  }

  /** Choose the model of the next answers; the conversation stays (its history goes to the new model). */
  setModel(model: string): void {
    const { failure, status } = this._state;
    // the status's loading / error banner follows the chosen model's provider; other failures stay
    const fromStatus = statusFailure(status);
    const statusBanner = !failure || (fromStatus?.kind === failure.kind && fromStatus.message === failure.message);
    this.update({ model, failure: statusBanner ? this.statusFailureFor(status, model) : failure });
    this.settingsPatch({ model });
  }

  /**
   * The failure the status shows for this model. The status's state is its default provider's (the first of
   * `providers`): a model of another provider answers whatever that one does (its own state is in the picker).
   */
  private statusFailureFor(status: ServerStatus | null, modelId: string, models = this._state.models): WorkbenchError | null {
    const failure = statusFailure(status);
    const provider = models.find(m => m.id === modelId)?.workbench?.provider;
    const defaultProvider = status?.providers?.[0]?.name;
    return failure && provider && defaultProvider && provider !== defaultProvider ? null : failure;
  }

  setThinkingMode(thinkingMode: ThinkingMode): void {
    this.update({ thinkingMode });
    this.settingsPatch({ thinkingMode });
  }

  /**
   * The message being typed changed (or what it would be sent with): the context meter counts the request that
   * sending it would make, once typing pauses. Nothing is counted while an answer is under way.
   */
  setDraft(text: string): void {
    const trimmed = text.trim();
    if (!trimmed || this._state.busy || !this._state.model) {
      this.draftCounter.update(null);
      return;
    }
    this.draftCounter.update({
      model: this._state.model,
      build: () => {
        let context: ContextBlock[] = [];
        try {
          context = this.bridge.collectContext(this._state.context);
        } catch {
          // a count without the notebook's context is still a count
        }
        const draft: Message = { kind: 'user', id: 'draft', text: trimmed, context };
        return this.buildRequest([...this._state.conversation.messages, draft], { preview: true });
      }
    });
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
      const model = usableModel(models, status, this._state.model);
      const failure = this.statusFailureFor(status, model, models);
      this.update({ models, status, history, model, failure });
      const restore = this.restoreConversationId;
      this.restoreConversationId = null;
      if (restore && !this._state.conversation.messages.length && history.some(h => h.id === restore)) {
        await this.openConversation(restore);
      }
      if (statusFailure(status)?.kind === 'loading') {
        this.pollWhileLoading(); // also while another model is chosen: the picker shows when this one is ready
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
        // the banner says what the load waits for now
        this.update({ status, failure: this.statusFailureFor(status, this._state.model) });
        setTimeout(() => void tick(), this.loadingPollMs);
        return;
      }
      this.polling = false;
      await this.refresh();
    };
    setTimeout(() => void tick(), this.loadingPollMs);
  }

  /** The model card of a model of the list, if it is there. */
  modelInfo(modelId: string = this._state.model): ModelInfo | undefined {
    return this._state.models.find(m => m.id === modelId);
  }

  /** Whether this is the bundled demo model (by its id, or the local engine's checkpoint folder). */
  isDemoModel(modelId: string = this._state.model): boolean {
    const info = this.modelInfo(modelId);
    if (modelId === BUNDLED_MODEL_ID || modelId === `local/${BUNDLED_MODEL_ID}`) {
      return true;
    }
    if (info?.workbench?.provider_kind === 'local' && info.workbench.model === BUNDLED_MODEL_ID) {
      return true;
    }
    const status = this._state.status;
    const path = typeof status?.model_path === 'string' ? status.model_path.replace(/[\\/]+$/, '') : '';
    return status?.model === modelId && (path.endsWith(`/${BUNDLED_MODEL_ID}`) || path.endsWith(`\\${BUNDLED_MODEL_ID}`));
  }

  /** The model's context length in tokens: from its model card (max_model_len / context_length) or the
   * local engine's status (context_limit); null when the server does not say. */
  contextLength(modelId: string = this._state.model): number | null {
    const info = this.modelInfo(modelId);
    const fromCard = info?.workbench?.context_length ?? info?.max_model_len ?? info?.context_length;
    if (typeof fromCard === 'number' && fromCard > 0) {
      return fromCard;
    }
    const status = this._state.status;
    const limit = status?.context_limit;
    if (typeof limit === 'number' && limit > 0 && (!status?.model || status.model === modelId)) {
      return limit;
    }
    return null;
  }

  /** Ask the model to call a notebook tool, so the approval flow can be seen even on the demo model. */
  async tryTools(): Promise<void> {
    if (this._state.busy) {
      return;
    }
    this.forcedTool = TOOL_DEMO.tool;
    await this.send(TOOL_DEMO.prompt, [], { label: TOOL_DEMO.label, toggledContext: false });
    this.forcedTool = null;
  }

  /** Ask for the rest of an answer that was cut off. */
  async continueAnswer(): Promise<void> {
    await this.send(CONTINUE_PROMPT, [], { toggledContext: false });
  }

  /**
   * Whether a routing view is open (index.ts keeps this up to date). Recording an answer's routing costs the
   * engine an extra decode step and its prefill's last-row saving, so answers ask for it only while someone
   * looks at routing, or when the keepRouting preference says always.
   */
  routingViewOpen = false;

  /**
   * Whether the model's answers can record routing: its `routing` capability; for a server that does not list
   * capabilities (one backend per server), whether that backend is the local engine.
   */
  supportsRouting(modelId: string = this._state.model): boolean {
    return hasCapability(this.modelInfo(modelId), 'routing') ?? this._state.status?.backend === 'local';
  }

  /** Whether the model takes the thinking switch: its `thinking` capability; assumed where the server does not
   * say (GLM models think). */
  supportsThinking(modelId: string = this._state.model): boolean {
    return hasCapability(this.modelInfo(modelId), 'thinking') ?? true;
  }

  /** Whether the model honours a thinking budget (`thinking_budget`); never assumed: a server that does not say
   * would ignore it, or refuse the field. */
  supportsThinkingBudget(modelId: string = this._state.model): boolean {
    return this.supportsThinking(modelId) && hasCapability(this.modelInfo(modelId), 'thinking_budget') === true;
  }

  /**
   * Send a user message. `label` is shown above it and never sent; `toggledContext: false` leaves out what the
   * context toggles would add (Continue and the tool demo need none of it).
   */
  async send(
    text: string,
    extraContext: ContextBlock[] = [],
    options: { label?: string; toggledContext?: boolean } = {}
  ): Promise<void> {
    const trimmed = text.trim();
    if (!trimmed || this._state.busy) {
      return;
    }
    const { label, toggledContext = true } = options;
    const context = [...extraContext, ...(toggledContext ? this.bridge.collectContext(this._state.context) : [])];
    this.beginLoop();
    this.setMessages([
      ...this._state.conversation.messages,
      { kind: 'user', id: UUID.uuid4(), text: trimmed, context, ...(label ? { label } : {}) }
    ]);
    await this.generate();
  }

  async regenerate(): Promise<void> {
    if (this._state.busy) {
      return;
    }
    this.beginLoop();
    this.setMessages(messagesForRegenerate(this._state.conversation.messages));
    await this.generate();
  }

  /** A new run of the agent loop (a message, Regenerate, Continue): steps count from 0 up to the setting. */
  private beginLoop(): void {
    const limit = this.preferences.maxToolSteps;
    this.loop = startLoop(Number.isInteger(limit) && limit >= 1 ? limit : DEFAULT_MAX_TOOL_STEPS);
    this.update({ loopNotice: null });
  }

  /** Go on after the loop paused at its step limit: the tool results go back to the model. */
  async continueLoop(): Promise<void> {
    if (this._state.busy || !this._state.loopNotice?.canContinue) {
      return;
    }
    this.beginLoop();
    await this.generate();
  }

  /**
   * Stop the answer being generated (cancels it on the server) and the agent loop at once: calls waiting for
   * approval are rejected, no further step starts. With `interruptKernel`, a cell the loop is running is
   * interrupted too (otherwise it runs to its end, and its result is kept but not sent).
   */
  stop(options: { interruptKernel?: boolean } = {}): void {
    const inLoop = this._state.busy && this.loop.steps > 0;
    this.loop = stopLoop(this.loop);
    this.abort?.abort();
    if (inLoop) {
      this.update({ loopNotice: { text: stoppedNotice(this.loop, !!options.interruptKernel), canContinue: false } });
    }
    if (options.interruptKernel) {
      void this.bridge.interruptKernel?.().catch(error => this.reportFailure(error));
    }
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

  /** The request for these messages; `preview` (the draft's count) leaves the tool demo's forced tool for the
   * request that is sent. */
  private buildRequest(messages: Message[], { preview = false } = {}): ChatCompletionRequest {
    const request: ChatCompletionRequest = {
      model: this._state.model,
      messages: toApiMessages(messages, this.preferences.systemPrompt || undefined),
      stream: true,
      stream_options: { include_usage: true },
      temperature: this.effectiveSettings().temperature
    };
    const { maxTokens, thinkingBudget } = this.effectiveSettings();
    if (maxTokens > 0) {
      request.max_tokens = maxTokens;
    }
    if (this._state.thinkingMode !== 'auto' && this.supportsThinking(request.model)) {
      request.thinking = { type: this._state.thinkingMode === 'on' ? 'enabled' : 'disabled' };
    }
    // a budget caps thinking that happens: sent unless thinking is off (with "auto" it asks for thinking, capped)
    if (thinkingBudget !== null && this._state.thinkingMode !== 'off' && this.supportsThinkingBudget(request.model)) {
      request.thinking = { type: 'enabled', budget_tokens: thinkingBudget };
    }
    if (this.supportsRouting(request.model) && (this.routingViewOpen || this.preferences.keepRouting)) {
      request.routing = true;
    }
    // a model its server says cannot call tools gets none (one that does not say gets them, as before)
    const toolsPossible = hasCapability(this.modelInfo(request.model), 'tools') !== false;
    if ((this.preferences.enableTools || this.forcedTool) && toolsPossible) {
      request.tools = NOTEBOOK_TOOLS;
    }
    if (this.forcedTool) {
      if (toolsPossible) {
        // only the named tool: the demo model's 1024-token context, and its luck at the call format, need a short prompt
        request.tools = NOTEBOOK_TOOLS.filter(tool => tool.function.name === this.forcedTool);
        request.tool_choice = { type: 'function', function: { name: this.forcedTool } };
      }
      if (!preview) {
        this.forcedTool = null; // the model answers the tool's result freely
      }
    }
    return request;
  }

  /** Stream one assistant turn, then run its tool calls and continue while the model keeps calling tools. */
  private async generate(): Promise<void> {
    const request = this.buildRequest(this._state.conversation.messages);
    const id = UUID.uuid4();
    let message = newAssistantMessage(id, Date.now(), {
      model: request.model,
      routingRequested: !!request.routing,
      routingPossible: this.supportsRouting(request.model)
    });
    this.setMessages([...this._state.conversation.messages, message]);
    this.update({ busy: true, failure: null });
    const abort = new AbortController();
    this.abort = abort;
    try {
      let stream: AsyncGenerator<ChatCompletionChunk, void, undefined>;
      let attempt = request;
      const notes: string[] = [];
      for (;;) {
        try {
          stream = await this.open(attempt, abort.signal);
          break;
        } catch (error) {
          // A request the context cannot take: ask again for what fits, and say so under the answer.
          const fitted = notes.length < 2 ? fitToContext(attempt, error) : null;
          if (!fitted) {
            throw error;
          }
          attempt = fitted.request;
          notes.push(fitted.note);
          message = { ...message, note: notes.join(' ') };
          this.replaceMessage(id, () => message);
        }
      }
      for await (const chunk of stream) {
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
    if (message.status === 'done' && message.toolCalls.length && !this.loop.stopped) {
      this.loop = addSteps(this.loop, message.toolCalls.length);
      await this.startToolCalls(message);
      return;
    }
    this.update({ busy: false });
    await this.save();
    await this.refreshHistory();
  }

  /** Send the request and wait for the response headers (a refusal throws here, before any chunk). */
  private async open(
    request: ChatCompletionRequest,
    signal: AbortSignal
  ): Promise<AsyncGenerator<ChatCompletionChunk, void, undefined>> {
    const stream = this.client.chat(request, signal);
    const first = await stream.next();
    return (async function* () {
      if (!first.done) {
        yield first.value;
        yield* stream;
      }
    })();
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
    this.replaceMessage(id, m => ({ ...startRun(m as ToolMessage), started: Date.now() }));
    try {
      const result = this.fitToolResult(await this.bridge.runTool(current.call.function.name, current.args ?? {}));
      this.replaceMessage(id, m => ({ ...complete(m as ToolMessage, result), finished: Date.now() }));
    } catch (error) {
      const text = error instanceof Error ? error.message : String(error);
      this.replaceMessage(id, m => ({ ...fail(m as ToolMessage, text), finished: Date.now() }));
    }
  }

  /**
   * A tool result cut to what the model's context can still take (a whole notebook does not fit in the demo
   * model's 1024 tokens), with a line saying so; unchanged when the context length is unknown or there is room.
   */
  fitToolResult(result: string): string {
    const limit = this.contextLength();
    if (!limit) {
      return result;
    }
    const last = [...this._state.conversation.messages]
      .reverse()
      .find((m): m is AssistantMessage => m.kind === 'assistant' && !!m.usage);
    const used = last?.usage ? last.usage.prompt_tokens + last.usage.completion_tokens : 0;
    const tokens = limit - used - TOOL_RESULT_ANSWER_ROOM;
    const chars = Math.max(TOOL_RESULT_MIN_CHARS, tokens * TOOL_RESULT_CHARS_PER_TOKEN);
    if (result.length <= chars) {
      return result;
    }
    return (
      `${result.slice(0, chars)}\n[... ${result.length - chars} more characters left out: ` +
      `the model's ${limit}-token context has no room for them]`
    );
  }

  private async continueIfReady(): Promise<void> {
    const messages = this._state.conversation.messages;
    if (!readyToContinue(messages)) {
      return;
    }
    const decision = nextAction(this.loop, latestToolMessages(messages) as ToolMessage[]);
    if (decision === 'wait') {
      return;
    }
    if (decision === 'stopped') {
      this.update({ busy: false }); // Stop already said so
      await this.save();
      return;
    }
    if (decision === 'limit') {
      this.update({ busy: false, loopNotice: { text: limitNotice(this.loop), canContinue: true } });
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
    this.update({ conversation: emptyConversation(), loopNotice: null });
  }

  async openConversation(id: string): Promise<void> {
    if (this._state.busy) {
      this.stop();
    }
    try {
      const conversation = openedConversation(await this.client.getConversation(id));
      const settings = conversation.settings ?? {};
      this.update({
        conversation,
        model: this.knownModel(settings.model ?? conversation.model),
        thinkingMode: settings.thinkingMode ?? this._state.thinkingMode,
        loopNotice: null
      });
    } catch (error) {
      this.reportFailure(error);
    }
  }

  /** The conversation's model when it can be chosen now (a bare name saved before provider ids counts where it
   * names one model), else the current one. */
  private knownModel(model: string | undefined): string {
    const { models, status } = this._state;
    const usable = models.filter(m => usableModel(models, status, m.id) === m.id);
    const named = usable.filter(m => m.id === model || (!!model && !model.includes('/') && modelName(m) === model));
    return named.length === 1 ? named[0].id : this._state.model;
  }

  async deleteConversation(id: string): Promise<void> {
    try {
      await this.client.deleteConversation(id);
      if (this._state.conversation.id === id) {
        this.update({ conversation: emptyConversation(), loopNotice: null });
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
      // the settings the answers were asked with, the sidebar's as well where the conversation has none of its own
      const settings = { ...conversation.settings, model: this._state.model || conversation.model, thinkingMode: this._state.thinkingMode };
      await this.client.saveConversation({ ...conversation, settings });
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
