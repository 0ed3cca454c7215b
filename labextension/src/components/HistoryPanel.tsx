/**
 * Past conversations: each with its title (the first question, or the name the user gave it) and date, a search
 * over titles and text (client-side, over what the list sends: the first characters of each conversation), rename
 * and delete. Reads ChatModel.state; renaming and deleting go through ChatModel.
 */

import { deleteIcon, editIcon } from '@jupyterlab/ui-components';
import React, { useState } from 'react';

import type { ConversationSummary } from '../api';
import type { ChatModel, ChatState } from '../chatModel';

/** "14:05" today, "3 Dec 14:05" this year, "3 Dec 2025" before. */
export function historyDate(ms: number, now: Date = new Date()): string {
  const date = new Date(ms);
  const time = date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
  if (date.toDateString() === now.toDateString()) {
    return time;
  }
  const day = date.toLocaleDateString(undefined, { day: 'numeric', month: 'short' });
  if (date.getFullYear() === now.getFullYear()) {
    return `${day} ${time}`;
  }
  return date.toLocaleDateString(undefined, { day: 'numeric', month: 'short', year: 'numeric' });
}

/** The conversations whose title or text hold every word of the query (any case). */
export function filterHistory(history: ConversationSummary[], query: string): ConversationSummary[] {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) {
    return history;
  }
  return history.filter(item => {
    const haystack = `${item.title ?? ''} ${item.text ?? ''}`.toLowerCase();
    return words.every(word => haystack.includes(word));
  });
}

function HistoryItem({
  item,
  current,
  model,
  onClose
}: {
  item: ConversationSummary;
  current: boolean;
  model: ChatModel;
  onClose: () => void;
}): JSX.Element {
  const [renaming, setRenaming] = useState<string | null>(null);
  if (renaming !== null) {
    const done = (save: boolean) => {
      if (save) {
        void model.renameConversation(item.id, renaming);
      }
      setRenaming(null);
    };
    return (
      <li className="glm-History-item glm-mod-renaming">
        <input
          className="glm-Input glm-History-rename"
          aria-label="Conversation title"
          placeholder="Empty: the first question"
          autoFocus
          value={renaming}
          onChange={e => setRenaming(e.target.value)}
          onKeyDown={e => {
            if (e.key === 'Enter') {
              done(true);
            } else if (e.key === 'Escape') {
              e.stopPropagation();
              done(false);
            }
          }}
          onBlur={() => done(true)}
        />
      </li>
    );
  }
  return (
    <li className={`glm-History-item${current ? ' glm-mod-current' : ''}`}>
      <button
        className="glm-History-open"
        onClick={() => {
          void model.openConversation(item.id);
          onClose();
        }}
        title={`${item.title}\nUpdated ${new Date(item.updated).toLocaleString()}, started ${new Date(item.created).toLocaleString()}`}
      >
        <span className="glm-History-title">{item.title || 'Untitled'}</span>
        <span className="glm-History-date">{historyDate(item.updated)}</span>
      </button>
      <button
        className="glm-Button glm-IconButton glm-History-renameButton"
        aria-label={`Rename conversation ${item.title}`}
        title="Rename this conversation"
        onClick={() => setRenaming(item.title ?? '')}
      >
        <editIcon.react tag="span" elementSize="normal" />
      </button>
      <button
        className="glm-Button glm-IconButton glm-History-delete"
        aria-label={`Delete conversation ${item.title}`}
        title="Delete this conversation"
        onClick={() => void model.deleteConversation(item.id)}
      >
        <deleteIcon.react tag="span" elementSize="normal" />
      </button>
    </li>
  );
}

export function HistoryPanel({ state, model, onClose }: { state: ChatState; model: ChatModel; onClose: () => void }) {
  const [query, setQuery] = useState('');
  const shown = filterHistory(state.history, query);
  return (
    <div className="glm-History" role="region" aria-label="Past conversations">
      {state.history.length > 0 && (
        <input
          className="glm-Input glm-History-search"
          type="search"
          aria-label="Search conversations"
          placeholder="Search titles and text…"
          value={query}
          onChange={e => setQuery(e.target.value)}
        />
      )}
      {state.history.length === 0 && <div className="glm-History-empty">No saved conversations yet.</div>}
      {state.history.length > 0 && shown.length === 0 && (
        <div className="glm-History-empty">No conversation matches “{query}”.</div>
      )}
      <ul className="glm-History-list">
        {shown.map(item => (
          <HistoryItem
            key={item.id}
            item={item}
            current={item.id === state.conversation.id}
            model={model}
            onClose={onClose}
          />
        ))}
      </ul>
    </div>
  );
}
