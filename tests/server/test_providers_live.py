"""Providers across live servers: server A serves the scripted checkpoint; server B has the providers `local` (its
own engine), `gpu` (kind workbench -> A), `hosted` (kind openai, dialect zai, a loopback fake replaying Z.ai's
wire format, priced) and `nokey` (its key's variable unset). The official `openai` and `anthropic` clients talk to
B only; everything reaches A or the fake through B's providers, routing traces included, and no key leaks.

Module-scoped servers (two engines of the tiny scripted model): the whole file takes seconds, not minutes.
"""

from __future__ import annotations

import json
import secrets
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from fake_upstream import JSONHandler
from glm_live import MODEL, THINK_QUESTION, TOOL_QUESTION, TOOLS, start_live_server

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "providers" / "zai.json").read_text())
ENGINE = {"kernels": "torch", "cpu_kernels": "torch"}
HOSTED_PRICES = {"input": 0.2, "output": 1.1, "currency": "USD"}
ANTHROPIC_WEATHER = {"name": "get_weather", "description": "Get the weather for a city",
                     "input_schema": TOOLS[0]["function"]["parameters"]}


class ZaiUpstream:
    """A loopback endpoint answering in Z.ai's wire format (the recorded stream and answer); "rate-limit" gets a
    429 with Retry-After, "echo" an answer that repeats the key it was sent."""

    def __init__(self) -> None:
        self.keys_seen: set[str] = set()
        self.bodies: list[dict] = []
        upstream = self

        class Handler(JSONHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                upstream.bodies.append(body)
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                upstream.keys_seen.add(key)
                prompt = body["messages"][-1]["content"]
                if prompt == "rate-limit":
                    data = json.dumps({"error": {"code": "1302", "message": "rate limit reached"}}).encode()
                    self.send_response(429)
                    self.send_header("Retry-After", "17")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    self.wfile.write("\n".join(FIXTURE["stream"]).encode())
                else:
                    whole = json.loads(json.dumps(FIXTURE["whole"]))
                    if prompt == "echo":
                        whole["choices"][0]["message"]["content"] = f"your key is {key}"
                    self._json(200, whole)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/api/paas/v4"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hosted_key() -> str:
    return "zai-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def server_a(scripted_checkpoint, tmp_path_factory):
    server = start_live_server(tmp_path_factory.mktemp("providers-a"), {
        "model_path": str(scripted_checkpoint), **ENGINE}, token="a-" + secrets.token_hex(12))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hosted():
    upstream = ZaiUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def server_b(server_a, hosted, hosted_key, scripted_checkpoint, tmp_path_factory):
    providers = [
        {"name": "local", "kind": "local", "model_path": str(scripted_checkpoint)},
        {"name": "gpu", "kind": "workbench", "base_url": server_a.url + "/", "api_key_env": "WB_TEST_GPU_TOKEN"},
        {"name": "hosted", "kind": "openai", "dialect": "zai", "base_url": hosted.url, "api_key_env":
            "WB_TEST_HOSTED_KEY", "models": [{"name": "glm-4.5-air", "prices": HOSTED_PRICES}]},
        {"name": "nokey", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "models": ["m"],
         "api_key_env": "WB_TEST_UNSET_KEY"},
    ]
    folder = tmp_path_factory.mktemp("providers-b")
    (folder / "providers.json").write_text(json.dumps(providers))
    server = start_live_server(folder, {"providers_file": str(folder / "providers.json"), "presets": False,
                                        **ENGINE},
                               env={"WB_TEST_GPU_TOKEN": server_a.token, "WB_TEST_HOSTED_KEY": hosted_key},
                               token="b-" + secrets.token_hex(12))
    yield server
    server.stop()


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=server.token, max_retries=0, timeout=120)


def test_one_model_list_of_every_provider(server_b):
    listing = httpx.get(f"{server_b.api}/models", headers=server_b.headers, timeout=30).json()
    cards = {card["id"]: card for card in listing["data"]}
    assert list(cards) == ["local/ckpt", "gpu/local/ckpt", "hosted/glm-4.5-air", "nokey/m"]
    assert [card["owned_by"] for card in cards.values()] == ["local", "gpu", "hosted", "nokey"]
    local, remote, priced, unkeyed = (card["workbench"] for card in cards.values())
    assert local == {"provider": "local", "provider_kind": "local", "dialect": None, "model": MODEL,
                     "context_length": local["context_length"],
                     "capabilities": ["thinking", "tools", "routing", "thinking_budget"],
                     "prices": None, "free": False, "state": "ready"}
    assert local["context_length"] > 0
    assert remote["provider_kind"] == "workbench" and remote["model"] == "local/ckpt"
    assert remote["capabilities"] == ["thinking", "tools", "routing", "thinking_budget"] and remote["state"] == "ready"
    assert remote["context_length"] == local["context_length"]  # A's own figure, passed through
    assert priced["dialect"] == "zai" and priced["prices"] == {**HOSTED_PRICES, "per_tokens": 1_000_000}
    assert priced["free"] is False and priced["state"] == "ready"
    assert unkeyed["state"] == "key_missing"


