/**
 * The chat sidebar's view: header (model picker, thinking mode, history, new conversation), failure
 * banner, the message log (user messages, answers with their thinking block, tool calls awaiting approval)
 * and the input with notebook-context toggles.
 *
 * Reads ChatModel.state and calls its methods; nothing here decides behaviour. Re-renders at most once per
 * animation frame however fast chunks arrive.
 */

import React, { useEffect, useLayoutEffect, useRef, useState } from 'react';

import { isToolStep, kernelStepRunning, stepNumbers, stepReasoning } from '../agentLoop';
import type { ChatModel, ChatState } from '../chatModel';
import {
  answerParts,
  type AssistantMessage,
  completionTokens,
  contextTokens,
  isCutOff,
  type Message,
  tokensPerSecond,
  type UserMessage
} from '../chatState';
import type { FailureKind } from '../errors';
import { conversationCost, formatCost, groupModels, type ModelEntry, modelOptionText } from '../models';
import type { ThinkingMode } from '../protocol';
import { ConversationMenu, type ExportActions, SiblingNav } from './ConversationControls';
import { HistoryPanel } from './HistoryPanel';
import { Markdown } from './Markdown';
import { StepCard } from './StepCard';
import { ThinkingBlock } from './ThinkingBlock';

export interface ChatViewActions {
  copy(text: string): void;
  showRouting(completionId: string): void;
  /** How to point the workbench at a real GLM-4.5-Air (the README's section, notebook 5). */
  connectModel(): void;
  /** Export the shown branch to a new notebook / Markdown file and open it (absent: no export buttons). */
  exports?: ExportActions;
}

/** What the bundled model is, wherever the user meets it. */
export const DEMO_MODEL_TEXT =
  'a 10M-parameter demo model: it shows the workbench and real expert routing, but writes no useful code.';

/** Subscribe to the model, coalescing bursts of changes into one render per frame. */
function useChatState(model: ChatModel): ChatState {
  const [state, setState] = useState(model.state);
  useEffect(() => {
    let frame = 0;
    const onChange = () => {
      if (!frame) {
        frame = requestAnimationFrame(() => {
          frame = 0;
          setState(model.state);
        });
      }
    };
    model.changed.connect(onChange);
    setState(model.state);
    return () => {
      model.changed.disconnect(onChange);
      cancelAnimationFrame(frame);
    };
  }, [model]);
  return state;
}

const FAILURE_TITLES: Record<FailureKind, string> = {
  unreachable: 'Server unreachable',
  'session-expired': 'Session expired',
  loading: 'Model still loading',
  busy: 'Server busy',
  backend: 'Backend error',
  'bad-request': 'Request refused'
};

function FailureBanner({ state, model }: { state: ChatState; model: ChatModel }): JSX.Element | null {
  const failure = state.failure;
  if (!failure) {
    return null;
  }
  return (
    <div className={`glm-Failure glm-mod-${failure.kind}`} role="alert">
      <strong className="glm-Failure-title">{FAILURE_TITLES[failure.kind]}</strong>
      <span className="glm-Failure-message">{failure.message}</span>
      <span className="glm-Failure-actions">
        {failure.kind === 'session-expired' ? (
          <button className="glm-Button" onClick={() => window.location.reload()}>
            Reload page
          </button>
        ) : (
          <button className="glm-Button" onClick={() => void model.refresh()}>
            Retry
          </button>
        )}
        <button className="glm-Button" aria-label="Dismiss" onClick={() => model.dismissFailure()}>
          ×
        </button>
      </span>
    </div>
  );
}

