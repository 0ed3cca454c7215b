/**
 * The live preview of an HTML code block: the page in a sandboxed frame, sized to its content.
 *
 * `sandbox="allow-scripts"` and nothing else: scripts run, but in an opaque origin, so the page reads no
 * Jupyter cookie, token, XSRF value, storage or notebook, cannot reach the parent's DOM, opens no popup and
 * submits no form; its document carries a Content-Security-Policy that refuses every connection as well
 * (htmlPreview.ts). The only thing taken from the frame is its content height, a number, from its own window.
 */

import React, { useEffect, useMemo, useRef, useState } from 'react';

import { PREVIEW_HEIGHT_MESSAGE, previewDocument, previewHeight } from '../htmlPreview';

/** The frame's height before the page reports its own (px). */
const INITIAL_HEIGHT = 240;

export function HtmlPreview({ code }: { code: string }): JSX.Element {
  const frame = useRef<HTMLIFrameElement>(null);
  const [height, setHeight] = useState(INITIAL_HEIGHT);
  const srcdoc = useMemo(() => previewDocument(code), [code]);

  useEffect(() => {
    const onMessage = (event: MessageEvent) => {
      // only this frame's window, and only a height: a page cannot make the sidebar do anything else
      if (!frame.current || event.source !== frame.current.contentWindow) {
        return;
      }
      const data = event.data as { type?: unknown; height?: unknown } | null;
      if (data && data.type === PREVIEW_HEIGHT_MESSAGE) {
        const next = previewHeight(data.height);
        if (next !== null) {
          setHeight(next);
        }
      }
    };
    window.addEventListener('message', onMessage);
    return () => window.removeEventListener('message', onMessage);
  }, []);

  return (
    <div className="glm-HtmlPreview">
      <iframe
        ref={frame}
        className="glm-HtmlPreview-frame"
        title="HTML preview (sandboxed)"
        sandbox="allow-scripts"
        referrerPolicy="no-referrer"
        srcDoc={srcdoc}
        style={{ height: `${height}px` }}
      />
    </div>
  );
}
