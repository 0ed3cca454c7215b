"""The one fold of a streamed answer into a message (workbench.chat.fold), which the backends' fold_chunks, the
parser's collect and the magics use."""

from __future__ import annotations

from workbench.chat.fold import MessageFold, ToolCallFragment


def test_texts_are_joined_and_the_last_finish_reason_is_kept():
    fold = MessageFold()
    assert (fold.reasoning_content, fold.content, fold.tool_calls, fold.finish_reason) == (None, None, [], None)
    fold.add("Let me ", None)
    fold.add("think.", "")
    fold.add(None, "Hello")
    fold.add(None, ", world", finish_reason="stop")
    fold.add(None, None)  # a usage-only chunk changes nothing
    assert (fold.reasoning_content, fold.content, fold.finish_reason) == ("Let me think.", "Hello, world", "stop")


def test_tool_call_fragments_are_merged_by_index_in_index_order():
    fold = MessageFold()
    fold.add(tool_calls=[ToolCallFragment(1, "b", "lookup", '{"q"'), ToolCallFragment(0, None, "ad", "")])
    fold.add(tool_calls=[ToolCallFragment(1, None, None, ': "x"}'), ToolCallFragment(0, "a", "d", "{}")])
    assert fold.tool_calls == [{"index": 0, "id": "a", "name": "add", "arguments": "{}"},
                               {"index": 1, "id": "b", "name": "lookup", "arguments": '{"q": "x"}'}]


def test_api_deltas_fold_as_their_fields_say():
    fold = MessageFold()
    fold.add_delta({"role": "assistant", "reasoning_content": "r", "content": None})
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}
    fold.add_delta({"content": "a", "tool_calls": [call]})
    fold.add_delta({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}, "tool_calls")
    assert (fold.reasoning_content, fold.content, fold.finish_reason) == ("r", "a", "tool_calls")
    assert fold.tool_calls == [{"index": 0, "id": "c", "name": "f", "arguments": "{}"}]