function UserMessageView({
  message,
  state,
  model
}: {
  message: UserMessage;
  state: ChatState;
  model: ChatModel;
}): JSX.Element {
  const [draft, setDraft] = useState<string | null>(null);
  if (draft !== null) {
    const resend = () => {
      if (draft.trim() && !state.busy) {
        void model.editMessage(message.id, draft);
        setDraft(null);
      }
    };
    return (
      <div className="glm-Message glm-mod-user glm-mod-editing" aria-label="Edit your message">
        <textarea
          className="glm-Input glm-EditMessage-input"
          aria-label="Edited message"
          autoFocus
          rows={Math.min(8, Math.max(2, draft.split('\n').length))}
          value={draft}
          onChange={e => setDraft(e.target.value)}
          onKeyDown={e => {
            if (e.key === 'Enter' && !e.shiftKey && !e.nativeEvent.isComposing) {
              e.preventDefault();
              resend();
            } else if (e.key === 'Escape') {
              e.stopPropagation();
              setDraft(null);
            }
          }}
        />
        <div className="glm-Message-footer">
          <span className="glm-Note">The answers after it are replaced; the current ones stay as the other branch.</span>
          <span className="glm-Message-actions">
            <button className="glm-Button" onClick={() => setDraft(null)}>
              Cancel
            </button>
            <button
              className="glm-Button glm-mod-accept glm-EditMessage-send"
              disabled={!draft.trim() || state.busy}
              onClick={resend}
            >
              Send
            </button>
          </span>
        </div>
      </div>
    );
  }
  return (
    <div className="glm-Message glm-mod-user" aria-label="Your message">
      {message.label && <div className="glm-Message-label">{message.label}</div>}
      {message.context.length > 0 && (
        <div className="glm-Message-context">
          {message.context.map((block, i) => (
            <span key={i} className="glm-ContextChip" title={block.text.slice(0, 500)}>
              {block.label}
            </span>
          ))}
        </div>
      )}
      <div className="glm-Message-text">{message.text}</div>
      <div className="glm-Message-footer glm-mod-user">
        <SiblingNav id={message.id} state={state} model={model} what="branch" />
        <span className="glm-Message-actions">
          {!state.busy && (
            <button
              className="glm-Button glm-EditMessage"
              aria-label="Edit message"
              title="Edit this message and send it again (the current answers stay as a branch)"
              onClick={() => setDraft(message.text)}
            >
              Edit
            </button>
          )}
        </span>
      </div>
    </div>
  );
}

function UsageLine({ message }: { message: AssistantMessage }): JSX.Element | null {
  if (message.status === 'streaming') {
    return null;
  }
  const tokens = completionTokens(message);
  const rate = tokensPerSecond(message);
  const cost = formatCost(message.usage?.cost);
  const { start, end } = message.timing;
  const parts = [`${tokens} token${tokens === 1 ? '' : 's'}`];
  if (rate !== null) {
    parts.push(`${rate.toFixed(1)} tok/s`);
  }
  if (message.usage) {
    const seconds = message.usage.prompt_seconds;
    parts.push(`prompt ${message.usage.prompt_tokens}${typeof seconds === 'number' ? ` in ${seconds.toFixed(2)} s` : ''}`);
  }
  if (cost === null && end !== undefined && end > start) {
    // an answer without a cost (the local engine, an unpriced model) says how long it took instead
    parts.push(`${((end - start) / 1000).toFixed(1)} s total`);
  }
  const measured =
    typeof message.usage?.decode_seconds === 'number'
      ? "Speed measured by the server's engine, from the first generated token to the last."
      : 'Speed over the whole request as the browser saw it (the server sent no decode time).';
  const costTitle = message.usage?.cost
    ? `Input ${formatCost({ ...message.usage.cost, total: message.usage.cost.input })}, ` +
      `output ${formatCost({ ...message.usage.cost, total: message.usage.cost.output })} ` +
      "at the model's prices"
    : undefined;
  return (
    <span className="glm-Usage" title={measured}>
      {parts.join(' · ')}
      {cost !== null && (
        <>
          {' · '}
          <span className="glm-Usage-cost" title={costTitle}>
            {cost}
          </span>
        </>
      )}
      {message.model && (
        <>
          {' · '}
          <span className="glm-Usage-model" title="The model that gave this answer">
            {message.model}
          </span>
        </>
      )}
    </span>
  );
}

