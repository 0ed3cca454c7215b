/**
 * Writing an exported conversation into the workspace: a new file named after its title (never over an existing
 * one: " 1", " 2" ... are added), through Jupyter's contents API. The conversion is exportConversation.ts's.
 */

import type { Contents } from '@jupyterlab/services';

import type { Conversation } from './chatState';
import { exportFileName, toMarkdown, toNotebook } from './exportConversation';

export type ExportTarget = 'ipynb' | 'md';

/** The first of "name.ext", "name 1.ext", ... that does not exist yet. */
async function freePath(contents: Contents.IManager, fileName: string): Promise<string> {
  const dot = fileName.lastIndexOf('.');
  const [base, ext] = [fileName.slice(0, dot), fileName.slice(dot)];
  for (let i = 0; i < 1000; i++) {
    const path = i === 0 ? fileName : `${base} ${i}${ext}`;
    try {
      await contents.get(path, { content: false });
    } catch {
      return path; // not there (a 404): free
    }
  }
  throw new Error(`Too many files named like ${fileName}: rename or move some.`);
}

/** Save the conversation's shown branch as a notebook or Markdown file at the workspace root; its path. */
export async function writeExport(
  contents: Contents.IManager,
  conversation: Pick<Conversation, 'title' | 'messages' | 'model'>,
  target: ExportTarget
): Promise<string> {
  const path = await freePath(contents, exportFileName(conversation.title, target));
  if (target === 'ipynb') {
    await contents.save(path, { type: 'notebook', format: 'json', content: toNotebook(conversation) });
  } else {
    await contents.save(path, { type: 'file', format: 'text', content: toMarkdown(conversation) });
  }
  return path;
}
