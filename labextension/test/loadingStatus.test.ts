import { describe, expect, it } from 'vitest';

import type { WorkbenchClient } from '../src/api';
import { ChatModel, DEFAULT_PREFERENCES, type NotebookBridge } from '../src/chatModel';

/** A server whose status the test changes while the sidebar polls it. */
class StatusClient {
  constructor(public serverStatus: Record<string, unknown>) {}
  async models() {
    return [{ id: 'glm45-air-mini' }];
  }
  async status() {
    return this.serverStatus;
  }
  async listConversations() {
    return [];
  }
}

const bridge: NotebookBridge = {
  collectContext: () => [],
  runTool: async () => ''
} as unknown as NotebookBridge;

async function until(check: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (check()) {
      return;
    }
    await new Promise(resolve => setTimeout(resolve, 5));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe('the loading banner', () => {
  it('follows the status message while the model loads (the first compile of the CPU kernels)', async () => {
    const client = new StatusClient({ backend: 'local', state: 'loading', message: null });
    const model = new ChatModel(client as unknown as WorkbenchClient, bridge, DEFAULT_PREFERENCES);
    model.loadingPollMs = 5;
    await model.refresh();
    expect(model.state.failure?.message).toBe('The model is still loading. The chat is ready in a moment.');
    const compiling = 'compiling CPU kernels, about a minute, once per machine';
    client.serverStatus = { backend: 'local', state: 'loading', message: compiling };
    await until(() => model.state.failure?.message.includes(compiling) ?? false, 'the banner to name the compile');
    expect(model.state.failure?.kind).toBe('loading');
    client.serverStatus = { backend: 'local', state: 'ready', message: null };
    await until(() => model.state.failure === null, 'the banner to clear');
  });
});
