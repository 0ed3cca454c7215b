"""`%%glm` and `%glm`: the notebook's way to the model (`%load_ext workbench` registers them).

Owns the magics' surface (options, `{name}` interpolation, conversation memory, where the model runs) and
nothing of prompts or models: requests are OpenAI-shaped chat completions handed to the chat layer, either
through the Jupyter server that started this kernel (its `glm/` API, so every notebook shares one engine) or
in-process (`workbench.chat` backends) when there is no such server or when asked.

    %%glm [-f code|markdown|text] [--think | --no-think] [-m MODEL] [-t TEMP] [--max-tokens N]
          [--replace] [--run] [--cells N] [--trace] [--no-stream]
    prompt lines, with {variables}, {In[3]} and {Out[3]} from the kernel; {{ and }} for literal braces

    %glm status | models | history | reset | use local | use remote URL MODEL | use server URL [TOKEN]
         | config [key=value ...] | help

`%glm --help`, `%glm help` and `%%glm --help` (with or without a body) print the usage and every option.

Mistakes (unknown options, an empty prompt, an unknown `{name}`, a server that is down) end the cell with a
one-line `UsageError`; the kernel keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import re
import shlex
import string
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from workbench.models import bundled_model

FORMATS = ("code", "markdown", "text")
SYSTEM_PROMPTS = {
    "code": ("You are a coding assistant inside a Jupyter notebook. Answer with Python code for the next cell, "
             "in one fenced ```python block; explain only in code comments."),
    "markdown": "You are an assistant inside a Jupyter notebook. Answer in Markdown.",
    "text": "You are an assistant inside a Jupyter notebook. Answer in plain text, without Markdown.",
}
DEFAULT_CONTEXT_LIMIT = 8192  # memory budget when the backend does not say its context length
DEFAULT_ANSWER_RESERVE = 1024  # tokens kept free for the answer when --max-tokens is not given
CELL_OUTPUT_CHARS = 2000  # of each cell's output sent with --cells
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class GLMError(Exception):
    """A problem the person at the notebook can fix; shown as one line, never as a traceback."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


# --- settings -----------------------------------------------------------------------------------------

