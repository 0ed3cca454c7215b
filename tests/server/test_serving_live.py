"""The server under pressure, over real HTTP on the bundled model: requests without max_tokens run together
(KV blocks on demand), a pool that runs out preempts and resumes without changing any answer, and a request with
a vanishing temperature cannot hurt the requests beside it."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from glm_live import start_live_server

MODEL = "glm45-air-mini"


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory):
    """The bundled model with the server's default settings (8 concurrent sequences, compiled CPU kernels)."""
    server = start_live_server(tmp_path_factory.mktemp("bundled"), {})
    assert server.status()["state"] == "ready", server.status()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_pool_server(tmp_path_factory):
    """The bundled model with a KV pool of 384 tokens: four ~150-token sequences cannot all hold their blocks."""
    server = start_live_server(tmp_path_factory.mktemp("small-pool"), {"kv_cache_tokens": 384})
    assert server.status()["state"] == "ready", server.status()
    yield server
    server.stop()


async def stream_chat(client: httpx.AsyncClient, server, body: dict) -> dict:
    """One streamed completion, checked chunk by chunk: well-formed JSON, one role chunk first, [DONE] last."""
    chunks, done = [], False
    body = {"model": MODEL, **body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{server.api}/chat/completions", headers=server.headers, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, "data after [DONE]"
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            chunks.append(chunk)
    assert done, "the stream ended without [DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join((c["delta"].get("content") or "") + (c["delta"].get("reasoning_content") or "")
                   for chunk in chunks for c in chunk["choices"])
    finish = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    assert len(finish) == 1, finish
    usage = chunks[-1]["usage"]
    return {"text": text, "finish": finish[0], "usage": usage}


class StatusSampler:
    """Polls api/status in a thread while a test runs: what was running, queued and preempted at once."""

    def __init__(self, server) -> None:
        self.server, self.samples, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.server.status())
            time.sleep(0.05)

    def __enter__(self) -> StatusSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_concurrently(server, bodies: list[dict]) -> list[dict]:
    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*[stream_chat(client, server, body) for body in bodies])

    return asyncio.run(run())


def assert_pool_empty(server) -> None:
    status = server.wait_idle()
    assert status["active_requests"] == 0 and status["queued_requests"] == 0, status
    assert status["memory"]["kv_cache_blocks_used"] == 0, status


def test_16_requests_without_max_tokens_decode_together(bundled_server):
    bodies = [{"messages": [{"role": "user", "content": f"Write a Python function number {i}."}],
               "temperature": 0.7, "seed": i} for i in range(16)]
    with StatusSampler(bundled_server) as sampler:
        results = run_concurrently(bundled_server, bodies)
    context = bundled_server.status()["context_limit"]
    for result in results:
        assert result["finish"] in ("stop", "length"), result
        usage = result["usage"]
        assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] + usage["completion_tokens"] <= context
    most_running = max(s["active_requests"] for s in sampler.samples)
    # Reserving a whole context per request (the old admission) ran these one at a time.
    assert most_running >= 4, [s["active_requests"] for s in sampler.samples]
    assert_pool_empty(bundled_server)


def test_preempted_streams_equal_their_answers_alone(small_pool_server):
    bodies = [{"messages": [{"role": "user", "content": f"Tell me about module {name}."}], "temperature": 0,
               "max_tokens": 150, "ignore_eos": True} for name in ("os", "sys", "json", "re")]
    before = small_pool_server.status()["preemptions_total"]
    with StatusSampler(small_pool_server) as sampler:
        together = run_concurrently(small_pool_server, bodies)
    status = small_pool_server.status()
    assert status["preemptions_total"] > before, "the pool held everything: the test no longer preempts"
    assert any(s["preempted_requests"] for s in sampler.samples)
    alone = [run_concurrently(small_pool_server, [body])[0] for body in bodies]
    for shared, single in zip(together, alone, strict=True):
        assert shared["usage"]["completion_tokens"] == 150 and shared["finish"] == "length"
        assert shared["text"] == single["text"]
    assert_pool_empty(small_pool_server)


@pytest.mark.parametrize("setting", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-45},
                                     {"temperature": 1e-40}, {"top_p": 1e-300}])
def test_a_vanishing_temperature_answers_and_hurts_no_stream_beside_it(bundled_server, setting):
    long_body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 300, "ignore_eos": True,
                 "temperature": 0.8, "seed": 3}
    tiny_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **setting}

    async def run() -> tuple[dict, list[dict]]:
        async with httpx.AsyncClient(timeout=600) as client:
            long_task = asyncio.create_task(stream_chat(client, bundled_server, long_body))
            await asyncio.sleep(0.2)  # the long stream is decoding when the others arrive
            tiny = await asyncio.gather(*[stream_chat(client, bundled_server, tiny_body) for _ in range(3)])
            return await long_task, tiny

    long_result, tiny_results = asyncio.run(run())
    assert long_result["usage"]["completion_tokens"] == 300 and long_result["finish"] == "length"
    for result in tiny_results:
        assert result["finish"] in ("stop", "length") and result["usage"]["completion_tokens"] >= 1
    greedy = run_concurrently(bundled_server, [{**tiny_body, "temperature": 0, "top_p": 1}])[0]
    assert tiny_results[0]["text"] == greedy["text"]  # a vanishing temperature is greedy
    assert_pool_empty(bundled_server)
