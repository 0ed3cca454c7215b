import { describe, expect, it } from 'vitest';

import {
  addSteps,
  DEFAULT_MAX_TOOL_STEPS,
  isToolStep,
  kernelStepRunning,
  limitNotice,
  needsApproval,
  nextAction,
  resultSummary,
  startLoop,
  stepDuration,
  stepNumbers,
  stepReasoning,
  stoppedNotice,
  stopLoop,
  toolEffect
} from '../src/agentLoop';
import { newAssistantMessage, type AssistantMessage, type Message, type ToolMessage } from '../src/chatState';

const tool = (id: string, status: ToolMessage['status'], extra: Partial<ToolMessage> = {}): ToolMessage => ({
  kind: 'tool',
  id,
  call: { id: `call-${id}`, type: 'function', function: { name: 'run_cell', arguments: '{}' } },
  status,
  autoApproved: false,
  ...extra
});

const step = (id: string, reasoning: string, content = ''): AssistantMessage => ({
  ...newAssistantMessage(id, 0),
  status: 'done',
  reasoning,
  content,
  toolCalls: [{ id: `c-${id}`, type: 'function', function: { name: 'run_cell', arguments: '{}' } }]
});

describe('step limit', () => {
  it('defaults to 8 steps and refuses a limit below 1 with a message naming the setting', () => {
    expect(startLoop().limit).toBe(DEFAULT_MAX_TOOL_STEPS);
    expect(DEFAULT_MAX_TOOL_STEPS).toBe(8);
    expect(() => startLoop(0)).toThrow(/maxToolSteps/);
    expect(() => startLoop(2.5)).toThrow(/whole number/);
  });

  it('continues while under the limit and pauses once the steps reach it', () => {
    let run = startLoop(3);
    run = addSteps(run, 2);
    expect(nextAction(run, [tool('a', 'done'), tool('b', 'error')])).toBe('continue');
    run = addSteps(run, 1);
    expect(run.steps).toBe(3);
    expect(nextAction(run, [tool('c', 'done')])).toBe('limit');
    expect(limitNotice(run)).toMatch(/^Paused after 3 tool steps: the step limit is 3 .*Continue/);
  });

  it('waits while a call of the latest turn is pending or running, or when there is none', () => {
    const run = addSteps(startLoop(8), 2);
    expect(nextAction(run, [tool('a', 'done'), tool('b', 'pending')])).toBe('wait');
    expect(nextAction(run, [tool('a', 'running')])).toBe('wait');
    expect(nextAction(run, [])).toBe('wait');
  });

  it('a rejected call settles the turn: the model hears about it', () => {
    expect(nextAction(addSteps(startLoop(8), 1), [tool('a', 'rejected')])).toBe('continue');
  });
});

describe('stop', () => {
  it('ends the loop at once, even with calls still running or at the limit', () => {
    const run = stopLoop(addSteps(startLoop(2), 2));
    expect(run.stopped).toBe(true);
    expect(nextAction(run, [tool('a', 'running')])).toBe('stopped');
    expect(nextAction(run, [tool('a', 'done')])).toBe('stopped');
  });

  it('says plainly that the user stopped it, and whether the cell was interrupted', () => {
    expect(stoppedNotice({ steps: 1 }, false)).toBe('Stopped by you after 1 tool step. Nothing more is sent to the model.');
    expect(stoppedNotice({ steps: 3 }, true)).toMatch(/^Stopped by you after 3 tool steps; the running cell was interrupted\./);
  });

  it('leaves the previous run untouched (runs are values)', () => {
    const run = startLoop(4);
    stopLoop(run);
    addSteps(run, 3);
    expect(run).toEqual({ steps: 0, limit: 4, stopped: false });
  });
});

