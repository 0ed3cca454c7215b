/**
 * Lumino widgets that host the React views: the chat sidebar and the routing panel (a main-area tab per
 * answer). Owns loading the routing trace and its loading / error states.
 */

import { ReactWidget } from '@jupyterlab/apputils';
import type { Message } from '@lumino/messaging';
import React, { useEffect, useState } from 'react';

import type { WorkbenchClient } from './api';
import type { ChatModel } from './chatModel';
import { ChatView, type ChatViewActions } from './components/ChatView';
import { MarkdownContext, type MarkdownServices } from './components/Markdown';
import { RoutingView } from './components/RoutingView';
import type { RoutingData } from './protocol';
import { routingTitle } from './routingData';

export class ChatSidebar extends ReactWidget {
  constructor(
    readonly model: ChatModel,
    private readonly services: MarkdownServices,
    private readonly actions: ChatViewActions
  ) {
    super();
    this.addClass('glm-ChatSidebar');
  }

  render(): JSX.Element {
    return (
      <MarkdownContext.Provider value={this.services}>
        <ChatView model={this.model} actions={this.actions} />
      </MarkdownContext.Provider>
    );
  }

  /** Put the keyboard focus in the message box. */
  focusInput(): void {
    this.node.querySelector<HTMLTextAreaElement>('.glm-Input')?.focus();
  }

  /** Called each time the sidebar is shown (index.ts widens the right area when it is too narrow). */
  onShown: (() => void) | null = null;

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    if (this.onShown) {
      requestAnimationFrame(() => this.onShown?.());
    }
  }
}

function RoutingLoader({
  client,
  completionId,
  themeVersion
}: {
  client: WorkbenchClient;
  completionId: string;
  themeVersion: number;
}): JSX.Element {
  const [data, setData] = useState<RoutingData | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    client
      .routing(completionId)
      .then(setData)
      .catch(e =>
        setError(
          (e as Error).message ||
            'No routing trace for this answer: only answers from the local engine keep one, for the last few completions.'
        )
      );
  }, [client, completionId]);
  if (error) {
    return (
      <div className="glm-Routing">
        <div className="glm-Note glm-mod-error" role="alert">
          {error}
        </div>
        <div className="glm-Note">
          Answers of the local engine record their routing while a routing view is open (or always, with the
          setting “Record every answer's expert routing”): regenerate this one to see its routing.
        </div>
      </div>
    );
  }
  if (!data) {
    return <div className="glm-Routing glm-Waiting">Loading the routing trace…</div>;
  }
  return <RoutingView data={data} completionId={completionId} themeVersion={themeVersion} />;
}

export class RoutingPanel extends ReactWidget {
  private themeVersion = 0;

  /** `title`: routingTitle() of the answer (the question it answered). */
  constructor(
    private readonly client: WorkbenchClient,
    readonly completionId: string,
    title: { label: string; caption: string } = routingTitle([], completionId)
  ) {
    super();
    this.addClass('glm-RoutingPanel');
    this.id = `glm-routing-${completionId.replace(/[^A-Za-z0-9_-]/g, '_')}`;
    this.title.label = title.label;
    this.title.caption = title.caption;
    this.title.closable = true;
  }

  /** Redraw the plots in the new theme's colours. */
  themeChanged(): void {
    this.themeVersion += 1;
    this.update();
  }

  render(): JSX.Element {
    return <RoutingLoader client={this.client} completionId={this.completionId} themeVersion={this.themeVersion} />;
  }
}
