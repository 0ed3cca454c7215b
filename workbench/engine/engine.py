"""The engine: token ids in, token ids (and on request a routing trace) out. Its public API.

Owns loading a checkpoint (config, weights, tokenizer; `Engine.from_pretrained`) and the public calls: `stream`,
`generate`, `generate_batch`, `logits`, and `add_request`/`step` for callers that drive the steps themselves (the
server's scheduler thread). The work happens in three rooms beside this file: request.py (a generation in
flight), scheduler.py (continuous batching, KV blocks on demand, preemption, stop strings, traces) and runner.py
(the forward passes: torch, or the compiled CPU kernels, chosen once at start). Knows nothing of messages, prompts
or HTTP: callers bring token ids (the tokenizer is here to turn text into ids and back, and to render chat
templates).

Threading: any number of threads may call `stream()`/`generate()` at once; each step serves every request,
whichever thread runs it. `Request.cancel()` is safe from any thread and takes effect at the next step.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from workbench.engine import int_quant, quant
from workbench.engine.config import ConfigError, GLMConfig
from workbench.engine.gguf_cache import load_gguf
from workbench.engine.gguf_file import is_gguf_path
from workbench.engine.kv_cache import PagedKVCache
from workbench.engine.model import GLMForCausalLM
from workbench.engine.ops import CPU_KERNEL_CHOICES, KERNEL_CHOICES, KernelRequest
from workbench.engine.request import GenerationResult, Request, StreamToken, TokenStream
from workbench.engine.routing import RoutingTrace
from workbench.engine.runner import start_runner
from workbench.engine.sampling import SamplingParams, make_generator
from workbench.engine.scheduler import Scheduler
from workbench.engine.stop_strings import StopMatcher
from workbench.engine.tokenizer import Tokenizer
from workbench.engine.weights import CheckpointError, load_weights

__all__ = ["CPU_KERNEL_CHOICES", "DTYPES", "KERNEL_CHOICES", "Engine", "GenerationResult", "Request", "StreamToken",
           "TokenStream"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class Engine:
    def __init__(self, model: GLMForCausalLM, tokenizer: Tokenizer | None, *, device: torch.device,
                 dtype: torch.dtype, max_batch_size: int = 32, cache_tokens: int | None = None,
                 max_context: int | None = None, block_size: int = 16, name: str = "glm",
                 kernels: str | None = None, cpu_kernels: str | None = None) -> None:
        """`kernels` and `cpu_kernels` (see runner.start_runner; None: their environment variable, else "auto")
        are decided once, here, into `kernel_choice`; `kernels` and `cpu_kernels` then say what was decided."""
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        self.device, self.dtype, self.name = device, dtype, name
        self.max_batch_size = max_batch_size
        limit = self.config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        # By default the pool holds a full context for every sequence of a batch, up to 64K tokens (a real
        # GLM-4.5-Air's 64K take 12 GB in bf16); blocks are taken as sequences grow, so a smaller pool only means
        # more preemption under load.
        cache_tokens = cache_tokens or min(self.max_context * max_batch_size, 65536)
        self.max_context = min(self.max_context, cache_tokens)
        config = self.config
        self.cache = PagedKVCache(config.num_hidden_layers, -(-cache_tokens // block_size), block_size,
                                  config.num_key_value_heads, config.head_dim, dtype, device)
        self.moe_layer_ids = config.moe_layer_ids
        self.runner = start_runner(self.model, self.cache, device, kernels, cpu_kernels)
        self.kernel_choice = self.runner.choice
        self.kernels, self.cpu_kernels = self.kernel_choice.kernels, self.kernel_choice.cpu_kernels
        self.scheduler = Scheduler(self.cache, self.runner, max_batch_size, self._build_trace)

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                        kernels: str | None = None, cpu_kernels: str | None = None, quantize: str | None = None,
                        gguf_cache: str | Path | None = None, **engine_kwargs) -> Engine:
        """Load a checkpoint folder, or a GGUF file (its split set, a folder holding one: gguf_file.py). FP8
        checkpoints (a `quantization_config` in config.json) load as FP8.

        `quantize` quantizes a dense checkpoint as it loads, layer by layer: "int8" | "int4" (integer weights for
        CPUs, see int_quant.py; `dtype` is then the activations' and the unquantized tensors' dtype, "auto" =
        float32), or "fp8-channel" | "fp8-block" (add "-w8a8" for FP8 activations; for GPUs). A GGUF keeps its
        own formats (Q8_0 and Q4_K import exactly as int8 and int4); on the CPU its weights are memory-mapped from a
        repack cache made on first load (`gguf_cache`: its folder, or "off" to copy them into memory; default
        $WORKBENCH_GGUF_CACHE, else ~/.cache/glm-workbench/gguf; see gguf_cache.py).
        `kernels` and `cpu_kernels`: see `Engine` (checked here, before the slow weights)."""
        request = KernelRequest.from_arguments(kernels, cpu_kernels)
        int_quant.check_quantize_option(quantize, device, _resolved_kernels(request, device))
        folder = Path(path).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"model path {folder} does not exist")
        if is_gguf_path(folder):  # a GGUF file, its splits, or a folder holding one
            if quantize is not None:
                raise ValueError(f"{folder.name} is a GGUF file: its weights keep the file's own formats (Q8_0, "
                                 f"Q4_K, ...); drop quantize={quantize!r}")
            torch_device = torch.device(device)
            torch_dtype = _parse_dtype(dtype, torch_device)
            request.kernel_table(torch_device)
            model, tokenizer, name = load_gguf(folder, torch_dtype, torch_device, gguf_cache)
            return cls(model, tokenizer, device=torch_device, dtype=torch_dtype, name=name,
                       kernels=request.kernels, cpu_kernels=request.cpu_kernels, **engine_kwargs)
        if not folder.is_dir():
            raise CheckpointError(f"model path {folder} is a file: point at the checkpoint folder holding config.json")
        torch_device = torch.device(device)
        torch_dtype = _parse_dtype(dtype, torch_device)
        config = GLMConfig.from_json(folder)
        tokenizer = Tokenizer.from_pretrained(folder)  # checked before the (slow) weights
        request.kernel_table(torch_device)  # a request this device cannot meet fails before the weights load
        scheme = quant.parse_quantization_config(config.extra.get("quantization_config"))
        if quantize is not None and scheme is not None:
            raise ValueError(f"{folder.name} is already quantised ({scheme.name}); drop quantize={quantize!r}")
        if quantize in int_quant.QUANTIZE_FORMATS:
            int_quant.check_config(config, quantize)
            note = int_quant.cpu_note()
            if note:
                log.warning(note)
            model = _built(lambda: int_quant.build_quantized_model(
                config, int_quant.checkpoint_tensors(folder), quantize, dtype=torch_dtype))
        else:
            if quantize is not None:
                scheme = quant.scheme_from_name(quantize)

            def build() -> GLMForCausalLM:
                with torch.device("meta"):
                    model = GLMForCausalLM(config)
                    if scheme is not None:
                        quant.quantize_model(model, scheme)  # FP8 shells, filled (or quantised into) by the loader
                load_weights(model, config, folder, torch_dtype, torch_device)
                model.materialize_buffers(torch_device)
                return model

            model = _built(build)
        return cls(model, tokenizer, device=torch_device, dtype=torch_dtype, name=folder.name,
                   kernels=request.kernels, cpu_kernels=request.cpu_kernels, **engine_kwargs)

    @property
    def weights(self) -> dict:
        """The weights' format ("int4", "int8", an FP8 scheme or the dtype), average bits per weight of the
        matrices, their bytes in all and the bytes of weights one decoded token reads (the active parameters)."""
        if getattr(self, "_weights", None) is None:
            self._weights = int_quant.weight_summary(self.model)
        return self._weights

    # --- requests -------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, routing: bool = False,
                    routing_scores: bool = False) -> Request:
        """Queue a generation. `routing`: record the experts each token chose (`GenerationResult.routing`);
        `routing_scores`: also every router score (`RoutingTrace.scores`, [layers, tokens, experts] float32), for
        analysis in Python; the HTTP API keeps traces small and never asks for them."""
        params = params or SamplingParams()
        prompt_ids = self._check_prompt(prompt_ids, params)
        stop_ids = params.stop_token_ids
        if stop_ids is None:
            stop_ids = self.tokenizer.stop_token_ids if self.tokenizer else []
        request = Request(prompt_ids, params, frozenset(stop_ids), routing=routing or routing_scores,
                          routing_scores=routing_scores)
        request.generator = make_generator(params.seed, self.device)
        request.decoder = self.tokenizer.incremental_decoder() if self.tokenizer else None
        if params.stop_strings:
            request.stop_matcher = StopMatcher(params.stop_strings)
        self.scheduler.add(request)
        return request

    def _check_prompt(self, prompt_ids, params: SamplingParams) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token id")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={params.max_new_tokens} is "
                             f"{total} tokens, over this engine's context limit of {self.max_context}: shorten "
                             "the prompt or lower max_new_tokens")
        return prompt_ids

    def step(self) -> int:
        """One scheduler step: admit and prefill waiting requests, decode one token for every running one.
        Returns the number of tokens produced."""
        return self.scheduler.step()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_preempted(self) -> int:
        """Requests waiting to resume after a preemption."""
        return self.scheduler.num_preempted

    @property
    def preemptions(self) -> int:
        """Preemptions since the engine started."""
        return self.scheduler.preemptions

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def compiled_decode(self):
        """The compiled CPU decode step in use (None on the torch path)."""
        return getattr(self.runner, "decode_step", None)

    @property
    def prefill_last_rows_only(self) -> bool:
        """Whether a prefill runs its last layer for each prompt's last row only (see runner.py)."""
        return self.runner.prefill_last_rows_only

    @prefill_last_rows_only.setter
    def prefill_last_rows_only(self, value: bool) -> None:
        self.runner.prefill_last_rows_only = value

    # --- routing traces ---------------------------------------------------------------------------------------
    def _build_trace(self, request: Request) -> RoutingTrace:
        ids = torch.cat([c[0] for c in request.routing_chunks], dim=1)
        weights = torch.cat([c[1] for c in request.routing_chunks], dim=1)
        scores = None
        if request.routing_scores and request.routing_chunks[0][2] is not None:
            scores = torch.cat([c[2] for c in request.routing_chunks], dim=1)
        tokens = (request.prompt_ids + request.output_ids)[: ids.shape[1]]
        return RoutingTrace(expert_ids=ids, weights=weights, token_ids=torch.tensor(tokens, dtype=torch.int64),
                            layer_ids=list(self.moe_layer_ids), num_experts=self.config.n_routed_experts,
                            prompt_len=len(request.prompt_ids), scores=scores,
                            meta={"model": self.name, "dtype": str(self.dtype).removeprefix("torch."),
                                  "kernels": self.kernels})

    # --- convenience API --------------------------------------------------------------------------------------
    def stream(self, prompt_ids, routing: bool = False, routing_scores: bool = False, **sampling) -> TokenStream:
        request = self.add_request(prompt_ids, SamplingParams(**sampling), routing=routing,
                                   routing_scores=routing_scores)
        return TokenStream(self.scheduler, request)

    def generate(self, prompt_ids, routing: bool = False, routing_scores: bool = False,
                 **sampling) -> GenerationResult:
        return self.stream(prompt_ids, routing=routing, routing_scores=routing_scores, **sampling).result

    def generate_batch(self, prompts: list, routing: bool = False, **sampling) -> list[GenerationResult]:
        """Generate for several prompts at once: they share every decode step."""
        requests = [self.add_request(p, SamplingParams(**sampling), routing=routing) for p in prompts]
        while not all(r.finished for r in requests):
            self.step()
        return [r.result() for r in requests]

    @torch.inference_mode()
    def logits(self, prompt_ids) -> torch.Tensor:
        """Full forward over the prompt without the cache: [T, V] float32."""
        ids = self._check_prompt(prompt_ids, SamplingParams(max_new_tokens=1))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.model(input_ids[None, :])[0]

    def describe(self) -> str:
        """What runs, in `glm/api/status`'s words: "float32 on cpu, kernels=torch, cpu_kernels=compiled", and for
        quantized weights ", weights int4 (5.29 bits per weight, 2.8 MiB read per token)". The CLI and the server
        log print this line."""
        line = f"{str(self.dtype).removeprefix('torch.')} on {self.device}, {self.kernel_choice.describe()}"
        weights = self.weights
        if weights["format"] != str(self.dtype).removeprefix("torch."):  # quantized: say how, and what a token reads
            line += (f", weights {weights['format']} ({weights['bits_per_weight']:.2f} bits per weight, "
                     f"{_binary_size(weights['bytes_per_token'])} read per token)")
        return line

    def __repr__(self) -> str:
        c = self.config
        return (f"Engine({self.name}: {c.num_hidden_layers} layers, {c.n_routed_experts} experts top-"
                f"{c.num_experts_per_tok}, {self.dtype}, {self.device}, kernels={self.kernels}, "
                f"context {self.max_context})")


def _binary_size(nbytes: float) -> str:
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            break
    return f"{nbytes:.1f} {unit}"


def _built(build) -> GLMForCausalLM:
    """`build()`'s model with its projections fused; if anything fails, nothing partially loaded stays in memory."""
    try:
        model = build()
        model.fuse_projections()
        return model
    except BaseException:
        gc.collect()  # the failed build's tensors go now, not at some later collection
        raise


def _resolved_kernels(request: KernelRequest, device: str | torch.device) -> str:
    """"torch" | "triton", as the engine will choose (a request the device cannot meet is refused later)."""
    try:
        return request.kernel_table(torch.device(device))
    except (ValueError, RuntimeError):
        return request.kernels


def _parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A dtype name or torch dtype; "auto" is float32 on the CPU (CPUs without bf16 units run it slower than
    fp32) and bfloat16 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
