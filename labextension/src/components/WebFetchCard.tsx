/**
 * What a `web_fetch` tool card shows besides its arguments: the page's title, the address it ended at (after
 * redirects), its size and whether the server cut it; the full text stays under the card's "Result".
 */

import React from 'react';

import type { ToolMessage } from '../chatState';
import { formatChars, webFetchSummary } from '../webFetch';

export function WebFetchCard({ message }: { message: ToolMessage }): JSX.Element | null {
  const summary = message.status === 'done' ? webFetchSummary(message.result) : null;
  if (!summary) {
    return null;
  }
  const requested = typeof message.args?.url === 'string' ? message.args.url : '';
  return (
    <div className="glm-WebFetch" aria-label="Fetched page">
      <div className="glm-WebFetch-title">{summary.title}</div>
      <div className="glm-WebFetch-url" title={summary.url}>
        {summary.url}
        {requested && requested !== summary.url && <span className="glm-WebFetch-redirect"> (redirected)</span>}
      </div>
      <div className="glm-WebFetch-size">
        {formatChars(summary.chars)}
        {summary.truncated && <span className="glm-WebFetch-truncated"> · truncated</span>}
      </div>
    </div>
  );
}
