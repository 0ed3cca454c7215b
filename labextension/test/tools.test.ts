import { describe, expect, it } from 'vitest';
import type { Message } from '../src/chatState';
import type { ToolCall } from '../src/protocol';
import {
  approve,
  complete,
  createToolMessage,
  fail,
  NOTEBOOK_TOOLS,
  readyToContinue,
  reject,
  startRun,
  ToolStateError,
  TOOL_NAMES
} from '../src/tools';

const call = (name: string, args: string, id = 'c1'): ToolCall => ({
  id,
  type: 'function',
  function: { name, arguments: args }
});

describe('tool definitions', () => {
  it('offers the notebook tools and web_fetch with object schemas', () => {
    expect(TOOL_NAMES).toEqual(['read_cells', 'insert_cell', 'edit_cell', 'run_cell', 'read_output', 'list_variables', 'web_fetch']);
    for (const tool of NOTEBOOK_TOOLS) {
      expect(tool.function.parameters.type).toBe('object');
      expect(tool.function.description.length).toBeGreaterThan(10);
    }
  });
});

describe('tool approval state', () => {
  it('waits for the user unless the tool is auto-approved', () => {
    const pending = createToolMessage(call('insert_cell', '{"source": "x = 1"}'), new Set());
    expect(pending.status).toBe('pending');
    expect(pending.args).toEqual({ source: 'x = 1' });
    const auto = createToolMessage(call('insert_cell', '{"source": "x"}'), new Set(['insert_cell']));
    expect(auto.status).toBe('approved');
    expect(auto.autoApproved).toBe(true);
    // auto-approve is per tool
    expect(createToolMessage(call('run_cell', '{"index": 1}'), new Set(['insert_cell'])).status).toBe('pending');
  });

  it('treats empty arguments as no arguments', () => {
    expect(createToolMessage(call('list_variables', ''), new Set()).args).toEqual({});
  });

  it('settles unknown tools and bad arguments at once with a reason for the model', () => {
    const unknown = createToolMessage(call('rm_rf', '{}'), new Set(['rm_rf']));
    expect(unknown.status).toBe('error');
    expect(unknown.result).toMatch(/unknown tool "rm_rf"/);
    expect(createToolMessage(call('run_cell', '{index: 1'), new Set()).result).toMatch(/not valid JSON/);
    expect(createToolMessage(call('run_cell', '[1]'), new Set()).result).toMatch(/JSON object/);
  });

  it('runs approved calls once and refuses impossible moves', () => {
    const pending = createToolMessage(call('run_cell', '{"index": 0}'), new Set());
    expect(() => startRun(pending)).toThrow(ToolStateError); // not approved yet
    const running = startRun(approve(pending));
    expect(running.status).toBe('running');
    expect(() => startRun(running)).toThrow(ToolStateError); // double click
    expect(() => approve(running)).toThrow(ToolStateError);
    expect(complete(running, 'out: 2')).toMatchObject({ status: 'done', result: 'out: 2' });
    expect(fail(running, 'kernel died')).toMatchObject({ status: 'error', result: 'Error: kernel died' });
    const rejected = reject(pending);
    expect(rejected).toMatchObject({ status: 'rejected', result: 'The user rejected this tool call.' });
    expect(() => approve(rejected)).toThrow(ToolStateError);
  });

  it('continues the conversation only when every call of the latest turn is settled', () => {
    const a = createToolMessage(call('insert_cell', '{"source": "1"}', 'c1'), new Set());
    const b = createToolMessage(call('list_variables', '{}', 'c2'), new Set(['list_variables']));
    const head: Message[] = [{ kind: 'user', id: 'u', text: 'go', context: [] }];
    expect(readyToContinue(head)).toBe(false);
    expect(readyToContinue([...head, a, b])).toBe(false);
    const b2 = complete(startRun(b), 'x: int');
    expect(readyToContinue([...head, a, b2])).toBe(false);
    expect(readyToContinue([...head, reject(a), b2])).toBe(true);
  });
});
