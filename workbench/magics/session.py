"""One kernel's `%%glm` session: its settings (`%glm config`), where requests go (`%glm use`) and the
conversation so far (`%glm history`, `%glm reset`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.magics.connection import (
    Connection,
    GLMError,
    InProcessConnection,
    ServerConnection,
    find_jupyter_server,
)
from workbench.models import bundled_model

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
    quantize: str = ""  # in-process local engine: int8 or int4 (quantized as it loads); empty: as stored
    api_key_env: str = "ZAI_API_KEY"  # `use remote`: NAME of the environment variable holding the key
    display: str = "auto"  # auto: rich in a Jupyter kernel, text elsewhere; rich; text
    timeout: float = 600.0  # seconds to wait for an answer

    CHOICES = {"server": ("auto", "off"), "display": ("auto", "rich", "text"),
               "dtype": ("auto", "float32", "bfloat16", "float16"), "kernels": ("auto", "triton", "torch"),
               "quantize": ("", "int8", "int4")}

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


# --- the session: where requests go, and what the conversation so far was ------------------------------

@dataclass
class Turn:
    user: str
    assistant: str


@dataclass
class Session:
    """One kernel's `%%glm` state: settings, target, the open connection and the conversation memory."""

    settings: Settings = field(default_factory=Settings)
    # ("local",) | ("local", "kernel") (in this kernel, never the server's) | ("remote", url, model) | ("server", info)
    target: tuple = ("local",)
    turns: list[Turn] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)  # what this session's priced answers cost, by currency
    priced_answers: int = 0
    _connection: Connection | None = None

    def add_cost(self, cost: Any) -> None:
        """One answer's `usage.cost` (`{"input", "output", "total", "currency"}`) into the running total."""
        if not isinstance(cost, dict) or not isinstance(cost.get("total"), int | float):
            return
        currency = str(cost.get("currency") or "USD")
        self.costs[currency] = self.costs.get(currency, 0.0) + float(cost["total"])
        self.priced_answers += 1

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
        if settings.server == "auto" and self.target == ("local",):
            server = find_jupyter_server()
            if server is not None:
                return ServerConnection(server, settings.timeout)
        path, why_not = (settings.model_path, "") if settings.model_path else bundled_model()
        if not path:
            raise GLMError(f"no model to run in this kernel ({why_not}). Set a checkpoint with "
                           "`%glm config model_path=/path/to/checkpoint`, or `%glm use remote URL MODEL` for a "
                           "hosted GLM endpoint")
        if not Path(path).expanduser().is_dir() and Path(path).suffix != ".gguf":
            raise GLMError(f"model_path {path} is neither a checkpoint folder (config.json, *.safetensors, "
                           "tokenizer.json) nor a .gguf file: `%glm config model_path=/path/to/checkpoint`")
        from workbench.chat import LocalBackend

        # The setting's "auto" pins nothing: the engine's default (WORKBENCH_KERNELS, else auto) decides.
        backend = LocalBackend(model_path=path, device=settings.device, dtype=settings.dtype,
                               kernels=None if settings.kernels == "auto" else settings.kernels,
                               quantize=settings.quantize or None)
        quantized = f", {settings.quantize} weights" if settings.quantize else ""
        return InProcessConnection(backend, f"the local engine in this kernel ({path}, {settings.device}{quantized})",
                                   settings.timeout)

    def retarget(self, target: tuple) -> None:
        self.target = target
        self.disconnect()

    def disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


