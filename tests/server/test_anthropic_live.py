"""The Anthropic-compatible door (`glm/anthropic/v1/messages`), driven by the official `anthropic` client against
live servers: the scripted checkpoint (real reasoning, a real tool call, a real answer to the tool result out of
the engine and parser), the same model through a second server's remote backend, and the bundled model."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from glm_live import MODEL, start_live_server

WEATHER = {"name": "get_weather", "description": "Get the weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                              "days": {"type": "integer"}},
                            "required": ["city"]}}
THINKING = {"type": "enabled", "budget_tokens": 32}
HELLO = [{"role": "user", "content": "Say hello."}]
PARIS = [{"role": "user", "content": "Weather in Paris?"}]
# The scripted model's answers, exactly (the current client has no temperature argument: it goes as an extra field).
GREEDY = {"model": MODEL, "thinking": THINKING, "extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def local_server(scripted_checkpoint, tmp_path_factory):
    server = start_live_server(tmp_path_factory.mktemp("anthropic-local"), {
        "model_path": str(scripted_checkpoint), "kernels": "torch", "cpu_kernels": "torch"}, token="local-token")
    assert server.status()["state"] == "ready", server.status()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relay_server(local_server, tmp_path_factory):
    """A second server whose backend is the first, reached as an OpenAI-compatible endpoint."""
    server = start_live_server(tmp_path_factory.mktemp("anthropic-relay"), {
        "backend": "remote", "remote_base_url": local_server.api, "remote_model": MODEL,
        "remote_api_key_env": "ANTHROPIC_TEST_UPSTREAM", "remote_thinking_style": "thinking"},
        env={"ANTHROPIC_TEST_UPSTREAM": local_server.token}, token="relay-token")
    yield server
    server.stop()


def client_for(server, token: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{server.url}/glm/anthropic", auth_token=token or server.token,
                               api_key=None, max_retries=0, timeout=120)


@pytest.fixture(params=["local", "relay"])
def client(request, local_server, relay_server) -> anthropic.Anthropic:
    return client_for(local_server if request.param == "local" else relay_server)


def test_a_whole_message_with_thinking(client):
    message = client.messages.create(**GREEDY, max_tokens=64, messages=HELLO)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "The user greets me."
    assert message.content[1].text == "Hello!"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.role == "assistant" and message.model == MODEL and message.id.startswith("msg_")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_the_stream_is_anthropics_event_sequence_and_adds_up_to_the_whole_message(client):
    with client.messages.stream(**GREEDY, max_tokens=64, messages=HELLO) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events if event.type in (
        "message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop")]
    assert kinds == ["message_start", "content_block_start", "content_block_stop", "content_block_start",
                     "content_block_stop", "message_delta", "message_stop"]
    deltas = [event.delta.type for event in events if event.type == "content_block_delta"]
    assert deltas and set(deltas) == {"thinking_delta", "text_delta"}
    assert deltas.index("text_delta") > max(i for i, kind in enumerate(deltas) if kind == "thinking_delta")
    whole = client.messages.create(**GREEDY, max_tokens=64, messages=HELLO)
    assert [block.model_dump() for block in final.content] == [block.model_dump() for block in whole.content]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens > 0


def test_a_tool_round_trip(client):
    asked = client.messages.create(**GREEDY, max_tokens=96, messages=PARIS, tools=[WEATHER])
    assert asked.stop_reason == "tool_use"
    call = asked.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris", "days": 2}
    assert asked.content[0].type == "thinking" and asked.content[0].thinking == "Need the tool."
    history = [*PARIS, {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in
                                                         asked.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "sunny, 24 C"}]}]
    answer = client.messages.create(**GREEDY, max_tokens=64, messages=history, tools=[WEATHER])
    assert [block.type for block in answer.content] == ["thinking", "text"]
    assert answer.content[1].text == "Sunny in Paris." and answer.stop_reason == "end_turn"


def test_a_streamed_tool_call_arrives_as_input_json_deltas(local_server):
    client = client_for(local_server)
    with client.messages.stream(**GREEDY, max_tokens=96, messages=PARIS, tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    pieces = [event.delta.partial_json for event in events
              if event.type == "content_block_delta" and event.delta.type == "input_json_delta"]
    assert pieces and "".join(pieces).replace(" ", "") == '{"city":"Paris","days":2}'
    assert final.content[-1].input == {"city": "Paris", "days": 2} and final.stop_reason == "tool_use"


def test_a_stop_sequence_ends_the_answer_and_is_named(local_server):
    message = client_for(local_server).messages.create(**GREEDY, max_tokens=64, messages=HELLO,
                                                       stop_sequences=["zzz", "greets"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "greets"
    assert message.content[0].thinking == "The user"  # the parser trims the thinking's edges


def test_thinking_disabled_gives_no_thinking_block(local_server):
    message = client_for(local_server).messages.create(model=MODEL, max_tokens=16, messages=HELLO,
                                                       thinking={"type": "disabled"})
    assert all(block.type == "text" for block in message.content)
    assert message.stop_reason in ("end_turn", "max_tokens")


def test_adaptive_thinking_thinks_and_omitted_display_keeps_the_text_out(local_server):
    client = client_for(local_server)
    adaptive = client.messages.create(**{**GREEDY, "thinking": {"type": "adaptive"}}, max_tokens=64, messages=HELLO)
    assert [(block.type, getattr(block, "thinking", None)) for block in adaptive.content] == [
        ("thinking", "The user greets me."), ("text", None)]
    omitted = client.messages.create(**{**GREEDY, "thinking": {**THINKING, "display": "omitted"}}, max_tokens=64,
                                     messages=HELLO)
    assert [block.type for block in omitted.content] == ["thinking", "text"]
    assert omitted.content[0].thinking == "" and omitted.content[1].text == "Hello!"


def test_count_tokens_counts_the_prompt_the_model_reads(local_server, relay_server):
    client = client_for(local_server)
    counted = client.messages.count_tokens(model=MODEL, messages=PARIS, tools=[WEATHER], thinking=THINKING)
    used = client.messages.create(**GREEDY, max_tokens=96, messages=PARIS, tools=[WEATHER])
    assert counted.input_tokens == used.usage.input_tokens > 0
    with pytest.raises(anthropic.BadRequestError, match="Counting tokens needs the model's tokenizer"):
        client_for(relay_server).messages.count_tokens(model=MODEL, messages=PARIS)


def test_bad_requests_are_anthropic_shaped_errors_naming_the_parameter(local_server):
    url, headers = f"{local_server.url}/glm/anthropic/v1/messages", {"Authorization": f"Bearer {local_server.token}"}
    cases = [
        ({"model": MODEL, "messages": HELLO}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
         "image blocks are not supported"),
        ({"model": MODEL, "max_tokens": 8, "messages": HELLO, "thinking": {"type": "enabled"}}, "budget_tokens"),
        ({"model": MODEL, "max_tokens": 8, "messages": HELLO, "thinking": THINKING}, "must be less than max_tokens"),
        ({"model": MODEL, "max_tokens": 8, "messages": HELLO, "temperature": 1.5}, "temperature"),
        ({"model": MODEL, "max_tokens": 8, "messages": HELLO, "frequency": 1}, "frequency"),
        ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "x", "content": "y"}]}]}, "cannot be in a assistant message"),
    ]
    for body, fragment in cases:
        response = httpx.post(url, json=body, headers=headers, timeout=30)
        assert response.status_code == 400, (body, response.text)
        error = response.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
        assert fragment in error["error"]["message"], (fragment, error)
    with pytest.raises(anthropic.NotFoundError, match="does not exist here"):
        client_for(local_server).messages.create(model="claude-elsewhere", max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.PermissionDeniedError, match="Bearer"):
        client_for(local_server, token="wrong").messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    response = httpx.get(f"{local_server.url}/glm/anthropic/v1/models", headers=headers, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_the_bundled_model_answers_through_the_door(tmp_path_factory):
    """The default model as a user's first try of an Anthropic client would meet it: streamed, thinking on."""
    server = start_live_server(tmp_path_factory.mktemp("anthropic-bundled"), {})
    try:
        client = client_for(server)
        with client.messages.stream(model="glm45-air-mini", max_tokens=48, messages=[
                {"role": "user", "content": "What is a mixture of experts?"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
        assert text == "".join(block.text for block in final.content if block.type == "text")
    finally:
        server.stop()
