"""HTTP handlers of the GLM API under `{base_url}glm/`: chat completions (JSON or server-sent events), models,
status, routing traces and the OpenAPI description.

Owns the HTTP side only: authentication (jupyter-server's token, or cookie + XSRF, via `APIHandler` and
`@web.authenticated`), turning `APIError`s and any other failure into OpenAI-shaped error bodies, and the link
between a client's connection and its generation: a client that disconnects cancels it. Generation itself runs
in the backend, never on the event loop; so does parsing a large body (over `INLINE_PARSE_BYTES`), and a body
over the server's `max_request_bytes` is a 413 before it is parsed at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.iostream import StreamClosedError

from workbench.chat.backends.base import Backend
from workbench.chat.protocol import APIError, ChatCompletionRequest, ModelList, parse_request, to_json
from workbench.server.openapi import openapi_spec

if TYPE_CHECKING:  # app.py imports this module to register its routes
    from workbench.server.app import GLMWorkbench

T = TypeVar("T")

log = logging.getLogger(__name__)

_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
# Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones in a worker thread.
INLINE_PARSE_BYTES = 64 * 1024


def check_body_size(body: bytes, limit: int, what: str = "request body") -> None:
    """A 413 for a body over `limit` bytes, before anything reads it."""
    if limit and len(body) > limit:
        raise APIError(413, f"The {what} is {len(body):,} bytes; this server accepts at most {limit:,} bytes "
                            f"({limit / 2**20:.0f} MiB, GLMWorkbench.max_request_bytes). Send less.",
                       code="request_too_large")


async def off_loop(function: Callable[..., T], *args: Any, size: int) -> T:
    """`function(*args)` inline when the input is small, else in a worker thread (the event loop stays free)."""
    if size <= INLINE_PARSE_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


class GLMHandler(APIHandler):
    """Base: OpenAI-shaped errors for everything, including tornado's own (403 without a token, 405, ...)."""

    @property
    def glm_app(self) -> GLMWorkbench:
        return self.settings["glm_workbench"]

    def send_api_error(self, error: APIError) -> None:
        if error.status >= 500:
            log.error("GLM API %s %s -> %d: %s", self.request.method, self.request.path, error.status, error.message)
        self.clear()
        self.set_status(error.status, _REASONS.get(error.status))
        self.set_header("Content-Type", "application/json")
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.finish(json.dumps(error.to_dict()))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        exc = exc_info[1] if exc_info else None
        param = None
        if isinstance(exc, APIError):
            message, code, param = exc.message, exc.code, exc.param
        elif isinstance(exc, web.HTTPError):
            message = exc.log_message % exc.args if exc.log_message and exc.args else exc.log_message
            message = message or exc.reason or _REASONS.get(status_code, "error")
            if status_code == 403:
                message = ("Forbidden: authenticate with the Jupyter server's token (Authorization: token <token>, "
                           "or Bearer <token> as OpenAI clients send it), or a session cookie with its XSRF token.")
            code = {403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
                status_code, "http_error")
        else:
            message, code = f"Internal server error ({type(exc).__name__}): see the server log.", "internal_error"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(APIError(status_code, message, param=param, code=code).to_dict()))


class GenerationHandler(GLMHandler):
    """A POST whose answer is a generation (`_serve`): a client that disconnects cancels it."""

    _task: asyncio.Task | None = None
    _disconnected = False

    def on_connection_close(self) -> None:
        self._disconnected = True
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the generation stops at the engine's next step

    @web.authenticated
    async def post(self) -> None:
        self._task = asyncio.ensure_future(self._serve())
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
            log.info("%s: client disconnected; its generation was cancelled", self.request.path)

    async def _serve(self) -> None:
        raise NotImplementedError


