import { describe, expect, it } from 'vitest';
import { classifyHttpError, errorMessageFromBody, statusFailure } from '../src/errors';

describe('failure states', () => {
  it('reads OpenAI and Jupyter error bodies', () => {
    expect(errorMessageFromBody('{"error": {"message": "unknown model x", "type": "invalid_request_error"}}')).toBe(
      'unknown model x'
    );
    expect(errorMessageFromBody('{"message": "Forbidden", "reason": null}')).toBe('Forbidden');
    expect(errorMessageFromBody('plain text')).toBe('plain text');
    expect(errorMessageFromBody('<html><body>404 : Not Found</body></html>')).toBe('');
  });

  it('maps statuses to the states the sidebar shows', () => {
    expect(classifyHttpError(403, '{"message": "Forbidden"}').kind).toBe('session-expired');
    expect(classifyHttpError(401, '').kind).toBe('session-expired');
    const loading = classifyHttpError(503, '{"error": {"message": "loading weights 40%"}}');
    expect(loading.kind).toBe('loading');
    expect(loading.message).toMatch(/loading weights 40%/);
    expect(classifyHttpError(429, '').kind).toBe('busy');
    expect(classifyHttpError(400, '{"error": {"message": "context too long"}}').message).toBe('context too long');
    expect(classifyHttpError(500, '{"error": {"message": "CUDA OOM"}}')).toMatchObject({ kind: 'backend' });
    expect(classifyHttpError(404, '').kind).toBe('unreachable');
    expect(classifyHttpError(404, '<html>404 : Not Found</html>').message).toMatch(/server extension is not running/);
  });

  it('reads the server status into a failure state', () => {
    expect(statusFailure({ state: 'ready' })).toBeNull();
    expect(statusFailure(null)).toBeNull();
    expect(statusFailure({ state: 'loading' })?.kind).toBe('loading');
    const broken = statusFailure({ state: 'error', message: 'could not load the model from /x: no config.json' });
    expect(broken).toMatchObject({ kind: 'backend', message: 'could not load the model from /x: no config.json' });
    expect(statusFailure({ state: 'unconfigured' })?.message).toMatch(/unconfigured/);
  });
});