function AssistantMessageView({
  message,
  isLast,
  busy,
  model,
  actions,
  state
}: {
  message: AssistantMessage;
  isLast: boolean;
  busy: boolean;
  model: ChatModel;
  actions: ChatViewActions;
  state: ChatState;
}): JSX.Element {
  const waiting = message.status === 'streaming' && !message.content && !message.reasoning && !message.toolCalls.length;
  return (
    <div
      className={`glm-Message glm-mod-assistant glm-mod-${message.status}`}
      aria-label="Answer"
      aria-busy={message.status === 'streaming'}
    >
      <ThinkingBlock message={message} collapseOnAnswer={model.preferences.collapseThinkingOnAnswer} />
      {waiting && <div className="glm-Waiting">Waiting for the model…</div>}
      {message.note && <div className="glm-Note glm-mod-info">{message.note}</div>}
      {message.content && <AnswerText text={message.content} />}
      {message.status === 'stopped' && <div className="glm-Note">Stopped.</div>}
      {isCutOff(message) && <CutOffNote message={message} isLast={isLast} busy={busy} model={model} />}
      {message.status === 'error' && (
        <div className="glm-Note glm-mod-error" role="alert">
          {message.error}
        </div>
      )}
      {message.status !== 'streaming' && (
        <div className="glm-Message-footer">
          <SiblingNav id={message.id} state={state} model={model} what="version" />
          <UsageLine message={message} />
          <span className="glm-Message-actions">
            {message.content && (
              <button className="glm-Button" aria-label="Copy answer" onClick={() => actions.copy(message.content)}>
                Copy
              </button>
            )}
            {isLast && !busy && (
              <button className="glm-Button" aria-label="Regenerate answer" onClick={() => void model.regenerate()}>
                Regenerate
              </button>
            )}
            {(message.routingRequested || message.routingPossible) &&
              message.completionId &&
              message.status === 'done' && (
              <button
                className="glm-Button glm-ShowRouting"
                aria-label="Show expert routing of this answer"
                onClick={() => actions.showRouting(message.completionId!)}
              >
                Experts
              </button>
            )}
          </span>
        </div>
      )}
    </div>
  );
}

/**
 * "Cut off" under an answer that ended at its token limit, with Continue; when the conversation already fills the
 * model's context there is nothing to continue in, and the note offers a new conversation instead.
 */
function CutOffNote({
  message,
  isLast,
  busy,
  model
}: {
  message: AssistantMessage;
  isLast: boolean;
  busy: boolean;
  model: ChatModel;
}): JSX.Element {
  const what = message.content ? 'answer' : 'thinking';
  const limit = model.contextLength(message.model);
  const used = contextTokens(message);
  const full = limit !== null && used !== null && used >= limit;
  return (
    <div className="glm-Note glm-mod-warning glm-CutOff" role="status">
      <span>
        {full
          ? `Cut off: the conversation fills the model's ${limit}-token context${message.content ? '' : ' before any answer'}.`
          : `Cut off: the ${what} reached its token limit${message.content ? '' : ' before any answer'}.`}
      </span>
      {isLast && !busy && !full && (
        <button className="glm-Button glm-Continue" onClick={() => void model.continueAnswer()}>
          Continue
        </button>
      )}
      {isLast && !busy && full && (
        <button className="glm-Button glm-CutOff-new" onClick={() => model.newConversation()}>
          New conversation
        </button>
      )}
    </div>
  );
}

/** Answer text, with tool calls the server could not use shown as such, never as raw markup. */
function AnswerText({ text }: { text: string }): JSX.Element {
  const parts = answerParts(text);
  return (
    <>
      {parts.map((part, i) =>
        part.kind === 'text' ? (
          <Markdown key={i} text={part.text} />
        ) : (
          <div key={i} className="glm-UnusableCall" title="Not an offered tool, or not in GLM's call format: not run">
            Unusable tool call (not run): <code>{`${part.name}(${part.args})`}</code>
          </div>
        )
      )}
    </>
  );
}