class ChatCompletionsHandler(GenerationHandler):
    """`POST v1/chat/completions`."""

    async def _serve(self) -> None:
        try:
            body = self.request.body
            check_body_size(body, self.glm_app.max_request_bytes)
            request = await off_loop(parse_request, body, size=len(body))
            backend = await self.glm_app.ready_providers()
            if request.stream:
                await self._stream(backend, request)
            else:
                completion = await backend.complete(request)
                self.set_header("Content-Type", "application/json")
                await self.finish(to_json(completion))
        except APIError as error:
            self.send_api_error(error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failure inside the backend fails this request only
            log.exception("GLM API: chat completion failed")
            self.send_api_error(APIError(500, f"The completion failed ({type(exc).__name__}: {exc}). The server "
                                              "is still running: retry the request.", code="internal_error"))

    async def _stream(self, backend: Backend, request: ChatCompletionRequest) -> None:
        chunks = backend.stream(request)
        try:
            first = await chunks.__anext__()  # errors before any output are a plain HTTP error answer
        except StopAsyncIteration:
            first = None
        try:
            self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.set_header("Cache-Control", "no-cache")
            self.set_header("X-Accel-Buffering", "no")  # proxies must not hold the events back
            if first is not None:
                await self._event(to_json(first))
                try:
                    async for chunk in chunks:
                        await self._event(to_json(chunk))
                except Exception as exc:  # after the headers went out: the error is the stream's last event
                    error = exc if isinstance(exc, APIError) else APIError(
                        500, f"The completion failed ({type(exc).__name__}: {exc}). The server is still running: "
                             "retry the request.", code="internal_error")
                    log.error("GLM API: stream failed: %s", error.message, exc_info=not isinstance(exc, APIError))
                    await self._event(json.dumps(error.to_dict()))
                    return
            await self._event("[DONE]")
        except StreamClosedError:
            log.info("GLM API: client disconnected mid-stream; its generation was cancelled")
        finally:
            await chunks.aclose()  # cancels the generation if it is still running
        if not self._finished:
            self.finish()

    async def _event(self, data: str) -> None:
        if self._disconnected:
            raise StreamClosedError()
        self.write(f"data: {data}\n\n")
        await self.flush()


class CountTokensHandler(GLMHandler):
    """`POST api/count_tokens`: the tokens a chat request's prompt renders to for its model, `{"model",
    "prompt_tokens"}` (a context meter's count; what a workbench provider asks the server behind it)."""

    @web.authenticated
    async def post(self) -> None:
        try:
            body = self.request.body
            check_body_size(body, self.glm_app.max_request_bytes)
            request = await off_loop(parse_request, body, size=len(body))
            backend = await self.glm_app.ready_providers()
            tokens = await backend.count_prompt_tokens(request)
            self.finish(json.dumps({"model": request.model, "prompt_tokens": tokens}))
        except APIError as error:
            self.send_api_error(error)


class ModelsHandler(GLMHandler):
    """`GET v1/models`: every provider's models, `provider/model`, with the workbench's fields."""

    @web.authenticated
    async def get(self) -> None:
        registry = await self.glm_app.ready_providers()
        self.finish(ModelList(data=await registry.list_models()).model_dump_json())


class StatusHandler(GLMHandler):
    """`GET api/status`: the default provider's backend, model, device, memory, active and queued requests, recent
    tok/s; and every provider's state (`providers`)."""

    @web.authenticated
    async def get(self) -> None:
        self.glm_app.start_backend()  # a server run without the start hook (tests, embedding) starts loading here
        self.glm_app.glm_providers.refresh_in_background()  # an endpoint that was unreachable may be back
        self.finish(json.dumps(self.glm_app.glm_providers.status()))


class RoutingHandler(GLMHandler):
    """`GET api/routing/{completion_id}`: the routing trace of a recent completion made with routing, by this
    server's engines or fetched from the workbench provider that made it."""

    @web.authenticated
    async def get(self, completion_id: str) -> None:
        try:
            trace = await self.glm_app.glm_providers.fetch_routing_trace(completion_id)
        except APIError as error:
            self.send_api_error(error)
            return
        if trace is None:
            self.send_api_error(APIError(
                404, f"No routing trace for {completion_id!r}: traces are kept for the most recent "
                     f"{self.glm_app.routing_history} completions made with \"routing\": true by a model with the "
                     "routing capability.", param="completion_id", code="routing_trace_not_found"))
            return
        self.finish(json.dumps(trace))


class OpenAPIHandler(GLMHandler):
    """`GET api/openapi.json`."""

    @web.authenticated
    async def get(self) -> None:
        self.finish(json.dumps(openapi_spec(self.base_url)))


class NotFoundHandler(GLMHandler):
    """Anything else under `glm/`: an OpenAI-shaped 404 that names the endpoints there are."""

    @web.authenticated
    def _not_found(self, *args: Any) -> None:
        self.send_api_error(APIError(
            404, f"No endpoint {self.request.method} {self.request.path}. The GLM API has POST "
                 "glm/v1/chat/completions, GET glm/v1/models, GET glm/api/status, POST glm/api/count_tokens, GET "
                 "glm/api/routing/{completion_id}, POST glm/api/tools/web_fetch and GET glm/api/openapi.json.",
            code="not_found"))

    get = post = put = patch = delete = _not_found


ROUTES = [
    (r"/glm/v1/chat/completions", ChatCompletionsHandler),
    (r"/glm/v1/models", ModelsHandler),
    (r"/glm/api/status", StatusHandler),
    (r"/glm/api/count_tokens", CountTokensHandler),
    (r"/glm/api/routing/([^/]+)", RoutingHandler),
    (r"/glm/api/openapi.json", OpenAPIHandler),
]
# registered after every other glm/ route (the conversation store's too): it answers only what none of them do
CATCH_ALL = (r"/glm/.*", NotFoundHandler)
