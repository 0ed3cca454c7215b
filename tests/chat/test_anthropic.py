"""The Anthropic Messages translation (workbench.chat.anthropic), without a server: requests into the chat layer's
requests, chunks into Anthropic's events and the whole message they add up to."""

from __future__ import annotations

import json

import pytest

from workbench.chat.anthropic import MessageEvents, error_body, parse_count_tokens_request, parse_messages_request
from workbench.chat.protocol import (
    APIError,
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    ToolCallDelta,
    Usage,
)

TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def body(**fields) -> dict:
    return {"model": "m", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}], **fields}


def test_a_conversation_with_a_tool_round_trip_becomes_chat_messages():
    parsed = parse_messages_request(body(
        system=[{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Use tools.",
                                                          "cache_control": {"type": "ephemeral"}}],
        tools=[TOOL], tool_choice={"type": "any"}, stop_sequences=["END"], temperature=0, stream=True,
        thinking={"type": "enabled", "budget_tokens": 16},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Need the tool.", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "text", "text": "And tomorrow?"}]},
        ]))
    request = parsed.request
    assert parsed.stream and parsed.show_thinking
    assert request.stream and request.include_usage  # both answers are folded from chunks with usage
    roles = [message.role for message in request.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert request.messages[0].content == "Be brief. Use tools."
    assistant = request.messages[2]
    assert assistant.reasoning_content == "Need the tool." and assistant.content is None
    assert assistant.tool_calls[0].id == "toolu_1"
    assert json.loads(assistant.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert request.messages[3].tool_call_id == "toolu_1" and request.messages[3].content == "sunny"
    assert request.messages[4].content == "And tomorrow?"
    assert request.tool_choice == "required" and request.stop_list == ["END"] and request.temperature == 0.0
    assert request.thinking.type == "enabled" and request.tools[0].function.parameters == TOOL["input_schema"]


@pytest.mark.parametrize(("thinking", "expected"), [
    (None, "disabled"), ({"type": "disabled"}, "disabled"), ({"type": "adaptive"}, "enabled"),
    ({"type": "between_tools"}, "enabled"), ({"type": "enabled", "budget_tokens": 8}, "enabled")],
    ids=["absent-is-off-as-anthropic", "disabled", "adaptive", "between-tools", "enabled"])
def test_thinking_maps_onto_glm_thinking(thinking, expected):
    fields = {"thinking": thinking} if thinking else {}
    assert parse_messages_request(body(**fields)).request.thinking.type == expected


def test_an_error_result_says_so_and_a_named_tool_choice_is_forced():
    request = parse_messages_request(body(tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather"}, messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "boom",
                                      "is_error": True}]}])).request
    assert [m.role for m in request.messages] == ["user", "assistant", "tool"]  # no empty user turn after results
    assert request.messages[2].content == "Error: boom"
    assert request.tool_choice.function.name == "get_weather"


@pytest.mark.parametrize(("fields", "param", "fragment"), [
    ({"max_tokens": None}, "max_tokens", "required field is missing"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]",
     "document blocks are not supported"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "'user' or 'assistant'"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]", "server tool"),
    ({"tools": [{"name": "t"}]}, "tools[0]", "without input_schema"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {}}}}, "output_config.format",
     "structured outputs are not supported"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name", "required when"),
    ({"thinking": {"type": "enabled", "budget_tokens": 32}}, "thinking.budget_tokens", "less than max_tokens"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"unknown_field": 1}, "unknown_field", "Unrecognized request argument"),
], ids=["no-max-tokens", "document-block", "system-role-in-messages", "server-tool", "no-input-schema",
        "structured-output", "tool-choice-without-name", "budget-over-max-tokens", "top-p-zero", "stream-not-bool",
        "unknown-field"])