def test_the_openai_client_chats_with_both_models_through_b(server_b):
    client = openai_client(server_b)
    for model in ("local/ckpt", "gpu/local/ckpt"):
        answer = client.chat.completions.create(model=model, messages=THINK_QUESTION, temperature=0, max_tokens=32,
                                                extra_body={"thinking": {"type": "enabled"}})
        assert answer.model == model
        assert answer.choices[0].message.content == "Hello!"
        assert answer.choices[0].message.reasoning_content == "The user greets me."
        assert getattr(answer.usage, "cost", None) is None  # an engine's answer: tokens and time, no cost
        stream = client.chat.completions.create(model=model, messages=TOOL_QUESTION, tools=TOOLS, temperature=0,
                                                max_tokens=64, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        calls = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
        assert calls[0].function.name == "get_weather"
        assert json.loads("".join(call.function.arguments or "" for call in calls)) == {"city": "Paris", "days": 2}
        assert {chunk.model for chunk in chunks} == {model} and chunks[-1].usage.completion_tokens > 0


def test_a_routing_trace_of_as_model_is_served_by_b_as_a_recorded_it(server_a, server_b):
    client = openai_client(server_b)
    answer = client.chat.completions.create(model="gpu/local/ckpt", messages=THINK_QUESTION, temperature=0,
                                            max_tokens=16, extra_body={"routing": True})
    via_b = httpx.get(f"{server_b.url}/glm/api/routing/{answer.id}", headers=server_b.headers, timeout=30)
    at_a = httpx.get(f"{server_a.url}/glm/api/routing/{answer.id}", headers=server_a.headers, timeout=30)
    assert via_b.status_code == at_a.status_code == 200
    assert via_b.json() == at_a.json() and via_b.json()["completion_id"] == answer.id
    # B's own engine keeps its own traces; a made-up id is a 404 on B too
    own = client.chat.completions.create(model="local/ckpt", messages=THINK_QUESTION, temperature=0, max_tokens=8,
                                         extra_body={"routing": True})
    assert httpx.get(f"{server_b.url}/glm/api/routing/{own.id}", headers=server_b.headers,
                     timeout=30).json()["completion_id"] == own.id
    missing = httpx.get(f"{server_b.url}/glm/api/routing/chatcmpl-nope", headers=server_b.headers, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "routing_trace_not_found"
    with pytest.raises(openai.BadRequestError) as refused:  # a model without the routing capability says so
        client.chat.completions.create(model="hosted/glm-4.5-air", messages=THINK_QUESTION,
                                       extra_body={"routing": True})
    assert refused.value.param == "routing"


def test_hosted_answers_carry_their_cost_and_upstream_errors_pass_on(server_b, hosted):
    client = openai_client(server_b)
    whole = client.chat.completions.create(model="hosted/glm-4.5-air", messages=TOOL_QUESTION, tools=TOOLS,
                                           extra_body={"thinking": {"type": "enabled"}})
    assert hosted.bodies[-1]["thinking"] == {"type": "enabled"} and hosted.bodies[-1]["model"] == "glm-4.5-air"
    assert whole.choices[0].message.reasoning_content == "The user asks for the weather."
    assert whole.usage.cost == {"input": 0.000036, "output": 0.0000462, "total": 0.0000822, "currency": "USD"}
    stream = list(client.chat.completions.create(model="hosted/glm-4.5-air", messages=TOOL_QUESTION, tools=TOOLS,
                                                  stream=True, stream_options={"include_usage": True}))
    assert stream[-1].usage.cost["total"] == pytest.approx(0.0000822)
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in stream if c.choices) == \
        "The user asks for the weather."
    limited = httpx.post(f"{server_b.api}/chat/completions", headers=server_b.headers, timeout=30, json={
        "model": "hosted/glm-4.5-air", "messages": [{"role": "user", "content": "rate-limit"}]})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "17"
    assert "rate limit reached" in limited.json()["error"]["message"]
    unkeyed = httpx.post(f"{server_b.api}/chat/completions", headers=server_b.headers, timeout=30, json={
        "model": "nokey/m", "messages": [{"role": "user", "content": "hi"}]})
    assert unkeyed.status_code == 503 and "WB_TEST_UNSET_KEY" in unkeyed.json()["error"]["message"]


def test_the_anthropic_client_through_a_workbench_provider(server_b):
    client = anthropic.Anthropic(base_url=f"{server_b.url}/glm/anthropic", auth_token=server_b.token, api_key=None,
                                 max_retries=0, timeout=120)
    greedy = {"model": "gpu/local/ckpt", "thinking": {"type": "enabled", "budget_tokens": 32},
              "extra_body": {"temperature": 0}}
    with client.messages.stream(**greedy, max_tokens=64, messages=THINK_QUESTION) as stream:
        deltas = {event.delta.type for event in stream if event.type == "content_block_delta"}
        final = stream.get_final_message()
    assert deltas == {"thinking_delta", "text_delta"} and final.model == "gpu/local/ckpt"
    assert [block.type for block in final.content] == ["thinking", "text"] and final.content[1].text == "Hello!"
    asked = client.messages.create(**greedy, max_tokens=96, messages=TOOL_QUESTION, tools=[ANTHROPIC_WEATHER])
    call = asked.content[-1]
    assert asked.stop_reason == "tool_use" and call.input == {"city": "Paris", "days": 2}
    history = [*TOOL_QUESTION, {"role": "assistant", "content": [block.model_dump(exclude_none=True)
                                                                 for block in asked.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "sunny, 24 C"}]}]
    answer = client.messages.create(**greedy, max_tokens=64, messages=history, tools=[ANTHROPIC_WEATHER])
    assert answer.content[-1].text == "Sunny in Paris." and answer.stop_reason == "end_turn"


