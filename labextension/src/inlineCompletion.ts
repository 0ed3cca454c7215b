/**
 * Inline completion (ghost text) in notebook cells, through JupyterLab's inline completer: the model selected in
 * the sidebar continues the code at the cursor, with the cell and the cells above it as context.
 *
 * Owns the provider (`GlmInlineCompletionProvider`, registered with ICompletionProviderManager), when it may run
 * (the `inlineCompletion` setting: on for the local engine, off for remote models, which cost money), the prompt
 * (a chat request whose system prompt asks for the continuation only) and the cleaning of what comes back
 * (fences, an echoed line). Each keystroke cancels the request before it (AbortController) and waits out a short
 * pause before asking again; the answer streams into the ghost text. Nothing here awaits on the typing path:
 * `fetch` returns at once with a streaming item. Latency goes to the browser console's debug level.
 */

import type {
  CompletionHandler,
  IInlineCompletionContext,
  IInlineCompletionItem,
  IInlineCompletionList,
  IInlineCompletionProvider
} from '@jupyterlab/completer';

import type { WorkbenchClient } from './api';
import type { ApiMessage, ChatCompletionChunk, ChatCompletionRequest, ModelInfo, ServerStatus } from './protocol';

export type InlineCompletionMode = 'auto' | 'on' | 'off';

export interface InlineCompletionSettings {
  /** auto: on for the local engine's models (not the bundled demo model), off for remote ones (each completion is
   * a paid request there). */
  mode: InlineCompletionMode;
  /** Pause after the last keystroke before asking the model (ms). */
  delayMs: number;
  /** The longest completion (tokens). */
  maxTokens: number;
}

export const DEFAULT_INLINE_SETTINGS: InlineCompletionSettings = { mode: 'auto', delayMs: 300, maxTokens: 64 };

/** What the provider needs to know about the sidebar's choice of model at the moment of a request. */
export interface InlineModelChoice {
  model: string;
  models: readonly ModelInfo[];
  status: ServerStatus | null;
  /** The bundled 10M-parameter demo model (ChatModel.isDemoModel): it writes no useful code. */
  demo?: boolean;
}

/**
 * The provider of a model: the providers contract's `workbench.provider` on its model card, else the prefix of a
 * `provider/model` id among cards that carry it, else (a server with one backend) `local` when the status says
 * the local engine answers.
 */
export function modelProvider(choice: InlineModelChoice): string | null {
  const card = choice.models.find(m => m.id === choice.model);
  const provider = card?.workbench?.provider;
  if (typeof provider === 'string' && provider) {
    return provider;
  }
  if (card?.workbench && choice.model.includes('/')) {
    return choice.model.split('/')[0];
  }
  if (choice.status?.backend === 'local' && (!choice.status.model || choice.status.model === choice.model)) {
    return 'local';
  }
  return choice.status?.backend ? String(choice.status.backend) : null;
}

/** Whether inline completion runs now, and why not when it does not (for the debug log). */
export function inlineCompletionAllowed(
  settings: InlineCompletionSettings,
  choice: InlineModelChoice
): { allowed: boolean; reason: string } {
  if (!choice.model) {
    return { allowed: false, reason: 'no model is selected in the GLM sidebar' };
  }
  if (settings.mode === 'off') {
    return { allowed: false, reason: 'the inlineCompletion setting is off' };
  }
  if (settings.mode === 'on') {
    return { allowed: true, reason: 'the inlineCompletion setting is on' };
  }
  if (choice.demo) {
    return {
      allowed: false,
      reason: `${choice.model} is the bundled demo model, which writes no useful code: set inlineCompletion to "on" to see it anyway`
    };
  }
  const provider = modelProvider(choice);
  return provider === 'local'
    ? { allowed: true, reason: 'the local engine answers' }
    : {
        allowed: false,
        reason: `${choice.model} is a remote model (provider ${provider ?? 'unknown'}): set inlineCompletion to "on" to use it`
      };
}

/** Context sizes: the cells above (their end), the text before the cursor (its end) and after it (its start). */
const MAX_ABOVE_CHARS = 6000;
const MAX_PREFIX_CHARS = 3000;
const MAX_SUFFIX_CHARS = 1000;

export const CURSOR = '<CURSOR>';

export const COMPLETION_SYSTEM_PROMPT =
  'You are a code completion engine inside a Jupyter notebook. Reply with only the text to insert at ' +
  `${CURSOR} in the current cell: no explanation, no Markdown, no code fences, and do not repeat any code ` +
  'that is already there. Continue the current line or add a few lines that naturally follow. If nothing ' +
  'should be inserted, reply with nothing.';

