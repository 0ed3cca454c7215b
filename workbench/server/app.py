"""The jupyter-server extension: configuration (traitlets), the backend's lifetime, and the URL table.

Owns `GLMWorkbench`, an `ExtensionApp`. Its traitlets are the one place configuration enters, e.g. in
`jupyter_server_config.py`::

    c.GLMWorkbench.backend = "local"              # or "remote"
    c.GLMWorkbench.model_path = "/models/glm-4.5-air-fp8"
    c.GLMWorkbench.device = "cuda"
    c.GLMWorkbench.quantize = "int4"              # CPU: int8 or int4 weights, quantized as the model loads
    c.GLMWorkbench.remote_base_url = "https://api.z.ai/api/paas/v4"
    c.GLMWorkbench.remote_model = "glm-4.5-air"
    c.GLMWorkbench.remote_api_key_env = "ZAI_API_KEY"   # the NAME of the variable; the key stays in the env

or on the command line: `jupyter lab --GLMWorkbench.backend=remote ...`. Those settings are the shorthand for one
provider; several side by side (this server's engines, OpenAI-compatible endpoints, other workbenches) are
`providers` (see workbench.chat.providers and the README's "Providers")::

    c.GLMWorkbench.providers = [
        {"name": "local", "kind": "local"},                                  # the bundled model (or model_path)
        {"name": "vllm", "kind": "openai", "dialect": "vllm", "base_url": "http://gpu:8000/v1", "models": "auto"},
        {"name": "gpu-box", "kind": "workbench", "base_url": "http://gpu-box:8888/", "api_key_env": "GPU_BOX_TOKEN"},
    ]

or `--GLMWorkbench.providers_file=providers.json` (the same list as JSON). The presets (Z.ai, Zhipu, OpenRouter)
join when their key's variable is set. Every model is `provider/model` in one list shared by the sidebar, every
notebook's `%%glm` and any OpenAI client; the engines start loading when the server's event loop runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, default, validate

from workbench.chat.backends import Backend, LocalBackend, RemoteBackend
from workbench.chat.providers import ErrorProvider, LocalProvider, ProviderRegistry, RemoteProvider, build_providers
from workbench.engine.int_quant import QUANTIZE_CHOICES
from workbench.models import bundled_model
from workbench.server import anthropic_api, handlers, web_fetch_api
from workbench.server.conversations import ConversationStore, conversation_handlers

log = logging.getLogger(__name__)

NO_MODEL_MESSAGE = (
    "No model is configured, and the bundled model is not installed. Point the server at a GLM-4.5-style "
    "checkpoint folder (config.json, *.safetensors, tokenizer.json): `jupyter lab --GLMWorkbench.model_path=/path`, "
    "or use a remote endpoint: `--GLMWorkbench.backend=remote --GLMWorkbench.remote_base_url=... "
    "--GLMWorkbench.remote_model=...`."
)


class GLMWorkbench(ExtensionApp):
    """GLM Workbench's server side: an OpenAI-compatible chat API under `{base_url}glm/`."""

    name = "workbench"  # the package that exposes `_jupyter_server_extension_points`
    description = "GLM Workbench: an OpenAI-compatible GLM-4.5 chat API with thinking, tools and routing traces"
    load_other_extensions = True

    backend = Enum(["local", "remote"], default_value="local", config=True,
                   help="Where completions come from: this server's own engine (local) or an OpenAI-compatible "
                        "GLM endpoint (remote: Z.ai, Zhipu, vLLM, SGLang, another workbench).")
    model_path = Unicode(None, allow_none=True, config=True,
                         help="Checkpoint folder for the local engine (config.json, *.safetensors, tokenizer.json). "
                              "Default: the bundled small model, when installed.")
    model_name = Unicode("", config=True,
                         help="The model id clients send and v1/models lists. Default: the checkpoint folder's name "
                              "(local) or remote_model (remote).")
    device = Unicode("cpu", config=True, help="Torch device of the local engine: cpu, cuda, cuda:1, ...")
    dtype = Enum(["auto", "float32", "bfloat16", "float16"], default_value="auto", config=True,
                 help="Weight and activation dtype of the local engine; auto = float32 on CPU, bfloat16 on GPUs.")
    kernels = Enum(["auto", "triton", "torch"], default_value=None, allow_none=True, config=True,
                   help="Kernel backend of the local engine: triton on GPUs, torch references elsewhere (auto). "
                        "Unset: the environment variable WORKBENCH_KERNELS, else auto.")
    cpu_kernels = Enum(["auto", "compiled", "torch"], default_value=None, allow_none=True, config=True,
                       help="On the CPU: the engine's compiled kernels (decode step, prefill attention and MoE; "
                            "compiled once per machine) where they can run (auto), insisted on, or the torch path. "
                            "Unset: the environment variable WORKBENCH_CPU_KERNELS, else auto.")
    quantize = Enum(list(QUANTIZE_CHOICES), default_value=None, allow_none=True, config=True,
                    help="Quantize the local engine's weights as the checkpoint loads: int8 or int4 (CPU: integer "
                         "weights, 8 or ~4.75 bits; routers, norms and embeddings stay dense), or an FP8 scheme "
                         "(GPUs: fp8-channel, fp8-block, add -w8a8 for FP8 activations). Default: as stored.")
    max_concurrent_sequences = Int(8, config=True,
                                   help="Sequences the local engine decodes together in one batched step.")
    max_queued_requests = Int(64, config=True,
                              help="Requests that may wait beyond max_concurrent_sequences; more get a 429.")
    context_limit = Int(0, config=True, help="Tokens of context per sequence (0: the model's own limit).")
    max_request_bytes = Int(8 * 2**20, config=True,
                            help="Largest request body the GLM API reads (bytes); a larger one is a 413 before it is "
                                 "parsed. 0: no limit.")
    default_max_tokens = Int(0, config=True,
                             help="Completion length when a request gives no max_tokens: 0 (default) gives the room "
                                  "left in the context, as vLLM does; a positive value caps it.")
    kv_cache_tokens = Int(0, config=True,
                          help="Tokens the local engine's KV cache holds for all sequences together (0: a full "
                               "context for each of max_concurrent_sequences, at most 65,536). Blocks are taken as "
                               "sequences grow; when they run out the newest sequence pauses and resumes later.")
    routing_history = Int(32, config=True, help="Routing traces kept for api/routing/{id} (the most recent ones).")
    remote_base_url = Unicode("", config=True,
                              help="API root of the remote endpoint, e.g. https://api.z.ai/api/paas/v4, "
                                   "https://open.bigmodel.cn/api/paas/v4 or http://host:8000/v1.")
    remote_model = Unicode("", config=True, help="Model name at the remote endpoint, e.g. glm-4.5-air.")
    remote_api_key_env = Unicode("ZAI_API_KEY", config=True,
                                 help="NAME of the environment variable holding the remote API key (the key itself "
                                      "is never configured, logged or sent anywhere but the endpoint). Empty: no key.")
    remote_thinking_style = Enum(["auto", "thinking", "chat_template_kwargs"], default_value="auto", config=True,
                                 help="How the endpoint switches thinking: the `thinking` field (Z.ai, Zhipu) or "
                                      "`chat_template_kwargs.enable_thinking` (vLLM, SGLang); auto picks by host.")
    remote_timeout = Float(600.0, config=True, help="Seconds to wait for the remote endpoint.")
    providers = List(Dict(), default_value=[], config=True,
                     help="Model providers side by side, each a dict: {'name': 'local', 'kind': 'local', "
                          "'model_path': ...}, {'name': 'zai', 'kind': 'openai', 'base_url': ..., 'models': [...] or "
                          "'auto', 'api_key_env': 'ZAI_API_KEY', 'dialect': 'zai', 'prices': {...}} or {'name': "
                          "'gpu-box', 'kind': 'workbench', 'base_url': 'http://host:8888/', 'api_key_env': ...}. "
                          "Empty: one provider from the backend/model_path/remote_* settings.")
    providers_file = Unicode("", config=True,
                             help="A JSON file holding the providers list (used instead of `providers`).")
    presets = Bool(True, config=True,
                   help="Add the built-in providers zai, zhipu and openrouter when their key's variable "
                        "(ZAI_API_KEY, ZHIPUAI_API_KEY, OPENROUTER_API_KEY) is set.")
    conversations_dir = Unicode(None, allow_none=True, config=True,
                                help="Where the sidebar's saved conversations live (default: in Jupyter's data "
                                     "directory).")
    web_fetch_allow_private = Bool(False, config=True,
                                   help="Let the web_fetch tool (glm/api/tools/web_fetch, %%glm --web) read loopback, "
                                        "private, link-local and other non-public addresses. Off: only public "
                                        "addresses, checked after DNS and on every redirect.")
    web_fetch_timeout = Float(20.0, config=True, help="Seconds a web_fetch may take, redirects included.")
    web_fetch_max_bytes = Int(5 * 2**20, config=True,
                              help="Most bytes of one page web_fetch reads; a longer body is cut there (truncated).")

    @validate("web_fetch_timeout", "web_fetch_max_bytes")
    def _positive(self, proposal: Any) -> Any:
        if proposal["value"] <= 0:
            raise TraitError(f"GLMWorkbench.{proposal['trait'].name} must be positive, got {proposal['value']}")
        return proposal["value"]

    @default("model_path")
    def _default_model_path(self) -> str | None:
        path, self._no_bundled_model = bundled_model()
        return path

    def initialize_settings(self) -> None:
        self._log_into_the_server_log()
        self.glm_providers = ProviderRegistry(self.make_providers())
        self._backend_started: asyncio.Task | None = None
        self.settings["glm_workbench"] = self

    # --- providers -------------------------------------------------------------------------------------------
    def provider_configs(self) -> list[dict[str, Any]] | None:
        """The configured providers list (providers_file, else providers); None: the shorthand settings."""
        if self.providers_file:
            path = Path(self.providers_file).expanduser()
            try:
                configs = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"GLMWorkbench.providers_file {path}: cannot read it as JSON ({exc})") from None
            if not isinstance(configs, list):
                raise ValueError(f"GLMWorkbench.providers_file {path}: must hold a JSON list of provider objects")
            return configs
        return list(self.providers) or None

    def make_providers(self) -> list:
        try:
            configs = self.provider_configs()
        except ValueError as exc:  # the server stays up and says why in api/status
            log.error("%s", exc)
            return [ErrorProvider("providers_file", "unknown", str(exc))]
        if configs is None:  # the shorthand: one provider from backend / model_path / remote_*
            backend = self.make_backend()
            if isinstance(backend, RemoteBackend):
                shorthand = RemoteProvider("remote", "openai", backend, [{"name": backend.remote_model}], {}, None,
                                           ["thinking", "tools"])
            else:
                shorthand = LocalProvider("local", backend)
            return [shorthand, *build_providers([], local_backend=self.make_local_backend, presets=self.presets)]
        return build_providers(configs, local_backend=self.make_local_backend, presets=self.presets)

    def make_local_backend(self, options: dict[str, Any]) -> LocalBackend:
        """A local provider's engine: its own options over the server's engine settings."""
        path = options.get("model_path", self.model_path)
        return LocalBackend(model_path=path, model_id=options.get("model_name") or None,
                            device=options.get("device", self.device), dtype=options.get("dtype", self.dtype),
                            kernels=options.get("kernels", self.kernels),
                            cpu_kernels=options.get("cpu_kernels", self.cpu_kernels),
                            quantize=options.get("quantize", self.quantize),
                            max_concurrent_sequences=self.max_concurrent_sequences,
                            max_queued_requests=self.max_queued_requests, context_limit=self.context_limit,
                            kv_cache_tokens=self.kv_cache_tokens, default_max_tokens=self.default_max_tokens,
                            routing_history=self.routing_history,
                            unconfigured_message=None if path else self._unconfigured_message())

    @property
    def glm_backend(self) -> Backend | None:
        """The default provider's backend (the first provider's: this server's engine unless configured else)."""
        return self.glm_providers.default.backend

    @glm_backend.setter
    def glm_backend(self, backend: Backend) -> None:
        default = self.glm_providers.default
        if isinstance(default, LocalProvider):
            default.replace_backend(backend)
        else:
            default.backend = backend

    def _log_into_the_server_log(self) -> None:
        """The workbench's loggers (and its kernels') write through the server's log handlers, at its level: the
        server log says what loads, what runs (kernels, cpu_kernels) and when the CPU kernels are first compiled.
        Only where nobody has set up logging (a server process of its own; not, e.g., a server inside pytest)."""
        if logging.getLogger().handlers:
            return
        server_log = self.serverapp.log
        for name in ("workbench", "glm_kernels"):
            logger = logging.getLogger(name)
            if not logger.handlers and logger.level == logging.NOTSET:
                logger.setLevel(server_log.getEffectiveLevel())
                for handler in server_log.handlers:
                    logger.addHandler(handler)

    def make_backend(self) -> Backend:
        if self.backend == "remote":
            return RemoteBackend(self.remote_base_url, self.remote_model, api_key_env=self.remote_api_key_env,
                                 thinking_style=self.remote_thinking_style, timeout=self.remote_timeout)
        return self.make_local_backend({"model_name": self.model_name})

    def _unconfigured_message(self) -> str:
        why = getattr(self, "_no_bundled_model", "")
        return NO_MODEL_MESSAGE + (f" (The bundled model: {why}.)" if why else "")

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers.ROUTES)
        self.handlers.extend(anthropic_api.ROUTES)
        self.handlers.extend(web_fetch_api.ROUTES)
        self.handlers.extend(conversation_handlers(ConversationStore(self.conversations_dir)))
        self.handlers.append(handlers.CATCH_ALL)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        self.start_backend()

    def start_backend(self) -> asyncio.Task:
        """Start the providers once (loading a model takes a while: requests wait for it, the server does not)."""
        if self._backend_started is None:
            self._backend_started = asyncio.ensure_future(self.glm_providers.start())
        return self._backend_started

    async def ready_providers(self) -> ProviderRegistry:
        """The registry, every provider starting: each request waits for its own provider only."""
        await asyncio.shield(self.start_backend())
        return self.glm_providers

    async def ready_backend(self) -> Backend:
        """The default provider's backend, started (what in-process callers and tests drive directly)."""
        await self.ready_providers()
        return await self.glm_providers.default.ready()

    async def stop_extension(self) -> None:
        await self.glm_providers.close()


def main() -> None:  # `python -m workbench.server.app`: a Jupyter server with just this API
    GLMWorkbench.launch_instance()


if __name__ == "__main__":
    main()
