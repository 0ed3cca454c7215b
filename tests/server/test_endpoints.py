"""Every endpoint of the GLM API inside pytest-jupyter's server (jp_fetch), with a tiny random checkpoint:
authentication, JSON and SSE answers, routing traces, the OpenAPI description, and every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import referencing
import tornado.httpclient

pytest_plugins = ["pytest_jupyter.jupyter_server"]

CONTEXT_LIMIT = 256


@pytest.fixture
def jp_server_config(tiny_checkpoint, tmp_path):
    return {"ServerApp": {"jpserver_extensions": {"workbench": True}},
            "GLMWorkbench": {"model_path": str(tiny_checkpoint), "kernels": "torch", "max_concurrent_sequences": 2,
                             "max_queued_requests": 1, "context_limit": CONTEXT_LIMIT, "default_max_tokens": 16,
                             "routing_history": 4, "conversations_dir": str(tmp_path / "conversations")}}


@pytest.fixture
def glm(jp_serverapp, jp_asyncio_loop):
    """The extension app; its backend is closed after the test (the scheduler thread ends)."""
    app = jp_serverapp.web_app.settings["glm_workbench"]
    yield app
    jp_asyncio_loop.run_until_complete(app.glm_backend.close())


def request_body(**overrides) -> dict:
    body = {"model": "ckpt", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
            "temperature": 0}
    body.update(overrides)
    return body


async def post(jp_fetch, body, **kwargs) -> tornado.httpclient.HTTPResponse:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return await jp_fetch("glm", "v1", "chat", "completions", method="POST", body=data, raise_error=False, **kwargs)


def sse_events(response) -> list[str]:
    text = response.body.decode()
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    return [block[len("data: "):] for block in events]


def assert_openai_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.code == status, response.body
    error = json.loads(response.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# ------------------------------------------------------------------------------------------------- happy paths


async def test_models_and_status(jp_fetch, glm):
    models = json.loads((await jp_fetch("glm", "v1", "models")).body)
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["local/ckpt"]
    assert models["data"][0]["owned_by"] == "local" and models["data"][0]["workbench"]["model"] == "ckpt"
    await post(jp_fetch, request_body())  # waits for the model to load
    status = json.loads((await jp_fetch("glm", "api", "status")).body)
    assert status["backend"] == "local" and status["model"] == "ckpt" and status["state"] == "ready"
    assert status["device"] == "cpu" and status["dtype"] == "float32" and status["kernels"] == "torch"
    assert status["cpu_kernels"] == "compiled"  # the default "auto" takes them on the CPU
    assert status["context_limit"] == CONTEXT_LIMIT
    assert status["memory"]["process_rss_bytes"] > 0 and status["memory"]["model_bytes"] > 0
    assert status["active_requests"] == 0 and status["queued_requests"] == 0
    assert status["recent_tokens_per_second"] > 0


async def test_completion_json(jp_fetch, glm):
    response = await post(jp_fetch, request_body(max_tokens=6, ignore_eos=True))
    assert response.code == 200 and response.headers["Content-Type"].startswith("application/json")
    completion = json.loads(response.body)
    assert completion["object"] == "chat.completion" and completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "ckpt"
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    usage = completion["usage"]
    assert usage["completion_tokens"] == 6 and usage["total_tokens"] == usage["prompt_tokens"] + 6


async def test_stream_is_server_sent_events_equal_to_the_json_answer(jp_fetch, glm):
    body = request_body(max_tokens=12, ignore_eos=True, thinking={"type": "disabled"})
    whole = json.loads((await post(jp_fetch, body)).body)
    response = await post(jp_fetch, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas) or None
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas) or None
    assert (content, reasoning) == (whole["choices"][0]["message"].get("content"),
                                    whole["choices"][0]["message"].get("reasoning_content"))
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finish == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


async def test_routing_trace_of_a_completion(jp_fetch, glm):
    completion = json.loads((await post(jp_fetch, request_body(max_tokens=5, ignore_eos=True, routing=True))).body)
    trace = json.loads((await jp_fetch("glm", "api", "routing", completion["id"])).body)
    config = glm.glm_backend.engine.config
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    tokens = completion["usage"]["prompt_tokens"] + 5
    assert trace["completion_id"] == completion["id"] and trace["prompt_len"] == completion["usage"]["prompt_tokens"]
    assert len(trace["expert_ids"]) == moe_layers and trace["layer_ids"] == list(range(1, config.num_hidden_layers))
    assert len(trace["expert_ids"][0]) == tokens == len(trace["tokens"]) == len(trace["token_ids"])
    assert all(len(row) == config.num_experts_per_tok for row in trace["expert_ids"][0])
    assert all(0 <= e < config.n_routed_experts for layer in trace["expert_ids"] for row in layer for e in row)
    # a completion without routing keeps no trace
    plain = json.loads((await post(jp_fetch, request_body())).body)
    missing = await jp_fetch("glm", "api", "routing", plain["id"], raise_error=False)
    assert_openai_error(missing, 404, param="completion_id", code="routing_trace_not_found")


async def test_routing_history_keeps_the_last_n(jp_fetch, glm):
    ids = [json.loads((await post(jp_fetch, request_body(max_tokens=1, routing=True))).body)["id"] for _ in range(5)]
    first = await jp_fetch("glm", "api", "routing", ids[0], raise_error=False)
    assert first.code == 404  # routing_history = 4
    for completion_id in ids[1:]:
        assert (await jp_fetch("glm", "api", "routing", completion_id)).code == 200


async def test_openapi_describes_every_endpoint_and_the_request_schema(jp_fetch, glm):
    spec = json.loads((await jp_fetch("glm", "api", "openapi.json")).body)
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {"/v1/chat/completions", "/v1/models", "/api/status",
                                  "/api/routing/{completion_id}", "/api/openapi.json", "/api/tools/web_fetch",
                                  "/api/count_tokens"}
    assert spec["servers"][0]["url"].endswith("/glm")
    registry = referencing.Registry().with_resource("urn:spec", referencing.Resource.from_contents(
        spec, default_specification=referencing.jsonschema.DRAFT202012))
    request_schema = {"$ref": "urn:spec#/components/schemas/ChatCompletionRequest"}
    validator = jsonschema.Draft202012Validator(request_schema, registry=registry)
    validator.validate(request_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]))
    assert not validator.is_valid({"model": "ckpt", "messages": [{"role": "robot", "content": "x"}]})


# ------------------------------------------------------------------------------------------------ authentication

ENDPOINTS = [("GET", ("glm", "v1", "models")), ("GET", ("glm", "api", "status")),
             ("GET", ("glm", "api", "routing", "chatcmpl-x")), ("GET", ("glm", "api", "openapi.json")),
             ("POST", ("glm", "v1", "chat", "completions"))]


@pytest.mark.parametrize("authorization", [None, "token wrong-token", "Bearer wrong-token"])
@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_every_endpoint_needs_the_token(jp_fetch, glm, method, path, authorization):
    headers = {"Authorization": authorization or ""}
    body = json.dumps(request_body()) if method == "POST" else None
    response = await jp_fetch(*path, method=method, body=body, headers=headers, raise_error=False)
    error = assert_openai_error(response, 403)
    assert "token" in error["message"]


async def test_bearer_token_is_accepted(jp_fetch, jp_serverapp, glm):
    bearer = {"Authorization": f"Bearer {jp_serverapp.identity_provider.token}"}
    response = await jp_fetch("glm", "v1", "models", headers=bearer)
    assert response.code == 200


async def test_cookie_auth_needs_the_xsrf_token(jp_fetch, jp_serverapp, glm, http_server_client, jp_base_url):
    token = jp_serverapp.identity_provider.token
    login = await http_server_client.fetch(f"{jp_base_url}login?token={token}", follow_redirects=False,
                                           raise_error=False)
    cookies = "; ".join(c.split(";")[0] for c in login.headers.get_list("Set-Cookie"))
    assert "username-" in cookies, login.headers
    url = f"{jp_base_url}glm/v1/chat/completions"
    body = json.dumps(request_body(max_tokens=1))
    # the login cookie alone (a cross-site form post could send it) is refused
    refused = await http_server_client.fetch(url, method="POST", body=body, headers={"Cookie": cookies},
                                             raise_error=False)
    assert_openai_error(refused, 403)
    # the cookie with the XSRF token, as the browser extension sends it, works
    xsrf = "glm-xsrf-test"
    accepted = await http_server_client.fetch(url, method="POST", body=body, raise_error=False, headers={
        "Cookie": f"{cookies}; _xsrf={xsrf}", "X-XSRFToken": xsrf})
    assert accepted.code == 200, accepted.body


# ---------------------------------------------------------------------------------------------------------- errors

TOOL = {"type": "function", "function": {"name": "get_weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
ERRORS = [  # (name, body, status, param, code)
    ("malformed_json", b'{"model": "ckpt", "messages": [', 400, None, "invalid_json"),
    ("not_an_object", b"[1, 2]", 400, None, "invalid_json"),
    ("empty_body", b"", 400, None, "invalid_json"),
    ("unknown_model", request_body(model="gpt-4o"), 404, "model", "model_not_found"),
    ("missing_messages", {"model": "ckpt"}, 400, "messages", None),
    ("no_messages", request_body(messages=[]), 400, "messages", None),
    ("bad_role", request_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", None),
    ("missing_role", request_body(messages=[{"content": "hi"}]), 400, "messages[0].role", None),
    ("image_part", request_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content", None),
    ("tool_result_first", request_body(messages=[{"role": "tool", "tool_call_id": "call_1", "content": "x"}]),
     400, "messages[0].role", None),
    ("tool_result_unknown_call", request_body(tools=[TOOL], messages=[
        {"role": "user", "content": "weather?"}, {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]), 400, "messages[2].tool_call_id", None),
    ("ends_with_assistant", request_body(messages=[{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]),
     400, "messages[1].role", None),
    ("assistant_without_content", request_body(messages=[{"role": "assistant"}, {"role": "user", "content": "x"}]),
     400, "messages[0]", None),
    ("tool_arguments_not_json", request_body(tools=[TOOL], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]),
     400, "messages[1].tool_calls[0].function.arguments", None),
    ("invalid_tool_schema", request_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "banana"}}}}}]),
     400, "tools[0].function.parameters", None),
    ("tool_schema_not_object", request_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]), 400, "tools[0].function.parameters", None),
    ("bad_tool_name", request_body(tools=[{"type": "function", "function": {"name": "rm -rf"}}]),
     400, "tools[0].function.name", None),
    ("duplicate_tools", request_body(tools=[TOOL, TOOL]), 400, "tools", None),
    ("tool_choice_unknown", request_body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "x"}}),
     400, "tool_choice", None),
    ("tool_choice_without_tools", request_body(tool_choice="required"), 400, "tool_choice", None),
    ("temperature_high", request_body(temperature=2.5), 400, "temperature", None),
    ("temperature_type", request_body(temperature="hot"), 400, "temperature", None),
    ("top_p_zero", request_body(top_p=0), 400, "top_p", None),
    ("max_tokens_zero", request_body(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens_disagree", request_body(max_tokens=4, max_completion_tokens=5), 400, "max_completion_tokens", None),
    ("n_two", request_body(n=2), 400, "n", None),
    ("too_many_stops", request_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("stream_options_without_stream", request_body(stream_options={"include_usage": True}), 400, "stream_options",
     None),
    ("thinking_type", request_body(thinking={"type": "sometimes"}), 400, "thinking.type", None),
    ("unknown_field", request_body(logprobs=True), 400, "logprobs", "unrecognized_argument"),
    ("context_too_long", request_body(messages=[{"role": "user", "content": "word " * 400}]), 400, "messages",
     "context_length_exceeded"),
    ("max_tokens_over_context", request_body(max_tokens=CONTEXT_LIMIT), 400, "max_tokens",
     "context_length_exceeded"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
async def test_errors_are_openai_shaped(jp_fetch, glm, body, status, param, code):
    streamable = isinstance(body, dict) and "stream_options" not in body
    for stream in (False, True) if streamable else (False,):  # streaming fails the same way, before any event
        if stream:
            body = {**body, "stream": True}
        response = await post(jp_fetch, body)
        assert response.headers["Content-Type"].startswith("application/json")
        assert_openai_error(response, status, param=param, code=code)


async def test_wrong_method_and_unknown_path(jp_fetch, glm):
    wrong = await jp_fetch("glm", "v1", "chat", "completions", method="GET", raise_error=False)
    assert_openai_error(wrong, 405)
    unknown = await jp_fetch("glm", "v1", "embeddings", method="POST", body="{}", raise_error=False)
    assert "chat/completions" in assert_openai_error(unknown, 404, code="not_found")["message"]


async def test_full_queue_answers_429_with_retry_after(jp_fetch, glm):
    # capacity: 2 decoding + 1 queued; a fourth request while they run is refused
    body = request_body(max_tokens=64, ignore_eos=True)
    first = [asyncio.ensure_future(post(jp_fetch, body, request_timeout=300)) for _ in range(3)]
    while True:  # until all three are in (running, waiting in the engine, or being prepared)
        status = json.loads((await jp_fetch("glm", "api", "status")).body)
        if status["active_requests"] + status["queued_requests"] == 3:
            break
        assert not any(f.done() for f in first), "a request finished before all three were in"
        await asyncio.sleep(0.005)
    refused = await post(jp_fetch, request_body(max_tokens=1))
    assert_openai_error(refused, 429, code="queue_full")
    assert refused.headers["Retry-After"] == "1"
    assert [r.code for r in await asyncio.gather(*first)] == [200, 200, 200]
    assert (await post(jp_fetch, request_body(max_tokens=1))).code == 200  # room again


async def test_engine_failure_fails_that_request_and_the_server_goes_on(jp_fetch, glm):
    await post(jp_fetch, request_body(max_tokens=1))
    model = glm.glm_backend.engine.model
    original = model.hidden_states

    def broken(*args, **kwargs):
        model.hidden_states = original  # fails once
        raise RuntimeError("injected device fault")

    model.hidden_states = broken
    failed = await post(jp_fetch, request_body())
    error = assert_openai_error(failed, 500, code="engine_error")
    assert "injected device fault" in error["message"]
    after = await post(jp_fetch, request_body(max_tokens=3, ignore_eos=True))
    assert after.code == 200 and json.loads(after.body)["usage"]["completion_tokens"] == 3
    assert glm.glm_backend.engine.num_running == 0


async def test_engine_failure_mid_stream_ends_the_stream_with_an_error_event(jp_fetch, glm):
    await post(jp_fetch, request_body(max_tokens=1))
    scheduler = glm.glm_backend.engine.scheduler
    original, calls = scheduler._decode, []

    def fails_on_third_decode(requests):  # the decode step, whichever path (compiled or torch) runs it
        calls.append(1)
        if len(calls) == 3:
            scheduler._decode = original
            raise RuntimeError("injected fault after two tokens")
        return original(requests)

    scheduler._decode = fails_on_third_decode
    response = await post(jp_fetch, request_body(max_tokens=10, ignore_eos=True, stream=True))
    assert response.code == 200
    events = sse_events(response)
    last = json.loads(events[-1])
    assert last["error"]["code"] == "engine_error" and "after two tokens" in last["error"]["message"]
    assert (await post(jp_fetch, request_body(max_tokens=2))).code == 200