def test_bad_requests_name_the_anthropic_parameter(fields, param, fragment):
    payload = {key: value for key, value in body(**fields).items() if value is not None}
    with pytest.raises(APIError) as caught:
        parse_messages_request(payload)
    assert caught.value.status == 400 and caught.value.param == param, caught.value
    assert fragment in caught.value.message
    assert error_body(caught.value)["error"]["type"] == "invalid_request_error"


def test_count_tokens_takes_no_max_tokens():
    request = parse_count_tokens_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                          "tools": [TOOL]})
    assert request.messages[0].content == "hi" and request.tools


def chunk(delta: Delta | None = None, finish: str | None = None, usage: Usage | None = None,
          stop_reason: str | None = None) -> ChatCompletionChunk:
    choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish, stop_reason=stop_reason)]
    return ChatCompletionChunk(id="c", model="m", choices=choices, usage=usage)


def call(index: int, arguments: str, name: str | None = None, id: str | None = None) -> Delta:
    return Delta(tool_calls=[ToolCallDelta(index=index, id=id, type="function" if name else None,
                                           function=FunctionCallDelta(name=name, arguments=arguments))])


def test_chunks_become_blocks_and_the_events_add_up_to_the_message():
    translation = MessageEvents("m", message_id="msg_1")
    events = []
    for piece in [chunk(Delta(role="assistant", content="")), chunk(Delta(reasoning_content="Think")),
                  chunk(Delta(reasoning_content="ing.")), chunk(Delta(content="Calling.")),
                  chunk(call(0, '{"city": ', "get_weather", "call_a")), chunk(call(0, '"Paris"}')),
                  chunk(call(1, "{}", "now", "call_b")), chunk(Delta(), finish="tool_calls"),
                  chunk(usage=Usage(prompt_tokens=7, completion_tokens=5, total_tokens=12))]:
        events += translation.feed(piece)
    events += translation.finish()
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [payload["content_block"]["type"] for name, payload in events if name == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use", "tool_use"]
    assert names.count("content_block_stop") == 4
    indexes = [payload["index"] for name, payload in events if name.startswith("content_block")]
    assert indexes == sorted(indexes)  # blocks never interleave
    json_pieces = [payload["delta"]["partial_json"] for name, payload in events
                   if name == "content_block_delta" and payload["delta"]["type"] == "input_json_delta"]
    assert json_pieces == ['{"city": ', '"Paris"}', "{}"]
    message = translation.message()
    assert message["content"] == [
        {"type": "thinking", "thinking": "Thinking.", "signature": ""}, {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "now", "input": {}}]
    assert message["stop_reason"] == "tool_use" and message["usage"] == {"input_tokens": 7, "output_tokens": 5}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


@pytest.mark.parametrize(("finish", "stop_string", "expected"), [
    ("stop", None, "end_turn"), ("length", None, "max_tokens"), ("stop", "END", "stop_sequence")],
    ids=["end-of-turn", "max-tokens", "stop-sequence-named"])
def test_stop_reasons(finish, stop_string, expected):
    translation = MessageEvents("m")
    translation.feed(chunk(Delta(content="x")))
    translation.feed(chunk(Delta(), finish=finish, stop_reason=stop_string))
    translation.finish()
    assert translation.message()["stop_reason"] == expected
    assert translation.message()["stop_sequence"] == stop_string


def test_an_empty_answer_still_starts_and_stops_the_message():
    translation = MessageEvents("m")
    events = translation.feed(chunk(Delta(role="assistant", content=""))) + translation.finish()
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert translation.message()["content"] == []


def test_a_stop_token_id_from_vllm_ends_the_turn():
    """vLLM's stop_reason is the stop string, or the id of a stop token: the chunk validates and the turn ends."""
    relayed = ChatCompletionChunk.model_validate({"id": "c", "model": "m", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": 151336}]})
    translation = MessageEvents("m")
    translation.feed(relayed)
    translation.finish()
    assert translation.message()["stop_reason"] == "end_turn" and translation.message()["stop_sequence"] is None
