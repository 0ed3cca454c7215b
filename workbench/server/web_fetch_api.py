"""`POST {base_url}glm/api/tools/web_fetch`: the server runs the `web_fetch` tool for the sidebar and `%%glm --web`.

Body `{"url": "https://...", "max_chars"?: int}`; answer `{"url", "final_url", "title", "text", "links",
"truncated", "content_type"}` (text: the main text as Markdown; links: `[{"text", "url"}]`, at most 100).
Owns the HTTP side only (authentication as every glm/ endpoint, the body, the error shape); the fetch and its
address policy are `workbench.tools.web_fetch`, configured by GLMWorkbench's `web_fetch_*` traitlets. The fetch
runs in a worker thread: the event loop stays free while a page loads.
"""

from __future__ import annotations

import asyncio
import json

from tornado import web

from workbench.chat.protocol import APIError
from workbench.server.handlers import GLMHandler, check_body_size
from workbench.tools.web_fetch import DEFAULT_MAX_CHARS, MAX_CHARS_LIMIT, WebFetcher, WebFetchError

MAX_BODY_BYTES = 64 * 1024  # a URL and a number


def _parse(body: bytes) -> tuple[str, int]:
    check_body_size(body, MAX_BODY_BYTES)
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The body is not JSON ({exc}). Send {{\"url\": \"https://...\"}}.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object such as {\"url\": \"https://example.org/\"}.",
                       code="invalid_request")
    unknown = sorted(set(data) - {"url", "max_chars"})
    if unknown:
        raise APIError(400, f"Unknown field(s) {', '.join(unknown)}: web_fetch takes url and max_chars.",
                       param=unknown[0], code="invalid_request")
    url = data.get("url")
    if not isinstance(url, str) or not url.strip():
        raise APIError(400, "url is required: an http or https URL as a string.", param="url",
                       code="invalid_request")
    max_chars = data.get("max_chars", DEFAULT_MAX_CHARS)
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or not 1 <= max_chars <= MAX_CHARS_LIMIT:
        raise APIError(400, f"max_chars must be a whole number from 1 to {MAX_CHARS_LIMIT:,} (default "
                            f"{DEFAULT_MAX_CHARS:,}), got {max_chars!r}.", param="max_chars", code="invalid_request")
    return url, max_chars


class WebFetchHandler(GLMHandler):
    """`POST api/tools/web_fetch`."""

    @web.authenticated
    async def post(self) -> None:
        try:
            url, max_chars = _parse(self.request.body)
            app = self.glm_app
            fetcher = WebFetcher(allow_private=app.web_fetch_allow_private, timeout=app.web_fetch_timeout,
                                 max_bytes=app.web_fetch_max_bytes)
            page = await asyncio.to_thread(fetcher.fetch, url, max_chars)
        except APIError as error:
            self.send_api_error(error)
            return
        except WebFetchError as error:
            self.send_api_error(APIError(error.status, error.message, param="url", code=error.code))
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(page.to_dict()))


ROUTES = [(r"/glm/api/tools/web_fetch", WebFetchHandler)]