@dataclass
class Settings:
    """What `%glm config key=value` changes; one set per kernel session."""

    model: str = ""  # model id to ask for; empty: the first one the backend lists
    temperature: float | None = None  # None: the backend's default
    max_tokens: int | None = None  # None: the backend's default
    context_limit: int = 0  # token budget of prompt + memory + answer; 0: the backend's context length
    memory: bool = True  # send earlier %%glm turns of this session along
    system_prompt: bool = True  # tell the model the answer format in a system message
    server: str = "auto"  # auto: the Jupyter server that started this kernel, when there is one; off: never
    model_path: str = ""  # in-process local engine: checkpoint folder; empty: the bundled model
    device: str = "cpu"  # in-process local engine
    dtype: str = "auto"  # in-process local engine: auto, float32, bfloat16, float16
    kernels: str = "auto"  # in-process local engine: auto, triton, torch
    api_key_env: str = "ZAI_API_KEY"  # `use remote`: NAME of the environment variable holding the key
    display: str = "auto"  # auto: rich in a Jupyter kernel, text elsewhere; rich; text
    timeout: float = 600.0  # seconds to wait for an answer

    CHOICES = {"server": ("auto", "off"), "display": ("auto", "rich", "text"),
               "dtype": ("auto", "float32", "bfloat16", "float16"), "kernels": ("auto", "triton", "torch")}

    def set(self, key: str, raw: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}
        if key not in fields:
            raise GLMError(f"unknown setting {key!r}; settings: {', '.join(fields)}")
        kind = str(fields[key].type)
        try:
            if raw.lower() in ("none", "") and "None" in kind:
                value: Any = None
            elif kind.startswith("bool"):
                if raw.lower() not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "on", "yes", "1")
            elif kind.startswith("int"):
                value = int(raw)
            elif kind.startswith("float"):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise GLMError(f"setting {key}={raw!r}: expected a value of type {kind}") from None
        if key in self.CHOICES and value not in self.CHOICES[key]:
            raise GLMError(f"setting {key}={raw!r}: choose one of {', '.join(self.CHOICES[key])}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise GLMError(f"setting {key}={raw!r}: must not be negative")
        setattr(self, key, value)

    def lines(self) -> list[str]:
        return [f"{f.name} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)]


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
        return [m["id"] for m in self._get("glm/v1/models").get("data", [])]

    def status(self) -> dict[str, Any]:
        self._status = self._get("glm/api/status")
        return self._status

    def chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import httpx

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
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and "error" in chunk:
                        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                        raise GLMError(str(error.get("message")), code=error.get("code"))
                    yield chunk
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

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


# --- the session: where requests go, and what the conversation so far was ------------------------------

@dataclass
class Turn:
    user: str
    assistant: str


@dataclass
class Session:
    """One kernel's `%%glm` state: settings, target, the open connection and the conversation memory."""

    settings: Settings = field(default_factory=Settings)
    target: tuple = ("local",)  # ("local",) | ("remote", url, model) | ("server", ServerInfo)
    turns: list[Turn] = field(default_factory=list)
    _connection: Connection | None = None

    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = self._connect()
        return self._connection

    def _connect(self) -> Connection:
        settings = self.settings
        kind = self.target[0]
        if kind == "server":
            return ServerConnection(self.target[1], settings.timeout)
        if kind == "remote":
            from workbench.chat import RemoteBackend

            _, url, model = self.target
            try:
                backend = RemoteBackend(url, model, api_key_env=settings.api_key_env or None,
                                        timeout=settings.timeout)
            except ValueError as exc:
                raise GLMError(str(exc)) from None
            key = f" (API key from ${settings.api_key_env})" if settings.api_key_env else ""
            return InProcessConnection(backend, f"the remote endpoint {url} (model {model}), called from this "
                                                f"kernel{key}", settings.timeout)
        if settings.server == "auto":
            server = find_jupyter_server()
            if server is not None:
                return ServerConnection(server, settings.timeout)
        path, why_not = (settings.model_path, "") if settings.model_path else bundled_model()
        if not path:
            raise GLMError(f"no model to run in this kernel ({why_not}). Set a checkpoint with "
                           "`%glm config model_path=/path/to/checkpoint`, or `%glm use remote URL MODEL` for a "
                           "hosted GLM endpoint")
        if not Path(path).expanduser().is_dir():
            raise GLMError(f"model_path {path} is not a checkpoint folder (config.json, *.safetensors, "
                           "tokenizer.json): `%glm config model_path=/path/to/checkpoint`")
        from workbench.chat import LocalBackend

        backend = LocalBackend(model_path=path, device=settings.device, dtype=settings.dtype,
                               kernels=settings.kernels)
        return InProcessConnection(backend, f"the local engine in this kernel ({path}, {settings.device})",
                                   settings.timeout)

    def retarget(self, target: tuple) -> None:
        self.target = target
        self.disconnect()

    def disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# --- prompt building ----------------------------------------------------------------------------------

def interpolate(template: str, namespace: dict[str, Any]) -> str:
    """`{name}`, `{In[3]}`, `{Out[3]}`, `{obj.attr}`, `{x:.2f}` from the kernel; `{{` and `}}` are braces."""
    formatter = string.Formatter()
    try:
        fields = [name for _, name, _, _ in formatter.parse(template) if name is not None]
    except ValueError as exc:
        raise GLMError(f"the prompt has an unmatched brace ({exc}): write {{{{ and }}}} for literal braces") \
            from None
    for name in fields:
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise GLMError(f"{{{name}}} in the prompt names no variable: write {{{{{name}}}}} for literal braces")
        if root not in namespace:
            raise GLMError(f"unknown name {{{root}}} in the prompt: no variable {root!r} in this kernel; define "
                           f"it first, or write {{{{{name}}}}} for literal braces")
    try:
        return template.format_map(namespace)
    except (KeyError, IndexError) as exc:
        raise GLMError(f"could not fill in the prompt: {type(exc).__name__} {exc} (for {{Out[n]}}, cell n must "
                       "have returned a value; for {In[n]}, cell n must exist)") from None
    except (AttributeError, ValueError, TypeError) as exc:
        raise GLMError(f"could not fill in the prompt: {exc}") from None


class _Tee:
    """A stand-in for sys.stdout / sys.stderr during a cell: passes everything on, and hands written text to `keep`."""

    def __init__(self, stream, keep) -> None:
        self._stream, self._keep = stream, keep

    def write(self, text):
        self._keep(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class CellOutputLog:
    """What each cell printed (stdout and stderr) and the error it ended with, by execution count, for `--cells`.

    IPython keeps cells' sources and results (In, Out), but printed text goes straight to the frontend. While the
    extension is loaded, sys.stdout and sys.stderr are teed during each cell: the text goes out unchanged, and the
    last CELL_OUTPUT_CHARS of it are kept, for the last MAX_CELLS cells."""

    MAX_CELLS = 100

    def __init__(self, shell) -> None:
        self.shell = shell
        self.printed: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self._text = ""  # what the running cell printed so far (its tail, past 2 * CELL_OUTPUT_CHARS)
        self._saved: tuple[Any, Any] | None = None

    def register(self) -> None:
        self.shell.events.register("pre_run_cell", self.pre_run_cell)
        self.shell.events.register("post_run_cell", self.post_run_cell)

    def unregister(self) -> None:
        self._restore()
        for event, callback in (("pre_run_cell", self.pre_run_cell), ("post_run_cell", self.post_run_cell)):
            with contextlib.suppress(ValueError):
                self.shell.events.unregister(event, callback)

    def pre_run_cell(self, info=None) -> None:
        self._restore()
        self._text = ""
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._keep), _Tee(sys.stderr, self._keep)

    def post_run_cell(self, result) -> None:
        self._restore()
        number = getattr(result, "execution_count", None)
        if number is None:  # a cell run without history has no In[n] to attach its output to
            return
        text = self._text
        if result.result is not None:  # a terminal shell's displayhook prints "Out[n]: ..." too: Out has it already
            marker = text.rfind(f"Out[{number}]:")
            text = text if marker < 0 else text[:marker]
        text = ANSI_ESCAPE.sub("", text)[-CELL_OUTPUT_CHARS:]  # colours are for eyes, not for the model
        if text.strip():
            self.printed[number] = text
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            self.errors[number] = f"{type(error).__name__}: {error}"
        for kept in (self.printed, self.errors):
            for old in sorted(kept)[:-self.MAX_CELLS]:
                del kept[old]

    def _keep(self, text) -> None:
        if isinstance(text, str):
            self._text += text
            if len(self._text) > 2 * CELL_OUTPUT_CHARS:  # keep memory bounded for cells that print a lot
                self._text = self._text[-CELL_OUTPUT_CHARS:]

    def _restore(self) -> None:
        # Put the streams back only where they are still ours: a cell may have replaced them on purpose.
        if self._saved is not None:
            if isinstance(sys.stdout, _Tee):
                sys.stdout = self._saved[0]
            if isinstance(sys.stderr, _Tee):
                sys.stderr = self._saved[1]
            self._saved = None


def cells_context(shell, count: int, log: CellOutputLog | None = None) -> str:
    """The source, printed text, result and error of the last `count` cells before this one, as Markdown."""
    history = shell.user_ns.get("In", [])
    outputs = shell.user_ns.get("Out", {})
    current = len(history) - 1  # In[-1] is the cell running now
    parts = []
    for number in range(max(1, current - count), current):
        source = history[number].strip()
        if not source:
            continue
        block = f"In [{number}]:\n```python\n{source}\n```"
        if log is not None and number in log.printed:
            block += f"\nprinted:\n```\n{log.printed[number].rstrip()}\n```"
        if number in outputs:
            text = repr(outputs[number])
            if len(text) > CELL_OUTPUT_CHARS:
                text = text[:CELL_OUTPUT_CHARS] + " ..."
            block += f"\nOut[{number}]:\n```\n{text}\n```"
        if log is not None and number in log.errors:
            block += f"\nerror: {log.errors[number]}"
        parts.append(block)
    if not parts:
        return ""
    return "The last cells of my notebook:\n\n" + "\n\n".join(parts) + "\n\n"


FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^\1[ \t]*$|\Z)", re.S | re.M)
PYTHON_LANGS = ("", "python", "py", "python3", "ipython", "ipython3")


def extract_code(answer: str) -> str:
    """The fenced code of an answer (Python blocks when there are any, joined), or the whole answer."""
    blocks = [(lang.lower(), body.rstrip("\n")) for _, lang, body in FENCE.findall(answer)]
    python = [body for lang, body in blocks if lang in PYTHON_LANGS]
    chosen = python or [body for _, body in blocks]
    return "\n\n".join(chosen).strip("\n") if chosen else answer.strip("\n")


# --- the magics ---------------------------------------------------------------------------------------

SUBCOMMANDS = ("status", "models", "history", "reset", "use", "config", "help")
USAGE = """\
%%glm [-f code|markdown|text] [--think | --no-think] [-m MODEL] [-t TEMP] [--max-tokens N]
      [--replace] [--run] [--cells N] [--trace] [--no-stream]
prompt lines; {name}, {In[3]}, {Out[3]} come from the kernel, {{ and }} are literal braces

%glm status                   where the model runs, and how it is doing
%glm models                   the models the backend serves
%glm history | reset          the conversation memory of this kernel
%glm use local                the local engine (the Jupyter server's, else loaded in this kernel)
%glm use remote URL MODEL     an OpenAI-compatible GLM endpoint, called from this kernel
%glm use server URL [TOKEN]   the GLM API of a given Jupyter server
%glm config [key=value ...]   show or change settings (%glm config lists them)
%glm help | --help            this text (so does %%glm --help)"""
HELP_FLAGS = ("-h", "--help")


@magics_class
class GLMMagics(Magics):
    """`%%glm` asks the model; `%glm` manages the session (see the module docstring)."""

    def __init__(self, shell) -> None:
        super().__init__(shell)
        self.session = Session()
        self.output_log = CellOutputLog(shell)  # registered by load_ipython_extension

    @magic_arguments()
    @argument("-f", "--format", choices=FORMATS, default="code",
              help="code (default: the answer's code goes into a new cell below), markdown or text")
    @argument("--think", action="store_true", help="ask the model to think first")
    @argument("--no-think", action="store_true", help="ask the model to answer without thinking")
    @argument("-m", "--model", help="model id (default: the backend's model, or %%glm config model=...)")
    @argument("-t", "--temperature", type=float, help="sampling temperature (0 = greedy)")
    @argument("--max-tokens", type=int, help="longest answer, in tokens")
    @argument("--replace", action="store_true", help="put the code into this cell instead of a new one")
    @argument("--run", action="store_true", help="also run the generated code (format code only)")
    @argument("--cells", type=int, default=0, metavar="N",
              help="send the source and output of the last N cells along")
    @argument("--trace", action="store_true", help="show which experts the answer's tokens went to")
    @argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming")
    @line_cell_magic
    def glm(self, line: str, cell: str | None = None) -> None:
        """Ask the GLM model (`%%glm` + prompt), or manage the session (`%glm status`, ...)."""
        try:
            if cell is None:
                self._line(line)
            else:
                self._cell(line, cell)
        except GLMError as exc:
            raise UsageError(f"{'%glm' if cell is None else '%%glm'}: {exc}") from None

    def help_text(self) -> str:
        """The usage (`USAGE`) and every `%%glm` option with its meaning, from the option parser itself."""
        options = self.glm.parser.format_help().split("options:", 1)[-1].rstrip("\n")
        return f"{USAGE}\n\n%%glm options:{options}"

    # --- %glm subcommands ---------------------------------------------------------------------------------
    def _line(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise GLMError(f"cannot read {line!r}: {exc}") from None
        if not words or words[0] == "help" or words[0] in HELP_FLAGS:
            print(self.help_text())
            return
        command, rest = words[0], words[1:]
        session = self.session
        if command == "status":
            self._status()
        elif command == "models":
            for model in session.connection().models():
                print(model)
        elif command == "history":
            if not session.turns:
                print("no conversation yet (memory is " + ("on)" if session.settings.memory else "off)"))
            for number, turn in enumerate(session.turns, 1):
                print(f"[{number}] you: {_shorten(turn.user)}")
                print(f"[{number}] glm: {_shorten(turn.assistant)}")
        elif command == "reset":
            dropped = len(session.turns)
            session.turns.clear()
            print(f"conversation memory cleared ({dropped} turn{'s' if dropped != 1 else ''} forgotten)")
        elif command == "use":
            self._use(rest)
        elif command == "config":
            self._config(rest)
        else:
            raise GLMError(f"unknown subcommand {command!r}: %glm {' | '.join(SUBCOMMANDS)}; to ask the model, "
                           "put %%glm on the first line of a cell and the prompt below it")

    def _use(self, words: list[str]) -> None:
        session = self.session
        if words == ["local"]:
            session.retarget(("local",))
            print("using the local engine: " + session.connection().describe())
        elif len(words) == 3 and words[0] == "remote":
            session.retarget(("remote", words[1], words[2]))
            print("using " + session.connection().describe())
        elif len(words) in (2, 3) and words[0] == "server":
            url = words[1] if words[1].endswith("/") else words[1] + "/"
            session.retarget(("server", ServerInfo(url=url, token=words[2] if len(words) == 3 else "",
                                                   source="%glm use server")))
            print("using " + session.connection().describe())
        else:
            raise GLMError("usage: %glm use local | use remote URL MODEL | use server URL [TOKEN]")

    def _config(self, words: list[str]) -> None:
        settings = self.session.settings
        if not words:
            print("\n".join(settings.lines()))
            return
        changed_target = False
        for word in words:
            key, sep, value = word.partition("=")
            if not sep:
                raise GLMError(f"config takes key=value pairs, got {word!r}; `%glm config` lists the settings")
            settings.set(key.strip(), value.strip())
            changed_target |= key.strip() in ("server", "model_path", "device", "dtype", "kernels", "api_key_env",
                                              "timeout")
            print(f"{key.strip()} = {getattr(settings, key.strip())!r}")
        if changed_target:
            self.session.disconnect()  # the next request connects with the new settings

    def _status(self) -> None:
        session = self.session
        connection = session.connection()
        print("GLM Workbench: " + connection.describe())
        info = connection.status()
        facts = [f"{key} {info[key]}" for key in ("backend", "model", "state", "device", "dtype", "kernels")
                 if info.get(key)]
        if info.get("context_limit"):
            facts.append(f"context {info['context_limit']} tokens")
        facts.append(f"{info.get('active_requests', 0)} active, {info.get('queued_requests', 0)} queued")
        if info.get("recent_tokens_per_second") is not None:
            facts.append(f"{float(info['recent_tokens_per_second']):.1f} tok/s")
        print(" · ".join(facts))
        if info.get("message"):
            print(info["message"])
        memory = "on" if session.settings.memory else "off"
        print(f"memory: {len(session.turns)} turn{'s' if len(session.turns) != 1 else ''} ({memory})")

    # --- %%glm -------------------------------------------------------------------------------------------
    def _cell(self, line: str, cell: str) -> None:
        try:
            asks_help = any(word in HELP_FLAGS for word in shlex.split(line))
        except ValueError:
            asks_help = False  # unbalanced quotes: argparse says what is wrong just below
        if asks_help:  # the usage, whatever else the line or the body holds: nothing is sent
            print(self.help_text())
            return
        args = parse_argstring(self.glm, line)  # unknown options: argparse's one-line UsageError
        settings = self.session.settings
        if args.think and args.no_think:
            raise GLMError("--think and --no-think contradict each other: give one (or neither: the model decides)")
        if args.run and args.format != "code":
            raise GLMError(f"--run runs code, but --format is {args.format}: drop --run or use --format code")
        if args.replace and args.format != "code":
            raise GLMError(f"--replace puts code into this cell, but --format is {args.format}")
        if args.cells < 0:
            raise GLMError(f"--cells {args.cells}: give how many earlier cells to send (0 or more)")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise GLMError(f"--max-tokens {args.max_tokens}: must be at least 1")
        prompt = interpolate(cell, self.shell.user_ns).strip()
        if not prompt:
            raise GLMError("the prompt is empty: write it on the lines below %%glm (%glm --help shows the usage)")
        user_text = (cells_context(self.shell, args.cells, self.output_log) if args.cells else "") + prompt

        connection = self.session.connection()
        model = args.model or settings.model or self._default_model(connection)
        trace = args.trace
        if trace and not connection.supports_routing:
            print("note: --trace shows routing only for the local engine; this answer comes from a remote "
                  "endpoint, which does not report its experts")
            trace = False
        body: dict[str, Any] = {"model": model, "stream": not args.no_stream}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        if args.think or args.no_think:
            body["thinking"] = {"type": "enabled" if args.think else "disabled"}
        temperature = args.temperature if args.temperature is not None else settings.temperature
        if temperature is not None:
            body["temperature"] = temperature
        max_tokens = args.max_tokens or settings.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if trace:
            body["routing"] = True

        result = self._ask(connection, body, args.format, user_text, max_tokens)
        if result is None:
            return
        answer, finish_reason, completion_id = result
        if settings.memory:
            self.session.turns.append(Turn(user=user_text, assistant=answer))
        if finish_reason == "length":
            print(f"note: the answer was cut off at {max_tokens or 'the default'} tokens (--max-tokens)")
        if args.format == "code":
            self._place_code(answer, replace=args.replace, run=args.run)
        if trace and completion_id:
            self._show_trace(connection, completion_id)

    def _default_model(self, connection: Connection) -> str:
        models = connection.models()
        if not models:
            raise GLMError(connection.describe() + " lists no model (GET v1/models is empty)")
        return models[0]

    def _messages(self, connection: Connection, answer_format: str, user_text: str,
                  max_tokens: int | None, skip_turns: int) -> tuple[list[dict[str, str]], int]:
        """System prompt, the remembered turns that fit the context (oldest dropped first), the new prompt;
        and how many remembered turns went in."""
        settings = self.session.settings
        system = [{"role": "system", "content": SYSTEM_PROMPTS[answer_format]}] if settings.system_prompt else []
        turns = self.session.turns[skip_turns:] if settings.memory else []
        limit = settings.context_limit or connection.context_limit() or DEFAULT_CONTEXT_LIMIT
        budget = limit - (max_tokens or DEFAULT_ANSWER_RESERVE) - connection.count_tokens(user_text)
        budget -= sum(connection.count_tokens(m["content"]) for m in system)
        kept: list[Turn] = []
        for turn in reversed(turns):  # newest first: what is dropped is the oldest
            cost = connection.count_tokens(turn.user) + connection.count_tokens(turn.assistant) + 8
            if cost > budget:
                break
            budget -= cost
            kept.append(turn)
        history = []
        for turn in reversed(kept):
            history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        return system + history + [{"role": "user", "content": user_text}], len(kept)

    def _ask(self, connection: Connection, body: dict[str, Any], answer_format: str, user_text: str,
             max_tokens: int | None) -> tuple[str, str | None, str | None] | None:
        """Send the request and show the answer as it comes; returns (answer, finish_reason, completion id)."""
        from workbench.widgets.thinking import AnswerDisplay

        settings = self.session.settings
        rich = settings.display == "rich" or (settings.display == "auto"
                                               and getattr(self.shell, "kernel", None) is not None)
        skip = 0
        while True:
            body["messages"], remembered = self._messages(connection, answer_format, user_text, max_tokens, skip)
            view = AnswerDisplay(rich=rich)
            finish_reason = completion_id = None
            try:
                for chunk in connection.chat(body):
                    completion_id = chunk.get("id") or completion_id
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or choice.get("message") or {}
                        view.reasoning(delta.get("reasoning_content") or "")
                        view.content(delta.get("content") or "")
                        finish_reason = choice.get("finish_reason") or finish_reason
            except GLMError as exc:
                # Our token estimate was too low: drop the oldest remembered turn that was sent, and retry.
                if exc.code == "context_length_exceeded" and remembered > 0 and not view.answer:
                    skip = len(self.session.turns) - remembered + 1
                    continue
                raise
            except KeyboardInterrupt:
                view.finish()
                print("\ninterrupted: the generation was cancelled (nothing was remembered)")
                return None
            view.finish()
            return view.answer, finish_reason, completion_id

    def _place_code(self, answer: str, replace: bool, run: bool) -> None:
        code = extract_code(answer)
        if not code.strip():
            print("the model gave no code: nothing was put into a cell")
            return
        self.shell.set_next_input(code, replace=replace)
        lines = code.count("\n") + 1
        where = "into this cell, replacing the prompt" if replace else "into a new cell below"
        print(f"↳ {lines} line{'s' if lines != 1 else ''} of code put {where}" + (" and run here:" if run else ""))
        if run:
            self.shell.run_cell(code, store_history=False)

    def _show_trace(self, connection: Connection, completion_id: str) -> None:
        data = connection.routing(completion_id)
        if data is None:
            print(f"note: no routing trace was kept for {completion_id}")
            return
        from workbench.engine.routing import RoutingTrace
        from workbench.widgets import show_routing

        trace = RoutingTrace.from_dict(data)
        if isinstance(data.get("tokens"), list):
            trace.meta["token_texts"] = data["tokens"]
        show_routing(trace)


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_GLM_CELL_MAGIC = re.compile(r"^\s*%%glm(?P<line>(\s.*)?)$")


def empty_glm_cell(lines: list[str]) -> list[str]:
    """An input transformer for `%%glm` cells with nothing below the magic line (`%%glm --help`, say).

    IPython refuses any cell magic with an empty body before the magic runs ("the cell body is empty"), which
    would hide `%%glm --help` and the magic's own message; such a cell calls the magic directly instead.
    """
    match = _GLM_CELL_MAGIC.match(lines[0].rstrip("\n")) if lines else None
    if match is None or any(line.strip() for line in lines[1:]):
        return lines
    return [f"get_ipython().find_cell_magic('glm')({match['line'].strip()!r}, '')\n"]


def load_ipython_extension(ipython) -> None:
    """`%load_ext workbench` (or `%load_ext workbench.magics`): registers `%%glm` and `%glm`."""
    previous = ipython.magics_manager.registry.get("GLMMagics")
    if previous is not None:
        previous.output_log.unregister()
    magics = GLMMagics(ipython)
    magics.output_log.register()
    ipython.register_magics(magics)
    if empty_glm_cell not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(empty_glm_cell)


def unload_ipython_extension(ipython) -> None:
    magics = ipython.magics_manager.registry.get("GLMMagics")
    if magics is not None:
        magics.session.disconnect()
        magics.output_log.unregister()
    if empty_glm_cell in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(empty_glm_cell)
