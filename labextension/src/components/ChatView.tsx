/**
 * The chat sidebar's view: header (model picker, thinking mode, history, new conversation), failure
 * banner, the message log (user messages, answers with their thinking block, tool calls awaiting approval)
 * and the input with notebook-context toggles.
 *
 * Reads ChatModel.state and calls its methods; nothing here decides behaviour. Re-renders at most once per
 * animation frame however fast chunks arrive.
 */

import React, { useEffect, useLayoutEffect, useRef, useState } from 'react';

import type { ChatModel, ChatState } from '../chatModel';
import {
  type AssistantMessage,
  completionTokens,
  type Message,
  tokensPerSecond,
  type ToolMessage,
  type UserMessage
} from '../chatState';
import type { FailureKind } from '../errors';
import type { ThinkingMode } from '../protocol';
import { Markdown } from './Markdown';
import { ThinkingBlock } from './ThinkingBlock';

export interface ChatViewActions {
  copy(text: string): void;
  showRouting(completionId: string): void;
}

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

function HistoryList({ state, model, onClose }: { state: ChatState; model: ChatModel; onClose: () => void }) {
  return (
    <div className="glm-History" role="region" aria-label="Past conversations">
      {state.history.length === 0 && <div className="glm-History-empty">No saved conversations yet.</div>}
      <ul className="glm-History-list">
        {state.history.map(item => (
          <li
            key={item.id}
            className={`glm-History-item${item.id === state.conversation.id ? ' glm-mod-current' : ''}`}
          >
            <button
              className="glm-History-open"
              onClick={() => {
                void model.openConversation(item.id);
                onClose();
              }}
              title={new Date(item.updated).toLocaleString()}
            >
              {item.title || 'Untitled'}
            </button>
            <button
              className="glm-Button glm-History-delete"
              aria-label={`Delete conversation ${item.title}`}
              onClick={() => void model.deleteConversation(item.id)}
            >
              🗑
            </button>
          </li>
        ))}
      </ul>
    </div>
  );
}

function UserMessageView({ message }: { message: UserMessage }): JSX.Element {
  return (
    <div className="glm-Message glm-mod-user" aria-label="Your message">
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
    </div>
  );
}

function UsageLine({ message }: { message: AssistantMessage }): JSX.Element | null {
  if (message.status === 'streaming') {
    return null;
  }
  const tokens = completionTokens(message);
  const rate = tokensPerSecond(message);
  const parts = [`${tokens} token${tokens === 1 ? '' : 's'}`];
  if (rate !== null) {
    parts.push(`${rate.toFixed(1)} tok/s`);
  }
  if (message.usage) {
    parts.push(`prompt ${message.usage.prompt_tokens}`);
  }
  if (message.model) {
    parts.push(message.model);
  }
  return <span className="glm-Usage">{parts.join(' · ')}</span>;
}

