"""Providers: every model this server offers, from its own engines and from other endpoints, in one model list.

Owns the provider configuration (`build_providers`: a list of dicts, validated here, plus the built-in presets),
the model ids (`provider/model`; a bare model name where it names one model), each model's workbench fields
(context length, capabilities, prices, state: what `GET v1/models` and the sidebar show), the cost of an answer
(`usage.cost`) and `ProviderRegistry`, which is itself a `Backend`: the server's handlers hand it every request
and it routes each to its provider's backend. Three kinds:

- `local`: an engine of this server (`LocalBackend`); the first one loads when the server starts, any other when
  it is first asked for;
- `openai`: any OpenAI-compatible endpoint (`RemoteBackend` with its `dialect` for thinking), its models listed
  in the configuration or read from its `v1/models` (`"models": "auto"`);
- `workbench`: another GLM Workbench server; its models (and their workbench fields) are read from its
  `glm/v1/models`, requests pass through with our own fields, and its routing traces are fetched from it.

Presets (`PRESETS`: Z.ai, Zhipu BigModel, OpenRouter) join the list only when their key's variable is set. A key
is only ever read from the environment variable a provider names, when a request is made; a provider whose
variable is not set shows `key_missing` with the variable's NAME, and nothing is sent for it. A provider whose
configuration is wrong shows `error` with what to fix; the server and the other providers go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from workbench.chat.backends.base import Backend
from workbench.chat.backends.remote import DIALECTS, RemoteBackend
from workbench.chat.protocol import APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ModelCard

log = logging.getLogger(__name__)

KINDS = ("local", "openai", "workbench")
STATES = ("ready", "loading", "idle", "unreachable", "key_missing", "error")
# thinking_budget: a `thinking.budget_tokens` cap is honoured (our engines close the reasoning after N tokens,
# OpenRouter takes it as reasoning.max_tokens, another workbench when it lists it); other dialects ignore it
CAPABILITIES = ("thinking", "tools", "routing", "thinking_budget")
PER_MILLION = 1_000_000
GLM_45_AIR_CONTEXT = 131072  # GLM-4.5-Air's context (the model card; Z.ai and OpenRouter list 128K / 131,072)

# Built-in presets, active only when their key's variable is set. Launch prices of GLM-4.5-Air:
# - Z.ai: $0.20 / $1.10 per million input / output tokens (Z.ai's pricing, as listed by
#   https://opencode.ai/data/zhipuai/glm-4-5-air.json and https://vercel.com/ai-gateway/models/glm-4.5-air.md);
# - Zhipu BigModel: 0.8 / 2 yuan per million input / output tokens (the launch announcement; issue 15);
# - OpenRouter: `z-ai/glm-4.5-air:free` costs nothing; `z-ai/glm-4.5-air` at the Z.ai endpoint's $0.20 / $1.10
#   (https://openrouter.ai/z-ai/glm-4.5-air, provider list). Thinking there: `reasoning.enabled`
#   (https://openrouter.ai/docs/use-cases/reasoning-tokens).
PRESETS: dict[str, dict[str, Any]] = {
    "zai": {"kind": "openai", "dialect": "zai", "base_url": "https://api.z.ai/api/paas/v4",
            "api_key_env": "ZAI_API_KEY", "context_length": GLM_45_AIR_CONTEXT,
            "models": [{"name": "glm-4.5-air", "prices": {"input": 0.2, "output": 1.1, "currency": "USD"}}]},
    "zhipu": {"kind": "openai", "dialect": "zai", "base_url": "https://open.bigmodel.cn/api/paas/v4",
              "api_key_env": "ZHIPUAI_API_KEY", "context_length": GLM_45_AIR_CONTEXT,
              "models": [{"name": "glm-4.5-air", "prices": {"input": 0.8, "output": 2.0, "currency": "CNY"}}]},
    "openrouter": {"kind": "openai", "dialect": "openrouter", "base_url": "https://openrouter.ai/api/v1",
                   "api_key_env": "OPENROUTER_API_KEY", "context_length": GLM_45_AIR_CONTEXT,
                   "models": [{"name": "z-ai/glm-4.5-air:free",
                               "prices": {"input": 0.0, "output": 0.0, "currency": "USD"}},
                              {"name": "z-ai/glm-4.5-air",
                               "prices": {"input": 0.2, "output": 1.1, "currency": "USD"}}]},
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_COMMON_KEYS = {"name", "kind"}
_LOCAL_KEYS = _COMMON_KEYS | {"model_path", "model_name", "device", "dtype", "quantize", "kernels", "cpu_kernels",
                              "lazy"}
_REMOTE_KEYS = _COMMON_KEYS | {"base_url", "models", "api_key_env", "dialect", "prices", "context_length",
                               "capabilities", "timeout"}
_MODEL_KEYS = {"name", "context_length", "prices", "capabilities"}
_PRICE_KEYS = {"input", "output", "currency", "per_tokens"}
LISTING_RETRY_SECONDS = 10.0  # an endpoint whose model list failed is asked again at most this often
LISTING_WAIT_SECONDS = 10.0  # v1/models waits this long for endpoints still listing their models at start
ROUTED_IDS_KEPT = 256  # completion ids of remote answers with routing, and where they came from


class ProviderConfigError(ValueError):
    """A provider's configuration is wrong; the message says what to fix."""


