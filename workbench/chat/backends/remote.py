"""The remote backend: any OpenAI-compatible GLM endpoint (Z.ai, Zhipu BigModel, vLLM, SGLang, another workbench).

Owns the translation of our request into the endpoint's dialect and the pass-through of its answers:

- thinking: Z.ai and Zhipu take `"thinking": {"type": ...}`; vLLM and SGLang take
  `"chat_template_kwargs": {"enable_thinking": ...}` (`thinking_style`, "auto" picks by host name);
- streaming: the endpoint's server-sent chunks are passed on as they come, reasoning and tool-call deltas
  untouched; closing our stream closes the upstream connection, which cancels the generation there;
- the API key is read from the environment variable *named* in the configuration, when a request is made, and
  sent only in the Authorization header. It is never stored on the object, logged, or put in an error: any text
  that comes back from the endpoint has it masked before it goes anywhere.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import httpx

from workbench.chat.backends.base import Backend, Throughput
from workbench.chat.protocol import APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest

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

    def _mask(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "***") if key else text

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
        raw = (await response.aread()).decode("utf-8", "replace")
        try:
            detail = json.loads(raw).get("error", {})
            message = detail.get("message") if isinstance(detail, dict) else str(detail)
            param = detail.get("param") if isinstance(detail, dict) else None
            code = detail.get("code") if isinstance(detail, dict) else None
        except (json.JSONDecodeError, AttributeError):
            message, param, code = raw[:500], None, None
        message = self._mask(f"The remote GLM endpoint answered {response.status_code}: {message or raw[:500]}")
        # its client errors are the client's errors; anything else is a bad gateway from where the client stands
        status = response.status_code if 400 <= response.status_code < 500 else 502
        return APIError(status, message, param=param, code=str(code) if code is not None else None,
                        headers={"Retry-After": response.headers["Retry-After"]}
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
        self.active += 1
        try:
            async with client.stream("POST", f"{self.base_url}/chat/completions", json=body,
                                     headers=self._headers()) as response:
                if response.status_code >= 400:
                    raise await self._error_from(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # comments, event names, keep-alives
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    chunk = self._chunk(data)
                    if chunk.usage is not None:
                        self.throughput.add(chunk.usage.completion_tokens)
                        if not request.include_usage:
                            if not chunk.choices:
                                continue
                            chunk.usage = None
                    yield chunk
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        finally:
            self.active -= 1

    def _chunk(self, data: str) -> ChatCompletionChunk:
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            raise APIError(502, self._mask(f"The remote GLM endpoint sent a stream line that is not JSON: "
                                           f"{data[:200]}"), code="bad_upstream_response") from None
        if isinstance(payload, dict) and "error" in payload:
            error = payload["error"] if isinstance(payload["error"], dict) else {"message": str(payload["error"])}
            raise APIError(502, self._mask(f"The remote GLM endpoint failed mid-stream: {error.get('message')}"),
                           code=error.get("code") or "upstream_error")
        try:
            return ChatCompletionChunk.model_validate(payload)
        except ValueError as exc:
            raise APIError(502, self._mask(f"The remote GLM endpoint sent a chunk that is not a chat completion "
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
            try:
                completion = ChatCompletion.model_validate(response.json())
            except ValueError as exc:
                raise APIError(502, self._mask(f"The remote GLM endpoint's answer is not a chat completion: "
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
