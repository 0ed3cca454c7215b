/**
 * HTTP client for the workbench server extension under `{base_url}glm/`.
 *
 * Every request goes through `ServerConnection.makeRequest`, which adds the Jupyter token and the XSRF
 * header, so the browser never holds any other secret. Failures become `WorkbenchError`s whose kind is a
 * state the sidebar can show (unreachable, session expired, model loading, backend error).
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type { Conversation } from './chatState';
import { classifyHttpError, unreachableError, WorkbenchError } from './errors';
import type { ChatCompletionChunk, ChatCompletionRequest, ModelInfo, RoutingData, ServerStatus } from './protocol';
import { readChatStream } from './sse';

export interface ConversationSummary {
  id: string;
  title: string;
  created: number;
  updated: number;
  model?: string;
  /** The first characters of the shown messages, for the history's search (servers before it send none). */
  text?: string;
}

export class WorkbenchClient {
  constructor(readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  private url(path: string): string {
    return URLExt.join(this.settings.baseUrl, 'glm', path);
  }

  /** Fetch and check the status; network failures and HTTP errors become WorkbenchError. */
  async request(path: string, init: RequestInit = {}): Promise<Response> {
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(this.url(path), init, this.settings);
    } catch (error) {
      if ((error as Error)?.name === 'AbortError') {
        throw error;
      }
      throw unreachableError(error);
    }
    if (!response.ok) {
      throw classifyHttpError(response.status, await response.text().catch(() => ''));
    }
    return response;
  }

  private async json<T>(path: string, init: RequestInit = {}): Promise<T> {
    const response = await this.request(path, init);
    const text = await response.text();
    try {
      return (text ? JSON.parse(text) : null) as T;
    } catch {
      throw new WorkbenchError('backend', `The server answered ${path} with something that is not JSON.`);
    }
  }

  async models(): Promise<ModelInfo[]> {
    const body = await this.json<{ data?: ModelInfo[] }>('v1/models');
    return body?.data ?? [];
  }

  status(): Promise<ServerStatus> {
    return this.json<ServerStatus>('api/status');
  }

  routing(completionId: string): Promise<RoutingData> {
    return this.json<RoutingData>(`api/routing/${encodeURIComponent(completionId)}`);
  }

  /**
   * Start a streaming completion. Aborting `signal` closes the connection, which cancels the generation
   * on the server.
   */
  async *chat(body: ChatCompletionRequest, signal: AbortSignal): AsyncGenerator<ChatCompletionChunk, void, undefined> {
    const response = await this.request('v1/chat/completions', {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      signal
    });
    if (!response.body) {
      throw new WorkbenchError('backend', 'The server sent no stream body.');
    }
    yield* readChatStream(response.body);
  }

  /** The prompt tokens of a chat request for its model (`POST api/count_tokens`); a provider that cannot count
   * answers 400. */
  async countTokens(body: ChatCompletionRequest, signal: AbortSignal): Promise<number> {
    const answer = await this.json<{ prompt_tokens?: unknown }>('api/count_tokens', {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { 'Content-Type': 'application/json' },
      signal
    });
    if (typeof answer?.prompt_tokens !== 'number') {
      throw new WorkbenchError('backend', 'The server answered api/count_tokens without prompt_tokens.');
    }
    return answer.prompt_tokens;
  }

  async listConversations(): Promise<ConversationSummary[]> {
    const body = await this.json<{ conversations?: ConversationSummary[] }>('api/conversations');
    return body?.conversations ?? [];
  }

  getConversation(id: string): Promise<Conversation> {
    return this.json<Conversation>(`api/conversations/${encodeURIComponent(id)}`);
  }

  async saveConversation(conversation: Conversation): Promise<void> {
    await this.request(`api/conversations/${encodeURIComponent(conversation.id)}`, {
      method: 'PUT',
      body: JSON.stringify(conversation),
      headers: { 'Content-Type': 'application/json' }
    });
  }

  async deleteConversation(id: string): Promise<void> {
    await this.request(`api/conversations/${encodeURIComponent(id)}`, { method: 'DELETE' });
  }
}