# ------------------------------------------------------------------------------------------------ prices


@dataclass(frozen=True)
class Prices:
    """A model's price per `per_tokens` input and output tokens."""

    input: float
    output: float
    currency: str = "USD"
    per_tokens: int = PER_MILLION

    @classmethod
    def parse(cls, value: Any, where: str) -> Prices:
        if isinstance(value, Prices):
            return value
        if not isinstance(value, Mapping):
            raise ProviderConfigError(f"{where}: prices must be an object like {{\"input\": 0.2, \"output\": 1.1, "
                                      f"\"currency\": \"USD\"}} (per million tokens), not {value!r}")
        unknown = set(value) - _PRICE_KEYS
        if unknown:
            raise ProviderConfigError(f"{where}: unknown price field(s) {', '.join(sorted(unknown))}; prices take "
                                      f"{', '.join(sorted(_PRICE_KEYS))}")
        numbers = {}
        for key in ("input", "output"):
            number = value.get(key)
            if isinstance(number, bool) or not isinstance(number, int | float) or number < 0 or number != number:
                raise ProviderConfigError(f"{where}: prices.{key} must be a number >= 0 (per million tokens), "
                                          f"not {number!r}")
            numbers[key] = float(number)
        currency = value.get("currency", "USD")
        per_tokens = value.get("per_tokens", PER_MILLION)
        if not isinstance(currency, str) or not currency:
            raise ProviderConfigError(f"{where}: prices.currency must be a currency code like USD or CNY")
        if isinstance(per_tokens, bool) or not isinstance(per_tokens, int) or per_tokens < 1:
            raise ProviderConfigError(f"{where}: prices.per_tokens must be a positive integer (default 1000000)")
        return cls(numbers["input"], numbers["output"], currency, per_tokens)

    @property
    def free(self) -> bool:
        return self.input == 0 and self.output == 0

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "currency": self.currency, "per_tokens": self.per_tokens}

    def cost(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The cost of one answer, as `usage.cost` says it."""
        spent_in = round(prompt_tokens * self.input / self.per_tokens, 10)
        spent_out = round(completion_tokens * self.output / self.per_tokens, 10)
        return {"input": spent_in, "output": spent_out, "total": round(spent_in + spent_out, 10),
                "currency": self.currency}


# ------------------------------------------------------------------------------------------------ models


@dataclass
class ModelEntry:
    """One model of one provider, as v1/models lists it."""

    provider: Provider
    model: str  # the name the provider itself uses
    context_length: int | None = None
    capabilities: list[str] = field(default_factory=lambda: ["thinking", "tools"])
    prices: Prices | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    remote_state: str | None = None  # a workbench provider's own state of the model, when not ready

    @property
    def id(self) -> str:
        return f"{self.provider.name}/{self.model}"

    def card(self) -> ModelCard:
        provider = self.provider
        state = provider.state
        if state == "ready" and self.remote_state and self.remote_state != "ready":
            state = self.remote_state
        context = provider.context_length(self) if self.context_length is None else self.context_length
        return ModelCard(id=self.id, created=self.created, owned_by=provider.name, workbench={
            "provider": provider.name, "provider_kind": provider.kind, "dialect": provider.dialect,
            "model": self.model, "context_length": context, "capabilities": list(self.capabilities),
            "prices": self.prices.to_dict() if self.prices else None,
            "free": bool(self.prices and self.prices.free), "state": state})


# ----------------------------------------------------------------------------------------------- providers


class Provider:
    """A source of models: a name, a kind, a backend, a state."""

    kind = "abstract"
    dialect: str | None = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: str | None = None
        self.backend: Backend | None = None
        self._started: asyncio.Task | None = None

    @property
    def state(self) -> str:
        raise NotImplementedError

    def entries(self) -> list[ModelEntry]:
        return []

    def context_length(self, entry: ModelEntry) -> int | None:
        return None

    async def _start(self) -> None:
        return None

    def start(self) -> asyncio.Task:
        """Start once (a task: requests for this provider wait for it; the others do not)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        return self._started

    async def ready(self) -> Backend:
        await asyncio.shield(self.start())
        if self.backend is None:
            raise APIError(503, f"The provider {self.name!r} cannot serve: {self.error}", code="provider_error")
        return self.backend

    async def refresh(self) -> None:
        """Read the model list again where it comes from the endpoint and the last reading failed."""

    def note(self, error: APIError | None) -> None:
        """What the last request says of the provider's health (an unreachable endpoint, or fine again)."""

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    def status_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind, "state": self.state,
                                 "models": [model.id for model in self.entries()], "error": self.error}
        if self.kind == "openai":
            entry["dialect"] = self.dialect
        return entry


