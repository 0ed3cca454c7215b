/**
 * Streaming Markdown: prose rendered to sanitized HTML by `marked`, fenced code as CodeBlock components
 * highlighted by JupyterLab's own CodeMirror languages (so colours follow the theme), each with
 * Insert below / Replace active cell / Copy, and Preview for HTML pages (a sandboxed frame: HtmlPreview.tsx).
 *
 * Re-lexes the whole text on each render; an unclosed fence while streaming is simply a code block that
 * is still growing.
 */

import type { IEditorLanguageRegistry } from '@jupyterlab/codemirror';
import type { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { marked, type Token, type Tokens } from 'marked';
import React, { useEffect, useMemo, useRef, useState } from 'react';

import { isPreviewableHtml } from '../htmlPreview';
import { HtmlPreview } from './HtmlPreview';

export interface CodeActions {
  insertBelow(code: string): void;
  replaceActive(code: string): void;
  copy(code: string): void;
}

export interface MarkdownServices {
  sanitizer: IRenderMime.ISanitizer;
  languages: IEditorLanguageRegistry | null;
  codeActions: CodeActions;
}

export const MarkdownContext = React.createContext<MarkdownServices | null>(null);

type Part = { kind: 'html'; tokens: Token[] } | { kind: 'code'; code: string; lang: string };

/** Split Markdown into runs of prose and top-level fenced code blocks. */
export function splitMarkdown(text: string): Part[] {
  const parts: Part[] = [];
  let prose: Token[] = [];
  const flush = () => {
    if (prose.length) {
      parts.push({ kind: 'html', tokens: prose });
      prose = [];
    }
  };
  for (const token of marked.lexer(text, { gfm: true })) {
    if (token.type === 'code') {
      flush();
      const code = token as Tokens.Code;
      parts.push({ kind: 'code', code: code.text, lang: (code.lang ?? '').trim().split(/\s+/)[0] });
    } else {
      prose.push(token);
    }
  }
  flush();
  return parts;
}

function Prose({ tokens, sanitizer }: { tokens: Token[]; sanitizer: IRenderMime.ISanitizer }): JSX.Element {
  const html = useMemo(() => {
    const list = Object.assign([...tokens], { links: {} }) as unknown as Parameters<typeof marked.parser>[0];
    return sanitizer.sanitize(marked.parser(list, { gfm: true }) as string);
  }, [tokens, sanitizer]);
  return <div className="glm-Markdown-prose" dangerouslySetInnerHTML={{ __html: html }} />;
}

export function CodeBlock({ code, lang }: { code: string; lang: string }): JSX.Element {
  const services = React.useContext(MarkdownContext);
  const ref = useRef<HTMLElement>(null);
  const [copied, setCopied] = useState(false);
  const previewable = isPreviewableHtml(code, lang);
  const [previewing, setPreviewing] = useState(false);
  const showPreview = previewable && previewing;

  useEffect(() => {
    const target = ref.current;
    const languages = services?.languages;
    if (!target) {
      return;
    }
    target.textContent = code;
    if (!languages) {
      return;
    }
    let current = true;
    const scratch = document.createElement('code');
    const language = languages.findBest(lang || 'python');
    languages
      .highlight(code, language, scratch)
      .then(() => {
        if (current) {
          target.replaceChildren(...Array.from(scratch.childNodes));
        }
      })
      .catch(() => undefined);
    return () => {
      current = false;
    };
  }, [code, lang, services, showPreview]);

  const actions = services?.codeActions;
  return (
    <div className="glm-CodeBlock">
      <div className="glm-CodeBlock-toolbar" role="toolbar" aria-label="Code block actions">
        <span className="glm-CodeBlock-lang">{lang || 'code'}</span>
        {previewable && (
          <button
            className="glm-Button glm-CodeBlock-preview"
            title={showPreview ? 'Show the code' : 'Render this page in a sandboxed frame (scripts run, isolated from Jupyter)'}
            aria-label={showPreview ? 'Show the code' : 'Preview this HTML'}
            aria-pressed={showPreview}
            onClick={() => setPreviewing(!showPreview)}
          >
            {showPreview ? 'Code' : 'Preview'}
          </button>
        )}
        <button
          className="glm-Button glm-CodeBlock-insert"
          title="Insert below the active cell"
          aria-label="Insert code below the active cell"
          onClick={() => actions?.insertBelow(code)}
        >
          Insert
        </button>
        <button
          className="glm-Button glm-CodeBlock-replace"
          title="Replace the active cell with this code"
          aria-label="Replace the active cell with this code"
          onClick={() => actions?.replaceActive(code)}
        >
          Replace
        </button>
        <button
          className="glm-Button glm-CodeBlock-copy"
          aria-label="Copy code"
          onClick={() => {
            actions?.copy(code);
            setCopied(true);
            setTimeout(() => setCopied(false), 1200);
          }}
        >
          {copied ? 'Copied' : 'Copy'}
        </button>
      </div>
      {showPreview ? (
        <HtmlPreview code={code} />
      ) : (
        <pre className="glm-CodeBlock-pre">
          <code ref={ref} className="cm-s-jupyter" />
        </pre>
      )}
    </div>
  );
}

export function Markdown({ text }: { text: string }): JSX.Element {
  const services = React.useContext(MarkdownContext);
  const parts = useMemo(() => splitMarkdown(text), [text]);
  return (
    <div className="glm-Markdown">
      {parts.map((part, i) =>
        part.kind === 'code' ? (
          <CodeBlock key={i} code={part.code} lang={part.lang} />
        ) : services ? (
          <Prose key={i} tokens={part.tokens} sanitizer={services.sanitizer} />
        ) : (
          <pre key={i}>{part.tokens.map(t => t.raw).join('')}</pre>
        )
      )}
    </div>
  );
}
