/**
 * The agent loop's pure logic: how many tool steps a conversation may take on its own, whether a call waits
 * for the user, when the loop goes on, stops or has reached its limit, and what a step card shows (summary,
 * time, the reasoning that led to the call).
 *
 * Owns decisions only; chatModel.ts owns the requests and the timing of the loop, notebookTools.ts runs the
 * tools, components/StepCard.tsx draws the steps. Knows nothing of the DOM or JupyterLab, so it is unit-tested
 * directly (test/agentLoop.test.ts).
 */

import type { AssistantMessage, Message, ToolMessage } from './chatState';
import { isSettled } from './chatState';

/** Tool steps a user message may lead to before the loop asks to continue (setting maxToolSteps). */
export const DEFAULT_MAX_TOOL_STEPS = 8;

/** What a tool does, for the card's badge: reading changes nothing; the others change the notebook, run code
 * or reach the network. */
export type ToolEffect = 'read' | 'edit' | 'run' | 'network';

const EFFECTS: Record<string, ToolEffect> = {
  read_cells: 'read',
  read_output: 'read',
  list_variables: 'run', // runs a snippet in the user's kernel
  insert_cell: 'edit',
  edit_cell: 'edit',
  run_cell: 'run',
  web_fetch: 'network'
};

export function toolEffect(name: string): ToolEffect {
  return EFFECTS[name] ?? 'run';
}

/**
 * Whether a call waits for the user: every call does unless its tool is auto-approved (setting
 * autoApproveTools, or "Always allow" on a card). Unknown tools never run, so they never wait either.
 */
export function needsApproval(name: string, autoApprove: ReadonlySet<string>): boolean {
  return !autoApprove.has(name);
}

/** One run of the loop, from a user message (or Continue) until it answers, stops or reaches its limit. */
export interface LoopRun {
  /** Tool steps taken in this run (one per tool call). */
  steps: number;
  limit: number;
  stopped: boolean;
}

export function startLoop(limit: number = DEFAULT_MAX_TOOL_STEPS): LoopRun {
  if (!Number.isInteger(limit) || limit < 1) {
    throw new Error(`The tool step limit must be a whole number of at least 1, got ${limit}. Fix maxToolSteps in Settings > GLM Workbench.`);
  }
  return { steps: 0, limit, stopped: false };
}

export function addSteps(run: LoopRun, count: number): LoopRun {
  return { ...run, steps: run.steps + count };
}

export function stopLoop(run: LoopRun): LoopRun {
  return { ...run, stopped: true };
}

/**
 * What the loop does once a tool call settles:
 * - `wait`: calls of the latest turn are still pending or running;
 * - `stopped`: the user pressed Stop;
 * - `limit`: the step limit is reached (the sidebar says so, with Continue);
 * - `continue`: send the results back to the model.
 */
export type LoopDecision = 'wait' | 'stopped' | 'limit' | 'continue';

export function nextAction(run: LoopRun, latestTools: readonly ToolMessage[]): LoopDecision {
  if (run.stopped) {
    return 'stopped';
  }
  if (!latestTools.length || !latestTools.every(t => isSettled(t.status))) {
    return 'wait';
  }
  return run.steps >= run.limit ? 'limit' : 'continue';
}

/** The sentence under the last step when the limit is reached. */
export function limitNotice(run: Pick<LoopRun, 'steps' | 'limit'>): string {
  return (
    `Paused after ${run.steps} tool steps: the step limit is ${run.limit} (Settings > GLM Workbench > ` +
    `Maximum tool steps). Continue lets the model go on for up to ${run.limit} more.`
  );
}

/** The sentence under the last step when the user stopped the loop. */
export function stoppedNotice(run: Pick<LoopRun, 'steps'>, interrupted: boolean): string {
  const steps = `${run.steps} tool step${run.steps === 1 ? '' : 's'}`;
  return `Stopped by you after ${steps}${interrupted ? '; the running cell was interrupted' : ''}. Nothing more is sent to the model.`;
}

/** The first line of a tool result, cut to `max` characters, for the card's header. */
export function resultSummary(result: string | undefined, max = 80): string {
  if (!result) {
    return '';
  }
  const line = result.split('\n').find(l => l.trim()) ?? '';
  const trimmed = line.trim();
  return trimmed.length > max ? `${trimmed.slice(0, max - 1)}…` : trimmed;
}

/**
 * How long the step ran, e.g. "0.4 s"; while it runs, how long so far when `now` is given (the card's live
 * timer); empty when it never ran.
 */
export function stepDuration(message: ToolMessage, now?: number): string {
  const end = message.finished ?? (message.status === 'running' ? now : undefined);
  if (message.started === undefined || end === undefined) {
    return '';
  }
  const seconds = Math.max(0, (end - message.started) / 1000);
  return seconds < 10 ? `${seconds.toFixed(1)} s` : `${Math.round(seconds)} s`;
}

/** Number of each tool message among all steps of the conversation since its last user message (1-based). */
export function stepNumbers(messages: readonly Message[]): Map<string, number> {
  const numbers = new Map<string, number>();
  let n = 0;
  for (const m of messages) {
    if (m.kind === 'user') {
      n = 0;
    } else if (m.kind === 'tool') {
      n += 1;
      numbers.set(m.id, n);
    }
  }
  return numbers;
}

/**
 * The answer whose reasoning belongs under a step's card: the assistant message that made the call, when it
 * said nothing but its calls (a step of the loop). Its thinking is then shown under the first of its cards,
 * not as an empty answer bubble. Returns the map tool id -> that message, for the first call of each turn.
 */
export function stepReasoning(messages: readonly Message[]): Map<string, AssistantMessage> {
  const out = new Map<string, AssistantMessage>();
  let owner: AssistantMessage | null = null;
  for (const m of messages) {
    if (m.kind === 'assistant') {
      owner = isToolStep(m) ? m : null;
    } else if (m.kind === 'tool') {
      if (owner) {
        out.set(m.id, owner);
        owner = null;
      }
    } else {
      owner = null;
    }
  }
  return out;
}

/** An answer that is only a loop step: tool calls, perhaps reasoning, no text for the user. */
export function isToolStep(message: AssistantMessage): boolean {
  return message.status === 'done' && message.toolCalls.length > 0 && !message.content.trim();
}

/** Tools whose run happens in the user's kernel, so Stop can offer to interrupt it. */
const KERNEL_TOOLS = new Set(['run_cell', 'list_variables']);

/** Whether a step is running code in the kernel right now (Stop then offers "Stop and interrupt the kernel"). */
export function kernelStepRunning(messages: readonly Message[]): boolean {
  return messages.some(m => m.kind === 'tool' && m.status === 'running' && KERNEL_TOOLS.has(m.call.function.name));
}
