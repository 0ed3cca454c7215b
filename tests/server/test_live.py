"""Live `jupyter server` processes on free loopback ports, driven by real clients: the official `openai` client,
`zai-sdk`, raw httpx streams (32 concurrent, 10 disconnecting), the remote backend through a second server
(two hops), a property-based run of malformed requests against the OpenAPI description, and the API key test.

The first server runs the local engine on `scripted_checkpoint` (a tiny model trained to answer three prompts
with reasoning, a tool call, and an answer to the tool result); the second runs the remote backend against it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
import jsonschema
import openai
import pytest
import referencing
from glm_live import (
    MODEL,
    THINK_QUESTION,
    TOOL_QUESTION,
    TOOLS,
    start_live_server,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

UPSTREAM_KEY_ENV = "GLM_WORKBENCH_TEST_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def upstream_key() -> str:
    return "sk-glm-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def live_server(scripted_checkpoint, tmp_path_factory, upstream_key):
    """The local engine on the scripted checkpoint; its token is the key the remote backend must guard."""
    server = start_live_server(tmp_path_factory.mktemp("local"), {
        # The torch CPU path: the cancellation tests need generations that outlast the relays' socket buffers, and
        # the compiled kernels write the tiny model's 1,800 tokens in well under a second.
        "model_path": str(scripted_checkpoint), "kernels": "torch", "cpu_kernels": "torch",
        "max_concurrent_sequences": 32, "max_queued_requests": 32, "routing_history": 8}, token=upstream_key)
    assert server.status()["state"] == "ready", server.status()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_server(live_server, tmp_path_factory, upstream_key):
    """A second server whose backend is the first one, reached as an OpenAI-compatible GLM endpoint."""
    server = start_live_server(tmp_path_factory.mktemp("remote"), {
        "backend": "remote", "remote_base_url": live_server.api, "remote_model": MODEL,
        "remote_api_key_env": UPSTREAM_KEY_ENV, "remote_thinking_style": "thinking"},
        env={UPSTREAM_KEY_ENV: upstream_key}, token="remote-" + secrets.token_hex(8))
    yield server
    server.stop()


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=server.token, max_retries=0, timeout=120)


def extra(obj, name):
    """A field OpenAI's own types do not declare (reasoning_content): the client keeps it as an extra."""
    return getattr(obj, name, None) or (obj.model_extra or {}).get(name)


def collect_stream(stream) -> dict:
    content, reasoning, calls, finish, usage = [], [], {}, None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append(extra(choice.delta, "reasoning_content") or "")
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"content": "".join(content) or None, "reasoning": "".join(reasoning) or None,
            "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish, "usage": usage}


# --------------------------------------------------------------------------------------------- the openai client


@pytest.mark.parametrize("server_name", ["live_server", "remote_server"])
def test_openai_client_reasoning_separated_from_content(request, server_name):
    server = request.getfixturevalue(server_name)
    client = openai_client(server)
    provider = "local" if server_name == "live_server" else "remote"  # the shorthand settings' one provider
    assert [m.id for m in client.models.list().data] == [f"{provider}/{MODEL}"]
    answer = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0)
    message = answer.choices[0].message
    assert extra(message, "reasoning_content") == "The user greets me."
    assert message.content == "Hello!" and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens > 0
    streamed = collect_stream(client.chat.completions.create(
        model=MODEL, messages=THINK_QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert streamed["reasoning"] == "The user greets me." and streamed["content"] == "Hello!"
    assert streamed["finish_reason"] == "stop" and streamed["usage"].completion_tokens == answer.usage.completion_tokens


@pytest.mark.parametrize("server_name", ["live_server", "remote_server"])
def test_openai_client_tool_call_round_trip(request, server_name):
    server = request.getfixturevalue(server_name)
    client = openai_client(server)
    answer = client.chat.completions.create(model=MODEL, messages=TOOL_QUESTION, tools=TOOLS, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert extra(choice.message, "reasoning_content") == "Need the tool."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    streamed = collect_stream(client.chat.completions.create(model=MODEL, messages=TOOL_QUESTION, tools=TOOLS,
                                                             temperature=0, stream=True))
    assert streamed["finish_reason"] == "tool_calls" and streamed["content"] is None
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 2})]
    # the round trip: the assistant turn as the client got it, then the tool's result
    messages = [*TOOL_QUESTION, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0)
    assert final.choices[0].message.content == "Sunny in Paris."
    assert extra(final.choices[0].message, "reasoning_content") == "It is sunny."


def test_openai_client_extra_body_thinking_and_routing(live_server):
    client = openai_client(live_server)
    on = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0, max_tokens=4,
                                        extra_body={"thinking": {"type": "enabled"}, "routing": True})
    off = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0, max_tokens=4,
                                         extra_body={"thinking": {"type": "disabled"}})
    # thinking off renders "/nothink" and an empty think block into the prompt
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
    assert off.choices[0].finish_reason in ("stop", "length")
    trace = httpx.get(f"{live_server.url}/glm/api/routing/{on.id}", headers=live_server.headers, timeout=10).json()
    assert trace["prompt_len"] == on.usage.prompt_tokens
    assert len(trace["token_ids"]) == on.usage.prompt_tokens + on.usage.completion_tokens


