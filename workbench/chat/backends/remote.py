"""The remote backend: any OpenAI-compatible GLM endpoint (Z.ai, Zhipu BigModel, vLLM, SGLang, another workbench).

Owns the translation of our request into the endpoint's dialect and the pass-through of its answers:

- thinking: Z.ai and Zhipu take `"thinking": {"type": ...}`; vLLM and SGLang take
  `"chat_template_kwargs": {"enable_thinking": ...}` (`thinking_style`, "auto" picks by host name);
- streaming: the endpoint's server-sent chunks are passed on as they come, reasoning and tool-call deltas
  untouched; closing our stream closes the upstream connection, which cancels the generation there;
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


class RemoteBackend(Backend):
    kind = "remote"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, thinking_style: str = "auto",
                 timeout: float = 600.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not base_url or not urlparse(base_url).scheme.startswith("http"):
            raise ValueError(f"remote base URL {base_url!r} is not an http(s) URL: set it to the endpoint's API "
                             "root, e.g. https://api.z.ai/api/paas/v4 or http://host:8000/v1")
        if not model:
            raise ValueError("the remote backend needs the remote model name (e.g. glm-4.5-air)")
        if thinking_style not in ("auto", "thinking", "chat_template_kwargs"):
            raise ValueError(f"thinking_style {thinking_style!r}: use auto, thinking or chat_template_kwargs")
        self.base_url = base_url.rstrip("/")
        self.remote_model = model
        self.api_key_env = api_key_env or None
        if thinking_style == "auto":
            host = urlparse(self.base_url).hostname or ""
            thinking_style = "thinking" if host.endswith(THINKING_FIELD_HOSTS) else "chat_template_kwargs"
        self.thinking_style = thinking_style
        self.timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.throughput = Throughput()
        self.active = 0
        self.state = "ready"

    def __repr__(self) -> str:
        return f"RemoteBackend({self.base_url!r}, model={self.remote_model!r}, key from ${self.api_key_env})"

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
        if request.routing:
            raise APIError(400, "Routing traces come only from the local engine; this server uses a remote GLM "
                                "endpoint. Drop 'routing' or switch the backend to local.", param="routing",
                           code="unsupported")
        body = request.model_dump(exclude_none=True, exclude=_NOT_FORWARDED | {"stream", "stream_options"})
        body["model"] = self.remote_model
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
            if self.thinking_style == "thinking":
                body["thinking"] = {"type": "enabled" if request.enable_thinking else "disabled"}
            else:
                body["chat_template_kwargs"] = {"enable_thinking": request.enable_thinking}
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
        relay = StreamMask(self._masker())
        self.active += 1
        try:
            async with client.stream("POST", f"{self.base_url}/chat/completions", json=body,
                                     headers=self._headers()) as response:
                if response.status_code >= 400:
                    raise await self._error_from(response)
                async for line in response.aiter_lines():
                    data = sse_data(line)
                    if data is None:
                        continue
                    if data == SSE_DONE:
                        break
                    chunk = self._chunk(data, relay)
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
        self.active += 1
        try:
            response = await client.post(f"{self.base_url}/chat/completions", json=body, headers=self._headers())
            if response.status_code >= 400:
                raise await self._error_from(response)
            mask = self._masker()
            try:
                completion = ChatCompletion.model_validate(mask.value(response.json()))
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

    def status(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.remote_model, "state": self.state, "base_url": self.base_url,
                "api_key_env": self.api_key_env, "thinking_style": self.thinking_style,
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