function EmptyState({
  state,
  model,
  actions
}: {
  state: ChatState;
  model: ChatModel;
  actions: ChatViewActions;
}): JSX.Element {
  const demo = state.model !== '' && model.isDemoModel(state.model);
  return (
    <div className="glm-Empty">
      {demo && (
        <div className="glm-DemoNotice" role="note" aria-label="Demo model">
          <p>
            <strong>{state.model}</strong> is {DEMO_MODEL_TEXT}
          </p>
          <p>
            <button className="glm-Button glm-mod-accept glm-ConnectModel" onClick={() => actions.connectModel()}>
              Connect a real model
            </button>
            <button
              className="glm-Button glm-TryTools"
              title="Asks the model to call read_cells (named in tool_choice), so you can approve or reject the call"
              disabled={state.busy}
              onClick={() => void model.tryTools()}
            >
              Try tools
            </button>
          </p>
        </div>
      )}
      <p>
        Ask about your notebook. Include the active cell, your selection or the whole notebook with the toggles below;
        the model can read and edit the notebook with your approval.
      </p>
    </div>
  );
}

function MessageList({
  state,
  model,
  actions
}: {
  state: ChatState;
  model: ChatModel;
  actions: ChatViewActions;
}): JSX.Element {
  const ref = useRef<HTMLDivElement>(null);
  const stickToBottom = useRef(true);
  const messages = state.conversation.messages;
  useLayoutEffect(() => {
    const el = ref.current;
    if (el && stickToBottom.current) {
      el.scrollTop = el.scrollHeight;
    }
  });
  const lastAssistant = [...messages].reverse().find(m => m.kind === 'assistant');
  const steps = stepNumbers(messages);
  const reasoningOf = stepReasoning(messages);
  return (
    <div
      ref={ref}
      className="glm-Messages"
      role="log"
      aria-live="polite"
      aria-label="Conversation"
      onScroll={() => {
        const el = ref.current!;
        stickToBottom.current = el.scrollHeight - el.scrollTop - el.clientHeight < 40;
      }}
    >
      {messages.length === 0 && <EmptyState state={state} model={model} actions={actions} />}
      {messages.map((m: Message) =>
        m.kind === 'user' ? (
          <UserMessageView key={m.id} message={m} state={state} model={model} />
        ) : m.kind === 'assistant' ? (
          // an answer that only made tool calls is a step: its reasoning goes under its card
          isToolStep(m) ? null : (
          <AssistantMessageView
            key={m.id}
            message={m}
            isLast={m === lastAssistant}
            busy={state.busy}
            model={model}
            actions={actions}
            state={state}
          />
          )
        ) : (
          <StepCard key={m.id} message={m} step={steps.get(m.id)} reasoning={reasoningOf.get(m.id)} model={model} />
        )
      )}
      {state.loopNotice && !state.busy && (
        <div className="glm-Note glm-mod-warning glm-LoopNotice" role="status">
          <span>{state.loopNotice.text}</span>
          {state.loopNotice.canContinue && (
            <button className="glm-Button glm-LoopContinue" onClick={() => void model.continueLoop()}>
              Continue
            </button>
          )}
        </div>
      )}
    </div>
  );
}

