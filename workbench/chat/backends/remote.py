"""The remote backend: any OpenAI-compatible GLM endpoint (Z.ai, Zhipu BigModel, OpenRouter, vLLM, SGLang,
llama.cpp's llama-server, Ollama, another workbench).

Owns the translation of our request into the endpoint's dialect and the pass-through of its answers:

- thinking, by `dialect` (DIALECTS; each one's wire format is recorded in tests/fixtures/providers/):
  Z.ai and Zhipu take `"thinking": {"type": ...}`; OpenRouter `"reasoning": {"enabled": ...}`; vLLM, SGLang
  and llama-server `"chat_template_kwargs": {"enable_thinking": ...}`; Ollama's OpenAI-compatible endpoint
  `"reasoning_effort"` ("none" switches thinking off); a plain OpenAI endpoint gets nothing. Answers that carry
  the reasoning as `reasoning` (OpenRouter, Ollama, vLLM since it renamed the field) reach our clients as
  `reasoning_content`, whole or streamed;
- streaming: the endpoint's server-sent chunks are passed on as they come, tool-call deltas untouched; closing
  our stream closes the upstream connection, which cancels the generation there; a stream that ends before
  any finish_reason (a cut connection) ends ours with a 502 error event instead of a silently short answer;
- another workbench (`dialect="workbench"`) also takes our own fields (`routing`), so a trace recorded there can
  be fetched from here (`fetch_routing_trace`);
- the API key is read from the environment variable *named* in the configuration, when a request is made, and
  sent only in the Authorization header. It is never stored on the object, logged, or put in an error: every
  string that comes back from the endpoint (errors, whole answers, every field of every stream chunk, keys of
  objects too) has the key masked as `***` before it goes anywhere, in any letter case and in its simple
  encodings (URL-encoded, percent-encoded byte by byte, hex, base64 at any alignment). In a stream, the text
  fields (content, reasoning, tool-call arguments) hold back a tail that could be the start of the key until the
  next chunk shows it is not, so a key split over chunks is masked too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, quote_plus, urlparse

import httpx

from workbench.chat.backends.base import Backend, Throughput
from workbench.chat.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    sse_data,
)

log = logging.getLogger(__name__)

THINKING_FIELD_HOSTS = ("z.ai", "bigmodel.cn")  # hosted GLM APIs that take the `thinking` field
# Our own extensions and compatibility fields, never forwarded as they are.
_NOT_FORWARDED = {"routing", "thinking", "chat_template_kwargs", "model", "n"}
DIALECTS = ("zai", "openrouter", "vllm", "sglang", "llama-server", "ollama", "openai", "workbench")
_STYLE_DIALECTS = {"thinking": "zai", "chat_template_kwargs": "vllm"}  # the old thinking_style setting


def thinking_fields(dialect: str, enable: bool, budget: int | None = None) -> dict[str, Any]:
    """The request fields that switch thinking on or off at an endpoint of this dialect (and cap it, where the
    endpoint can: another workbench, OpenRouter; the others have no budget and think as long as they like)."""
    if dialect == "workbench":  # our own: the Z.ai field plus the budget the engine enforces
        return {"thinking": {"type": "enabled" if enable else "disabled",
                             **({"budget_tokens": budget} if enable and budget else {})}}
    if dialect == "zai":  # Z.ai / Zhipu API reference: thinking.type enabled | disabled
        return {"thinking": {"type": "enabled" if enable else "disabled"}}
    if dialect == "openrouter":  # openrouter.ai/docs/use-cases/reasoning-tokens: reasoning.enabled, .max_tokens
        return {"reasoning": {"enabled": enable, **({"max_tokens": budget} if enable and budget else {})}}
    if dialect in ("vllm", "sglang", "llama-server"):  # the chat template's own switch, passed through
        return {"chat_template_kwargs": {"enable_thinking": enable}}
    if dialect == "ollama":  # docs.ollama.com/api/openai-compatibility: reasoning_effort, "none" = off
        return {"reasoning_effort": "medium" if enable else "none"}
    return {}  # plain OpenAI-compatible: no switch to send; the model decides


def reasoning_as_reasoning_content(message: Any) -> None:
    """A delta or message that carries its reasoning as `reasoning` (OpenRouter, Ollama, newer vLLM) gets it as
    `reasoning_content`, the one field our clients read; OpenRouter's `reasoning_details` (the same text again,
    structured) is dropped, so that the reasoning goes out once."""
    if not isinstance(message, dict):
        return
    reasoning = message.pop("reasoning", None)
    message.pop("reasoning_details", None)
    if isinstance(reasoning, str) and reasoning and not message.get("reasoning_content"):
        message["reasoning_content"] = reasoning


class RemoteBackend(Backend):
    kind = "remote"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, thinking_style: str = "auto",
                 timeout: float = 600.0, transport: httpx.AsyncBaseTransport | None = None,
                 dialect: str | None = None, models: list[str] | None = None,
                 routing_url: str | None = None) -> None:
        if not base_url or not urlparse(base_url).scheme.startswith("http"):
            raise ValueError(f"remote base URL {base_url!r} is not an http(s) URL: set it to the endpoint's API "
                             "root, e.g. https://api.z.ai/api/paas/v4 or http://host:8000/v1")
        if not model and models is None:
            raise ValueError("the remote backend needs the remote model name (e.g. glm-4.5-air)")
        if thinking_style not in ("auto", "thinking", "chat_template_kwargs"):
            raise ValueError(f"thinking_style {thinking_style!r}: use auto, thinking or chat_template_kwargs")
        if dialect is not None and dialect not in DIALECTS:
            raise ValueError(f"dialect {dialect!r}: use one of {', '.join(DIALECTS)}")
        self.base_url = base_url.rstrip("/")
        self.remote_model = model or (models or [""])[0]
        # every model name this endpoint is asked for (a provider serves several; "auto" fills it in)
        self.served: set[str] = {self.remote_model, *(models or [])} - {""}
        self.api_key_env = api_key_env or None
        if dialect is None:
            if thinking_style == "auto":
                host = urlparse(self.base_url).hostname or ""
                thinking_style = "thinking" if host.endswith(THINKING_FIELD_HOSTS) else "chat_template_kwargs"
            dialect = _STYLE_DIALECTS[thinking_style]
        self.dialect = dialect
        self.thinking_style = {"zai": "thinking", "workbench": "thinking", "vllm": "chat_template_kwargs",
                               "sglang": "chat_template_kwargs", "llama-server": "chat_template_kwargs"}.get(
            dialect, dialect)
        self.routing_url = routing_url.rstrip("/") if routing_url else None
        self.timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.throughput = Throughput()
        self.active = 0
        self.state = "ready"

    def __repr__(self) -> str:
        return (f"RemoteBackend({self.base_url!r}, model={self.remote_model!r}, dialect={self.dialect!r}, "
                f"key from ${self.api_key_env})")

    def check_model(self, request: ChatCompletionRequest) -> None:
        if request.model not in self.served:
            raise APIError(404, f"The model {request.model!r} does not exist here: this endpoint serves "
                                f"{', '.join(sorted(self.served))} (see GET v1/models).", param="model",
                           code="model_not_found")

    @property
    def key_missing(self) -> bool:
        """The key's variable is named but not set: nothing may be sent (status says key_missing)."""
        return bool(self.api_key_env) and not os.environ.get(self.api_key_env)

    @property
    def model_id(self) -> str:
        return self.remote_model

    async def start(self) -> None:
        self._client_or_new()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _client_or_new(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0),
                                             transport=self._transport)
        return self._client

    # --- the key: read when needed, masked everywhere ------------------------------------------------------------
    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise APIError(503, f"The remote backend reads its API key from the environment variable "
                                f"{self.api_key_env}, which is not set in the Jupyter server's environment.",
                           code="api_key_missing")
        return key

    def _masker(self) -> KeyMask:
        return KeyMask(os.environ.get(self.api_key_env) if self.api_key_env else None)

    def _mask(self, text: str) -> str:
        return self._masker().text(text)

    # --- requests --------------------------------------------------------------------------------------------------
    def payload(self, request: ChatCompletionRequest, stream: bool) -> dict[str, Any]:
        """The request as the endpoint expects it."""
        if request.routing and self.dialect != "workbench":
            raise APIError(400, f"Routing traces come only from a GLM Workbench engine; the model {request.model!r} "
                                "runs at an OpenAI-compatible endpoint that does not record them. Drop 'routing' "
                                "or choose a model with the routing capability (GET v1/models).", param="routing",
                           code="unsupported")
        body = request.model_dump(exclude_none=True, exclude=_NOT_FORWARDED | {"stream", "stream_options"})
        body["model"] = request.model if request.model in self.served else self.remote_model
        if request.routing:
            body["routing"] = True
        body["stream"] = stream
        for message in body["messages"]:  # OpenAI-compatible servers take arguments as JSON strings only
            for call in message.get("tool_calls") or []:
                if isinstance(call["function"]["arguments"], dict):
                    call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
        if not request.ignore_eos:
            body.pop("ignore_eos", None)  # vLLM's extension: sent only when asked for
        if stream:  # usage feeds our throughput figure; dropped again if the client did not ask for it
            body["stream_options"] = {"include_usage": True}
        explicit = request.thinking is not None or (
            request.chat_template_kwargs is not None and request.chat_template_kwargs.enable_thinking is not None)
        if explicit:
            body.update(thinking_fields(self.dialect, request.enable_thinking, request.thinking_budget))
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def _error_from(self, response: httpx.Response) -> APIError:
        mask = self._masker()
        raw = mask.text((await response.aread()).decode("utf-8", "replace"))
        try:
            detail = mask.value(json.loads(raw)).get("error", {})
            message = detail.get("message") if isinstance(detail, dict) else str(detail)
            param = detail.get("param") if isinstance(detail, dict) else None
            code = detail.get("code") if isinstance(detail, dict) else None
        except (ValueError, AttributeError, RecursionError):
            message, param, code = raw[:500], None, None
        message = mask.text(f"The remote GLM endpoint answered {response.status_code}: {message or raw[:500]}")
        # its client errors are the client's errors; anything else is a bad gateway from where the client stands
        status = response.status_code if 400 <= response.status_code < 500 else 502
        return APIError(status, message, param=mask.text(str(param))[:200] if param is not None else None,
                        code=mask.text(str(code))[:200] if code is not None else None,
                        headers={"Retry-After": mask.text(response.headers["Retry-After"])}
                        if "Retry-After" in response.headers else None)

    def _unreachable(self, exc: Exception) -> APIError:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "could not be reached"
        return APIError(504 if kind == "timed out" else 502,
                        self._mask(f"The remote GLM endpoint at {self.base_url} {kind}: {type(exc).__name__}"
                                   f"{': ' + str(exc) if str(exc) else ''}"), code="upstream_unavailable")

    async def stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        self.check_model(request)
        body = self.payload(request, stream=True)
        client = self._client_or_new()
        headers = self._headers()  # a missing key fails here, before anything is sent
        relay = StreamMask(self._masker())
        self.active += 1
        finished = done = False
        try:
            async with client.stream("POST", f"{self.base_url}/chat/completions", json=body,
                                     headers=headers) as response:
                if response.status_code >= 400:
                    raise await self._error_from(response)
                async for line in response.aiter_lines():
                    data = sse_data(line)
                    if data is None:
                        continue
                    if data == SSE_DONE:
                        done = True
                        break
                    chunk = self._chunk(data, relay)
                    finished |= any(choice.finish_reason for choice in chunk.choices)
                    if chunk.usage is not None:
                        self.throughput.add(chunk.usage.completion_tokens)
                        if not request.include_usage:
                            if not chunk.choices:
                                continue
                            chunk.usage = None
                    yield chunk
                rest = relay.rest()
                if rest is not None:  # text held back at the very end (a stream without a finish_reason)
                    yield self._validated_chunk(rest, relay.mask)
                if not finished and not done:
                    raise APIError(502, f"The remote GLM endpoint at {self.base_url} ended the stream before the "
                                        "answer finished (no finish_reason, no [DONE]): the answer is incomplete. "
                                        "Retry the request.", code="upstream_stream_cut")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        finally:
            self.active -= 1

    def _chunk(self, data: str, relay: StreamMask) -> ChatCompletionChunk:
        mask = relay.mask
        try:
            payload = mask.value(json.loads(data))
        except (ValueError, RecursionError):
            raise APIError(502, mask.text(f"The remote GLM endpoint sent a stream line that is not JSON: "
                                          f"{data[:200]}"), code="bad_upstream_response") from None
        if isinstance(payload, dict) and "error" in payload:
            error = payload["error"] if isinstance(payload["error"], dict) else {"message": str(payload["error"])}
            code = error.get("code")
            raise APIError(502, f"The remote GLM endpoint failed mid-stream: {error.get('message')}",
                           code=str(code)[:200] if code else "upstream_error")
        if isinstance(payload, dict):
            for choice in payload.get("choices") or []:
                reasoning_as_reasoning_content(choice.get("delta") if isinstance(choice, dict) else None)
        return self._validated_chunk(relay.chunk(payload), mask)

    def _validated_chunk(self, payload: Any, mask: KeyMask) -> ChatCompletionChunk:
        try:
            return ChatCompletionChunk.model_validate(payload)
        except ValueError as exc:
            raise APIError(502, mask.text(f"The remote GLM endpoint sent a chunk that is not a chat completion "
                                          f"chunk: {str(exc)[:300]}"), code="bad_upstream_response") from None

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletion:
        self.check_model(request)
        body = self.payload(request, stream=False)
        client = self._client_or_new()
        headers = self._headers()  # a missing key fails here, before anything is sent
        self.active += 1
        try:
            response = await client.post(f"{self.base_url}/chat/completions", json=body, headers=headers)
            if response.status_code >= 400:
                raise await self._error_from(response)
            mask = self._masker()
            try:
                payload = mask.value(response.json())
                for choice in (payload.get("choices") or []) if isinstance(payload, dict) else []:
                    reasoning_as_reasoning_content(choice.get("message") if isinstance(choice, dict) else None)
                completion = ChatCompletion.model_validate(payload)
            except (ValueError, RecursionError) as exc:
                raise APIError(502, mask.text(f"The remote GLM endpoint's answer is not a chat completion: "
                                              f"{str(exc)[:300]}"), code="bad_upstream_response") from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        finally:
            self.active -= 1
        if completion.usage is not None:
            self.throughput.add(completion.usage.completion_tokens)
        return completion

    async def get_json(self, url: str, what: str, body: dict[str, Any] | None = None) -> Any:
        """A JSON document from the endpoint (its model list, a routing trace; with `body`, the answer to a POST of
        it: a token count), the key masked in it."""
        client = self._client_or_new()
        headers = self._headers()
        try:
            response = await (client.get(url, headers=headers) if body is None
                              else client.post(url, json=body, headers=headers))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise await self._error_from(response)
        try:
            return self._masker().value(response.json())
        except (ValueError, RecursionError):
            raise APIError(502, self._mask(f"The remote endpoint's {what} is not JSON: {response.text[:200]}"),
                           code="bad_upstream_response") from None

    async def count_prompt_tokens(self, request: ChatCompletionRequest) -> int:
        """The prompt's tokens as the endpoint's own tokenizer and template count them: another workbench's
        `glm/api/count_tokens`, vLLM's `POST /tokenize` (chat messages in, `count` out; served at the server's
        root, beside `v1/`). Other endpoints have no counting API: they get the base class's clear 400."""
        self.check_model(request)
        if self.dialect == "workbench":
            url, field = re.sub(r"/v1$", "/api/count_tokens", self.base_url), "prompt_tokens"
            body = self.payload(request, stream=False)
        elif self.dialect == "vllm":
            url, field = re.sub(r"/v1$", "", self.base_url) + "/tokenize", "count"
            chat = self.payload(request, stream=False)
            body = {key: chat[key] for key in ("model", "messages", "tools", "chat_template_kwargs") if key in chat}
            body["add_generation_prompt"] = True
        else:
            return await super().count_prompt_tokens(request)
        answer = await self.get_json(url, "token count", body)
        count = answer.get(field) if isinstance(answer, dict) else None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise APIError(502, self._mask(f"The remote endpoint's token count ({url}) has no integer {field!r}: "
                                           f"{json.dumps(answer)[:200]}"), code="bad_upstream_response")
        return count

    async def list_models(self) -> list[dict[str, Any]]:
        """The endpoint's `GET models` entries (OpenAI's list), for `"models": "auto"`."""
        listing = await self.get_json(f"{self.base_url}/models", "model list")
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise APIError(502, f"The remote endpoint's model list ({self.base_url}/models) has no 'data' list.",
                           code="bad_upstream_response")
        return [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]

    async def fetch_routing_trace(self, completion_id: str) -> dict[str, Any] | None:
        """A routing trace recorded at another workbench (`routing_url`: its `glm/api/routing`), or None."""
        if self.routing_url is None:
            return None
        try:
            trace = await self.get_json(f"{self.routing_url}/{quote(completion_id, safe='')}", "routing trace")
        except APIError as error:
            if error.status == 404:
                return None
            raise
        return trace if isinstance(trace, dict) else None

    def status(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.remote_model, "state": self.state, "base_url": self.base_url,
                "api_key_env": self.api_key_env, "thinking_style": self.thinking_style, "dialect": self.dialect,
                "active_requests": self.active, "queued_requests": 0,
                "recent_tokens_per_second": self.throughput.rate(), "device": "remote", "memory": None}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class KeyMask:
    """Masks a secret as `***` in text and in JSON values, in any letter case and in its simple encodings."""

    MIN_ENCODED = 8  # encoded forms shorter than this are not masked on their own (too likely by chance)

    def __init__(self, key: str | None) -> None:
        self.key = key or None
        variants: set[str] = set()
        if self.key:
            raw = self.key.encode("utf-8")
            variants |= {self.key, quote(self.key, safe=""), quote_plus(self.key), raw.hex(),
                         "".join(f"%{byte:02x}" for byte in raw)}
            for offset in range(3):  # base64 of the key at each alignment inside a longer encoded text
                encoded = base64.b64encode(bytes(offset) + raw).decode()
                core = encoded[-(-offset * 8 // 6):(offset + len(raw)) * 8 // 6]
                variants |= {core, core.replace("+", "-").replace("/", "_")}
            variants = {v for v in variants if v == self.key or len(v) >= self.MIN_ENCODED}
        self.variants = sorted(variants, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self.variants)), re.IGNORECASE) if variants else None
        self._folded = [v.lower() for v in self.variants]

    def text(self, text: str) -> str:
        text = _LONE_SURROGATE.sub("\ufffd", text)  # not text: it could not be sent on as JSON
        return self._pattern.sub("***", text) if self._pattern is not None else text

    def value(self, value: Any) -> Any:
        """Every string of a JSON value masked, object keys included (iteratively: any depth is safe)."""
        if isinstance(value, str):
            return self.text(value)
        if not isinstance(value, dict | list):
            return value
        root: list[Any] = [value]
        stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]
        while stack:
            parent, slot, item = stack.pop()
            if isinstance(item, dict):
                copy: Any = {}
                for key, child in item.items():
                    name = self.text(key) if isinstance(key, str) else key
                    copy[name] = child
                    stack.append((copy, name, child))
            elif isinstance(item, list):
                copy = list(item)
                stack.extend((copy, index, child) for index, child in enumerate(item))
            else:
                copy = self.text(item) if isinstance(item, str) else item
            parent[slot] = copy
        return root[0]

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` could be the start of the key (or an encoding of it)."""
        if not self.variants:
            return 0
        folded = text[-max(map(len, self.variants)):].lower()
        for size in range(len(folded), 0, -1):
            tail = folded[-size:]
            if any(variant.startswith(tail) for variant in self._folded):
                return size
        return 0


class StreamMask:
    """Masks a stream's chunks; text fields keep back a tail that could begin the key until it is known not to.

    Held text is sent with the next chunk of its choice, or with the chunk that finishes it, or in one last
    chunk (`rest`) when the stream ends without a finish_reason.
    """

    def __init__(self, mask: KeyMask) -> None:
        self.mask = mask
        self.held: dict[Any, dict[Any, str]] = {}  # choice index -> {field: held text}
        self.last: dict[str, Any] = {}

    def chunk(self, payload: Any) -> Any:
        if not isinstance(payload, dict) or not self.mask.variants:
            return payload
        self.last = {k: payload[k] for k in ("id", "object", "created", "model") if k in payload}
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            held = self.held.setdefault(choice.get("index", 0), {})
            fields = dict(_text_fields(delta))
            for field in [f for f in held if f not in fields]:  # another field goes on: send what it held
                _set_field(delta, field, held.pop(field))
            finished = bool(choice.get("finish_reason"))
            for field, text in fields.items():
                combined = self.mask.text(held.pop(field, "") + text)
                keep = 0 if finished else self.mask.held_back(combined)
                _set_field(delta, field, combined[:len(combined) - keep])
                if keep:
                    held[field] = combined[len(combined) - keep:]
        return payload

    def rest(self) -> dict[str, Any] | None:
        choices = [{"index": index, "delta": {}} for index, held in self.held.items() if held]
        if not choices:
            return None
        for choice in choices:
            for field, text in self.held.pop(choice["index"]).items():
                _set_field(choice["delta"], field, text)
        return {"object": "chat.completion.chunk", **self.last, "choices": choices}


def _text_fields(delta: dict[str, Any]) -> list[tuple[Any, str]]:
    fields: list[tuple[Any, str]] = [(name, delta[name]) for name in ("content", "reasoning_content")
                                     if isinstance(delta.get(name), str)]
    for call in delta.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            fields.append((("tool_call", call.get("index")), function["arguments"]))
    return fields


def _set_field(delta: dict[str, Any], field: Any, text: str) -> None:
    if isinstance(field, str):
        delta[field] = text
        return
    index = field[1]
    for call in delta.get("tool_calls") or []:
        if isinstance(call, dict) and call.get("index") == index and isinstance(call.get("function"), dict):
            call["function"]["arguments"] = text
            return
    delta["tool_calls"] = [*(delta.get("tool_calls") or []), {"index": index, "function": {"arguments": text}}]
