/**
 * The sidebar's reach into notebooks: context for a prompt (active cell, selection, whole notebook),
 * the notebook tools the model may call (web_fetch is handed to the server: webFetch.ts), code-block actions (insert below, replace the active cell) and
 * the "Explain / fix this error" prompt.
 *
 * Owns everything that touches INotebookTracker and kernels (`NotebookTools`); the chat logic sees it only
 * through the `NotebookBridge` interface (chatModel.ts).
 */

import type { Cell, ICellModel } from '@jupyterlab/cells';
import type * as nbformat from '@jupyterlab/nbformat';
import { NotebookActions, type INotebookTracker, type NotebookPanel } from '@jupyterlab/notebook';
import { KernelMessage } from '@jupyterlab/services';

import type { ContextBlock } from './chatState';
import { readOutputText } from './readOutput';
import type { ContextToggles, NotebookBridge } from './chatModel';

/** Output text is cut to this many characters per cell so one huge output does not flood the prompt. */
const MAX_OUTPUT_CHARS = 2000;

// eslint-disable-next-line no-control-regex
const ANSI = /\u001b\[[0-9;]*[A-Za-z]/g;

export function stripAnsi(text: string): string {
  return text.replace(ANSI, '');
}

function joinText(value: nbformat.MultilineString | undefined): string {
  return Array.isArray(value) ? value.join('') : (value ?? '');
}

/** A text summary of outputs: streams, plain-text results and errors with their traceback. */
export function outputsToText(outputs: nbformat.IOutput[]): string {
  const parts: string[] = [];
  for (const output of outputs) {
    switch (output.output_type) {
      case 'stream':
        parts.push(joinText((output as nbformat.IStream).text));
        break;
      case 'execute_result':
      case 'display_data': {
        const data = (output as nbformat.IExecuteResult).data ?? {};
        const plain = data['text/plain'] as nbformat.MultilineString | undefined;
        const kinds = Object.keys(data).filter(k => k !== 'text/plain');
        parts.push(plain !== undefined ? joinText(plain) : `[${kinds.join(', ')}]`);
        break;
      }
      case 'error': {
        const error = output as nbformat.IError;
        parts.push(stripAnsi((error.traceback ?? []).join('\n')) || `${error.ename}: ${error.evalue}`);
        break;
      }
      default:
        break;
    }
  }
  const text = parts.join('\n');
  return text.length > MAX_OUTPUT_CHARS ? `${text.slice(0, MAX_OUTPUT_CHARS)}\n... (output cut)` : text;
}

function cellOutputs(model: ICellModel): nbformat.IOutput[] {
  return model.type === 'code' ? ((model.toJSON() as nbformat.ICodeCell).outputs ?? []) : [];
}

/** The error output of a cell, if it has one. */
export function errorOutput(model: ICellModel | undefined | null): nbformat.IError | null {
  if (!model) {
    return null;
  }
  const error = cellOutputs(model).find(o => o.output_type === 'error');
  return (error as nbformat.IError | undefined) ?? null;
}

/** The prompt of "Explain / fix this error": the cell's code and its traceback. */
export function explainErrorPrompt(source: string, error: nbformat.IError): { text: string; context: ContextBlock[] } {
  const traceback = stripAnsi((error.traceback ?? []).join('\n')) || `${error.ename}: ${error.evalue}`;
  return {
    text: `Explain this error and fix the code.`,
    context: [
      { label: 'Cell', text: '```python\n' + source + '\n```' },
      { label: 'Error', text: '```\n' + traceback + '\n```' }
    ]
  };
}

const LIST_VARIABLES_CODE = `
def __glm_workbench_variables():
    import json, types
    skip = {"In", "Out", "exit", "quit", "get_ipython"}
    rows = []
    for name, value in list(globals().items()):
        if name.startswith("_") or name in skip or isinstance(value, types.ModuleType):
            continue
        if callable(value) and getattr(value, "__module__", None) != "__main__":
            continue
        row = {"name": name, "type": type(value).__name__}
        shape = getattr(value, "shape", None)
        if shape is not None:
            row["shape"] = str(tuple(shape)) if not isinstance(shape, str) else shape
        try:
            text = repr(value)
        except Exception as error:
            text = f"<repr failed: {error}>"
        row["preview"] = text if len(text) <= 80 else text[:77] + "..."
        rows.append(row)
    print(json.dumps(rows))
__glm_workbench_variables()
del __glm_workbench_variables
`;

/**
 * End the current undo group of a shared model (YNotebook / YCell: the interfaces do not declare their Yjs undo
 * manager), so the change that follows is its own step: Yjs merges changes less than 500 ms apart otherwise.
 */
function stopCapturing(shared: unknown): void {
  (shared as { undoManager?: { stopCapturing(): void } | null }).undoManager?.stopCapturing();
}

export class NotebookTools implements NotebookBridge {
  /** `webFetch`: reads a page for the `web_fetch` tool (through the server: webFetch.ts); without it the tool fails. */
  constructor(
    private readonly tracker: INotebookTracker,
    private readonly webFetch?: (url: unknown) => Promise<string>
  ) {}

  private get panel(): NotebookPanel {
    const panel = this.tracker.currentWidget;
    if (!panel) {
      throw new Error('No notebook is open. Open a notebook and try again.');
    }
    return panel;
  }

  private cellLabel(index: number): string {
    return `Cell [${index}]`;
  }

  collectContext(toggles: ContextToggles): ContextBlock[] {
    const panel = this.tracker.currentWidget;
    if (!panel) {
      return [];
    }
    const notebook = panel.content;
    const blocks: ContextBlock[] = [];
    if (toggles.notebook) {
      const cells = Array.from({ length: notebook.widgets.length }, (_, i) => this.describeCell(notebook.widgets[i], i));
      blocks.push({ label: `Notebook ${panel.context.path}`, text: cells.join('\n\n') });
    } else if (toggles.cell && notebook.activeCell) {
      blocks.push({
        label: `Active cell ${this.cellLabel(notebook.activeCellIndex)}`,
        text: this.describeCell(notebook.activeCell, notebook.activeCellIndex)
      });
    }
    if (toggles.selection) {
      const selection = this.selectedText();
      if (selection) {
        blocks.push({ label: 'Selection', text: selection });
      }
    }
    return blocks;
  }

  private describeCell(cell: Cell, index: number): string {
    const source = cell.model.sharedModel.getSource();
    const outputs = outputsToText(cellOutputs(cell.model));
    const fence = cell.model.type === 'code' ? '```python' : '```markdown';
    return `${this.cellLabel(index)} (${cell.model.type})\n${fence}\n${source}\n\`\`\`${outputs ? `\nOutput:\n${outputs}` : ''}`;
  }

  selectedText(): string {
    const editor = this.tracker.currentWidget?.content.activeCell?.editor;
    if (!editor) {
      return '';
    }
    const selection = editor.getSelection();
    const start = editor.getOffsetAt(selection.start);
    const end = editor.getOffsetAt(selection.end);
    return start === end ? '' : editor.model.sharedModel.getSource().slice(Math.min(start, end), Math.max(start, end));
  }

  /** Insert a code cell below the active cell (code-block action "Insert below"). */
  insertBelow(source: string, cellType: 'code' | 'markdown' = 'code'): number {
    const notebook = this.panel.content;
    NotebookActions.insertBelow(notebook);
    if (cellType !== 'code') {
      NotebookActions.changeCellType(notebook, cellType);
    }
    notebook.activeCell?.model.sharedModel.setSource(source);
    return notebook.activeCellIndex;
  }

  /** Replace the active cell's text (code-block action "Replace active cell"). */
  replaceActive(source: string): number {
    const notebook = this.panel.content;
    const cell = notebook.activeCell;
    if (!cell) {
      throw new Error('The notebook has no active cell.');
    }
    cell.model.sharedModel.setSource(source);
    return notebook.activeCellIndex;
  }

  async runTool(name: string, args: Record<string, unknown>): Promise<string> {
    switch (name) {
      case 'read_cells':
        return this.readCells(args);
      case 'insert_cell':
        return this.insertCell(args);
      case 'edit_cell':
        return this.editCell(args);
      case 'read_output':
        return this.readOutput(args);
      case 'run_cell':
        return this.runCell(args);
      case 'list_variables':
        return this.listVariables();
      case 'web_fetch':
        if (!this.webFetch) {
          throw new Error('web_fetch is not available in this sidebar');
        }
        return this.webFetch(args.url);
      default:
        throw new Error(`unknown tool "${name}"`);
    }
  }

  private intArg(args: Record<string, unknown>, key: string, fallback?: number): number {
    const value = args[key] ?? fallback;
    if (typeof value !== 'number' || !Number.isInteger(value)) {
      throw new Error(`argument "${key}" must be an integer, got ${JSON.stringify(args[key])}`);
    }
    return value;
  }

  private readCells(args: Record<string, unknown>): string {
    const notebook = this.panel.content;
    const count = notebook.widgets.length;
    const start = Math.max(0, this.intArg(args, 'start', 0));
    const end = Math.min(count, this.intArg(args, 'end', count));
    const cells = [];
    for (let i = start; i < end; i++) {
      cells.push(this.describeCell(notebook.widgets[i], i));
    }
    return `${this.panel.context.path}: ${count} cells\n\n${cells.join('\n\n')}`;
  }

  /**
   * Insert a cell as ONE undoable step: the cell is created with its source in a single transaction of the
   * notebook's shared model, and the undo manager stops capturing before and after, so Ctrl+Z (command mode)
   * removes exactly this cell, never merged with the user's last edit.
   */
  private insertCell(args: Record<string, unknown>): string {
    const source = args.source;
    if (typeof source !== 'string') {
      throw new Error('argument "source" must be a string');
    }
    const cellType = args.cell_type === 'markdown' ? 'markdown' : 'code';
    const notebook = this.panel.content;
    const count = notebook.widgets.length;
    const index = args.index !== undefined ? this.intArg(args, 'index') : count ? notebook.activeCellIndex + 1 : 0;
    if (index < 0 || index > count) {
      throw new Error(`index ${index} is outside 0..${count}`);
    }
    const shared = notebook.model!.sharedModel;
    stopCapturing(shared);
    shared.insertCell(index, { cell_type: cellType, source });
    stopCapturing(shared);
    notebook.activeCellIndex = index;
    return `Inserted a ${cellType} cell at index ${index}.`;
  }

  private cellAt(args: Record<string, unknown>): { index: number; cell: Cell } {
    const notebook = this.panel.content;
    const index = this.intArg(args, 'index');
    if (index < 0 || index >= notebook.widgets.length) {
      throw new Error(`index ${index} is outside 0..${notebook.widgets.length - 1}`);
    }
    return { index, cell: notebook.widgets[index] };
  }

  /**
   * Replace a cell's source as ONE undoable step of that cell's history (JupyterLab keeps one per cell unless
   * document-wide undo is on, then the notebook's): one transaction, with capturing stopped around it, so
   * Ctrl+Z in the cell restores exactly the previous source.
   */
  private editCell(args: Record<string, unknown>): string {
    const source = args.source;
    if (typeof source !== 'string') {
      throw new Error('argument "source" must be a string');
    }
    const { index, cell } = this.cellAt(args);
    const shared = cell.model.sharedModel;
    const before = shared.getSource();
    if (before === source) {
      return `Cell ${index} already has this source; nothing changed.`;
    }
    stopCapturing(shared);
    shared.transact(() => shared.setSource(source));
    stopCapturing(shared);
    this.panel.content.activeCellIndex = index;
    return `Replaced the source of cell ${index} (${before.split('\n').length} lines before, ${source.split('\n').length} now).`;
  }

  private readOutput(args: Record<string, unknown>): string {
    const { index, cell } = this.cellAt(args);
    if (cell.model.type !== 'code') {
      return `Cell ${index} is a ${cell.model.type} cell: it has no outputs.`;
    }
    const json = cell.model.toJSON() as nbformat.ICodeCell;
    return readOutputText(index, json.outputs ?? [], (json.execution_count as number | null) ?? null);
  }

  /** Interrupt the active notebook's kernel (Stop with "interrupt the kernel"). */
  async interruptKernel(): Promise<void> {
    await this.tracker.currentWidget?.sessionContext.session?.kernel?.interrupt();
  }

  private async runCell(args: Record<string, unknown>): Promise<string> {
    const panel = this.panel;
    const notebook = panel.content;
    const index = this.intArg(args, 'index');
    if (index < 0 || index >= notebook.widgets.length) {
      throw new Error(`index ${index} is outside 0..${notebook.widgets.length - 1}`);
    }
    const cell = notebook.widgets[index];
    if (cell.model.type !== 'code') {
      throw new Error(`cell ${index} is a ${cell.model.type} cell, not a code cell`);
    }
    notebook.activeCellIndex = index;
    const ok = await NotebookActions.run(notebook, panel.sessionContext);
    const outputs = outputsToText(cellOutputs(cell.model));
    return `${ok ? 'Ran' : 'Ran with an error:'} cell ${index}.${outputs ? `\nOutput:\n${outputs}` : '\n(no output)'}`;
  }

  private async listVariables(): Promise<string> {
    const kernel = this.panel.sessionContext.session?.kernel;
    if (!kernel) {
      throw new Error('the active notebook has no running kernel');
    }
    let stdout = '';
    let failure = '';
    const future = kernel.requestExecute({ code: LIST_VARIABLES_CODE, silent: false, store_history: false });
    future.onIOPub = (msg: KernelMessage.IIOPubMessage) => {
      if (KernelMessage.isStreamMsg(msg) && msg.content.name === 'stdout') {
        stdout += msg.content.text;
      } else if (KernelMessage.isErrorMsg(msg)) {
        failure = `${msg.content.ename}: ${msg.content.evalue}`;
      }
    };
    await future.done;
    if (failure) {
      throw new Error(failure);
    }
    const rows = JSON.parse(stdout.trim() || '[]') as Array<{ name: string; type: string; shape?: string; preview: string }>;
    if (!rows.length) {
      return 'No user variables are defined.';
    }
    return rows.map(r => `${r.name}: ${r.type}${r.shape ? ` shape=${r.shape}` : ''} = ${r.preview}`).join('\n');
  }
}
