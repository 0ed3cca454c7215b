"""How `%%glm` reaches a model: the Jupyter server that started this kernel (found through its runtime files,
called over its `glm/` HTTP API with server-sent events), or the chat layer's backends run in this process.

Owns `Connection` and its two kinds, `ServerConnection` and `InProcessConnection`, `find_jupyter_server`, and
`GLMError` (a problem the person at the notebook can fix, shown as one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GLMError(Exception):
    """A problem the person at the notebook can fix; shown as one line, never as a traceback."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code



def resolve_model(cards: list[dict[str, Any]], name: str, where: str) -> str:
    """`name` as one id of `cards`: the id itself, or a bare model name (the provider's own) naming one model."""
    ids = [card["id"] for card in cards]
    if name in ids:
        return name
    exact = [card["id"] for card in cards if (card.get("workbench") or {}).get("model") == name]
    matches = exact or [model for model in ids if model.endswith("/" + name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise GLMError(f"the model name {name!r} is served by {' and '.join(matches)}: say which (e.g. "
                       f"%glm use {matches[0]})")
    listed = ", ".join(ids) if ids else "no model at all"
    raise GLMError(f"no model {name!r} at {where}; it has {listed} (%glm models shows them with their providers)")


# --- finding the Jupyter server of this kernel --------------------------------------------------------

@dataclass
class ServerInfo:
    url: str  # API root with the server's base_url, ending in "/"
    token: str = ""
    sock: str = ""  # a Unix socket the server listens on instead of a port
    source: str = ""  # where we learnt of it, for `%glm status`


def _runtime_dirs() -> list[Path]:
    dirs = []
    with contextlib.suppress(ImportError):
        from jupyter_core.paths import jupyter_runtime_dir

        dirs.append(Path(jupyter_runtime_dir()))
    with contextlib.suppress(Exception):  # a kernel's connection file lives in its server's runtime dir
        from ipykernel.connect import get_connection_file

        dirs.append(Path(get_connection_file()).parent)
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def find_jupyter_server() -> ServerInfo | None:
    """The Jupyter server that started this kernel: the runtime file of a server whose pid is an ancestor."""
    import psutil

    servers: dict[int, tuple[dict, Path]] = {}
    for folder in _runtime_dirs():
        for path in sorted(folder.glob("jpserver-*.json")):
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(path.read_text(encoding="utf-8"))
                servers[int(info["pid"])] = (info, path)
    if not servers:
        return None
    with contextlib.suppress(psutil.Error):
        for ancestor in psutil.Process().parents():
            if ancestor.pid in servers:
                info, path = servers[ancestor.pid]
                url = info.get("url") or f"http://{info.get('hostname', '127.0.0.1')}:{info['port']}/"
                sock = info.get("sock") or ""
                if sock:  # the URL names the socket; requests go to it with the server's base_url as path
                    url = "http://localhost" + (info.get("base_url") or "/")
                url = url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
                return ServerInfo(url=url if url.endswith("/") else url + "/", token=info.get("token") or "",
                                  sock=sock, source=str(path))
    return None


# --- connections: the server's HTTP API, or the chat layer in this process -----------------------------

class Connection(ABC):
    """One way to reach the model. `chat()` yields OpenAI chunk dicts (streaming) or one completion dict."""

    supports_routing = False

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def models(self) -> list[str]: ...

    def model_cards(self) -> list[dict[str, Any]]:
        """The model list's entries (`id`, and from a workbench server `owned_by` and the `workbench` fields)."""
        return [{"id": model} for model in self.models()]

    def resolve_model(self, name: str) -> str:
        """The model id `name` means: an id of the list, or a bare model name that names one of its models."""
        return resolve_model(self.model_cards(), name, self.describe())

    def supports_routing_for(self, model: str) -> bool:
        """Whether answers of `model` record routing traces (its `routing` capability, where the list says)."""
        for card in self.model_cards():
            fields = card.get("workbench")
            if card.get("id") == model and isinstance(fields, dict):
                return "routing" in (fields.get("capabilities") or [])
        return self.supports_routing

    @abstractmethod
    def status(self) -> dict[str, Any]: ...

    @abstractmethod
    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]: ...

    def routing(self, completion_id: str) -> dict[str, Any] | None:
        return None

    def context_limit(self) -> int | None:
        with contextlib.suppress(GLMError):
            limit = self.status().get("context_limit")
            return int(limit) if limit else None
        return None

    def web_fetch(self, url: str, max_chars: int) -> dict[str, Any]:
        """A web page's readable text (the web_fetch tool's answer: url, final_url, title, text, links,
        truncated), read from this kernel with the safe defaults: public addresses only."""
        from workbench.tools.web_fetch import WebFetchError

        try:
            return self.web_fetcher().fetch(url, max_chars).to_dict()
        except WebFetchError as exc:
            raise GLMError(f"cannot read {url}: {exc.message}", code=exc.code) from None

    def web_fetcher(self):
        from workbench.tools.web_fetch import WebFetcher

        return WebFetcher()

    def count_tokens(self, text: str) -> int:
        # Without the tokenizer at hand: BPE vocabularies average 3-4 characters a token on code and English;
        # counting 3 errs on the side of keeping the prompt inside the context.
        return len(text) // 3 + 1

    def close(self) -> None:
        return None


class ServerConnection(Connection):
    """The `glm/` API of a Jupyter server (the one that started this kernel, or one named by `use server`)."""

    def __init__(self, server: ServerInfo, timeout: float = 600.0) -> None:
        import httpx

        self.server = server
        transport = httpx.HTTPTransport(uds=server.sock) if server.sock else None
        headers = {"Authorization": f"token {server.token}"} if server.token else {}
        self.client = httpx.Client(base_url=server.url, headers=headers, transport=transport,
                                   timeout=httpx.Timeout(timeout, connect=10.0))
        self._status: dict[str, Any] | None = None

    @property
    def supports_routing(self) -> bool:  # only the server's own engine records routing
        with contextlib.suppress(GLMError):
            return self.status().get("backend") == "local"
        return False

    def describe(self) -> str:
        where = f"the Jupyter server at {self.server.url}"
        return where + (f" (found through {self.server.source})" if self.server.source else "")

    def _fail(self, response, path: str) -> GLMError:
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if response.status_code in (401, 403):  # the server's own text speaks to HTTP clients, not notebooks
            return GLMError(f"the Jupyter server at {self.server.url} refused this kernel "
                            f"({response.status_code}): it did not accept the token. Name the server and its "
                            "token yourself: %glm use server URL TOKEN")
        if isinstance(error, dict) and error.get("message"):
            return GLMError(str(error["message"]), code=error.get("code"))
        if response.status_code == 404:
            return GLMError(f"the Jupyter server at {self.server.url} has no GLM API ({path} answered 404): "
                            "install glm-workbench in the server's environment, run `jupyter server extension "
                            "enable workbench` and restart Jupyter; or `%glm config server=off` to run the "
                            "model in this kernel")
        return GLMError(f"the Jupyter server answered {response.status_code} on {path}: "
                        f"{response.text[:200].strip()}")

    def _unreachable(self, exc: Exception) -> GLMError:
        return GLMError(f"cannot reach the Jupyter server at {self.server.url} ({type(exc).__name__}): is it "
                        "still running? Restart it, or run `%glm config server=off` to load the model in this "
                        "kernel instead")

    def _get(self, path: str) -> Any:
        import httpx

        try:
            response = self.client.get(path)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise self._fail(response, path)
        return response.json()

    def models(self) -> list[str]:
        return [m["id"] for m in self.model_cards()]

    def model_cards(self) -> list[dict[str, Any]]:
        return [m for m in self._get("glm/v1/models").get("data", []) if isinstance(m, dict) and "id" in m]

    def status(self) -> dict[str, Any]:
        self._status = self._get("glm/api/status")
        return self._status

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import httpx

        from workbench.chat.protocol import SSE_DONE, sse_data  # here: the chat layer imports torch (seconds)

        path = "glm/v1/chat/completions"
        try:
            with self.client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._fail(response, path)
                if not body.get("stream"):
                    response.read()
                    yield response.json()
                    return
                for line in response.iter_lines():
                    data = sse_data(line)
                    if data is None:
                        continue
                    if data == SSE_DONE:
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and "error" in chunk:
                        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                        raise GLMError(str(error.get("message")), code=error.get("code"))
                    yield chunk
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def web_fetch(self, url: str, max_chars: int) -> dict[str, Any]:
        """Through the server's web_fetch endpoint: its settings (web_fetch_allow_private, ...) apply."""
        import httpx

        path = "glm/api/tools/web_fetch"
        try:
            response = self.client.post(path, json={"url": url, "max_chars": max_chars})
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            try:
                error = response.json().get("error") or {}
            except (ValueError, AttributeError):
                error = {}
            if isinstance(error, dict) and str(error.get("code") or "").startswith("web_fetch"):
                raise GLMError(f"cannot read {url}: {error.get('message')}", code=error.get("code"))
            raise self._fail(response, path)
        return response.json()

    def routing(self, completion_id: str) -> dict[str, Any] | None:
        try:
            return self._get(f"glm/api/routing/{completion_id}")
        except GLMError:
            return None

    def close(self) -> None:
        self.client.close()


class _LoopThread:
    """An asyncio loop on a daemon thread: the chat layer's async backends driven from synchronous cells
    (a Jupyter kernel already runs a loop on the main thread, so `asyncio.run` is not an option there)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="glm-magic-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        finally:
            future.cancel()  # after an interrupt (KeyboardInterrupt) the work stops too

    def iterate(self, async_iterator) -> Iterator[Any]:
        """Items of an async iterator, one by one; leaving early closes it (cancelling its generation)."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        done = object()

        async def pump() -> None:
            try:
                async for item in async_iterator:
                    items.put((item, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as it is
                items.put((done, exc))
                return
            items.put((done, None))

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                item, error = items.get()
                if item is done:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            if not future.done():
                future.cancel()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class InProcessConnection(Connection):
    """The chat layer in this kernel: the local engine (loaded here) or a remote endpoint called from here."""

    def __init__(self, backend, description: str, timeout: float = 600.0) -> None:
        self.backend = backend
        self.description = description
        self.timeout = timeout
        self.loop = _LoopThread()
        try:
            self.loop.run(backend.start())
        except Exception:
            self.loop.close()
            raise
        if getattr(backend, "state", "ready") in ("error", "unconfigured"):
            self.loop.close()
            raise GLMError(getattr(backend, "message", "") or f"the {backend.kind} backend could not start")

    @property
    def supports_routing(self) -> bool:
        return self.backend.kind == "local"

    def describe(self) -> str:
        return self.description

    def models(self) -> list[str]:
        return [card.id for card in self.backend.models()]

    def model_cards(self) -> list[dict[str, Any]]:
        return [card.model_dump(exclude_none=True) for card in self.backend.models()]

    def status(self) -> dict[str, Any]:
        return self.backend.status()

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        from workbench.chat import APIError, parse_request

        try:
            request = parse_request(body)
            if body.get("stream"):
                for chunk in self.loop.iterate(self.backend.stream(request)):
                    yield chunk.model_dump(exclude_none=True)
            else:
                yield self.loop.run(self.backend.complete(request), self.timeout).model_dump(exclude_none=True)
        except APIError as exc:
            raise GLMError(exc.message, code=exc.code) from None

    def routing(self, completion_id: str) -> dict[str, Any] | None:
        return self.backend.routing_trace(completion_id)

    def context_limit(self) -> int | None:
        with contextlib.suppress(AttributeError, TypeError):
            return int(self.backend.context_limit)
        return None

    def count_tokens(self, text: str) -> int:
        tokenizer = getattr(getattr(self.backend, "engine", None), "tokenizer", None)
        return len(tokenizer.encode(text)) if tokenizer is not None else super().count_tokens(text)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run(self.backend.close(), timeout=10)
        self.loop.close()