function AssistantMessageView({
  message,
  isLast,
  busy,
  model,
  actions
}: {
  message: AssistantMessage;
  isLast: boolean;
  busy: boolean;
  model: ChatModel;
  actions: ChatViewActions;
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
      {message.content && <Markdown text={message.content} />}
      {message.status === 'stopped' && <div className="glm-Note">Stopped.</div>}
      {message.status === 'error' && (
        <div className="glm-Note glm-mod-error" role="alert">
          {message.error}
        </div>
      )}
      {message.status !== 'streaming' && (
        <div className="glm-Message-footer">
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
            {message.routingRequested && message.completionId && message.status === 'done' && (
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

const TOOL_STATUS_TEXT: Record<ToolMessage['status'], string> = {
  pending: 'waiting for approval',
  approved: 'approved',
  running: 'running…',
  done: 'done',
  rejected: 'rejected',
  error: 'failed'
};

function ToolCallView({ message, model }: { message: ToolMessage; model: ChatModel }): JSX.Element {
  const args = message.args ? JSON.stringify(message.args, null, 2) : message.call.function.arguments;
  const name = message.call.function.name;
  return (
    <div
      className={`glm-ToolCall glm-mod-${message.status}`}
      role="group"
      aria-label={`Tool call ${name}: ${TOOL_STATUS_TEXT[message.status]}`}
    >
      <div className="glm-ToolCall-header">
        <span className="glm-ToolCall-name">{name}</span>
        <span className="glm-ToolCall-status">
          {TOOL_STATUS_TEXT[message.status]}
          {message.autoApproved ? ' (auto-approved)' : ''}
        </span>
      </div>
      <pre className="glm-ToolCall-args">{args}</pre>
      {message.status === 'pending' && (
        <div className="glm-ToolCall-actions">
          <button className="glm-Button glm-mod-accept glm-ToolCall-approve" onClick={() => model.approveTool(message.id)}>
            Approve
          </button>
          <button className="glm-Button glm-mod-reject glm-ToolCall-reject" onClick={() => model.rejectTool(message.id)}>
            Reject
          </button>
          <button
            className="glm-Button glm-ToolCall-always"
            title={`Approve this and every later ${name} call without asking`}
            onClick={() => model.alwaysApproveTool(message.id)}
          >
            Always allow {name}
          </button>
        </div>
      )}
      {message.result !== undefined && (
        <details className="glm-ToolCall-result">
          <summary>Result</summary>
          <pre>{message.result}</pre>
        </details>
      )}
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
      {messages.length === 0 && (
        <div className="glm-Empty">
          Ask anything. Include the active cell, your selection or the whole notebook with the toggles below; the
          model can read and edit the notebook with your approval.
        </div>
      )}
      {messages.map((m: Message) =>
        m.kind === 'user' ? (
          <UserMessageView key={m.id} message={m} />
        ) : m.kind === 'assistant' ? (
          <AssistantMessageView
            key={m.id}
            message={m}
            isLast={m === lastAssistant}
            busy={state.busy}
            model={model}
            actions={actions}
          />
        ) : (
          <ToolCallView key={m.id} message={m} model={model} />
        )
      )}
    </div>
  );
}

function Header({
  state,
  model,
  historyOpen,
  toggleHistory
}: {
  state: ChatState;
  model: ChatModel;
  historyOpen: boolean;
  toggleHistory: () => void;
}): JSX.Element {
  return (
    <div className="glm-Header">
      <select
        className="glm-Select glm-ModelPicker"
        aria-label="Model"
        value={state.model}
        onChange={e => model.setModel(e.target.value)}
      >
        {state.models.length === 0 && <option value="">no model</option>}
        {state.models.map(m => (
          <option key={m.id} value={m.id}>
            {m.id}
            {m.backend ? ` (${m.backend})` : ''}
          </option>
        ))}
      </select>
      <select
        className="glm-Select glm-ThinkingMode"
        aria-label="Thinking mode"
        title="Thinking: auto lets the model decide"
        value={state.thinkingMode}
        onChange={e => model.setThinkingMode(e.target.value as ThinkingMode)}
      >
        <option value="auto">Thinking: auto</option>
        <option value="on">Thinking: on</option>
        <option value="off">Thinking: off</option>
      </select>
      <span className="glm-Header-spacer" />
      <button
        className="glm-Button glm-HistoryToggle"
        aria-label="Past conversations"
        aria-pressed={historyOpen}
        onClick={toggleHistory}
      >
        History
      </button>
      <button className="glm-Button glm-NewConversation" aria-label="New conversation" onClick={() => model.newConversation()}>
        New
      </button>
    </div>
  );
}

function Composer({ state, model }: { state: ChatState; model: ChatModel }): JSX.Element {
  const [text, setText] = useState('');
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
          placeholder="Message GLM (Enter to send, Shift+Enter for a new line, Escape to stop)"
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
          <button className="glm-Button glm-mod-reject glm-Stop" aria-label="Stop generating" onClick={() => model.stop()}>
            Stop
          </button>
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
      <Header state={state} model={model} historyOpen={historyOpen} toggleHistory={() => setHistoryOpen(!historyOpen)} />
      <FailureBanner state={state} model={model} />
      {historyOpen && <HistoryList state={state} model={model} onClose={() => setHistoryOpen(false)} />}
      <MessageList state={state} model={model} actions={actions} />
      <Composer state={state} model={model} />
    </div>
  );
}
