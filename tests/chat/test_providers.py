"""Providers (workbench.chat.providers) without a server: each dialect's wire format replayed by a fake upstream
(tests/fixtures/providers/, one recorded example per dialect with its sources), thinking translated both ways,
errors passed on, keys never sent when missing, model ids, presets, prices and configuration errors.

Every upstream here is an `httpx.MockTransport` (nothing leaves the process) or, for "connection refused", a
loopback port nobody listens on; base URLs point at loopback so that a transport left out by mistake cannot
reach a real host either.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from pathlib import Path

import httpx
import pytest

from workbench.chat.backends.base import fold_chunks
from workbench.chat.protocol import APIError, parse_request
from workbench.chat.providers import PRESETS, ErrorProvider, Prices, ProviderRegistry, build_providers

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
DIALECTS = ["zai", "openrouter", "vllm", "sglang", "llama-server", "ollama", "openai"]
LOOPBACK = "http://127.0.0.1:9/v1"  # discard port: a request that escaped the mock transport goes nowhere
KEY_ENV = "WB_TEST_PROVIDER_KEY"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
PRICES = {"input": 0.2, "output": 1.1, "currency": "USD"}


def sync(test):
    """An async test run on its own event loop (as the other chat-layer tests do with asyncio.run)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


def fixture(dialect: str) -> dict:
    return json.loads((FIXTURES / f"{dialect}.json").read_text())


class FakeUpstream:
    """A mock transport answering like an endpoint of one dialect; it records every request it is sent."""

    def __init__(self, dialect: str = "openai", answer=None) -> None:
        self.data = fixture(dialect)
        self.requests: list[httpx.Request] = []
        self.answer = answer

    @property
    def bodies(self) -> list[dict]:
        return [json.loads(request.content) for request in self.requests if request.content]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answer is not None:
            return self.answer(request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "glm-4.5-air", "object": "model", "created": 1753689070, "owned_by": "library"}]})
        body = json.loads(request.content)
        if body.get("stream"):
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content="\n".join(self.data["stream"]).encode())
        return httpx.Response(200, json=self.data["whole"])

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


def registry(configs: list[dict], upstream: FakeUpstream | None = None, presets: bool = False,
             environ: dict | None = None) -> ProviderRegistry:
    return ProviderRegistry(build_providers(
        configs, local_backend=lambda options: pytest.fail("no local provider here"), presets=presets,
        environ=environ or {}, transport=upstream.transport() if upstream else httpx.MockTransport(
            lambda request: pytest.fail(f"nothing may be sent here: {request.url}"))))


def provider(dialect: str = "openai", models=("glm-4.5-air",), **extra) -> dict:
    return {"name": "up", "kind": "openai", "dialect": dialect, "base_url": LOOPBACK,
            "models": models if isinstance(models, str) else list(models),
            **extra}


def request(model: str = "up/glm-4.5-air", **fields):
    return parse_request({"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}],
                          "tools": [WEATHER], **fields})


async def collect(reg: ProviderRegistry, req) -> list:
    return [chunk async for chunk in reg.stream(req)]


# ------------------------------------------------------------------------------------------------ dialects