class ErrorProvider(Provider):
    """A provider whose configuration could not be used: listed with its error, serving nothing."""

    def __init__(self, name: str, kind: str, error: str) -> None:
        super().__init__(name)
        self.kind = kind if kind in KINDS else "unknown"
        self.error = error

    @property
    def state(self) -> str:
        return "error"


class LocalProvider(Provider):
    """An engine of this server."""

    kind = "local"

    def __init__(self, name: str, backend: Backend, lazy: bool = False) -> None:
        super().__init__(name)
        self.backend = backend
        self.lazy = lazy

    def replace_backend(self, backend: Backend) -> None:
        self.backend = backend
        self._started = None

    @property
    def state(self) -> str:
        state = getattr(self.backend, "state", "ready")
        if state in ("error", "unconfigured"):
            self.error = getattr(self.backend, "message", None) or f"the engine could not start ({state})"
            return "error"
        self.error = None
        if state == "stopped":
            return "idle" if self.lazy and self._started is None else "loading"
        return state if state in STATES else "ready"

    def entries(self) -> list[ModelEntry]:
        return [ModelEntry(self, self.backend.model_id, capabilities=list(CAPABILITIES), prices=None)]

    def context_length(self, entry: ModelEntry) -> int | None:
        if getattr(self.backend, "engine", None) is None:
            return None
        with contextlib.suppress(Exception):
            return int(self.backend.context_limit)
        return None

    async def _start(self) -> None:
        await self.backend.start()