function Header({
  state,
  model,
  historyOpen,
  toggleHistory,
  exports
}: {
  state: ChatState;
  model: ChatModel;
  historyOpen: boolean;
  toggleHistory: () => void;
  exports?: ExportActions;
}): JSX.Element {
  return (
    <div className="glm-Header">
      <div className="glm-Header-title">
        <span className="glm-Header-name">GLM Chat</span>
        <span className="glm-Header-spacer" />
        <button
          className="glm-Button glm-HistoryToggle"
          aria-label="Past conversations"
          aria-pressed={historyOpen}
          onClick={toggleHistory}
        >
          History
        </button>
        <button
          className="glm-Button glm-NewConversation"
          aria-label="New conversation"
          onClick={() => model.newConversation()}
        >
          New
        </button>
      </div>
      <div className="glm-Header-controls">
        <ModelPicker state={state} model={model} />
        <ThinkingControl state={state} model={model} />
        <ConversationMenu state={state} model={model} exports={exports} />
      </div>
      <ModelCard state={state} model={model} />
    </div>
  );
}

function ModelOption({ entry, model }: { entry: ModelEntry; model: ChatModel }): JSX.Element {
  return (
    <option
      value={entry.id}
      disabled={entry.unavailable !== null}
      title={entry.unavailable ? `${entry.id} cannot answer now: ${entry.unavailable}` : entry.id}
    >
      {modelOptionText(entry, model.isDemoModel(entry.id) ? '10M demo' : undefined)}
    </option>
  );
}

/** The model list, one group per provider; models of a provider that cannot answer (key not set, unreachable)
 * are listed disabled with the reason. A server without provider fields gives a plain list. */
function ModelPicker({ state, model }: { state: ChatState; model: ChatModel }): JSX.Element {
  const groups = groupModels(state.models, state.status);
  const plain = groups.length === 1 && groups[0].provider === null;
  return (
    <select
      className="glm-Select glm-ModelPicker"
      aria-label="Model"
      title={model.isDemoModel(state.model) ? `${state.model} is ${DEMO_MODEL_TEXT}` : state.model}
      value={state.model}
      onChange={e => model.setModel(e.target.value)}
    >
      {state.models.length === 0 && <option value="">no model</option>}
      {plain
        ? groups[0].models.map(m => <ModelOption key={m.id} entry={m} model={model} />)
        : groups.map(g => (
          <optgroup
            key={g.provider ?? ''}
            label={`${g.provider ?? 'other'}${g.problem ? ` (${g.problem})` : ''}`}
            data-provider={g.provider ?? ''}
          >
            {g.models.map(m => (
              <ModelOption key={m.id} entry={m} model={model} />
            ))}
            {g.models.length === 0 && (
              <option value={`${g.provider}/`} disabled>
                {g.problem}
              </option>
            )}
          </optgroup>
        ))}
    </select>
  );
}

/** auto / on / off where the model thinks; disabled, saying why, where its server says it does not. */
function ThinkingControl({ state, model }: { state: ChatState; model: ChatModel }): JSX.Element {
  const supported = model.supportsThinking(state.model);
  return (
    <select
      className="glm-Select glm-ThinkingMode"
      aria-label="Thinking mode"
      title={
        supported
          ? 'Thinking: auto lets the model decide'
          : `${state.model} has no thinking mode: its answers come without a thinking trace`
      }
      disabled={!supported}
      value={supported ? state.thinkingMode : 'none'}
      onChange={e => model.setThinkingMode(e.target.value as ThinkingMode)}
    >
      {supported ? (
        <>
          <option value="auto">Thinking: auto</option>
          <option value="on">Thinking: on</option>
          <option value="off">Thinking: off</option>
        </>
      ) : (
        <option value="none">Thinking: n/a</option>
      )}
    </select>
  );
}

const CAPABILITY_TITLES: Record<string, string> = {
  thinking: 'Thinks before answering (thinking auto / on / off)',
  tools: 'Can call the notebook tools',
  routing: 'Records expert routing: the Experts button opens it',
  thinking_budget: 'Takes a thinking budget: the most reasoning tokens (⚙ of the conversation)'
};