def test_status_shows_every_provider_and_no_key_anywhere(server_a, server_b, hosted, hosted_key):
    status = server_b.status()
    assert status["provider"] == "local" and status["backend"] == "local" and status["state"] == "ready"
    states = {entry["name"]: entry for entry in status["providers"]}
    assert {name: entry["state"] for name, entry in states.items()} == {
        "local": "ready", "gpu": "ready", "hosted": "ready", "nokey": "key_missing"}
    assert states["nokey"]["key_env"] == "WB_TEST_UNSET_KEY" and "WB_TEST_UNSET_KEY" in states["nokey"]["error"]
    assert states["hosted"]["dialect"] == "zai" and states["gpu"]["models"] == ["gpu/local/ckpt"]
    echoed = httpx.post(f"{server_b.api}/chat/completions", headers=server_b.headers, timeout=30, json={
        "model": "hosted/glm-4.5-air", "messages": [{"role": "user", "content": "echo"}]})
    assert echoed.json()["choices"][0]["message"]["content"] == "your key is ***"
    assert hosted.keys_seen == {hosted_key}  # the key did reach the endpoint it belongs to
    texts = [json.dumps(status), echoed.text, server_b.log_text(),
             httpx.get(f"{server_b.api}/models", headers=server_b.headers, timeout=30).text]
    for secret in (hosted_key, server_a.token):
        assert all(secret not in text for text in texts)


def test_token_counts_through_a_workbench_provider_are_as_own(server_a, server_b):
    """B counts A's model's prompt by asking A (glm/api/count_tokens), so a context meter or Anthropic's
    count_tokens on B gives the number A's own tokenizer and template give; a model that cannot count says so."""
    body = {"messages": TOOL_QUESTION, "tools": TOOLS}
    at_a = httpx.post(f"{server_a.url}/glm/api/count_tokens", headers=server_a.headers, timeout=30,
                      json={"model": "local/ckpt", **body})
    through_b = httpx.post(f"{server_b.url}/glm/api/count_tokens", headers=server_b.headers, timeout=30,
                           json={"model": "gpu/local/ckpt", **body})
    assert at_a.status_code == 200 and through_b.status_code == 200, (at_a.text, through_b.text)
    assert through_b.json() == {"model": "gpu/local/ckpt", "prompt_tokens": at_a.json()["prompt_tokens"]}
    assert at_a.json()["prompt_tokens"] > 20
    client = anthropic.Anthropic(base_url=f"{server_b.url}/glm/anthropic", auth_token=server_b.token, api_key=None,
                                 max_retries=0, timeout=60)
    counted = client.messages.count_tokens(model="gpu/local/ckpt", messages=THINK_QUESTION)
    at_a_door = anthropic.Anthropic(base_url=f"{server_a.url}/glm/anthropic", auth_token=server_a.token,
                                    api_key=None, max_retries=0, timeout=60)
    # the Anthropic door renders thinking off unless asked (its /nothink turn), so it is compared with A's own door
    assert counted.input_tokens == at_a_door.messages.count_tokens(model="local/ckpt",
                                                                   messages=THINK_QUESTION).input_tokens
    hosted = httpx.post(f"{server_b.url}/glm/api/count_tokens", headers=server_b.headers, timeout=30,
                        json={"model": "hosted/glm-4.5-air", **body})
    assert hosted.status_code == 400 and "tokenizer" in hosted.json()["error"]["message"]
