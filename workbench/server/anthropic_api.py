"""The Anthropic-compatible door: `POST {base_url}glm/anthropic/v1/messages` and `.../v1/messages/count_tokens`.

Owns the HTTP side of serving this server's model to clients built for Anthropic's Messages API: the same
authentication as the rest of the GLM API (the Jupyter token as `Authorization: Bearer <token>`, which the
`anthropic` client sends when given `auth_token`), the same body limits and cancellation on disconnect, errors in
Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`), and the stream as Anthropic's named
server-sent events. The translation itself is `workbench.chat.anthropic`; generation is the backend's.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any

from tornado import web
from tornado.iostream import StreamClosedError

from workbench.chat.anthropic import MessageEvents, error_body, parse_count_tokens_request, parse_messages_request
from workbench.chat.protocol import APIError
from workbench.server.handlers import GenerationHandler, GLMHandler, check_body_size, off_loop

log = logging.getLogger(__name__)


def _reason(status: int) -> str | None:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:  # 529 (overloaded) is Anthropic's own
        return None


class AnthropicHandler(GLMHandler):
    """Errors in Anthropic's shape, whatever raised them (tornado's own 403 and 405 included)."""

    def send_api_error(self, error: APIError) -> None:
        if error.status >= 500:
            log.error("Anthropic API %s -> %d: %s", self.request.path, error.status, error.message)
        self.clear()
        self.set_status(error.status, _reason(error.status))
        self.set_header("Content-Type", "application/json")
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.finish(json.dumps(error_body(error)))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None))[1]
        if isinstance(exc, APIError):
            error = exc
        elif status_code == 403:
            error = APIError(403, "Forbidden: authenticate with the Jupyter server's token as "
                                  "`Authorization: Bearer <token>` (the anthropic client's auth_token).")
        elif isinstance(exc, web.HTTPError):
            error = APIError(status_code, exc.reason or _reason(status_code) or "error")
        else:
            error = APIError(status_code, f"Internal server error ({type(exc).__name__}): see the server log.")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error_body(error)))

    async def _parsed(self, parse: Any) -> Any:
        body = self.request.body
        check_body_size(body, self.glm_app.max_request_bytes)
        return await off_loop(parse, body, size=len(body))


class MessagesHandler(AnthropicHandler, GenerationHandler):
    """`POST anthropic/v1/messages`: a whole message, or its events with `"stream": true`."""

    async def _serve(self) -> None:
        chunks = None
        try:
            request, stream, show_thinking = await self._parsed(parse_messages_request)
            backend = await self.glm_app.ready_providers()
            chunks = backend.stream(request)
            translation = MessageEvents(model=request.model, show_thinking=show_thinking)
            try:
                first = await chunks.__anext__()  # errors before any output are a plain HTTP error answer
            except StopAsyncIteration:
                first = None
            if not stream:
                if first is not None:
                    translation.feed(first)
                    async for chunk in chunks:
                        translation.feed(chunk)
                translation.finish()
                self.set_header("Content-Type", "application/json")
                await self.finish(json.dumps(translation.message(), ensure_ascii=False))
                return
            await self._stream(translation, first, chunks)
        except APIError as error:
            self.send_api_error(error)
        except asyncio.CancelledError:
            raise
        except StreamClosedError:
            log.info("Anthropic API: client disconnected mid-stream; its generation was cancelled")
        except Exception as exc:  # a failure inside the backend fails this request only
            log.exception("Anthropic API: message failed")
            self.send_api_error(APIError(500, f"The message failed ({type(exc).__name__}: {exc}). The server is "
                                              "still running: retry the request."))
        finally:
            if chunks is not None:
                await chunks.aclose()  # cancels the generation if it is still running

    async def _stream(self, translation: MessageEvents, first: Any, chunks: Any) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        await self._events(translation.start())
        if first is not None:
            await self._events(translation.feed(first))
            try:
                async for chunk in chunks:
                    await self._events(translation.feed(chunk))
            except Exception as exc:  # after the headers went out: the error is the stream's last event
                error = exc if isinstance(exc, APIError) else APIError(
                    500, f"The message failed ({type(exc).__name__}: {exc}). The server is still running: retry "
                         "the request.")
                log.error("Anthropic API: stream failed: %s", error.message, exc_info=not isinstance(exc, APIError))
                await self._events([("error", error_body(error))])
                self.finish()
                return
        await self._events(translation.finish())
        self.finish()

    async def _events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        if not events:
            return
        if self._disconnected:
            raise StreamClosedError()
        for name, payload in events:
            self.write(f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n")
        await self.flush()


class CountTokensHandler(AnthropicHandler):
    """`POST anthropic/v1/messages/count_tokens`: the prompt's tokens, as the model would read them."""

    @web.authenticated
    async def post(self) -> None:
        try:
            request = await self._parsed(parse_count_tokens_request)
            backend = await self.glm_app.ready_providers()
            tokens = await backend.count_prompt_tokens(request)
            self.finish(json.dumps({"input_tokens": tokens}))
        except APIError as error:
            self.send_api_error(error)


class AnthropicNotFoundHandler(AnthropicHandler):
    @web.authenticated
    def _not_found(self, *args: Any) -> None:
        self.send_api_error(APIError(
            404, f"No endpoint {self.request.method} {self.request.path}. The Anthropic-compatible API has POST "
                 "glm/anthropic/v1/messages and POST glm/anthropic/v1/messages/count_tokens."))

    get = post = put = patch = delete = _not_found


ROUTES = [
    (r"/glm/anthropic/v1/messages", MessagesHandler),
    (r"/glm/anthropic/v1/messages/count_tokens", CountTokensHandler),
    (r"/glm/anthropic/.*", AnthropicNotFoundHandler),
]