/** What the chosen model is: its provider, capabilities, price and context, under the picker. */
function ModelCard({ state, model }: { state: ChatState; model: ChatModel }): JSX.Element | null {
  const groups = groupModels(state.models, state.status);
  const group = groups.find(g => g.models.some(m => m.id === state.model));
  const entry = group?.models.find(m => m.id === state.model);
  if (!group || !entry || group.provider === null) {
    return null; // a server without provider fields says nothing more than the id
  }
  const price = entry.price ?? (group.kind === 'local' ? 'local engine' : null);
  return (
    <div className="glm-ModelCard" aria-label="Chosen model">
      <span className="glm-ModelCard-provider" title={group.kind ? `provider kind: ${group.kind}` : undefined}>
        {group.provider}
      </span>
      {(entry.capabilities ?? []).map(c => (
        <span key={c} className={`glm-Badge glm-mod-${c}`} title={CAPABILITY_TITLES[c]}>
          {c}
        </span>
      ))}
      {price && (
        <span
          className={`glm-ModelCard-price${entry.price === 'free' ? ' glm-mod-free' : ''}`}
          title={entry.price ? 'Price of this model' : 'Answers of the local engine cost nothing: they show tokens and time'}
        >
          {price}
        </span>
      )}
      {entry.contextLength !== null && (
        <span className="glm-ModelCard-context" title="Context length">
          {formatContext(entry.contextLength)} ctx
        </span>
      )}
    </div>
  );
}

/** 131072 → "128K", 1024 → "1K", 1000 → "1000". */
function formatContext(tokens: number): string {
  return tokens >= 1024 && tokens % 1024 === 0 ? `${tokens / 1024}K` : String(tokens);
}

/**
 * How full the conversation is, out of the model's context; a warning from 90 %. While a message is typed: the
 * server's count of the prompt sending it would make (`state.draftTokens`, glm/api/count_tokens after a pause in
 * typing); otherwise, or where the provider cannot count, the last shown answer's prompt + completion tokens as
 * the server counted them (`usage`, which every provider sends with the stream).
 */
function ContextMeter({ state, model }: { state: ChatState; model: ChatModel }): JSX.Element | null {
  const last = [...state.conversation.messages]
    .reverse()
    .find((m): m is AssistantMessage => m.kind === 'assistant' && contextTokens(m) !== null);
  const draft = state.draftTokens;
  const used = draft ?? (last ? contextTokens(last)! : 0);
  const limit = model.contextLength();
  if (!limit && !last && draft === null) {
    return null;
  }
  const fraction = limit ? Math.min(1, used / limit) : 0;
  const level = fraction >= 0.9 ? ' glm-mod-full' : fraction >= 0.7 ? ' glm-mod-high' : '';
  const text = limit
    ? `Context: ${used.toLocaleString()} / ${limit.toLocaleString()} tokens`
    : `Context: ${used.toLocaleString()} tokens`;
  return (
    <div
      className={`glm-ContextMeter${level}`}
      role="meter"
      aria-label="Context used"
      aria-valuemin={0}
      aria-valuemax={limit ?? undefined}
      aria-valuenow={used}
      title={
        limit
          ? `This conversation${draft !== null ? ' with the message being typed' : ''} takes ${used} of the ` +
            `model's ${limit} tokens of context; an answer gets what is left.`
          : `Tokens this conversation${draft !== null ? ' with the message being typed' : ''} takes (the server ` +
            'does not say its context length).'
      }
    >
      {limit !== null && (
        <span className="glm-ContextMeter-bar">
          <span className="glm-ContextMeter-fill" style={{ width: `${(fraction * 100).toFixed(1)}%` }} />
        </span>
      )}
      <span className="glm-ContextMeter-text">{text}</span>
      {limit !== null && fraction >= 0.9 && (
        <span className="glm-ContextMeter-warning" role="status">
          {fraction >= 1 ? 'Full' : 'Near the limit'}: start a new conversation, or edit an earlier message to branch
          off with less
        </span>
      )}
    </div>
  );
}

