/**
 * Notebook tools offered to the model, and the approval state of each call.
 *
 * Owns the OpenAI tool definitions (names, descriptions, JSON schemas; `web_fetch` runs on the server, webFetch.ts) and the life of one call:
 * pending (waits for the user) or approved (auto-approve for that tool), running, then done / rejected /
 * error. Transitions are pure and refuse impossible moves, so a double click cannot run a call twice.
 * Running a tool against a notebook lives in notebookTools.ts (`NotebookTools`).
 */

import type { ToolMessage, ToolStatus } from './chatState';
import type { ToolCall, ToolDefinition } from './protocol';
import { needsApproval } from './agentLoop';

export const NOTEBOOK_TOOLS: ToolDefinition[] = [
  {
    type: 'function',
    function: {
      name: 'read_cells',
      description:
        'Read cells of the active notebook: index, type, source and (for code cells) a text summary of the outputs.',
      parameters: {
        type: 'object',
        properties: {
          start: { type: 'integer', description: 'First cell index to read (0-based). Default 0.' },
          end: { type: 'integer', description: 'One past the last cell index to read. Default: all cells.' }
        }
      }
    }
  },
  {
    type: 'function',
    function: {
      name: 'insert_cell',
      description: 'Insert a new cell into the active notebook.',
      parameters: {
        type: 'object',
        properties: {
          source: { type: 'string', description: 'The text of the new cell.' },
          cell_type: { type: 'string', enum: ['code', 'markdown'], description: 'Default: code.' },
          index: {
            type: 'integer',
            description: 'Where the new cell goes (0-based). Default: below the active cell.'
          }
        },
        required: ['source']
      }
    }
  },
  {
    type: 'function',
    function: {
      name: 'edit_cell',
      description: "Replace the source of a cell of the active notebook (its outputs stay until it runs again).",
      parameters: {
        type: 'object',
        properties: {
          index: { type: 'integer', description: 'Index of the cell to edit (0-based).' },
          source: { type: 'string', description: 'The new text of the cell.' }
        },
        required: ['index', 'source']
      }
    }
  },
  {
    type: 'function',
    function: {
      name: 'run_cell',
      description: 'Run a code cell of the active notebook and return its outputs as text.',
      parameters: {
        type: 'object',
        properties: { index: { type: 'integer', description: 'Index of the cell to run (0-based).' } },
        required: ['index']
      }
    }
  },
  {
    type: 'function',
    function: {
      name: 'read_output',
      description:
        'Read the outputs of a code cell as text: streams, results, images as a note, and an error as its name, ' +
        'value and traceback.',
      parameters: {
        type: 'object',
        properties: { index: { type: 'integer', description: 'Index of the cell (0-based).' } },
        required: ['index']
      }
    }
  },
  {
    type: 'function',
    function: {
      name: 'list_variables',
      description: "List the variables defined in the active notebook's kernel: name, type and a short preview.",
      parameters: { type: 'object', properties: {} }
    }
  },
  {
    type: 'function',
    function: {
      name: 'web_fetch',
      description: "Fetch a web page (http or https) and return its title, readable text as Markdown and links.",
      parameters: {
        type: 'object',
        properties: { url: { type: 'string', description: 'The http(s) URL of the page.' } },
        required: ['url']
      }
    }
  }
];

export const TOOL_NAMES: readonly string[] = NOTEBOOK_TOOLS.map(tool => tool.function.name);

export class ToolStateError extends Error {}

/**
 * A message for a call the model just made. Calls to tools we never offered, or with arguments that are
 * not a JSON object, settle at once as errors (the model is told why); the rest wait for the user or,
 * with auto-approve for that tool, are approved.
 */
export function createToolMessage(
  call: ToolCall,
  autoApprove: ReadonlySet<string>,
  knownTools: readonly string[] = TOOL_NAMES
): ToolMessage {
  const base = { kind: 'tool' as const, id: `tool-${call.id}`, call, autoApproved: false };
  if (!knownTools.includes(call.function.name)) {
    return {
      ...base,
      status: 'error',
      result: `Error: unknown tool "${call.function.name}". Available tools: ${knownTools.join(', ')}.`
    };
  }
  let args: unknown;
  try {
    args = call.function.arguments.trim() ? JSON.parse(call.function.arguments) : {};
  } catch {
    return {
      ...base,
      status: 'error',
      result: `Error: the arguments are not valid JSON: ${call.function.arguments.slice(0, 200)}`
    };
  }
  if (typeof args !== 'object' || args === null || Array.isArray(args)) {
    return { ...base, status: 'error', result: 'Error: the arguments must be a JSON object.' };
  }
  const auto = !needsApproval(call.function.name, autoApprove);
  return { ...base, args: args as Record<string, unknown>, status: auto ? 'approved' : 'pending', autoApproved: auto };
}

function move(message: ToolMessage, from: ToolStatus[], to: ToolStatus, result?: string): ToolMessage {
  if (!from.includes(message.status)) {
    throw new ToolStateError(
      `Tool call ${message.call.function.name} (${message.call.id}) is ${message.status}; cannot become ${to}.`
    );
  }
  return { ...message, status: to, result: result ?? message.result };
}

export const approve = (m: ToolMessage): ToolMessage => move(m, ['pending'], 'approved');
export const reject = (m: ToolMessage, reason = 'The user rejected this tool call.'): ToolMessage =>
  move(m, ['pending', 'approved'], 'rejected', reason);
export const startRun = (m: ToolMessage): ToolMessage => move(m, ['approved'], 'running');
export const complete = (m: ToolMessage, result: string): ToolMessage => move(m, ['running'], 'done', result);
export const fail = (m: ToolMessage, error: string): ToolMessage =>
  move(m, ['running'], 'error', `Error: ${error}`);

/** The tool messages of the latest assistant turn (those after the last assistant message). */
export function latestToolMessages(messages: readonly { kind: string }[]): ToolMessage[] {
  const out: ToolMessage[] = [];
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i];
    if (m.kind !== 'tool') {
      break;
    }
    out.unshift(m as ToolMessage);
  }
  return out;
}

/** True when the latest turn made tool calls and every one of them is settled: time to answer the model. */
export function readyToContinue(messages: readonly { kind: string; status?: string }[]): boolean {
  const tools = latestToolMessages(messages);
  return tools.length > 0 && tools.every(t => t.status === 'done' || t.status === 'rejected' || t.status === 'error');
}