class RemoteProvider(Provider):
    """An OpenAI-compatible endpoint (`openai`) or another GLM Workbench (`workbench`)."""

    def __init__(self, name: str, kind: str, backend: RemoteBackend, models: list[dict[str, Any]] | None,
                 default_prices: dict[str, Prices], context_length: int | None,
                 capabilities: list[str]) -> None:
        super().__init__(name)
        self.kind = kind
        self.backend: RemoteBackend = backend
        self.dialect = backend.dialect if kind == "openai" else None
        self.auto = models is None
        self.default_prices = default_prices
        self.default_context = context_length
        self.default_capabilities = capabilities
        self._entries: list[ModelEntry] = []
        self._listed_at: float | None = None
        self._listing: asyncio.Task | None = None
        if models is not None:
            self._entries = [self._entry(spec) for spec in models]
            backend.served |= {entry.model for entry in self._entries}

    def _entry(self, spec: dict[str, Any]) -> ModelEntry:
        name = spec["name"]
        prices = spec.get("prices")
        return ModelEntry(self, name, context_length=spec.get("context_length", self.default_context),
                          capabilities=list(spec.get("capabilities") or self.default_capabilities),
                          prices=prices if prices is not None else self.default_prices.get(name),
                          created=spec.get("created") or int(time.time()), remote_state=spec.get("state"))

    @property
    def state(self) -> str:
        if self.backend.key_missing:
            self.error = (f"set {self.backend.api_key_env} in the Jupyter server's environment to use the "
                          f"provider {self.name!r} (its API key is read from that variable)")
            return "key_missing"
        if self.error is not None:
            return "unreachable"
        if self.auto and self._listed_at is None:
            return "loading"
        return "ready"

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    async def _start(self) -> None:
        await self.backend.start()
        if self.auto:
            await self.refresh(force=True)

    async def refresh(self, force: bool = False) -> None:
        if not self.auto or self.backend.key_missing:
            return
        if self._listing is not None and not self._listing.done():
            await asyncio.shield(self._listing)
            return
        due = self.error is not None and (self._listed_at is None or
                                          time.monotonic() - self._listed_at > LISTING_RETRY_SECONDS)
        if not (force or due):
            return
        self._listing = asyncio.ensure_future(self._list())
        await asyncio.shield(self._listing)

    async def _list(self) -> None:
        try:
            listed = await self.backend.list_models()
        except APIError as error:
            self.error = error.message
            self._listed_at = time.monotonic()
            log.warning("provider %s: could not list its models: %s", self.name, error.message)
            return
        entries = []
        for card in listed:
            fields = card.get("workbench") if self.kind == "workbench" else None
            spec: dict[str, Any] = {"name": card["id"], "created": card.get("created")
                                    if isinstance(card.get("created"), int) else None}
            if isinstance(fields, dict):  # another workbench says what its models can do, and cost
                capabilities = [c for c in fields.get("capabilities") or [] if c in CAPABILITIES]
                spec.update(capabilities=capabilities or self.default_capabilities,
                            context_length=fields.get("context_length") if isinstance(
                                fields.get("context_length"), int) else None,
                            state=fields.get("state") if fields.get("state") in STATES else None)
                with contextlib.suppress(ProviderConfigError):
                    spec["prices"] = Prices.parse(fields["prices"], "") if fields.get("prices") else None
            entries.append(self._entry(spec))
        self._entries = entries
        self.backend.served |= {entry.model for entry in entries}
        self._listed_at = time.monotonic()
        self.error = None

    def note(self, error: APIError | None) -> None:
        if error is None:
            self.error = None
        elif error.code in ("upstream_unavailable",) or error.status in (502, 504):
            self.error = error.message

    def status_entry(self) -> dict[str, Any]:
        entry = super().status_entry()
        entry["base_url"] = self.backend.base_url
        if self.backend.api_key_env:
            entry["key_env"] = self.backend.api_key_env
        return entry


# ---------------------------------------------------------------------------------------- configuration


def _model_specs(value: Any, where: str, prices: dict[str, Prices]) -> list[dict[str, Any]] | None:
    if value == "auto":
        return None
    if not isinstance(value, list) or not value:
        raise ProviderConfigError(f"{where}: models must be a non-empty list of model names (or objects with "
                                  "'name', 'context_length', 'prices', 'capabilities'), or \"auto\" to read the "
                                  "endpoint's v1/models")
    specs = []
    for index, item in enumerate(value):
        spec = {"name": item} if isinstance(item, str) else item
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ProviderConfigError(f"{where}: models[{index}] must be a model name or an object with a 'name'")
        unknown = set(spec) - _MODEL_KEYS
        if unknown:
            raise ProviderConfigError(f"{where}: models[{index}] has unknown field(s) {', '.join(sorted(unknown))}"
                                      f"; a model takes {', '.join(sorted(_MODEL_KEYS))}")
        spec = dict(spec)
        if spec.get("prices") is not None:
            spec["prices"] = Prices.parse(spec["prices"], f"{where} models[{index}]")
        elif spec["name"] in prices:
            spec["prices"] = prices[spec["name"]]
        _check_context(spec.get("context_length"), f"{where} models[{index}]")
        if spec.get("capabilities") is not None:
            spec["capabilities"] = _capabilities(spec["capabilities"], f"{where} models[{index}]")
        specs.append(spec)
    return specs


