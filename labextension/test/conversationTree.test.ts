import { describe, expect, it } from 'vitest';

import type { AssistantMessage, Message, UserMessage } from '../src/chatState';
import { newAssistantMessage } from '../src/chatState';
import {
  emptyTree,
  nodeCount,
  pathBefore,
  pathOf,
  savedTree,
  selectSibling,
  siblingPosition,
  treeFromMessages,
  withPath
} from '../src/conversationTree';

const user = (id: string, text = id): UserMessage => ({ kind: 'user', id, text, context: [] });
const answer = (id: string, content = id): AssistantMessage => ({
  ...newAssistantMessage(id, 0),
  content,
  status: 'done'
});
const ids = (messages: Message[]) => messages.map(m => m.id);

describe('conversation tree', () => {
  it('keeps a plain list as one branch (conversations saved before branches)', () => {
    const messages = [user('u1'), answer('a1'), user('u2'), answer('a2')];
    const tree = treeFromMessages(messages);
    expect(ids(pathOf(tree))).toEqual(['u1', 'a1', 'u2', 'a2']);
    expect(siblingPosition(tree, 'u2')).toEqual({ index: 0, count: 1 });
    expect(ids(pathOf(emptyTree()))).toEqual([]);
  });

  it('an edited message replaces the answers after it and keeps the old branch reachable', () => {
    let tree = treeFromMessages([user('u1'), answer('a1'), user('u2'), answer('a2'), user('u3'), answer('a3')]);
    // edit u2: the path up to it, then the new message; then its answer
    tree = withPath(tree, [...pathBefore(tree, 'u2'), user('u2b', 'edited')]);
    tree = withPath(tree, [...pathOf(tree), answer('a2b')]);
    expect(ids(pathOf(tree))).toEqual(['u1', 'a1', 'u2b', 'a2b']);
    expect(siblingPosition(tree, 'u2b')).toEqual({ index: 1, count: 2 });
    expect(nodeCount(tree)).toBe(8);
    // ‹ 1/2 ›: the old branch comes back whole, answers and later turns included
    const old = selectSibling(tree, 'u2b', 0);
    expect(ids(pathOf(old))).toEqual(['u1', 'a1', 'u2', 'a2', 'u3', 'a3']);
    // and back to the edit, with its own answer
    expect(ids(pathOf(selectSibling(old, 'u2', 1)))).toEqual(['u1', 'a1', 'u2b', 'a2b']);
  });

  it('Regenerate adds answer versions to the same question, each kept', () => {
    let tree = treeFromMessages([user('u1'), answer('a1')]);
    for (const id of ['a1v2', 'a1v3']) {
      tree = withPath(tree, pathBefore(tree, pathOf(tree)[1].id)); // the path ends at the question
      expect(ids(pathOf(tree))).toEqual(['u1']);
      tree = withPath(tree, [...pathOf(tree), answer(id)]);
    }
    expect(ids(pathOf(tree))).toEqual(['u1', 'a1v3']);
    expect(siblingPosition(tree, 'a1v3')).toEqual({ index: 2, count: 3 });
    expect(ids(pathOf(selectSibling(tree, 'a1v3', 0)))).toEqual(['u1', 'a1']);
    expect(ids(pathOf(selectSibling(tree, 'a1v3', 1)))).toEqual(['u1', 'a1v2']);
    // out of range: nothing changes
    expect(selectSibling(tree, 'a1v3', 3)).toBe(tree);
  });

  it('updates a streaming message in place without making a branch', () => {
    let tree = treeFromMessages([user('u1'), answer('a1', '')]);
    tree = withPath(tree, [user('u1'), answer('a1', 'Hello')]);
    expect(nodeCount(tree)).toBe(2);
    expect((pathOf(tree)[1] as AssistantMessage).content).toBe('Hello');
    expect(siblingPosition(tree, 'a1').count).toBe(1);
  });

  it('a version of an earlier answer keeps the later turns on the old branch', () => {
    let tree = treeFromMessages([user('u1'), answer('a1'), user('u2'), answer('a2')]);
    tree = withPath(tree, [user('u1'), answer('a1b')]);
    expect(ids(pathOf(tree))).toEqual(['u1', 'a1b']);
    expect(ids(pathOf(selectSibling(tree, 'a1b', 0)))).toEqual(['u1', 'a1', 'u2', 'a2']);
  });

  it('reads old saved conversations, new ones, and rebuilds a damaged tree from the messages', () => {
    const messages = [user('u1'), answer('a1')];
    expect(ids(pathOf(savedTree({ messages })))).toEqual(['u1', 'a1']);
    const branched = withPath(treeFromMessages(messages), [user('u1'), answer('a1b')]);
    const roundTrip = JSON.parse(JSON.stringify({ messages: pathOf(branched), tree: branched }));
    expect(ids(pathOf(savedTree(roundTrip)))).toEqual(['u1', 'a1b']);
    expect(siblingPosition(savedTree(roundTrip), 'a1b')).toEqual({ index: 1, count: 2 });
    expect(ids(pathOf(savedTree({ messages, tree: { nodes: [] } })))).toEqual(['u1', 'a1']);
    // a cycle written by hand ends the path instead of looping
    const cyclic = { nodes: { x: user('x') }, children: { '': ['x'], x: ['x'] }, selected: { '': 0, x: 0 } };
    expect(ids(pathOf(savedTree({ messages: [], tree: cyclic })))).toEqual(['x']);
  });
});
