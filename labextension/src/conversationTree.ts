/**
 * The branches of a conversation: every message ever sent or answered, as a tree, and the path the sidebar shows.
 *
 * Owns: editing a sent message (a new sibling of it: the answers after the old one stay on the old branch),
 * answer versions (Regenerate adds a sibling answer to the same question), switching between siblings
 * (‹ 1/2 ›), and reading conversations saved before the tree existed (a plain list becomes one branch).
 *
 * A node is a message; siblings are alternatives of one another. `selected[parent]` is the index of the child
 * the path follows, or -1 where the path ends (after an edit or a Regenerate, before the new answer arrives).
 * Switching to a sibling shows that sibling's own subtree as it was last shown. Pure functions over plain
 * objects, each returning a new tree (React compares identity); the controller keeps `messages` equal to
 * `pathOf(tree)` through `withPath`, so code that only knows the flat list keeps working.
 */

import type { Message } from './chatState';

/** The parent key of the first messages. */
export const ROOT = '';

export interface ConversationTree {
  /** Every message by id. */
  nodes: Record<string, Message>;
  /** Children of each node (ROOT for the first messages), oldest first. */
  children: Record<string, string[]>;
  /** Index into children[parent] the shown path follows; -1 (or absent) where it ends. */
  selected: Record<string, number>;
}

export function emptyTree(): ConversationTree {
  return { nodes: {}, children: {}, selected: {} };
}

/** One branch holding these messages in order (a conversation saved before branches existed). */
export function treeFromMessages(messages: Message[]): ConversationTree {
  return withPath(emptyTree(), messages);
}

/** The messages the sidebar shows: from the root, following each node's selected child. */
export function pathOf(tree: ConversationTree): Message[] {
  const path: Message[] = [];
  const seen = new Set<string>();
  let parent = ROOT;
  for (;;) {
    const kids = tree.children[parent] ?? [];
    const index = tree.selected[parent] ?? -1;
    const id = index >= 0 ? kids[index] : undefined;
    const node = id !== undefined ? tree.nodes[id] : undefined;
    if (!node || seen.has(id!)) {
      return path; // a damaged saved tree (a cycle, a missing node) shows what it can
    }
    seen.add(id!);
    path.push(node);
    parent = id!;
  }
}

/**
 * The tree whose shown path is `messages`: messages already on the path are updated in place; from the first one
 * that is not a child of its predecessor on, new nodes are added as the selected children (the old ones stay,
 * reachable as siblings); the path ends after the last message (what followed it stays on its branch).
 */
export function withPath(tree: ConversationTree, messages: Message[]): ConversationTree {
  const nodes = { ...tree.nodes };
  const children = { ...tree.children };
  const selected = { ...tree.selected };
  let parent = ROOT;
  for (const message of messages) {
    const kids = children[parent] ?? [];
    let index = kids.indexOf(message.id);
    if (index === -1) {
      children[parent] = [...kids, message.id];
      index = kids.length;
    }
    nodes[message.id] = message;
    selected[parent] = index;
    parent = message.id;
  }
  selected[parent] = -1;
  return { nodes, children, selected };
}

/** The parent of a node (ROOT for a first message), or null when the node is not in the tree. */
export function parentOf(tree: ConversationTree, id: string): string | null {
  for (const [parent, kids] of Object.entries(tree.children)) {
    if (kids.includes(id)) {
      return parent;
    }
  }
  return null;
}

/** Where a node stands among its siblings: index (0-based) and count; count 1 where it has none. */
export function siblingPosition(tree: ConversationTree, id: string): { index: number; count: number } {
  const parent = parentOf(tree, id);
  const kids = parent === null ? [] : tree.children[parent] ?? [];
  const index = kids.indexOf(id);
  return index === -1 ? { index: 0, count: 1 } : { index, count: kids.length };
}

/** Show the sibling `index` of a node (and below it, the branch that sibling last showed). */
export function selectSibling(tree: ConversationTree, id: string, index: number): ConversationTree {
  const parent = parentOf(tree, id);
  const kids = parent === null ? [] : tree.children[parent] ?? [];
  if (index < 0 || index >= kids.length) {
    return tree;
  }
  return { ...tree, selected: { ...tree.selected, [parent!]: index } };
}

/** The path up to (not including) a message: what an edit of it, or a new answer version in its place, follows. */
export function pathBefore(tree: ConversationTree, id: string): Message[] {
  const path = pathOf(tree);
  const at = path.findIndex(m => m.id === id);
  return at === -1 ? path : path.slice(0, at);
}

/** How many messages the tree holds (all branches). */
export function nodeCount(tree: ConversationTree): number {
  return Object.keys(tree.nodes).length;
}

/** Whether a saved value looks like a tree this module wrote (a damaged or foreign one is rebuilt from messages). */
export function isTree(value: unknown): value is ConversationTree {
  if (typeof value !== 'object' || value === null) {
    return false;
  }
  const tree = value as Record<string, unknown>;
  const isRecord = (v: unknown) => typeof v === 'object' && v !== null && !Array.isArray(v);
  return isRecord(tree.nodes) && isRecord(tree.children) && isRecord(tree.selected);
}

/** The tree of a saved conversation: its own when it has a sound one, else one branch of its messages. */
export function savedTree(saved: { messages?: Message[]; tree?: unknown }): ConversationTree {
  if (isTree(saved.tree) && pathOf(saved.tree).length > 0) {
    return saved.tree;
  }
  return treeFromMessages(Array.isArray(saved.messages) ? saved.messages : []);
}