@pytest.mark.parametrize("dialect", DIALECTS)
@sync
async def test_each_dialect_is_translated_both_ways(dialect, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-dialect")
    upstream = FakeUpstream(dialect)
    data = upstream.data
    reg = registry([provider(dialect, prices={"glm-4.5-air": PRICES}, api_key_env=KEY_ENV)], upstream)
    await reg.start()
    chunks = await collect(reg, request(thinking={"type": "enabled"}, stream=True,
                                        stream_options={"include_usage": True}))
    sent = upstream.bodies[-1]
    # the request: the dialect's own thinking switch, and nothing of the others'
    for name, value in data["thinking_on"].items():
        assert sent[name] == value
    others = {"thinking", "reasoning", "chat_template_kwargs", "reasoning_effort"} - set(data["thinking_on"])
    assert not others & set(sent), sent
    assert sent["model"] == "glm-4.5-air" and sent["stream"] is True
    assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-test-dialect"
    # the answer: reasoning as reasoning_content whatever the dialect named it, tool calls folded, the id echoed
    expected_reasoning = "" if dialect == "openai" else "The user asks for the weather."
    reasoning = "".join(c.choices[0].delta.reasoning_content or "" for c in chunks if c.choices)
    assert reasoning == expected_reasoning
    assert all("reasoning" not in (c.choices[0].delta.model_extra or {}) for c in chunks if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check."
    assert {c.model for c in chunks} == {"up/glm-4.5-air"}
    usage = chunks[-1].usage
    assert usage.prompt_tokens == 180 and usage.completion_tokens == 42
    assert usage.cost == {"input": 0.000036, "output": 0.0000462, "total": 0.0000822, "currency": "USD"}
    folded = await fold_chunks(reg.stream(request(stream=True, thinking={"type": "enabled"})))
    call = folded.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris",
                                                                                            "days": 2}
    assert folded.choices[0].finish_reason == "tool_calls"
    # thinking off, whole answer
    whole = await reg.complete(request(thinking={"type": "disabled"}))
    for name, value in data["thinking_off"].items():
        assert upstream.bodies[-1][name] == value
    message = whole.choices[0].message
    assert (message.reasoning_content or "") == expected_reasoning and message.content == "Let me check."
    assert "reasoning" not in (message.model_extra or {}) and "reasoning_details" not in (message.model_extra or {})
    assert whole.model == "up/glm-4.5-air" and whole.usage.cost["total"] == pytest.approx(0.0000822)
    # no thinking asked for: no switch sent (the model decides)
    await reg.complete(request())
    assert not {"thinking", "reasoning", "chat_template_kwargs", "reasoning_effort"} & set(upstream.bodies[-1])
    await reg.close()


def test_every_dialect_has_a_fixture_naming_its_sources():
    for dialect in DIALECTS:
        data = fixture(dialect)
        assert data["dialect"] == dialect and data["sources"] and all("http" in s for s in data["sources"])
        assert data["stream"][-2] == "data: [DONE]"


# --------------------------------------------------------------------------------------------- keys, presets


@sync
async def test_a_missing_key_sends_nothing_and_says_which_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    upstream = FakeUpstream()
    reg = registry([provider(api_key_env=KEY_ENV), {**provider(models="auto", api_key_env=KEY_ENV), "name": "auto"}],
                   upstream)
    await reg.start()
    for req in (request(), request(stream=True)):
        with pytest.raises(APIError) as caught:
            await collect(reg, req) if req.stream else await reg.complete(req)
        assert caught.value.status == 503 and caught.value.code == "api_key_missing"
        assert KEY_ENV in caught.value.message
    with pytest.raises(APIError) as caught:
        await reg.complete(request("auto/glm-4.5-air"))
    assert caught.value.status == 503 and KEY_ENV in caught.value.message
    await reg.list_models()
    assert upstream.requests == []  # not one request: no key, no traffic
    status = {entry["name"]: entry for entry in reg.status()["providers"]}
    assert status["up"]["state"] == status["auto"]["state"] == "key_missing"
    assert status["up"]["key_env"] == KEY_ENV and KEY_ENV in status["up"]["error"]
    assert [card.workbench["state"] for card in reg.models()] == ["key_missing"]


def test_presets_join_only_with_their_key():
    assert registry([{"name": "x", **provider()}], presets=True, environ={}).status()["providers"][1:] == []
    reg = registry([provider()], presets=True, environ={"OPENROUTER_API_KEY": "sk-or", "ZAI_API_KEY": "sk-z"})
    ids = [card.id for card in reg.models()]
    assert ids == ["up/glm-4.5-air", "zai/glm-4.5-air", "openrouter/z-ai/glm-4.5-air:free",
                   "openrouter/z-ai/glm-4.5-air"]
    cards = {card.id: card.workbench for card in reg.models()}
    assert cards["openrouter/z-ai/glm-4.5-air:free"]["free"] is True
    assert cards["openrouter/z-ai/glm-4.5-air:free"]["prices"]["input"] == 0
    assert cards["zai/glm-4.5-air"]["prices"] == {"input": 0.2, "output": 1.1, "currency": "USD",
                                                  "per_tokens": 1_000_000}
    assert cards["zai/glm-4.5-air"]["dialect"] == "zai" and cards["openrouter/z-ai/glm-4.5-air"]["dialect"] == \
        "openrouter"
    assert PRESETS["zhipu"]["models"][0]["prices"] == {"input": 0.8, "output": 2.0, "currency": "CNY"}
    # a configured provider named like a preset starts from it
    reg = registry([{"name": "zai", "models": ["glm-4.5"]}], presets=True, environ={})
    card = reg.models()[0]
    assert card.id == "zai/glm-4.5" and card.workbench["dialect"] == "zai"
    assert reg.status()["providers"][0]["base_url"] == "https://api.z.ai/api/paas/v4"


@sync
async def test_presets_point_at_their_hosts_but_tests_reach_only_the_fake(monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test")
    upstream = FakeUpstream("openrouter")
    reg = registry([], upstream, presets=True, environ={"OPENROUTER_API_KEY": "sk-or-test"})
    answer = await reg.complete(request("z-ai/glm-4.5-air:free", thinking={"type": "enabled"}))
    assert str(upstream.requests[0].url) == "https://openrouter.ai/api/v1/chat/completions"  # answered by the mock
    assert upstream.bodies[0]["reasoning"] == {"enabled": True}
    assert answer.model == "z-ai/glm-4.5-air:free"
    assert answer.usage.cost == {"input": 0.0, "output": 0.0, "total": 0.0, "currency": "USD"}  # not OpenRouter's


# ------------------------------------------------------------------------------------------------- errors


def answering(status: int, headers: dict | None = None, body: dict | None = None):
    return lambda request: httpx.Response(status, headers=headers or {}, json=body or {
        "error": {"message": f"upstream says {status}", "code": str(status)}})


@pytest.mark.parametrize(("status", "headers", "expected"), [
    (401, {}, 401), (429, {"Retry-After": "7"}, 429), (500, {}, 502), (503, {"Retry-After": "30"}, 502)])
@sync
async def test_upstream_errors_are_passed_on(status, headers, expected, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-secret-value-123")
    upstream = FakeUpstream(answer=answering(status, headers, {"error": {
        "message": "bad key sk-secret-value-123", "code": "x"}}))
    reg = registry([provider(api_key_env=KEY_ENV)], upstream)
    for req in (request(), request(stream=True)):
        with pytest.raises(APIError) as caught:
            await collect(reg, req) if req.stream else await reg.complete(req)
        error = caught.value
        assert error.status == expected and str(status) in error.message
        assert "sk-secret-value-123" not in error.message and "***" in error.message
        assert error.headers.get("Retry-After") == headers.get("Retry-After")


@sync
async def test_a_refused_connection_makes_the_provider_unreachable():
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reg = ProviderRegistry(build_providers([{**provider(), "base_url": f"http://127.0.0.1:{port}/v1"}],
                                           local_backend=lambda options: None, presets=False, environ={}))
    with pytest.raises(APIError) as caught:
        await reg.complete(request())
    assert caught.value.status == 502 and caught.value.code == "upstream_unavailable"
    entry = reg.status()["providers"][0]
    assert entry["state"] == "unreachable" and f"127.0.0.1:{port}" in entry["error"]
    await reg.close()


class _CutStream(httpx.AsyncByteStream):
    def __init__(self, lines: list[str], fail: bool) -> None:
        self.lines, self.fail = lines, fail

    async def __aiter__(self):
        for line in self.lines:
            yield (line + "\n").encode()
            await asyncio.sleep(0)
        if self.fail:
            raise httpx.ReadError("connection reset by peer")


@pytest.mark.parametrize("fail", [False, True], ids=["ends-early", "connection-drops"])
@sync
async def test_a_stream_that_stops_midway_ends_with_an_error(fail):
    data = fixture("vllm")
    first_half = data["stream"][:8]  # reasoning and content, no finish_reason, no [DONE]
    upstream = FakeUpstream(answer=lambda request: httpx.Response(
        200, headers={"Content-Type": "text/event-stream"}, stream=_CutStream(first_half, fail)))
    reg = registry([provider("vllm")], upstream)
    received = []
    with pytest.raises(APIError) as caught:
        async for chunk in reg.stream(request(stream=True)):
            received.append(chunk)
    assert caught.value.status == 502
    assert caught.value.code == ("upstream_unavailable" if fail else "upstream_stream_cut")
    assert "".join(c.choices[0].delta.reasoning_content or "" for c in received if c.choices) == \
        "The user asks for the weather."


# ------------------------------------------------------------------------------------------- ids and lists


@sync
async def test_ids_bare_names_and_clear_errors():
    upstream = FakeUpstream()
    reg = registry([provider(), {**provider(), "name": "other", "models": ["glm-4.5-air", "glm-4.5"]}], upstream)
    assert (await reg.complete(request("other/glm-4.5"))).model == "other/glm-4.5"
    assert upstream.bodies[-1]["model"] == "glm-4.5"
    assert (await reg.complete(request("glm-4.5"))).model == "glm-4.5"  # bare and unambiguous: echoed as sent
    with pytest.raises(APIError) as caught:
        await reg.complete(request("glm-4.5-air"))
    assert caught.value.status == 404 and "up/glm-4.5-air" in caught.value.message and \
        "other/glm-4.5-air" in caught.value.message
    with pytest.raises(APIError) as caught:
        await reg.complete(request("nope"))
    assert caught.value.status == 404 and caught.value.param == "model"
    assert "up/glm-4.5-air, other/glm-4.5-air, other/glm-4.5" in caught.value.message
    with pytest.raises(APIError) as caught:
        await reg.complete(request(routing=True))
    assert caught.value.status == 400 and caught.value.param == "routing"


@sync
async def test_auto_reads_the_endpoints_model_list():
    upstream = FakeUpstream("ollama")
    reg = registry([{**provider("ollama"), "models": "auto", "context_length": 65536}], upstream)
    assert reg.status()["providers"][0]["state"] == "loading"
    await reg.start()
    await reg.default.start()
    cards = await reg.list_models()
    assert [card.id for card in cards] == ["up/glm-4.5-air"] and cards[0].created == 1753689070
    assert cards[0].workbench["context_length"] == 65536 and cards[0].workbench["state"] == "ready"
    assert str(upstream.requests[0].url) == "http://127.0.0.1:9/v1/models"
    await reg.complete(request(thinking={"type": "enabled"}))
    assert upstream.bodies[-1]["reasoning_effort"] == "medium"


@pytest.mark.parametrize(("config", "says"), [
    ({"name": "a/b", "kind": "openai"}, "name 'a/b'"),
    ({"name": "x", "kind": "gpu"}, "kind 'gpu'"),
    ({"name": "x", "kind": "openai", "base_url": "ftp://h"}, "base_url"),
    ({**provider(), "dialect": "deepseek"}, "dialect 'deepseek'"),
    ({**provider(), "api_key_env": "sk-live-123"}, "NAME of an environment variable"),
    ({**provider(), "models": []}, "models must be"),
    ({**provider(), "modles": ["x"]}, "unknown field(s) modles"),
    ({**provider(), "prices": {"input": 1, "output": 2}}, "map each model name"),
    ({**provider(), "prices": {"glm-4.5-air": {"input": -1, "output": 2}}}, "prices.input"),
    ({**provider(), "models": [{"name": "m", "capabilities": ["vision"]}]}, "capabilities"),
])
def test_bad_configurations_are_errors_that_say_what_to_fix(config, says):
    reg = registry([config, {**provider(), "name": "fine"}])
    broken = reg.providers[0]
    assert isinstance(broken, ErrorProvider) and says in broken.error, broken.error
    assert [card.id for card in reg.models()] == ["fine/glm-4.5-air"]
    assert reg.status()["providers"][0]["state"] == "error"


def test_prices_and_cost():
    prices = Prices.parse({"input": 0.8, "output": 2, "currency": "CNY"}, "t")
    assert prices.cost(1_000_000, 500_000) == {"input": 0.8, "output": 1.0, "total": 1.8, "currency": "CNY"}
    assert Prices.parse({"input": 0, "output": 0}, "t").free
    assert not prices.free


class _StubEngineBackend:
    """What a local provider needs of its engine backend: an id, a state, start, a stream (no model loaded)."""

    kind = "local"

    def __init__(self, name: str) -> None:
        self.model_id, self.state, self.starts = name, "stopped", 0

    async def start(self) -> None:
        self.starts += 1
        self.state = "ready"

    async def close(self) -> None:
        self.state = "stopped"

    def status(self) -> dict:
        return {"backend": "local", "model": self.model_id, "state": self.state}

    def routing_trace(self, completion_id: str):
        return {"completion_id": completion_id} if completion_id == f"{self.model_id}-id" else None

    async def complete(self, request):
        from workbench.chat.protocol import ChatCompletion, Choice, ResponseMessage

        return ChatCompletion(id=f"{self.model_id}-id", model=request.model,
                              choices=[Choice(message=ResponseMessage(content=f"from {request.model}"))])


@sync
async def test_a_second_engine_loads_when_first_asked_for():
    engines: dict[str, _StubEngineBackend] = {}

    def local_backend(options):
        engines[options["model_path"]] = _StubEngineBackend(options["model_path"])
        return engines[options["model_path"]]

    reg = ProviderRegistry(build_providers(
        [provider(), {"name": "local", "kind": "local", "model_path": "small"},
         {"name": "big", "kind": "local", "model_path": "large"}],
        local_backend=local_backend, presets=False, environ={}))
    assert [p.name for p in reg.providers] == ["local", "big", "up"]  # engines first, in their order
    assert [card.workbench["state"] for card in reg.models()][:2] == ["loading", "idle"]
    await reg.start()
    await asyncio.sleep(0)
    assert engines["small"].starts == 1 and engines["large"].starts == 0
    answer = await reg.complete(request("big/large"))
    assert answer.choices[0].message.content == "from large" and answer.model == "big/large"
    assert engines["large"].starts == 1 and reg.status()["providers"][1]["state"] == "ready"
    assert answer.usage is None or answer.usage.cost is None
    assert await reg.fetch_routing_trace("large-id") == {"completion_id": "large-id"}
    assert reg.status()["provider"] == "local"


@sync
async def test_an_endpoint_that_comes_back_is_listed_again(monkeypatch):
    monkeypatch.setattr("workbench.chat.providers.LISTING_RETRY_SECONDS", 0.0)
    down = {"now": True}
    upstream = FakeUpstream("vllm")
    normal = upstream.handle

    def answer(request: httpx.Request) -> httpx.Response:
        if down["now"]:
            raise httpx.ConnectError("connection refused")
        return normal(request)

    reg = registry([{**provider("vllm"), "models": "auto"}], FakeUpstream(answer=answer))
    assert await reg.list_models() == []
    entry = reg.status()["providers"][0]
    assert entry["state"] == "unreachable" and "connection refused" in entry["error"]
    down["now"] = False
    assert [card.id for card in await reg.list_models()] == ["up/glm-4.5-air"]
    assert reg.status()["providers"][0]["state"] == "ready" and reg.status()["providers"][0]["error"] is None


@sync
async def test_vllm_counts_tokens_with_its_tokenize_endpoint():
    """vLLM serves `POST /tokenize` beside `v1/` (chat messages in, `count` out); other dialects have no such API
    and say so without sending anything."""
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/tokenize"
        return httpx.Response(200, json={"count": 42, "max_model_len": 131072, "tokens": list(range(42))})

    upstream = FakeUpstream("vllm", answer=answer)
    reg = registry([provider("vllm")], upstream)
    assert await reg.count_prompt_tokens(request()) == 42
    sent = upstream.bodies[-1]
    assert sent["model"] == "glm-4.5-air" and sent["messages"][0]["content"] == "Weather in Paris?"
    assert sent["add_generation_prompt"] is True and sent["tools"][0]["function"]["name"] == "get_weather"
    broken = registry([provider("vllm")], FakeUpstream("vllm", answer=lambda r: httpx.Response(200, json={})))
    with pytest.raises(APIError) as missing:
        await broken.count_prompt_tokens(request())
    assert missing.value.status == 502 and "count" in missing.value.message
    with pytest.raises(APIError) as unsupported:
        await registry([provider("zai")]).count_prompt_tokens(request())
    assert unsupported.value.status == 400 and "tokenizer" in unsupported.value.message


@pytest.mark.parametrize(("dialect", "sent"), [
    ("openrouter", {"reasoning": {"enabled": True, "max_tokens": 64}}),
    ("zai", {"thinking": {"type": "enabled"}}),  # no budget knob there: it thinks as long as it likes
    ("vllm", {"chat_template_kwargs": {"enable_thinking": True}}),
])
@sync
async def test_a_thinking_budget_goes_where_the_dialect_can_take_it(dialect, sent):
    upstream = FakeUpstream(dialect)
    await fold_chunks(registry([provider(dialect)], upstream).stream(
        request(thinking={"type": "enabled", "budget_tokens": 64})))
    body = upstream.bodies[-1]
    assert {key: body[key] for key in sent} == sent


@sync
async def test_v1_models_says_which_models_honour_a_thinking_budget():
    """`thinking_budget` is listed where `thinking.budget_tokens` is honoured: our own engines, OpenRouter, a
    workbench provider whose server lists it; not a dialect that ignores the cap (Z.ai, vLLM), nor a workbench
    that does not list it."""
    def other_workbench(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/glm/v1/models"
        card = {"object": "model", "created": 1, "owned_by": "local"}
        return httpx.Response(200, json={"object": "list", "data": [
            {**card, "id": "local/ckpt", "workbench": {"capabilities": ["thinking", "tools", "thinking_budget"]}},
            {**card, "id": "old/ckpt", "workbench": {"capabilities": ["thinking", "tools"]}}]})

    reg = ProviderRegistry(build_providers(
        [{"name": "local", "kind": "local", "model_path": "small"},
         {**provider("openrouter"), "name": "router"}, {**provider("zai"), "name": "zai"},
         {**provider("vllm"), "name": "vllm"},
         {"name": "gpu", "kind": "workbench", "base_url": "http://127.0.0.1:9/"}],
        local_backend=lambda options: _StubEngineBackend(options["model_path"]), presets=False, environ={},
        transport=httpx.MockTransport(other_workbench)))
    await reg.start()
    await reg.providers[-1].refresh(force=True)
    honoured = {card.id: "thinking_budget" in card.workbench["capabilities"] for card in await reg.list_models()}
    assert honoured == {"local/small": True, "router/glm-4.5-air": True, "zai/glm-4.5-air": False,
                        "vllm/glm-4.5-air": False, "gpu/local/ckpt": True, "gpu/old/ckpt": False}