/** What the conversation's priced answers cost so far, in each currency; nothing while none was priced. */
function ConversationCost({ state }: { state: ChatState }): JSX.Element | null {
  const cost = conversationCost(state.conversation.messages);
  if (cost === null) {
    return null;
  }
  return (
    <span
      className="glm-ConversationCost"
      aria-label="Conversation cost"
      title="What this conversation's priced answers cost so far (local-engine answers cost nothing)"
    >
      Total: {cost}
    </span>
  );
}

function Composer({ state, model }: { state: ChatState; model: ChatModel }): JSX.Element {
  const [text, setText] = useState('');
  // the context meter counts the draft with what it would be sent with (debounced in the model; typing never waits)
  const { busy, model: modelId, context } = state;
  const { id: conversationId, messages } = state.conversation;
  useEffect(() => {
    model.setDraft(text);
  }, [model, text, busy, modelId, context, conversationId, messages.length]);
  const send = () => {
    if (!text.trim() || state.busy) {
      return;
    }
    void model.send(text);
    setText('');
  };
  const toggle = (key: 'cell' | 'selection' | 'notebook', label: string) => (
    <label className="glm-Toggle">
      <input
        type="checkbox"
        checked={state.context[key]}
        onChange={e => model.setContext({ [key]: e.target.checked })}
      />
      {label}
    </label>
  );
  return (
    <div className="glm-Composer">
      <div className="glm-Composer-context" role="group" aria-label="Notebook context to include">
        {toggle('cell', 'Active cell')}
        {toggle('selection', 'Selection')}
        {toggle('notebook', 'Whole notebook')}
      </div>
      <div className="glm-Composer-row">
        <textarea
          className="glm-Input"
          aria-label="Message"
          placeholder="Ask GLM… (Enter sends)"
          title="Enter sends, Shift+Enter adds a line, Escape stops the answer"
          rows={3}
          value={text}
          onChange={e => setText(e.target.value)}
          onKeyDown={e => {
            if (e.key === 'Enter' && !e.shiftKey && !e.nativeEvent.isComposing) {
              e.preventDefault();
              send();
            }
          }}
        />
        {state.busy ? (
          <span className="glm-StopButtons">
            <button className="glm-Button glm-mod-reject glm-Stop" aria-label="Stop generating" onClick={() => model.stop()}>
              Stop
            </button>
            {kernelStepRunning(state.conversation.messages) && (
              <button
                className="glm-Button glm-mod-reject glm-StopInterrupt"
                aria-label="Stop and interrupt the kernel"
                title="Stop the agent loop and interrupt the cell it is running"
                onClick={() => model.stop({ interruptKernel: true })}
              >
                Stop + interrupt
              </button>
            )}
          </span>
        ) : (
          <button
            className="glm-Button glm-mod-accept glm-Send"
            aria-label="Send message"
            disabled={!text.trim() || !state.model}
            onClick={send}
          >
            Send
          </button>
        )}
      </div>
    </div>
  );
}

export function ChatView({ model, actions }: { model: ChatModel; actions: ChatViewActions }): JSX.Element {
  const state = useChatState(model);
  const [historyOpen, setHistoryOpen] = useState(false);
  return (
    <div
      className="glm-Chat"
      onKeyDown={e => {
        if (e.key === 'Escape' && state.busy) {
          model.stop();
        }
      }}
    >
      <Header
        state={state}
        model={model}
        historyOpen={historyOpen}
        toggleHistory={() => setHistoryOpen(!historyOpen)}
        exports={actions.exports}
      />
      <FailureBanner state={state} model={model} />
      {historyOpen && <HistoryPanel state={state} model={model} onClose={() => setHistoryOpen(false)} />}
      <MessageList state={state} model={model} actions={actions} />
      <div className="glm-Footer">
        <ContextMeter state={state} model={model} />
        <ConversationCost state={state} />
      </div>
      <Composer state={state} model={model} />
    </div>
  );
}
