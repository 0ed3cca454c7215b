/**
 * One step of the agent loop as a card: step number, tool, what it does (reads, edits, runs code, reaches the
 * network), status, time (ticking while it runs), the arguments, a one-line summary of the result with the full
 * result folded, the approval buttons while it waits, and under the card the reasoning that led to the call
 * (collapsed).
 *
 * The logic (numbering, summary, time, whose reasoning) lives in agentLoop.ts; this file only draws it.
 */

import React from 'react';

import { resultSummary, stepDuration, toolEffect, type ToolEffect } from '../agentLoop';
import type { ChatModel } from '../chatModel';
import type { AssistantMessage, ToolMessage } from '../chatState';
import { ThinkingBlock, useNow } from './ThinkingBlock';
import { WebFetchCard } from './WebFetchCard';

const STATUS_TEXT: Record<ToolMessage['status'], string> = {
  pending: 'waiting for approval',
  approved: 'approved',
  running: 'running…',
  done: 'done',
  rejected: 'rejected',
  error: 'failed'
};

const EFFECT_TEXT: Record<ToolEffect, string> = {
  read: 'reads',
  edit: 'edits the notebook',
  run: 'runs code',
  network: 'reads the web'
};

export function StepCard({
  message,
  step,
  reasoning,
  model
}: {
  message: ToolMessage;
  /** 1-based number among the steps since the last user message. */
  step?: number;
  /** The answer that made this call, when its reasoning belongs under this card. */
  reasoning?: AssistantMessage;
  model: ChatModel;
}): JSX.Element {
  const name = message.call.function.name;
  // code (insert_cell / edit_cell's source) reads as code, not as one JSON string full of \n
  const source = typeof message.args?.source === 'string' ? (message.args.source as string) : null;
  const rest = message.args ? Object.entries(message.args).filter(([key]) => source === null || key !== 'source') : [];
  const args = message.args
    ? rest.map(([key, value]) => `${key}: ${JSON.stringify(value)}`).join('\n')
    : message.call.function.arguments;
  const effect = toolEffect(name);
  // a running step shows how long it has run so far, ticking like the thinking viewer's timer
  const running = message.status === 'running' && message.started !== undefined;
  const now = useNow(running);
  const time = stepDuration(message, running ? now : undefined);
  const summary = resultSummary(message.result);
  return (
    <div className="glm-StepCard">
      <div
        className={`glm-ToolCall glm-mod-${message.status}`}
        role="group"
        aria-label={`${step ? `Step ${step}: ` : ''}tool call ${name}: ${STATUS_TEXT[message.status]}`}
      >
        <div className="glm-ToolCall-header">
          <span className="glm-ToolCall-title">
            {step !== undefined && <span className="glm-StepCard-number">Step {step}</span>}
            <span className="glm-ToolCall-name">{name}</span>
            <span className={`glm-StepCard-effect glm-mod-${effect}`}>{EFFECT_TEXT[effect]}</span>
          </span>
          <span className="glm-ToolCall-status">
            {STATUS_TEXT[message.status]}
            {message.autoApproved ? ' (auto-approved)' : ''}
            {time && (
              <span className={`glm-StepCard-time${running ? ' glm-mod-live' : ''}`} aria-live="off">
                {` · ${time}`}
              </span>
            )}
          </span>
        </div>
        {args && <pre className="glm-ToolCall-args">{args}</pre>}
        {source !== null && (
          <pre className="glm-ToolCall-args glm-StepCard-source" aria-label="Cell source">
            {source}
          </pre>
        )}
        {name === 'web_fetch' && <WebFetchCard message={message} />}
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
            <summary>
              <span className="glm-StepCard-summary">{summary || 'Result'}</span>
            </summary>
            <pre>{message.result}</pre>
          </details>
        )}
      </div>
      {reasoning && reasoning.reasoning && (
        <div className="glm-StepCard-reasoning">
          <ThinkingBlock message={reasoning} collapseOnAnswer={true} />
        </div>
      )}
    </div>
  );
}