def _check_context(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ProviderConfigError(f"{where}: context_length must be a positive number of tokens, not {value!r}")


def _capabilities(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or any(item not in CAPABILITIES for item in value):
        raise ProviderConfigError(f"{where}: capabilities must be a list drawn from {', '.join(CAPABILITIES)}")
    return list(value)


def _provider_prices(value: Any, where: str) -> dict[str, Prices]:
    """Provider-level `prices`: {model name: prices}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or (set(value) & {"input", "output"}):
        raise ProviderConfigError(f"{where}: a provider's prices map each model name to its prices, e.g. "
                                  "{\"glm-4.5-air\": {\"input\": 0.2, \"output\": 1.1, \"currency\": \"USD\"}}; "
                                  "or give prices on a model of 'models'")
    return {name: Prices.parse(item, f"{where} prices[{name!r}]") for name, item in value.items()}


def _remote_provider(name: str, config: Mapping[str, Any], where: str,
                     transport: httpx.AsyncBaseTransport | None) -> RemoteProvider:
    kind = config["kind"]
    unknown = set(config) - _REMOTE_KEYS
    if unknown:
        raise ProviderConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; a provider of kind "
                                  f"{kind} takes {', '.join(sorted(_REMOTE_KEYS))}")
    base_url = config.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ProviderConfigError(f"{where}: base_url must be the endpoint's http(s) URL, e.g. "
                                  + ("http://gpu-box:8888/ (the other Jupyter server's URL)" if kind == "workbench"
                                     else "https://api.z.ai/api/paas/v4 or http://host:8000/v1"))
    key_env = config.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env)):
        raise ProviderConfigError(f"{where}: api_key_env must be the NAME of an environment variable (e.g. "
                                  "ZAI_API_KEY), never the key itself")
    timeout = config.get("timeout", 600.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ProviderConfigError(f"{where}: timeout must be a positive number of seconds")
    _check_context(config.get("context_length"), where)
    dialect = config.get("dialect", "workbench" if kind == "workbench" else "openai")
    capabilities = (_capabilities(config["capabilities"], where) if config.get("capabilities") is not None
                    # OpenRouter caps the reasoning (reasoning.max_tokens); a workbench says so in its own list
                    else ["thinking", "tools", "thinking_budget"] if dialect == "openrouter" else ["thinking", "tools"])
    prices = _provider_prices(config.get("prices"), where)
    if kind == "workbench":
        if config.get("models", "auto") != "auto" or config.get("dialect") not in (None, "workbench"):
            raise ProviderConfigError(f"{where}: a workbench provider lists the other server's own models "
                                      "(leave out 'models' and 'dialect')")
        root = re.sub(r"/glm/v1/?$", "", base_url.rstrip("/"))
        backend = RemoteBackend(f"{root}/glm/v1", "", models=[], api_key_env=key_env, dialect="workbench",
                                timeout=float(timeout), transport=transport, routing_url=f"{root}/glm/api/routing")
        return RemoteProvider(name, kind, backend, None, prices, config.get("context_length"), capabilities)
    if dialect not in DIALECTS or dialect == "workbench":
        raise ProviderConfigError(f"{where}: dialect {dialect!r} is not one of "
                                  f"{', '.join(d for d in DIALECTS if d != 'workbench')} (how the endpoint switches "
                                  "thinking and names the reasoning)")
    models = _model_specs(config.get("models", "auto"), where, prices)
    # "auto": nothing is served until the endpoint has said what it has
    backend = RemoteBackend(base_url, "", models=[spec["name"] for spec in models or []], api_key_env=key_env,
                            dialect=dialect, timeout=float(timeout), transport=transport)
    return RemoteProvider(name, kind, backend, models, prices, config.get("context_length"), capabilities)


def build_providers(configs: list[Mapping[str, Any]], *, local_backend: Callable[[dict[str, Any]], Backend],
                    presets: bool = True, environ: Mapping[str, str] | None = None,
                    transport: httpx.AsyncBaseTransport | None = None) -> list[Provider]:
    """Providers from their configuration (in order; local ones first), then the presets whose key is set.

    `local_backend(options)` makes the engine backend of a `local` provider from its options (the server's own
    engine settings fill in the rest). A configuration that cannot be used becomes an `ErrorProvider` saying why.
    """
    environ = os.environ if environ is None else environ
    providers: list[Provider] = []
    names: set[str] = set()
    locals_seen = 0
    for index, raw in enumerate(configs):
        where = f"providers[{index}]"
        name = raw.get("name") if isinstance(raw, Mapping) else None
        label = name if isinstance(name, str) and name else f"provider{index}"
        try:
            if not isinstance(raw, Mapping):
                raise ProviderConfigError(f"{where} must be an object with 'name' and 'kind', not {raw!r}")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ProviderConfigError(f"{where}: name {name!r} must be 1-64 letters, digits, '_', '.' or '-' "
                                          "(it starts every model id: name/model)")
            where = f"provider {name!r}"
            if name in names:
                raise ProviderConfigError(f"{where}: two providers have this name; give each its own")
            preset = PRESETS.get(name)
            # a provider named like a preset starts from it (e.g. only another model list or other prices)
            config = {**preset, **raw} if preset and raw.get("kind", preset["kind"]) == preset["kind"] else dict(raw)
            kind = config.get("kind")
            if kind not in KINDS:
                raise ProviderConfigError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
            if kind == "local":
                unknown = set(config) - _LOCAL_KEYS
                if unknown:
                    raise ProviderConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; a local "
                                              f"provider takes {', '.join(sorted(_LOCAL_KEYS))}")
                lazy = config.get("lazy", locals_seen > 0)  # the first engine loads at start, others when asked
                options = {key: value for key, value in config.items() if key not in _COMMON_KEYS | {"lazy"}}
                try:
                    backend = local_backend(options)
                except (TypeError, ValueError) as exc:
                    raise ProviderConfigError(f"{where}: {exc}") from None
                providers.insert(locals_seen, LocalProvider(name, backend, lazy=bool(lazy)))
                locals_seen += 1
            else:
                providers.append(_remote_provider(name, config, where, transport))
        except ProviderConfigError as exc:
            log.error("GLM Workbench providers: %s", exc)
            providers.append(ErrorProvider(label, raw.get("kind") if isinstance(raw, Mapping) else "", str(exc)))
        names.add(label)
    if presets:
        for name, preset in PRESETS.items():
            if name in names or not environ.get(preset["api_key_env"]):
                continue
            providers.append(_remote_provider(name, preset, f"preset {name!r}", transport))
            names.add(name)
    return providers


# --------------------------------------------------------------------------------------------- the registry


class ProviderRegistry(Backend):
    """Every provider behind the one `Backend` interface: requests are routed by their `model`."""

    kind = "providers"

    def __init__(self, providers: list[Provider]) -> None:
        if not providers:
            raise ValueError("no provider is configured: configure at least one (GLMWorkbench.providers)")
        self.providers = providers
        self._routed: OrderedDict[str, Provider] = OrderedDict()  # completion id -> the remote that traced it
        self._refreshing: asyncio.Task | None = None

    @property
    def default(self) -> Provider:
        return self.providers[0]

    @property
    def model_id(self) -> str:
        entries = self.entries()
        return entries[0].id if entries else f"{self.default.name}/?"

    def provider(self, name: str) -> Provider | None:
        return next((p for p in self.providers if p.name == name), None)

    def entries(self) -> list[ModelEntry]:
        return [entry for provider in self.providers for entry in provider.entries()]

    # --- lifetime ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every provider that is not lazy (each request waits only for its own provider)."""
        for provider in self.providers:
            if not getattr(provider, "lazy", False):
                provider.start()

    async def close(self) -> None:
        for provider in self.providers:
            if provider._started is not None and not provider._started.done():
                provider._started.cancel()  # a load still under way ends with the server
            with contextlib.suppress(Exception):
                await provider.close()

    # --- the model list ----------------------------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        return [entry.card() for entry in self.entries()]

    async def list_models(self) -> list[ModelCard]:
        """The model list, once the endpoints that list their own models have (briefly) been waited for, and
        after reading again the lists of those whose last reading failed."""
        listing = [provider.start() for provider in self.providers
                   if isinstance(provider, RemoteProvider) and provider.auto]
        if listing:
            await asyncio.wait(listing, timeout=LISTING_WAIT_SECONDS)
        await self.refresh()
        return self.models()

    async def refresh(self) -> None:
        await asyncio.gather(*(provider.refresh() for provider in self.providers), return_exceptions=True)

    def refresh_in_background(self) -> None:
        """Read again the model lists that failed (api/status answers at once; its next answer shows the result)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh())

    def resolve(self, model: str) -> ModelEntry:
        """The model a request names: `provider/model`, or a bare model name that names one model."""
        entries = self.entries()
        for entry in entries:
            if entry.id == model:
                return entry
        exact = [entry for entry in entries if entry.model == model]
        matches = exact or [entry for entry in entries if entry.model.endswith("/" + model)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise APIError(404, f"The model name {model!r} is ambiguous: it is served by "
                                f"{', '.join(entry.id for entry in matches)}. Send one of these ids.",
                           param="model", code="model_not_found")
        provider = self.provider(model.split("/", 1)[0]) if "/" in model else None
        if provider is not None and provider.state in ("key_missing", "unreachable", "error", "loading"):
            raise APIError(503, f"The provider {provider.name!r} is {provider.state.replace('_', ' ')}: "
                                f"{provider.error or 'its models are not listed yet'}.", param="model",
                           code=f"provider_{provider.state}")
        ids = [entry.id for entry in entries]
        listed = ", ".join(ids[:40]) + (f" and {len(ids) - 40} more" if len(ids) > 40 else "")
        raise APIError(404, f"The model {model!r} does not exist here. Models: {listed or 'none'} "
                            "(GET v1/models lists them).", param="model", code="model_not_found")

    def check_model(self, request: ChatCompletionRequest) -> None:
        self.resolve(request.model)

    # --- requests ------------------------------------------------------------------------------------------------
    async def _route(self, request: ChatCompletionRequest) -> tuple[ModelEntry, Backend, ChatCompletionRequest]:
        entry = self.resolve(request.model)
        if request.routing and "routing" not in entry.capabilities:
            raise APIError(400, f"The model {entry.id!r} has no routing traces (its capabilities: "
                                f"{', '.join(entry.capabilities) or 'none'}). Drop 'routing' or choose a model with "
                                "the routing capability (GET v1/models).", param="routing", code="unsupported")
        backend = await entry.provider.ready()
        return entry, backend, request.model_copy(update={"model": entry.model})

    def _finish_usage(self, entry: ModelEntry, usage: Any) -> None:
        if usage is None:
            return
        usage.cost = entry.prices.cost(usage.prompt_tokens, usage.completion_tokens) if entry.prices else None

    def _remember_routing(self, entry: ModelEntry, completion_id: str) -> None:
        if entry.provider.kind != "workbench" or not completion_id:
            return
        self._routed[completion_id] = entry.provider
        while len(self._routed) > ROUTED_IDS_KEPT:
            self._routed.popitem(last=False)

    async def stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        entry, backend, routed = await self._route(request)
        chunks = backend.stream(routed)
        try:
            async for chunk in chunks:
                chunk.model = request.model
                self._finish_usage(entry, chunk.usage)
                if request.routing:
                    self._remember_routing(entry, chunk.id)
                yield chunk
            entry.provider.note(None)
        except APIError as error:
            entry.provider.note(error)
            raise
        finally:
            await chunks.aclose()

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletion:
        entry, backend, routed = await self._route(request)
        try:
            completion = await backend.complete(routed)
        except APIError as error:
            entry.provider.note(error)
            raise
        entry.provider.note(None)
        completion.model = request.model
        self._finish_usage(entry, completion.usage)
        if request.routing:
            self._remember_routing(entry, completion.id)
        return completion

    async def count_prompt_tokens(self, request: ChatCompletionRequest) -> int:
        _, backend, routed = await self._route(request)
        return await backend.count_prompt_tokens(routed)

    # --- routing traces and status -------------------------------------------------------------------------------
    def routing_trace(self, completion_id: str) -> dict[str, Any] | None:
        for provider in self.providers:
            if provider.kind == "local" and provider.backend is not None:
                trace = provider.backend.routing_trace(completion_id)
                if trace is not None:
                    return trace
        return None

    async def fetch_routing_trace(self, completion_id: str) -> dict[str, Any] | None:
        """A trace of this server's engines, else of the workbench provider that answered `completion_id`."""
        trace = self.routing_trace(completion_id)
        if trace is not None:
            return trace
        remote = self._routed.get(completion_id)
        candidates = [remote] if remote is not None else [p for p in self.providers if p.kind == "workbench"
                                                          and p.state == "ready"]
        for provider in candidates:
            trace = await provider.backend.fetch_routing_trace(completion_id)
            if trace is not None:
                return trace
        return None

    def status(self) -> dict[str, Any]:
        default = self.default
        info = (default.backend.status() if default.backend is not None
                else {"backend": default.kind, "model": None, "state": "error", "message": default.error,
                      "active_requests": 0, "queued_requests": 0, "recent_tokens_per_second": 0.0})
        if default.kind != "local" and default.state != "ready":
            info["state"] = default.state
            info["message"] = default.error
        info["provider"] = default.name
        info["providers"] = [provider.status_entry() for provider in self.providers]
        return info