export interface CompletionContext {
  /** The cell's text before and after the cursor. */
  prefix: string;
  suffix: string;
  /** Sources of the cells above the current one, in order (Markdown cells as they are). */
  cellsAbove: readonly { type: string; source: string }[];
  /** The kernel's language (python unless the notebook says). */
  language: string;
}

/** The chat messages of one completion request: the system prompt, then the notebook and the cursor. */
export function buildCompletionMessages(context: CompletionContext): ApiMessage[] {
  let above = context.cellsAbove
    .filter(c => c.source.trim())
    .map(c => (c.type === 'code' ? c.source : `[${c.type} cell]\n${c.source}`))
    .join('\n\n');
  if (above.length > MAX_ABOVE_CHARS) {
    above = above.slice(above.length - MAX_ABOVE_CHARS);
  }
  const prefix = context.prefix.slice(Math.max(0, context.prefix.length - MAX_PREFIX_CHARS));
  const suffix = context.suffix.slice(0, MAX_SUFFIX_CHARS);
  const parts: string[] = [];
  if (above) {
    parts.push(`Cells above the current one:\n${above}`);
  }
  parts.push(`Current ${context.language} cell (complete at ${CURSOR}):\n${prefix}${CURSOR}${suffix}`);
  return [
    { role: 'system', content: COMPLETION_SYSTEM_PROMPT },
    { role: 'user', content: parts.join('\n\n') }
  ];
}

/**
 * The text to show as ghost text for what the model said so far: without a Markdown fence around it, without
 * the current line's start when the model repeated it, and nothing while it is still opening a fence.
 */
export function cleanCompletion(raw: string, prefix: string, final = false): string {
  let text = raw.replace(/\r\n/g, '\n');
  const trimmed = text.trimStart();
  if (trimmed.startsWith('```')) {
    const newline = trimmed.indexOf('\n');
    if (newline < 0) {
      return ''; // "```pyth": the fence is still arriving
    }
    text = trimmed.slice(newline + 1);
  } else if (!final && '```'.startsWith(trimmed) && trimmed) {
    return ''; // "`" or "``": may become a fence
  }
  const fence = text.indexOf('```');
  if (fence >= 0) {
    text = text.slice(0, fence);
  }
  text = text.split(CURSOR).join('');
  // a model that repeats the line it continues: keep only what is new
  const line = prefix.slice(prefix.lastIndexOf('\n') + 1);
  if (line.trim() && text.startsWith(line)) {
    text = text.slice(line.length);
  } else if (line.trim() && text.startsWith(line.trimStart()) && line.trimStart() !== line) {
    text = text.slice(line.trimStart().length);
  }
  return final ? text.replace(/\s+$/, '') : text;
}

/** A notebook-like widget: its cells, the active one, and the kernel's language (duck-typed, no notebook import). */
interface NotebookLike {
  content?: {
    widgets?: readonly { model: { type: string; sharedModel: { getSource(): string } } }[];
    activeCellIndex?: number;
  };
  sessionContext?: { session?: { kernel?: { info?: unknown } } | null; kernelDisplayName?: string };
}

/** The cells above the active one of a notebook panel; none for a console or a file editor. */
export function cellsAbove(widget: unknown): { type: string; source: string }[] {
  const notebook = (widget as NotebookLike | null)?.content;
  const cells = notebook?.widgets;
  const active = notebook?.activeCellIndex;
  if (!cells || typeof active !== 'number' || active <= 0) {
    return [];
  }
  return cells.slice(0, active).map(c => ({ type: c.model.type, source: c.model.sharedModel.getSource() }));
}

function languageOf(request: CompletionHandler.IRequest): string {
  const mime = request.mimeType ?? '';
  const m = /^text\/x-(?:i)?(\w+)/.exec(mime);
  return m ? m[1] : 'python';
}

interface PendingStream {
  chunks: AsyncGenerator<ChatCompletionChunk, void, undefined>;
  abort: AbortController;
  prefix: string;
  started: number;
  model: string;
}

function sleep(ms: number, signal: AbortSignal): Promise<boolean> {
  return new Promise(resolve => {
    if (signal.aborted) {
      resolve(false);
      return;
    }
    const timer = setTimeout(() => resolve(true), ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve(false);
    });
  });
}

const LOG = 'GLM Workbench inline completion:';

/** InlineCompletionTriggerKind.Automatic (completion while typing), without importing the enum at run time. */
const AUTOMATIC = 1;

export class GlmInlineCompletionProvider implements IInlineCompletionProvider {
  readonly name = 'GLM Workbench';
  readonly identifier = 'glm-workbench:inline';
  /** JupyterLab's own debouncer stays off: ours cancels the request in flight at the first keystroke. */
  readonly schema = { default: { debouncerDelay: 0, timeout: 5000 } };

