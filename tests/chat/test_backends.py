"""Backends in-process: the local scheduler on a tiny engine (batching, cancellation, the queue bound) and the
remote backend's dialects and key handling (its live two-hop behaviour is in tests/server/test_live.py)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from workbench.chat import APIError, parse_request
from workbench.chat.backends import LocalBackend, RemoteBackend


def request(**overrides):
    body = {"model": "ckpt", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True}
    return parse_request({**body, **overrides})


@pytest.fixture
def backend(tiny_engine):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = LocalBackend(tiny_engine, model_id="ckpt", max_concurrent_sequences=4, max_queued_requests=2)
    yield backend
    asyncio.run(backend.close())
    torch.set_num_threads(threads)


def test_concurrent_requests_share_decode_steps(backend, tiny_engine):
    async def run():
        # No step until all four are queued (on a loaded machine the first could otherwise finish its 12 tokens
        # before the last arrives): then one step admits them all, and every later step decodes the four.
        with tiny_engine.scheduler._step_lock:
            tasks = [asyncio.create_task(backend.complete(request(max_tokens=12, seed=i, messages=[
                {"role": "user", "content": f"hi {i}"}]))) for i in range(4)]
            while tiny_engine.num_waiting < 4:
                await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results] == [12] * 4
    per_step = [tokens for _, tokens in backend.throughput.events]
    assert max(per_step) == 4, per_step  # steps that advanced all four sequences at once
    assert sum(per_step) == 48 and len(per_step) < 48
    assert tiny_engine.num_running == 0


def test_cancelling_a_stream_stops_it_within_a_step_and_frees_its_cache(backend, tiny_engine):
    free_before = tiny_engine.cache.num_free_blocks

    def produced() -> int:
        return sum(tokens for _, tokens in backend.throughput.events)

    async def run() -> int:
        stream = backend.stream(request(max_tokens=400, stream=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 4:
                break
        at_cancel = produced()
        await stream.aclose()  # cancels the engine request
        while backend._tracked:
            await asyncio.sleep(0.001)
        return at_cancel

    at_cancel = asyncio.run(run())
    assert produced() - at_cancel <= 1, (at_cancel, produced())  # at most the step that was in flight
    assert produced() < 100
    assert tiny_engine.num_running == 0 and tiny_engine.cache.num_free_blocks == free_before
    assert backend.requests_cancelled == 1


def test_full_queue_is_a_429(backend):
    async def run():
        streams = [backend.stream(request(max_tokens=300, stream=True)) for _ in range(6)]  # 4 running + 2 queued
        for stream in streams:
            await stream.__anext__()
        with pytest.raises(APIError) as refused:
            await backend.stream(request(stream=True)).__anext__()
        for stream in streams:
            await stream.aclose()
        return refused.value

    refused = asyncio.run(run())
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"


def test_unknown_model_is_a_404(backend):
    with pytest.raises(APIError) as caught:
        asyncio.run(backend.complete(request(model="other")))
    assert caught.value.status == 404 and caught.value.param == "model"


# --------------------------------------------------------------------------------------------------- remote


@pytest.mark.parametrize(("base_url", "thinking", "expected"), [
    ("https://api.z.ai/api/paas/v4", {"type": "disabled"}, {"thinking": {"type": "disabled"}}),
    ("https://open.bigmodel.cn/api/paas/v4", {"type": "enabled"}, {"thinking": {"type": "enabled"}}),
    ("http://gpu-node:8000/v1", {"type": "disabled"}, {"chat_template_kwargs": {"enable_thinking": False}}),
    ("http://gpu-node:8000/v1", None, {}),  # absent: the model decides, nothing is sent
])
def test_remote_thinking_dialects(base_url, thinking, expected):
    remote = RemoteBackend(base_url, "glm-4.5-air", api_key_env=None)
    body = remote.payload(request(model="glm-4.5-air", thinking=thinking), stream=True)
    assert {k: body[k] for k in ("thinking", "chat_template_kwargs") if k in body} == expected
    assert body["model"] == "glm-4.5-air" and body["stream"] is True and "routing" not in body
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True


def test_remote_payload_sends_openai_shaped_arguments():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    body = RemoteBackend("http://h/v1", "m").payload(request(model="m", messages=messages, ignore_eos=False), False)
    assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert "ignore_eos" not in body


def test_remote_key_is_read_from_the_named_variable_and_masked(monkeypatch):
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("GLM_TEST_KEY", key)
    seen_headers = {}

    def upstream(http_request: httpx.Request) -> httpx.Response:
        seen_headers.update(http_request.headers)
        # an upstream that echoes the key in its error, as some do
        return httpx.Response(401, json={"error": {"message": f"invalid key {key}", "code": "401"}})

    remote = RemoteBackend("http://upstream/v1", "m", api_key_env="GLM_TEST_KEY",
                           transport=httpx.MockTransport(upstream))
    assert key not in repr(remote) and key not in json.dumps(remote.status())
    with pytest.raises(APIError) as caught:
        asyncio.run(remote.complete(request(model="m")))
    assert seen_headers["authorization"] == f"Bearer {key}"
    assert caught.value.status == 401 and key not in caught.value.message and "***" in caught.value.message
    monkeypatch.delenv("GLM_TEST_KEY")
    with pytest.raises(APIError) as missing:
        asyncio.run(remote.complete(request(model="m")))
    assert missing.value.status == 503 and "GLM_TEST_KEY" in missing.value.message


def test_remote_unreachable_is_a_502():
    def refuse(http_request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=http_request)

    remote = RemoteBackend("http://upstream/v1", "m", transport=httpx.MockTransport(refuse))

    async def run():
        async for _ in remote.stream(request(model="m", stream=True)):
            pass

    with pytest.raises(APIError) as caught:
        asyncio.run(run())
    assert caught.value.status == 502 and "could not be reached" in caught.value.message


def test_remote_routing_is_refused_clearly():
    with pytest.raises(APIError) as caught:
        RemoteBackend("http://h/v1", "m").payload(request(model="m", routing=True), stream=False)
    assert caught.value.status == 400 and caught.value.param == "routing"


def test_usage_carries_the_engines_prompt_and_decode_seconds(backend):
    async def run():
        started = time.perf_counter()
        chunks = [c async for c in backend.stream(request(max_tokens=12, stream=True,
                                                          stream_options={"include_usage": True}))]
        return chunks, time.perf_counter() - started

    chunks, wall = asyncio.run(run())
    usage = chunks[-1].usage.model_dump()
    assert usage["completion_tokens"] == 12
    # decode runs from the first generated token to the last, prompt up to the first: both inside the request
    assert usage["decode_seconds"] > 0 and usage["prompt_seconds"] > 0, usage
    assert usage["prompt_seconds"] + usage["decode_seconds"] <= wall, (usage, wall)
    whole = asyncio.run(backend.complete(request(max_tokens=5))).usage.model_dump()
    assert whole["decode_seconds"] > 0 and whole["prompt_seconds"] > 0, whole
