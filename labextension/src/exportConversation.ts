/**
 * A conversation as a notebook or a Markdown document: what "Export" in the sidebar writes.
 *
 * Owns the conversion only (pure functions, unit-tested): the shown branch, in order; questions become Markdown
 * cells (quoted under "**You:**"), answers' prose Markdown cells, and their fenced code blocks in Python (or with
 * no language) code cells, ready to run; code in another language stays a fenced block in Markdown (a notebook's
 * kernel would not run it). Thinking traces and tool calls are left out of the notebook (they are how the
 * answer was reached, not the answer); the Markdown export notes each tool call in one line.
 * index.ts writes the file and opens it.
 */

import type { Conversation, Message } from './chatState';

/** Languages whose blocks become code cells (a Python kernel runs them). */
const RUNNABLE = new Set(['', 'python', 'py', 'python3', 'ipython', 'ipython3']);

export type AnswerPiece = { kind: 'prose'; text: string } | { kind: 'code'; language: string; code: string };

/** Prose and fenced code blocks of a Markdown answer, in order (an unclosed fence runs to the end). */
export function splitFences(markdown: string): AnswerPiece[] {
  const pieces: AnswerPiece[] = [];
  const lines = markdown.split('\n');
  let prose: string[] = [];
  let code: string[] | null = null;
  let fence = '';
  let language = '';
  const flushProse = () => {
    const text = prose.join('\n').trim();
    if (text) {
      pieces.push({ kind: 'prose', text });
    }
    prose = [];
  };
  for (const line of lines) {
    if (code === null) {
      const open = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/.exec(line);
      if (open) {
        flushProse();
        code = [];
        fence = open[1];
        language = open[2].toLowerCase();
      } else {
        prose.push(line);
      }
    } else if (line.trim().startsWith(fence) && line.trim().replace(/[`~]/g, '') === '') {
      pieces.push({ kind: 'code', language, code: code.join('\n') });
      code = null;
    } else {
      code.push(line);
    }
  }
  if (code !== null) {
    pieces.push({ kind: 'code', language, code: code.join('\n') });
  }
  flushProse();
  return pieces;
}

interface NotebookCell {
  id: string;
  cell_type: 'markdown' | 'code';
  metadata: Record<string, unknown>;
  source: string;
  outputs?: unknown[];
  execution_count?: null;
}

export interface NotebookDocument {
  nbformat: 4;
  nbformat_minor: 5;
  metadata: Record<string, unknown>;
  cells: NotebookCell[];
}

const quote = (text: string) => text.split('\n').map(line => `> ${line}`).join('\n');

function markdownCell(source: string): Omit<NotebookCell, 'id'> {
  return { cell_type: 'markdown', metadata: {}, source };
}

function codeCell(source: string): Omit<NotebookCell, 'id'> {
  return { cell_type: 'code', metadata: {}, source, outputs: [], execution_count: null };
}

/** The notebook of a conversation's shown branch (nbformat 4.5: each cell has an id, unique in the notebook). */
export function toNotebook(conversation: Pick<Conversation, 'title' | 'messages' | 'model'>): NotebookDocument {
  const cells: Array<Omit<NotebookCell, 'id'>> = [markdownCell(`# ${conversation.title || 'GLM conversation'}`)];
  for (const message of conversation.messages) {
    if (message.kind === 'user') {
      cells.push(markdownCell(`**You:**\n\n${quote(message.text)}`));
    } else if (message.kind === 'assistant' && message.content.trim()) {
      let first = true;
      for (const piece of splitFences(message.content)) {
        if (piece.kind === 'code' && RUNNABLE.has(piece.language)) {
          cells.push(codeCell(piece.code));
        } else {
          const text = piece.kind === 'prose' ? piece.text : `\`\`\`${piece.language}\n${piece.code}\n\`\`\``;
          cells.push(markdownCell(first ? `**${message.model ?? 'GLM'}:**\n\n${text}` : text));
        }
        first = false;
      }
    }
  }
  return {
    nbformat: 4,
    nbformat_minor: 5,
    metadata: {
      kernelspec: { name: 'python3', display_name: 'Python 3', language: 'python' },
      language_info: { name: 'python' },
      glm_workbench: { exported_from: 'conversation', model: conversation.model ?? null }
    },
    cells: cells.map((cell, i) => ({ id: `glm-${i}`, ...cell }))
  };
}

function toolLine(message: Message): string | null {
  return message.kind === 'tool'
    ? `*Tool call \`${message.call.function.name}\`: ${message.status}.*`
    : null;
}

/** The Markdown document of a conversation's shown branch. */
export function toMarkdown(conversation: Pick<Conversation, 'title' | 'messages'>): string {
  const parts = [`# ${conversation.title || 'GLM conversation'}`];
  for (const message of conversation.messages) {
    if (message.kind === 'user') {
      parts.push(`## You\n\n${message.text}`);
    } else if (message.kind === 'assistant') {
      if (message.content.trim()) {
        parts.push(`## ${message.model ?? 'GLM'}\n\n${message.content.trim()}`);
      }
    } else {
      parts.push(toolLine(message)!);
    }
  }
  return `${parts.join('\n\n')}\n`;
}

/** A file name from the title: letters, digits, spaces, '-' and '_' kept, at most 60 characters. */
export function exportFileName(title: string, extension: 'ipynb' | 'md'): string {
  const base = title.replace(/[^\p{L}\p{N} _-]+/gu, ' ').replace(/\s+/g, ' ').trim().slice(0, 60).trim();
  return `${base || 'GLM conversation'}.${extension}`;
}