  private current: AbortController | null = null;
  private readonly streams = new Map<string, PendingStream>();
  private counter = 0;

  constructor(
    private readonly client: WorkbenchClient,
    private readonly choice: () => InlineModelChoice,
    private readonly settings: () => InlineCompletionSettings
  ) {}

  async fetch(
    request: CompletionHandler.IRequest,
    context: IInlineCompletionContext
  ): Promise<IInlineCompletionList<IInlineCompletionItem>> {
    // the user typed on (or asked again): what was in flight is stale
    this.cancel();
    const settings = this.settings();
    const choice = this.choice();
    const allowed = inlineCompletionAllowed(settings, choice);
    if (!allowed.allowed) {
      console.debug(`${LOG} not asked: ${allowed.reason}.`);
      return { items: [] };
    }
    const abort = new AbortController();
    this.current = abort;
    // an explicit request (Alt+\) asks at once; typing waits for a pause
    if (context.triggerKind === AUTOMATIC && !(await sleep(settings.delayMs, abort.signal))) {
      return { items: [] };
    }
    const prefix = request.text.slice(0, request.offset);
    const suffix = request.text.slice(request.offset);
    const messages = buildCompletionMessages({
      prefix,
      suffix,
      cellsAbove: cellsAbove(context.widget),
      language: languageOf(request)
    });
    const body: ChatCompletionRequest = {
      model: choice.model,
      messages,
      stream: true,
      max_tokens: settings.maxTokens,
      temperature: 0.2,
      thinking: { type: 'disabled' }
    };
    const token = `glm-inline-${++this.counter}`;
    // the request leaves now (a generator would wait for the first read); stream() reads its chunks
    const chunks = this.client.chat(body, abort.signal);
    const head = chunks.next();
    head.catch(() => undefined); // read (and reported) by stream(); a stream never read must not warn
    this.streams.set(token, {
      chunks: (async function* () {
        const first = await head;
        if (!first.done) {
          yield first.value;
          yield* chunks;
        }
      })(),
      abort,
      prefix,
      started: performance.now(),
      model: choice.model
    });
    return { items: [{ insertText: '', isIncomplete: true, token }] };
  }

  async *stream(token: string): AsyncGenerator<{ response: IInlineCompletionItem }, undefined, unknown> {
    const pending = this.streams.get(token);
    this.streams.delete(token);
    if (!pending) {
      return;
    }
    let raw = '';
    let first: number | null = null;
    try {
      for await (const chunk of pending.chunks) {
        const delta = chunk.choices?.[0]?.delta?.content;
        if (!delta) {
          continue;
        }
        first ??= performance.now();
        raw += delta;
        yield { response: { insertText: cleanCompletion(raw, pending.prefix), isIncomplete: true } };
      }
      const now = performance.now();
      console.debug(
        `${LOG} ${pending.model}: first token after ${first === null ? '-' : Math.round(first - pending.started)} ms, ` +
          `done after ${Math.round(now - pending.started)} ms, ${raw.length} characters.`
      );
    } catch (error) {
      if (pending.abort.signal.aborted) {
        console.debug(`${LOG} cancelled after ${Math.round(performance.now() - pending.started)} ms (typing went on).`);
        return;
      }
      console.debug(`${LOG} failed:`, error);
      yield { response: { insertText: '', isIncomplete: false, error: { message: String((error as Error)?.message ?? error) } } };
      return;
    } finally {
      if (this.current === pending.abort) {
        this.current = null;
      }
    }
    yield { response: { insertText: cleanCompletion(raw, pending.prefix, true), isIncomplete: false } };
  }

  /** Stop the request in flight, if any. */
  cancel(): void {
    this.current?.abort();
    this.current = null;
  }
}

/** The inline settings from the plugin's settings (missing or wrong values fall back to the defaults). */
export function readInlineSettings(get: (key: string) => unknown): InlineCompletionSettings {
  const mode = get('inlineCompletion');
  const delay = get('inlineCompletionDelay');
  const maxTokens = get('inlineCompletionMaxTokens');
  return {
    mode: mode === 'on' || mode === 'off' || mode === 'auto' ? mode : DEFAULT_INLINE_SETTINGS.mode,
    delayMs: typeof delay === 'number' && delay >= 0 ? delay : DEFAULT_INLINE_SETTINGS.delayMs,
    maxTokens: typeof maxTokens === 'number' && maxTokens >= 1 ? maxTokens : DEFAULT_INLINE_SETTINGS.maxTokens
  };
}