def test_openai_client_errors_are_raised_as_openai_errors(live_server):
    client = openai_client(live_server)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=THINK_QUESTION)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=live_server.api, api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------------------------------- zai-sdk


def test_zai_sdk_client(live_server):
    from zai import ZaiClient

    client = ZaiClient(api_key=live_server.token, base_url=live_server.api, max_retries=0)
    # zai-sdk turns temperature 0 into do_sample=false (greedy) itself
    answer = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0,
                                            thinking={"type": "enabled"})
    message = answer.choices[0].message
    assert message.reasoning_content == "The user greets me." and message.content == "Hello!"
    stream = client.chat.completions.create(model=MODEL, messages=TOOL_QUESTION, tools=TOOLS, temperature=0,
                                            stream=True)
    reasoning, calls, finish = "", [], None
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += choice.delta.reasoning_content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert reasoning == "Need the tool." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2})]


# ------------------------------------------------------------------------------------------------- reliability


async def stream_tokens(client: httpx.AsyncClient, server, body: dict) -> dict:
    usage, finish, text = None, None, ""
    async with client.stream("POST", f"{server.api}/chat/completions", json=body, headers=server.headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += (choice["delta"].get("content") or "") + (choice["delta"].get("reasoning_content") or "")
                finish = choice.get("finish_reason") or finish
    return {"usage": usage, "finish": finish, "text": text}


def assert_engine_empty(server) -> dict:
    status = server.wait_idle()
    assert status["active_requests"] == 0 and status["queued_requests"] == 0, status
    memory = status["memory"]
    assert memory["kv_cache_blocks_free"] == memory["kv_cache_blocks_total"], memory
    return status


def test_32_concurrent_streaming_clients(live_server):
    lengths = [4 + (i % 5) * 3 for i in range(32)]  # 4..16 tokens each, different per client

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*[stream_tokens(client, live_server, {
                "model": MODEL, "messages": [{"role": "user", "content": f"Client {i} says hi."}],
                "max_tokens": n, "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) for i, n in enumerate(lengths)])

    results = asyncio.run(run())
    assert [r["usage"]["completion_tokens"] for r in results] == lengths
    assert all(r["finish"] == "length" for r in results)
    assert_engine_empty(live_server)


def test_disconnecting_clients_cancel_their_generation(live_server):
    before = live_server.status()["requests_cancelled"]

    async def leave_early(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me a long story {i}."}],
                "max_tokens": 1800, "ignore_eos": True, "stream": True}
        seen = 0
        async with client.stream("POST", f"{live_server.api}/chat/completions", json=body,
                                 headers=live_server.headers) as response:
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[leave_early(client, i) for i in range(10)])

    assert asyncio.run(run()) == [3] * 10
    status = assert_engine_empty(live_server)
    assert status["requests_cancelled"] - before == 10


def test_remote_backend_streams_through_two_hops_and_cancels_upstream(remote_server, live_server):
    status = remote_server.status()
    assert status["backend"] == "remote" and status["model"] == MODEL and status["api_key_env"] == UPSTREAM_KEY_ENV
    client = openai_client(remote_server)
    off = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0, max_tokens=4,
                                         extra_body={"thinking": {"type": "disabled"}})
    on = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0, max_tokens=4)
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the thinking switch reached the engine
    with pytest.raises(openai.BadRequestError) as routing:
        client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, extra_body={"routing": True})
    assert routing.value.param == "routing"
    with pytest.raises(openai.BadRequestError) as upstream_error:  # the upstream's 400 comes through as a 400
        client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, max_tokens=100000)
    assert upstream_error.value.code == "context_length_exceeded"

    before = live_server.status()["requests_cancelled"]

    async def leave_early() -> None:
        body = {"model": MODEL, "messages": THINK_QUESTION, "max_tokens": 1800, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(timeout=60) as http, http.stream(
                "POST", f"{remote_server.api}/chat/completions", json=body, headers=remote_server.headers) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break

    asyncio.run(leave_early())
    status = assert_engine_empty(live_server)
    assert status["requests_cancelled"] - before == 1
    deadline = time.monotonic() + 10
    while remote_server.status()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remote_server.status()["active_requests"] == 0


# ---------------------------------------------------------------------------- malformed requests vs the OpenAPI spec

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                           | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
FIELDS = ["model", "messages", "thinking", "tools", "tool_choice", "temperature", "top_p", "max_tokens",
          "max_completion_tokens", "stop", "seed", "stream", "stream_options", "n", "routing"]


@st.composite
def malformed_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["field", "message", "drop", "unknown", "raw", "truncated"]))
    body = json.loads(json.dumps(BASE))
    if kind == "field":
        body[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
    elif kind == "message":
        message = draw(st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "tool_call_id", "name",
                                                         "reasoning_content"]), JSON_VALUES, max_size=4))
        body["messages"] = draw(st.permutations([message, *body["messages"]]))
    elif kind == "drop":
        del body[draw(st.sampled_from(["model", "messages"]))]
    elif kind == "unknown":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in body))] = draw(JSON_VALUES)
    elif kind == "raw":
        return draw(st.binary(max_size=40))
    if kind == "truncated":
        text = json.dumps(body).encode()
        return text[:draw(st.integers(0, len(text) - 1))]
    if body.get("stream") is True:
        body["max_tokens"] = 1
    return json.dumps(body).encode()


