/**
 * The thinking-trace viewer: the model's reasoning in its own collapsible block with a live timer
 * ("Thinking 3.2 s" while it streams, "Thought for 5.1 s · 812 tokens" after).
 *
 * Collapses by itself when the answer starts (if the setting says so) unless the user already chose;
 * a click or Enter/Space on the header toggles it. The body is plain pre-wrapped text and is not in the
 * DOM while collapsed, and long traces show their tail while streaming, so very long traces stay
 * responsive.
 */

import React, { useEffect, useState } from 'react';

import { type AssistantMessage, isThinking, reasoningTokens, thinkingSeconds, visibleReasoning } from '../chatState';

/** While streaming, only the tail is rendered: the DOM stays small however long the trace gets. */
const LIVE_TAIL_CHARS = 20000;

/** The time now, refreshed every `intervalMs` while `active` (a live timer's clock). */
export function useNow(active: boolean, intervalMs = 100): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    if (!active) {
      return;
    }
    const timer = setInterval(() => setNow(Date.now()), intervalMs);
    return () => clearInterval(timer);
  }, [active, intervalMs]);
  return active ? now : Date.now();
}

export function thinkingLabel(message: AssistantMessage, now: number): string {
  const seconds = thinkingSeconds(message, now).toFixed(1);
  if (isThinking(message)) {
    return `Thinking ${seconds} s`;
  }
  const tokens = reasoningTokens(message);
  const verb = message.status === 'stopped' && !message.content ? 'Stopped after' : 'Thought for';
  return `${verb} ${seconds} s · ${tokens} token${tokens === 1 ? '' : 's'}`;
}

export function ThinkingBlock({
  message,
  collapseOnAnswer
}: {
  message: AssistantMessage;
  collapseOnAnswer: boolean;
}): JSX.Element | null {
  const thinking = isThinking(message);
  const now = useNow(thinking);
  // null: follow the automatic behaviour; true/false: the user's own choice wins.
  const [userOpen, setUserOpen] = useState<boolean | null>(null);
  const open = userOpen ?? (thinking || !collapseOnAnswer);

  if (!message.reasoning) {
    return null;
  }
  const bodyId = `glm-thinking-${message.id}`;
  const reasoning = visibleReasoning(message.reasoning); // no stray tool-call tags from a small model
  const text = thinking && reasoning.length > LIVE_TAIL_CHARS ? `… ${reasoning.slice(-LIVE_TAIL_CHARS)}` : reasoning;
  return (
    <div className={`glm-Thinking${thinking ? ' glm-mod-live' : ''}${open ? ' glm-mod-open' : ''}`}>
      <button
        className="glm-Thinking-header"
        aria-expanded={open}
        aria-controls={bodyId}
        onClick={() => setUserOpen(!open)}
      >
        <span className="glm-Thinking-caret" aria-hidden="true">
          {open ? '▾' : '▸'}
        </span>
        <span className="glm-Thinking-label" aria-live="off">
          {thinkingLabel(message, now)}
        </span>
      </button>
      {open && (
        <div id={bodyId} className="glm-Thinking-body" role="region" aria-label="Model reasoning">
          {text}
        </div>
      )}
    </div>
  );
}
