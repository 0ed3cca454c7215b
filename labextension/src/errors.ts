/**
 * Failure states the sidebar shows, and how an HTTP failure maps to one.
 *
 * Owns the user-facing wording: each kind says what happened and what to do. Pure, unit-tested.
 */

export type FailureKind = 'unreachable' | 'session-expired' | 'loading' | 'busy' | 'backend' | 'bad-request';

export class WorkbenchError extends Error {
  constructor(
    readonly kind: FailureKind,
    message: string,
    readonly status?: number
  ) {
    super(message);
    this.name = 'WorkbenchError';
  }
}

/** Pull the message out of an OpenAI-style `{"error": {"message": ...}}` body, or a Jupyter `{"message": ...}`. */
export function errorMessageFromBody(body: string): string {
  try {
    const parsed = JSON.parse(body);
    const message = parsed?.error?.message ?? parsed?.message ?? parsed?.reason;
    if (typeof message === 'string' && message) {
      return message;
    }
  } catch {
    // not JSON: fall through to the raw text
  }
  const text = body.trim();
  // An HTML error page (Jupyter's own 404, a proxy's 502) says nothing the user can act on.
  return text.startsWith('<') ? '' : text.slice(0, 300);
}

/** Classify a failed HTTP response. */
export function classifyHttpError(status: number, body: string): WorkbenchError {
  const detail = errorMessageFromBody(body);
  if (status === 401 || status === 403) {
    return new WorkbenchError(
      'session-expired',
      'Your Jupyter session has expired or is not authorised. Reload the page (and log in again) to continue.',
      status
    );
  }
  if (status === 404 && !detail) {
    return new WorkbenchError(
      'unreachable',
      'The GLM Workbench server extension is not running on this Jupyter server. ' +
        'Check that `jupyter server extension list` shows `workbench.server` enabled, then restart Jupyter.',
      status
    );
  }
  if (status === 503) {
    return new WorkbenchError(
      'loading',
      `The model is still loading${detail ? ` (${detail})` : ''}. Try again in a moment.`,
      status
    );
  }
  if (status === 429) {
    return new WorkbenchError('busy', `The server is busy${detail ? `: ${detail}` : ''}. Try again shortly.`, status);
  }
  if (status >= 400 && status < 500) {
    return new WorkbenchError('bad-request', detail || `The server refused the request (HTTP ${status}).`, status);
  }
  return new WorkbenchError('backend', `Backend error (HTTP ${status})${detail ? `: ${detail}` : ''}`, status);
}

export function unreachableError(cause: unknown): WorkbenchError {
  const why = cause instanceof Error ? cause.message : String(cause);
  return new WorkbenchError(
    'unreachable',
    `Cannot reach the Jupyter server (${why}). Check that it is still running, then try again.`
  );
}

/**
 * The failure a server status implies, if any: `GET glm/api/status` says `state` is ready, loading, error,
 * unconfigured or stopped (with a `message` for the last three).
 */
export function statusFailure(status: { state?: unknown; message?: unknown } | null): WorkbenchError | null {
  const state = typeof status?.state === 'string' ? status.state : 'ready';
  const detail = typeof status?.message === 'string' && status.message ? status.message : '';
  if (state === 'loading') {
    return new WorkbenchError('loading', `The model is still loading${detail ? ` (${detail})` : ''}. The chat is ready in a moment.`);
  }
  if (state === 'error' || state === 'unconfigured' || state === 'stopped') {
    return new WorkbenchError('backend', detail || `The workbench backend is ${state}; see the Jupyter server's log.`);
  }
  return null;
}