def test_malformed_requests_never_answer_500(live_server):
    spec = httpx.get(f"{live_server.url}/glm/api/openapi.json", headers=live_server.headers, timeout=10).json()
    registry = referencing.Registry().with_resource("urn:spec", referencing.Resource.from_contents(
        spec, default_specification=referencing.jsonschema.DRAFT202012))
    validator = jsonschema.Draft202012Validator({"$ref": "urn:spec#/components/schemas/ChatCompletionRequest"},
                                                registry=registry)
    client = httpx.Client(timeout=60, headers=live_server.headers)
    seen = {"invalid": 0, "valid": 0}

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(raw=malformed_bodies())
    def check(raw: bytes) -> None:
        response = client.post(f"{live_server.api}/chat/completions", content=raw)
        assert response.status_code != 500 and response.status_code < 500, (raw, response.text)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if body is None or not validator.is_valid(body):
            seen["invalid"] += 1
            assert response.status_code in (400, 404), (raw, response.text)  # what the spec refuses, we refuse
        else:
            seen["valid"] += 1
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    check()
    client.close()
    assert seen["invalid"] >= 200, seen
    assert_engine_empty(live_server)


# ---------------------------------------------------------------------------------------------------- the API key


def test_api_key_never_leaves_the_remote_server(remote_server, upstream_key):
    client = httpx.Client(timeout=60, headers=remote_server.headers)
    api = remote_server.api
    body = {"model": MODEL, "messages": THINK_QUESTION, "max_tokens": 3}
    responses = [
        client.get(f"{api}/models"), client.get(f"{remote_server.url}/glm/api/status"),
        client.get(f"{remote_server.url}/glm/api/openapi.json"),
        client.get(f"{remote_server.url}/glm/api/routing/chatcmpl-x"),
        client.post(f"{api}/chat/completions", json=body),
        client.post(f"{api}/chat/completions", json={**body, "stream": True}),
        client.post(f"{api}/chat/completions", json={**body, "model": "other"}),
        client.post(f"{api}/chat/completions", json={**body, "max_tokens": 100000}),  # the upstream refuses
        client.post(f"{api}/chat/completions", json={**body, "routing": True}),
        client.post(f"{api}/chat/completions", content=b"{oops"),
        httpx.get(f"{api}/models", headers={"Authorization": "token wrong"}),
    ]
    client.close()
    assert [r.status_code for r in responses] == [200, 200, 200, 404, 200, 200, 404, 400, 400, 400, 403]
    for response in responses:
        assert upstream_key not in response.text
        assert all(upstream_key not in value for value in response.headers.values())
    log = remote_server.log_text()
    assert "POST" in log or "chat/completions" in log  # the log is the server's, and it logged requests
    assert upstream_key not in log


def test_non_streaming_client_that_disconnects_cancels_too(live_server):
    before = live_server.status()["requests_cancelled"]
    body = {"model": MODEL, "messages": THINK_QUESTION, "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{live_server.api}/chat/completions", json=body, headers=live_server.headers, timeout=0.5)
    status = assert_engine_empty(live_server)
    assert status["requests_cancelled"] - before == 1


def test_a_thinking_budget_cuts_the_reasoning_short(live_server):
    """`thinking.budget_tokens`: the engine closes the thinking after that many tokens; the reasoning is then the
    first tokens of what it would have thought."""
    client = openai_client(live_server)
    full = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0, max_tokens=32,
                                          extra_body={"thinking": {"type": "enabled"}})
    cut = client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, temperature=0, max_tokens=32,
                                         extra_body={"thinking": {"type": "enabled", "budget_tokens": 2}})
    whole_reasoning = extra(full.choices[0].message, "reasoning_content")
    reasoning = extra(cut.choices[0].message, "reasoning_content")
    assert whole_reasoning == "The user greets me." and reasoning and reasoning != whole_reasoning
    assert whole_reasoning.startswith(reasoning.strip())
    with pytest.raises(openai.BadRequestError, match="budget_tokens"):
        client.chat.completions.create(model=MODEL, messages=THINK_QUESTION, max_tokens=8,
                                       extra_body={"thinking": {"type": "enabled", "budget_tokens": 0}})
