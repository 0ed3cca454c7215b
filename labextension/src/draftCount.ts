/**
 * The context meter's count of the message being typed: after a pause in typing, the server counts the prompt the
 * sidebar would send now (`POST glm/api/count_tokens`: model, messages with the draft, tools → `prompt_tokens`).
 *
 * Owns the timing only: a count starts once typing has paused (`DRAFT_COUNT_DELAY_MS`), a newer draft cancels the
 * count under way (AbortController) and an answer that comes back late is dropped. A model whose server cannot count
 * (400: a provider without a counting API; 404: a server without the endpoint) is not asked again, and the meter
 * falls back to the last answer's usage (`null`). Nothing here waits on the network in the typing path.
 */

import type { ChatCompletionRequest } from './protocol';

/** Quiet time after the last keystroke before the draft is counted. */
export const DRAFT_COUNT_DELAY_MS = 500;

export type CountTokens = (request: ChatCompletionRequest, signal: AbortSignal) => Promise<number>;

/** A draft to count: its model, and how to build the request sending it would make (built only when the count
 * starts: collecting a whole notebook's context on every keystroke would slow typing down). */
export interface Draft {
  model: string;
  build(): ChatCompletionRequest;
}

export class DraftCounter {
  private timer: ReturnType<typeof setTimeout> | null = null;
  private abort: AbortController | null = null;
  /** Models whose server answered 400/404: the meter uses the usage for them. */
  private readonly cannotCount = new Set<string>();

  constructor(
    private readonly count: CountTokens,
    /** The draft's prompt tokens, or null: show the last answer's usage. */
    private readonly onCount: (tokens: number | null) => void,
    private readonly delayMs = DRAFT_COUNT_DELAY_MS
  ) {}

  /**
   * The draft changed; null when there is nothing to count (an empty draft, an answer under way). The last count
   * stays shown until the new one arrives, so the meter does not flicker while typing.
   */
  update(draft: Draft | null): void {
    this.cancel();
    if (!draft || !draft.model || this.cannotCount.has(draft.model)) {
      this.onCount(null);
      return;
    }
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.run(draft);
    }, this.delayMs);
  }

  /** Stop the pending count and the one under way (their results are dropped). */
  cancel(): void {
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    this.abort?.abort();
    this.abort = null;
  }

  private async run(draft: Draft): Promise<void> {
    const abort = new AbortController();
    this.abort = abort;
    try {
      const tokens = await this.count(draft.build(), abort.signal);
      if (!abort.signal.aborted) {
        this.onCount(typeof tokens === 'number' && Number.isFinite(tokens) && tokens >= 0 ? tokens : null);
      }
    } catch (error) {
      if (abort.signal.aborted) {
        return; // a newer draft took over
      }
      const status = (error as { status?: unknown } | null)?.status;
      if (status === 400 || status === 404) {
        this.cannotCount.add(draft.model);
      }
      this.onCount(null); // silently: the meter shows the last answer's usage
    } finally {
      if (this.abort === abort) {
        this.abort = null;
      }
    }
  }
}
