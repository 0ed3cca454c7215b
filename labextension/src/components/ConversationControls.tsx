/**
 * Controls of one conversation: ‹ 1/2 › between branches and answer versions, the conversation's settings
 * popover (temperature, max tokens; the model and thinking mode are the header's pickers, saved with it too)
 * and export to a notebook or Markdown. Reads state; behaviour is ChatModel's.
 */

import React, { useEffect, useRef, useState } from 'react';

import type { ChatModel, ChatState } from '../chatModel';
import type { Conversation } from '../chatState';
import { siblingPosition } from '../conversationTree';

/** "‹ 2/3 ›" on a message with siblings (other branches, other versions); nothing on one without. */
export function SiblingNav({
  id,
  state,
  model,
  what
}: {
  id: string;
  state: ChatState;
  model: ChatModel;
  what: 'branch' | 'version';
}): JSX.Element | null {
  const tree = state.conversation.tree;
  if (!tree) {
    return null;
  }
  const { index, count } = siblingPosition(tree, id);
  if (count < 2) {
    return null;
  }
  const label = what === 'branch' ? 'Edit' : 'Answer version';
  return (
    <span className="glm-SiblingNav" role="group" aria-label={`${label} ${index + 1} of ${count}`}>
      <button
        className="glm-Button glm-IconButton glm-SiblingNav-prev"
        aria-label={`Previous ${what}`}
        disabled={index === 0 || state.busy}
        onClick={() => model.showSibling(id, index - 1)}
      >
        ‹
      </button>
      <span className="glm-SiblingNav-position">
        {index + 1}/{count}
      </span>
      <button
        className="glm-Button glm-IconButton glm-SiblingNav-next"
        aria-label={`Next ${what}`}
        disabled={index === count - 1 || state.busy}
        onClick={() => model.showSibling(id, index + 1)}
      >
        ›
      </button>
    </span>
  );
}

export interface ExportActions {
  exportNotebook(conversation: Conversation): void;
  exportMarkdown(conversation: Conversation): void;
}

function numberOrUndefined(text: string): number | undefined {
  const value = Number(text);
  return text.trim() === '' || !Number.isFinite(value) ? undefined : value;
}

/** The "Conversation" popover: this conversation's temperature, max tokens and thinking budget, and its exports. */
export function ConversationMenu({
  state,
  model,
  exports
}: {
  state: ChatState;
  model: ChatModel;
  exports?: ExportActions;
}): JSX.Element {
  const [open, setOpen] = useState(false);
  const ref = useRef<HTMLDivElement>(null);
  useEffect(() => {
    if (!open) {
      return;
    }
    const close = (event: MouseEvent) => {
      if (ref.current && !ref.current.contains(event.target as Node)) {
        setOpen(false);
      }
    };
    document.addEventListener('mousedown', close);
    return () => document.removeEventListener('mousedown', close);
  }, [open]);
  const own = state.conversation.settings ?? {};
  const { temperature, maxTokens, thinkingBudget } = model.effectiveSettings();
  // a cap on the reasoning, where the model honours one (`thinking_budget`) and thinking is not switched off
  const budgetShown = model.supportsThinkingBudget() && state.thinkingMode !== 'off';
  const empty = state.conversation.messages.length === 0;
  return (
    <div className="glm-ConversationMenu" ref={ref}>
      <button
        className="glm-Button glm-ConversationMenu-toggle"
        aria-label="Conversation settings and export"
        aria-expanded={open}
        aria-haspopup="dialog"
        onClick={() => setOpen(!open)}
      >
        ⚙
      </button>
      {open && (
        <div
          className="glm-ConversationMenu-popover"
          role="dialog"
          aria-label="This conversation"
          onKeyDown={e => {
            if (e.key === 'Escape') {
              e.stopPropagation();
              setOpen(false);
            }
          }}
        >
          <div className="glm-ConversationMenu-heading">This conversation</div>
          <p className="glm-ConversationMenu-hint">
            Saved with it and restored when you reopen it, with the model and thinking mode chosen above.
          </p>
          <label className="glm-ConversationMenu-field">
            <span>Temperature</span>
            <input
              className="glm-Input glm-ConversationMenu-temperature"
              type="number"
              min={0}
              max={2}
              step={0.1}
              aria-label="Temperature of this conversation"
              value={temperature}
              onChange={e => {
                const value = numberOrUndefined(e.target.value);
                if (value === undefined || (value >= 0 && value <= 2)) {
                  model.setConversationSettings({ temperature: value });
                }
              }}
            />
          </label>
          <label className="glm-ConversationMenu-field">
            <span title="0: as much as fits in the model's context">Max tokens (0: as fits)</span>
            <input
              className="glm-Input glm-ConversationMenu-maxTokens"
              type="number"
              min={0}
              step={256}
              aria-label="Maximum tokens per answer in this conversation"
              value={maxTokens}
              onChange={e => {
                const value = numberOrUndefined(e.target.value);
                if (value === undefined || (Number.isInteger(value) && value >= 0)) {
                  model.setConversationSettings({ maxTokens: value });
                }
              }}
            />
          </label>
          {budgetShown && (
            <label className="glm-ConversationMenu-field">
              <span title="The most tokens the model may think before it answers; empty: no cap">
                Thinking budget (tokens)
              </span>
              <input
                className="glm-Input glm-ConversationMenu-thinkingBudget"
                type="number"
                min={1}
                step={256}
                placeholder="no cap"
                aria-label="Thinking budget of this conversation, in tokens"
                value={thinkingBudget ?? ''}
                onChange={e => {
                  const value = numberOrUndefined(e.target.value);
                  if (value === undefined || (Number.isInteger(value) && value >= 1)) {
                    model.setConversationSettings({ thinkingBudget: value });
                  }
                }}
              />
            </label>
          )}
          {(own.temperature !== undefined || own.maxTokens !== undefined || own.thinkingBudget !== undefined) && (
            <button
              className="glm-Button glm-ConversationMenu-reset"
              title="Use the defaults of Settings > GLM Workbench"
              onClick={() =>
                model.setConversationSettings({ temperature: undefined, maxTokens: undefined, thinkingBudget: undefined })
              }
            >
              Use the defaults
            </button>
          )}
          {exports && (
            <>
              <div className="glm-ConversationMenu-heading">Export</div>
              <div className="glm-ConversationMenu-exports">
                <button
                  className="glm-Button glm-ExportNotebook"
                  disabled={empty}
                  title="A new notebook: questions and answers as Markdown, Python code blocks as code cells"
                  onClick={() => {
                    exports.exportNotebook(state.conversation);
                    setOpen(false);
                  }}
                >
                  To notebook
                </button>
                <button
                  className="glm-Button glm-ExportMarkdown"
                  disabled={empty}
                  title="A new Markdown file in the workspace"
                  onClick={() => {
                    exports.exportMarkdown(state.conversation);
                    setOpen(false);
                  }}
                >
                  To Markdown
                </button>
              </div>
            </>
          )}
        </div>
      )}
    </div>
  );
}