describe('approval policy', () => {
  it('every tool waits for the user unless it is auto-approved', () => {
    const auto = new Set(['run_cell', 'read_output']);
    for (const name of ['insert_cell', 'edit_cell', 'read_cells', 'list_variables', 'web_fetch']) {
      expect(needsApproval(name, auto), name).toBe(true);
    }
    expect(needsApproval('run_cell', auto)).toBe(false);
    expect(needsApproval('read_output', auto)).toBe(false);
    expect(needsApproval('run_cell', new Set())).toBe(true);
  });

  it('names what each tool does: edits, runs, reads or reaches the network', () => {
    expect(toolEffect('insert_cell')).toBe('edit');
    expect(toolEffect('edit_cell')).toBe('edit');
    expect(toolEffect('run_cell')).toBe('run');
    expect(toolEffect('list_variables')).toBe('run');
    expect(toolEffect('read_output')).toBe('read');
    expect(toolEffect('web_fetch')).toBe('network');
    expect(toolEffect('something_new')).toBe('run'); // unknown: assume the worst
  });
});

describe('step cards', () => {
  it('summarises a result by its first non-empty line, cut to length', () => {
    expect(resultSummary('\n\nRan cell 1.\nOutput:\n3')).toBe('Ran cell 1.');
    expect(resultSummary(undefined)).toBe('');
    expect(resultSummary('x'.repeat(100), 10)).toBe(`${'x'.repeat(9)}…`);
  });

  it('times a step from start to finish, and shows nothing before it finished', () => {
    expect(stepDuration(tool('a', 'done', { started: 1000, finished: 1420 }))).toBe('0.4 s');
    expect(stepDuration(tool('a', 'done', { started: 0, finished: 42_600 }))).toBe('43 s');
    expect(stepDuration(tool('a', 'running', { started: 1000 }))).toBe('');
    // the live timer of a running step: how long so far
    expect(stepDuration(tool('a', 'running', { started: 1000 }), 3500)).toBe('2.5 s');
    expect(stepDuration(tool('a', 'pending'), 3500)).toBe('');
    expect(stepDuration(tool('a', 'done', { started: 1000, finished: 1420 }), 99_000)).toBe('0.4 s');
  });

  it('numbers the steps since the last user message', () => {
    const messages: Message[] = [
      { kind: 'user', id: 'u1', text: 'a', context: [] },
      step('s1', ''),
      tool('t1', 'done'),
      step('s2', ''),
      tool('t2', 'done'),
      { kind: 'user', id: 'u2', text: 'b', context: [] },
      step('s3', ''),
      tool('t3', 'done')
    ];
    expect([...stepNumbers(messages)]).toEqual([
      ['t1', 1],
      ['t2', 2],
      ['t3', 1]
    ]);
  });

  it('puts the reasoning of a call-only answer under the first card of its turn', () => {
    const s1 = step('s1', 'I should run it.');
    const s2 = step('s2', 'Explained first.', 'Let me explain before running.');
    const messages: Message[] = [
      { kind: 'user', id: 'u1', text: 'a', context: [] },
      s1,
      tool('t1', 'done'),
      tool('t1b', 'done'),
      s2,
      tool('t2', 'done')
    ];
    const owners = stepReasoning(messages);
    expect(owners.get('t1')).toBe(s1);
    expect(owners.has('t1b')).toBe(false); // once per turn
    expect(owners.has('t2')).toBe(false); // an answer with text keeps its thinking in its bubble
    expect(isToolStep(s1)).toBe(true);
    expect(isToolStep(s2)).toBe(false);
    expect(isToolStep({ ...s1, status: 'streaming' })).toBe(false);
  });
});

describe('Stop and interrupt', () => {
  it('is offered only while a step runs code in the kernel', () => {
    expect(kernelStepRunning([tool('a', 'running')])).toBe(true); // run_cell
    expect(kernelStepRunning([tool('a', 'done')])).toBe(false);
    const read = tool('b', 'running', { call: { id: 'x', type: 'function', function: { name: 'read_cells', arguments: '{}' } } });
    expect(kernelStepRunning([read])).toBe(false);
  });
});
