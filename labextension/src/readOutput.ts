/**
 * The `read_output` tool's text: a code cell's outputs as the model can read them. Streams and text results as
 * they are, rich results by their plain text (or a note naming their types), images as a note (the model cannot
 * see them), and an error as its name, value and traceback with the terminal colour codes stripped.
 *
 * Pure (nbformat JSON in, text out) so it is unit-tested without JupyterLab (test/readOutput.test.ts).
 */

import type * as nbformat from '@jupyterlab/nbformat';

/** Characters of output text kept per cell, so one huge output does not flood the context. */
export const MAX_READ_OUTPUT_CHARS = 4000;

// eslint-disable-next-line no-control-regex
const ANSI = /\u001b\[[0-9;?]*[A-Za-z]/g;

export function stripAnsiCodes(text: string): string {
  return text.replace(ANSI, '');
}

function joinText(value: unknown): string {
  return Array.isArray(value) ? value.join('') : typeof value === 'string' ? value : '';
}

function describeData(data: nbformat.IMimeBundle, metadata: nbformat.OutputMetadata | undefined): string {
  const kinds = Object.keys(data);
  const images = kinds.filter(k => k.startsWith('image/'));
  const parts: string[] = [];
  for (const kind of images) {
    const meta = (metadata?.[kind] ?? {}) as { width?: number; height?: number };
    const size = meta.width && meta.height ? ` ${meta.width}x${meta.height}` : '';
    parts.push(`[an image (${kind}${size}) is shown here; its pixels are not readable as text]`);
  }
  const plain = data['text/plain'];
  if (plain !== undefined && !images.length) {
    parts.push(joinText(plain));
  } else if (!images.length) {
    parts.push(`[output of type ${kinds.join(', ')}]`);
  }
  return parts.join('\n');
}

/** The outputs of one code cell as text for the model; `execution_count` says whether it ran. */
export function readOutputText(index: number, outputs: nbformat.IOutput[], executionCount: number | null): string {
  const ran = executionCount === null ? 'has not run in this session' : `ran as [${executionCount}]`;
  if (!outputs.length) {
    return `Cell ${index} ${ran} and has no output.`;
  }
  const parts: string[] = [];
  let error = '';
  for (const output of outputs) {
    switch (output.output_type) {
      case 'stream': {
        const stream = output as nbformat.IStream;
        parts.push(`[${stream.name}]\n${stripAnsiCodes(joinText(stream.text))}`);
        break;
      }
      case 'execute_result':
      case 'display_data': {
        const result = output as nbformat.IExecuteResult;
        parts.push(describeData(result.data ?? {}, result.metadata));
        break;
      }
      case 'error': {
        const e = output as nbformat.IError;
        const traceback = stripAnsiCodes((e.traceback ?? []).join('\n'));
        error = `Error: ${e.ename}: ${e.evalue}${traceback ? `\nTraceback:\n${traceback}` : ''}`;
        parts.push(error);
        break;
      }
      default:
        break;
    }
  }
  let text = parts.join('\n');
  if (text.length > MAX_READ_OUTPUT_CHARS) {
    // keep the end: an error's last lines say what went wrong
    text = `... (${text.length - MAX_READ_OUTPUT_CHARS} characters left out)\n${text.slice(-MAX_READ_OUTPUT_CHARS)}`;
  }
  return `Cell ${index} ${ran}${error ? ' and raised an error' : ''}. Outputs:\n${text}`;
}
