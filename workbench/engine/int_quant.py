"""Integer-quantized CPU weights in the engine: int8 and int4 block formats, their modules, and one model builder.

Owns building a `GLMForCausalLM` whose matrices hold `glm_kernels.blockquant` weights (`Int8Weight`: 8 bits and
one fp32 scale per group of 32 along the input; `Int4Weight`: 4 bits with a scale and a minimum per group of 32,
two-level scales like GGUF's Q4_K), and the modules that run them. FP8 (GPUs) stays in quant.py.

**The one door in**: `build_quantized_model(config, tensors, quantize, dtype=...)` takes the config and an iterator
of `(Hugging Face tensor name, value)` pairs, where a value is a `torch.Tensor` (any float dtype) or an already
quantized `Int8Weight` / `Int4Weight`, and returns the model, ready for `Engine(model, ...)`. Both ways of getting
quantized weights go through it:
- quantize-at-load of a safetensors checkpoint (`Engine.from_pretrained(path, quantize="int8" | "int4")`, fed by
  `checkpoint_tensors(folder)`): dense tensors bound for a quantized matrix are quantized as they arrive;
- pre-quantized imports (GGUF Q8_0 / Q4_K / Q6_K, imported exactly into our formats by the GGUF reader): a
  quantized value is stored as it comes (a view stays a view: nothing is copied), whatever `quantize` says.
Names are the HF checkpoint's (`model.layers.3.mlp.experts.17.up_proj.weight`, ...); routed experts may also come
stacked in the fused layout (`model.layers.3.mlp.experts.gate_up_proj` [E, 2I, D], `...experts.down_proj` [E, D, I]).
Tensors of the multi-token-prediction layer are skipped. Missing or misshapen tensors raise `CheckpointError` and
nothing of the half-built model survives.

**Layer by layer**: nothing holds the model in full precision. Each dense tensor is quantized in row chunks of
about `CHUNK_ELEMENTS` straight into its preallocated quantized storage (experts into their slot of the stacked
[E, N, K] storage) and then dropped, so the peak beyond the quantized model is one chunk's fp32 copy plus the
pages of the one tensor being read (released again by `checkpoint_tensors`). bench/load_memory.py --quantize
measures it.

**What is quantized, and what is not (and why)**:
- quantized: attention q/k/v/o projections, dense MLPs, shared experts, routed experts (stacked), lm_head. These
  are >99% of GLM-4.5-Air's bytes read per token, and matrix-vector products over them are what decode spends its
  time on.
- lm_head: int8 under both formats (`LM_HEAD_FORMAT`). The logits are where a 4-bit error stops averaging out over
  many inputs: measured on the bundled model (bench/quant_quality.py, held-out text), an int4 lm_head raised the
  loss over fp32 from +0.06% to +0.22% (more than all other int4 matrices together) and its greedy continuations
  matched fp32's for 20% of prompts instead of 50%, while int8 for it costs ~4 bits more on one matrix
  (llama.cpp's Q4_K_M keeps its output matrix at 6 bits for the same reason).
- kept in the engine's dtype: embeddings (a token reads one row of the table, so quantizing it saves memory but
  no time, and every later layer sees its error), norms (tiny, and they scale every activation), the q/k/v biases
  (tiny, added after the product);
- kept in fp32: the router (`mlp.gate.weight`) and its correction bias: they make discrete choices (which experts
  run), where a small error flips a choice and changes the output by a whole expert; they are E x D, a rounding
  error of the model's size.

Quantized values arriving for a matrix we keep dense (e.g. a GGUF's Q4_K token embedding) are dequantized into
the engine's dtype, with one log line.

The modules call `glm_kernels.quant_linear`'s `quantized_linear` / `quantized_fused_moe` (compiled integer kernels,
activations quantized per block of 32; their torch reference where the kernels cannot run), through `_KERNELS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from glm_kernels import blockquant
from glm_kernels.blockquant import Int4Weight, Int8Weight, QuantizedWeight
from glm_kernels.quant_linear import quantized_fused_moe, quantized_linear

from workbench.engine import huge_pages
from workbench.engine.config import GLMConfig

log = logging.getLogger(__name__)

QUANTIZE_FORMATS: tuple[str, ...] = tuple(blockquant.QUANTIZE_FORMATS)  # ("int8", "int4")
# Every value `Engine.from_pretrained(quantize=...)` takes: the integer formats (CPU) and the FP8 schemes (GPUs).
QUANTIZE_CHOICES: tuple[str, ...] = (*QUANTIZE_FORMATS, "fp8", "fp8-channel", "fp8-channel-w8a8", "fp8-block",
                                     "fp8-block-w8a8")
# The lm_head's format under each quantize option (see the module docstring for why int4 models keep int8 here).
LM_HEAD_FORMAT = {"int8": "int8", "int4": "int8"}
# Rows are quantized in chunks of about this many elements (4 MiB of fp32): bounds the transient copies.
CHUNK_ELEMENTS = 1 << 20
# The matrices that hold quantized weights, as parameter names of `GLMForCausalLM` (no `model.` prefix).
QUANTIZED_PARAMS = re.compile(r"(lm_head\.weight|layers\.\d+\.(self_attn\.[qkvo]_proj\.weight|"
                              r"mlp\.(shared_experts\.)?(gate|up|down)_proj\.weight|mlp\.experts\.(gate_up|down)_proj))$")


class QuantizeError(ValueError):
    """A quantize option or model the integer formats cannot run; the message says what works instead."""


def format_of(qw: QuantizedWeight) -> str:
    return "int8" if isinstance(qw, Int8Weight) else "int4"


def is_quantized(value: Any) -> bool:
    return isinstance(value, Int8Weight | Int4Weight)


# --- the kernels: one place -----------------------------------------------------------------------------------------
# glm_kernels.quant_linear runs the compiled integer kernels where they are loaded and its torch reference otherwise.
_KERNELS = (quantized_linear, quantized_fused_moe)


# --- storage helpers ------------------------------------------------------------------------------------------------
def _tensor_fields(qw: QuantizedWeight) -> list[str]:
    return [f.name for f in dataclasses.fields(qw) if isinstance(getattr(qw, f.name), torch.Tensor)]


def _map_tensors(qw: QuantizedWeight, fn) -> QuantizedWeight:
    return dataclasses.replace(qw, **{name: fn(getattr(qw, name)) for name in _tensor_fields(qw)})


def empty_quantized(fmt: str, shape: tuple[int, ...], like: QuantizedWeight | None = None) -> QuantizedWeight:
    """Uninitialised storage of `fmt` for a weight of `shape` [..., N, K] (with `like`'s group, if given), in huge
    pages where the OS gives them (huge_pages: decode streams through it once per token)."""
    *lead, rows, cols = shape
    if fmt == "int8":
        group = like.group if isinstance(like, Int8Weight) else 32
        return Int8Weight(q=huge_pages.empty((*lead, rows, cols), torch.int8),
                          scales=huge_pages.empty((*lead, rows, cols // group), torch.float32), group=group)
    supers = -(-cols // 256)
    return Int4Weight(packed=huge_pages.empty((*lead, rows, cols // 2), torch.uint8),
                      d=huge_pages.empty((*lead, rows, supers), torch.float32),
                      dmin=huge_pages.empty((*lead, rows, supers), torch.float32),
                      sc=huge_pages.empty((*lead, rows, cols // 32), torch.uint8),
                      mn=huge_pages.empty((*lead, rows, cols // 32), torch.uint8))


def _same_layout(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    return type(a) is type(b) and getattr(a, "group", None) == getattr(b, "group", None)


def _copy_rows(dest: QuantizedWeight, index: tuple, src: QuantizedWeight) -> None:
    """dest[index] = src, field by field (every field of both formats has the rows N at dim -2)."""
    for name in _tensor_fields(dest):
        getattr(dest, name)[index].copy_(getattr(src, name))


def quantize_into(dest: QuantizedWeight, dense: torch.Tensor) -> None:
    """Quantize `dense` [..., N, K] into `dest` (same shape) in row chunks: never more than a chunk in fp32."""
    fmt = format_of(dest)
    rows = dense.reshape(-1, dense.shape[-1])
    flat = _map_tensors(dest, lambda t: t.view(-1, t.shape[-1]))
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].to(torch.float32)
        q = blockquant.quantize_int8(chunk, dest.group) if fmt == "int8" else blockquant.quantize_int4(chunk)
        _copy_rows(flat, (slice(start, start + step),), q)


def quantize_weight(dense: torch.Tensor, fmt: str) -> QuantizedWeight:
    """`dense` [..., N, K] in `fmt`, quantized in row chunks (what quantize-at-load does to each matrix)."""
    dest = empty_quantized(fmt, tuple(dense.shape))
    quantize_into(dest, dense)
    return dest


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Several weights of one layout stacked along N (e.g. q, k and v as one [Nq + Nk + Nv, K] matrix)."""
    if any(not _same_layout(w, weights[0]) for w in weights):
        raise QuantizeError("cannot fuse quantized matrices of different formats")
    def stacked(name: str) -> torch.Tensor:
        parts = [getattr(w, name) for w in weights]
        shape = list(parts[0].shape)
        shape[-2] = sum(p.shape[-2] for p in parts)
        return torch.cat(parts, dim=-2, out=huge_pages.empty(shape, parts[0].dtype))

    return dataclasses.replace(weights[0], **{name: stacked(name) for name in _tensor_fields(weights[0])})


# --- modules --------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear layer whose weight is an `Int8Weight` or `Int4Weight`; same call as nn.Linear ([..., K] -> [..., N]).

    The weight's tensors are buffers (`weight_q`, `weight_scales`, ... named after its fields), so `buffers()`,
    `state_dict()` and `.to()` see them; `qweight` is the weight object the kernels take. The bias stays dense."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        *lead, self.out_features, self.in_features = qweight.shape
        if lead:
            raise QuantizeError(f"QuantLinear takes one [N, K] matrix, got a weight of shape {list(qweight.shape)}")
        self.qweight = qweight
        for name in _tensor_fields(qweight):
            self.register_buffer("weight_" + name, getattr(qweight, name))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def format(self) -> str:
        return format_of(self.qweight)

    def set_weight(self, qweight: QuantizedWeight) -> None:
        """Hold `qweight` (same shape and format; e.g. a view of a fused matrix) instead of the current weight."""
        self.qweight = qweight
        for name in _tensor_fields(qweight):
            setattr(self, "weight_" + name, getattr(qweight, name))

    def _apply(self, fn, recurse=True):  # keep `qweight` the object of the (moved) buffers
        super()._apply(fn, recurse)
        self.qweight = dataclasses.replace(self.qweight, **{
            name: getattr(self, "weight_" + name) for name in _tensor_fields(self.qweight)})
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = _KERNELS[0](x.reshape(-1, self.in_features), self.qweight).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = f", group {self.qweight.group}" if isinstance(self.qweight, Int8Weight) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.format}{group} ({self.qweight.bits_per_weight:.2f} bits/weight)")


class QuantExperts(nn.Module):
    """The routed experts, quantized and stacked like `model.Experts`: gate_up [E, 2I, D] (gate rows, then up rows),
    down [E, D, I]; same call as `model.Experts`."""

    def __init__(self, gate_up: QuantizedWeight, down: QuantizedWeight) -> None:
        super().__init__()
        self.gate_up, self.down = gate_up, down
        for prefix, qw in (("gate_up_proj_", gate_up), ("down_proj_", down)):
            for name in _tensor_fields(qw):
                self.register_buffer(prefix + name, getattr(qw, name))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.gate_up, self.down = (dataclasses.replace(qw, **{name: getattr(self, prefix + name)
                                                              for name in _tensor_fields(qw)})
                                   for prefix, qw in (("gate_up_proj_", self.gate_up), ("down_proj_", self.down)))
        return self

    def forward(self, x, topk_ids, topk_weights, ops=None) -> torch.Tensor:
        return _KERNELS[1](x, self.gate_up, self.down, topk_ids, topk_weights).to(x.dtype)

    def extra_repr(self) -> str:
        experts, rows, cols = self.gate_up.shape
        return (f"experts={experts}, gate_up=[{rows}, {cols}] {format_of(self.gate_up)}, "
                f"down={list(self.down.shape[1:])} {format_of(self.down)}")


# --- checks ---------------------------------------------------------------------------------------------------------
def check_quantize_option(quantize: str | None, device: torch.device | str = "cpu", kernels: str = "torch") -> None:
    """A clear error, before anything loads, for a quantize option the integer formats cannot run."""
    from workbench.engine.quant import SCHEMES

    if quantize is None:
        return
    if quantize not in QUANTIZE_FORMATS and quantize not in SCHEMES:
        raise QuantizeError(f"quantize={quantize!r} is not a weight format: choose {' or '.join(QUANTIZE_FORMATS)} "
                            f"(integer weights for CPUs) or one of {', '.join(SCHEMES)} (FP8, for GPUs)")
    if quantize not in QUANTIZE_FORMATS:
        return
    device = torch.device(device)
    if device.type != "cpu":
        raise QuantizeError(f"quantize={quantize!r} runs on the CPU only (integer CPU kernels), not on "
                            f"{device}: on a GPU use FP8 (quantize='fp8-channel' or 'fp8-block') or no quantize")
    if kernels == "triton":
        raise QuantizeError(f"quantize={quantize!r} runs with the CPU kernels, not kernels='triton': use "
                            "kernels='torch' (or 'auto') on the CPU, or FP8 (quantize='fp8-channel') with Triton")


def check_config(config: GLMConfig, quantize: str) -> None:
    """Every quantized matrix needs its input width K to be a multiple of 32 (the formats' group)."""
    widths = {"hidden_size": config.hidden_size, "num_attention_heads * head_dim":
              config.num_attention_heads * config.head_dim, "moe_intermediate_size": config.moe_intermediate_size}
    if config.first_k_dense_replace > 0:
        widths["intermediate_size"] = config.intermediate_size
    bad = {name: value for name, value in widths.items() if value % 32}
    if bad:
        name, value = next(iter(bad.items()))
        raise QuantizeError(f"quantize={quantize!r} groups weights by 32 along their input, but this model's "
                            f"{name} is {value} (not a multiple of 32): load it without quantize")


def cpu_note() -> str | None:
    """One line for the log where this CPU lacks AVX2, which the integer kernels' fast paths need: they then run
    their portable scalar path (and the torch reference where they are not compiled), several times slower."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512") or not capability.startswith(("AVX", "DEFAULT")):
        return None  # AVX2 and wider, or not an x86 CPU (the kernels' own dispatch decides there)
    return (f"this CPU has no AVX2 ({capability}): the int8/int4 weights run the kernels' portable scalar path "
            "(or the torch reference), several times slower than with AVX2")


# --- threads while loading -------------------------------------------------------------------------------------------
LOAD_THREADS_ENV = "WORKBENCH_LOAD_THREADS"


def loading_thread_count() -> int:
    """torch's threads for the elementwise loops of a load (quantizing, decoding GGUF blocks): $WORKBENCH_LOAD_THREADS
    if set, else torch's count capped at the cores other processes leave idle (the 1-minute load average less this
    process's one running thread), at least 1.

    Why: every torch op is an OpenMP region that waits for its slowest thread, and a thread sharing its core with
    another process gets only part of it, while the spin-waiting one burns its share. Measured on a 2-core box with
    a load average of ~7 (other sessions): quantize-at-load int8 at 2 threads 64-70 s/GB of bf16 against 9-18 s/GB
    at 1; the GGUF repack 17 s against 1.2 s for 320 MB. On an idle machine torch's own count is kept."""
    setting = os.environ.get(LOAD_THREADS_ENV)
    if setting:
        return max(1, int(setting))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    others = max(0.0, busy - 1.0)  # the load average counts this process's own running thread too
    return max(1, min(torch.get_num_threads(), int(cores - others + 0.5)))


@contextlib.contextmanager
def loading_threads() -> Iterator[int]:
    """torch's thread count set to `loading_thread_count()` for the block, restored after."""
    before = torch.get_num_threads()
    threads = loading_thread_count()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if threads != before:
            torch.set_num_threads(before)


# --- the builder ----------------------------------------------------------------------------------------------------
def build_quantized_model(config: GLMConfig, tensors: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                          quantize: str | None, *, dtype: torch.dtype = torch.float32,
                          lm_head: str | None = None) -> nn.Module:
    """A `GLMForCausalLM` on the CPU from (HF name, tensor or quantized weight) pairs: see the module docstring.

    `quantize` ("int8" | "int4" | None) is the format dense tensors bound for a quantized matrix are quantized to
    (None keeps them dense: a GGUF's F16 matrices, say); `lm_head` overrides the lm_head's format (default:
    `LM_HEAD_FORMAT[quantize]`). `dtype` is the engine's activation dtype, which the dense tensors take. Runs with
    `loading_threads()`."""
    with loading_threads():
        return _build_quantized_model(config, tensors, quantize, dtype=dtype, lm_head=lm_head)


def _build_quantized_model(config: GLMConfig, tensors: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                           quantize: str | None, *, dtype: torch.dtype, lm_head: str | None) -> nn.Module:
    from workbench.engine.model import Experts, GLMForCausalLM
    from workbench.engine.weights import FP32_PARAMS, CheckpointError, check_expert_coverage, map_name

    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise QuantizeError(f"quantize={quantize!r}: choose {' or '.join(QUANTIZE_FORMATS)} (or None)")
    if quantize is not None:
        check_config(config, quantize)
    lm_head = lm_head or (LM_HEAD_FORMAT[quantize] if quantize else None)
    with torch.device("meta"):
        skeleton = GLMForCausalLM(config)
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    tied = config.tie_word_embeddings
    dense: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    covered: dict[str, set] = {}
    dequantized: list[str] = []
    layer_of = re.compile(r"model\.layers\.(\d+)\.")

    def target_format(param: str) -> str | None:
        if not QUANTIZED_PARAMS.search(param):
            return None
        return lm_head if param == "lm_head.weight" else quantize

    for name, value in tensors:
        layer = layer_of.match(name)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue  # the multi-token-prediction layer(s): plain decoding never runs them
        if tied and name == "lm_head.weight":
            continue
        placement = map_name(name)
        if placement is None or placement.param not in params:
            raise CheckpointError(f"unexpected tensor {name!r}: the {config.model_type} model built from the config "
                                  "has no such parameter (does the config match the weights?)")
        param, meta = placement.param, params[placement.param]
        fmt = target_format(param)
        wanted = tuple(meta.shape) if placement.expert is None else _slot_shape(meta.shape, placement.part)
        got = tuple(value.shape)
        if got != wanted:
            raise CheckpointError(f"tensor {name!r} has shape {list(got)} but the model expects {list(wanted)} "
                                  "(from the config)")
        as_quantized = fmt is not None or (is_quantized(value) and QUANTIZED_PARAMS.search(param))
        if not as_quantized:
            if is_quantized(value):
                dequantized.append(name)
            target_dtype = torch.float32 if FP32_PARAMS.search(param) else dtype
            _store_dense(dense, param, placement, value, meta, target_dtype)
        elif placement.expert is None:
            quantized[param] = value if is_quantized(value) else quantize_weight(value, fmt)
        else:
            store = quantized.get(param)
            if store is None:
                store = quantized[param] = empty_quantized(
                    format_of(value) if is_quantized(value) else fmt, tuple(meta.shape), value)
            index = _slot_index(meta.shape, placement)
            if is_quantized(value):
                if not _same_layout(value, store):
                    raise CheckpointError(f"tensor {name!r} is {format_of(value)} but other experts of "
                                          f"{param} are {format_of(store)}: one format per stacked expert tensor")
                _copy_rows(store, index, value)
            else:
                quantize_into(_map_tensors(store, lambda t, i=index: t[i]), value)
        if placement.expert is not None:
            covered.setdefault(param, set()).add((placement.expert, placement.part))
        del value  # the caller's tensor is dropped here (see the peak-memory test)

    check_expert_coverage(config, covered)
    if tied and lm_head is not None and "embed_tokens.weight" in dense:
        quantized["lm_head.weight"] = quantize_weight(dense["embed_tokens.weight"], lm_head)
    elif tied and "embed_tokens.weight" in dense:
        dense["lm_head.weight"] = dense["embed_tokens.weight"]
    missing = [p for p in params if p not in dense and p not in quantized]
    if missing:
        raise CheckpointError(f"missing tensor for parameter {missing[0]!r} (shape {list(params[missing[0]].shape)})"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: the weights are "
                              "incomplete or the config describes a different model")
    if dequantized:
        log.info("dequantized %d quantized tensor(s) the engine keeps in %s (e.g. %s): they cost %s's bytes",
                 len(dequantized), str(dtype).removeprefix("torch."), dequantized[0], str(dtype).removeprefix("torch."))

    model = skeleton
    for param, qw in quantized.items():
        module_name = param.removesuffix(".weight") if param.endswith(".weight") else param.rpartition(".")[0]
        if module_name.endswith(".experts"):
            continue
        setattr_module(model, module_name, QuantLinear(qw, bias=dense.pop(module_name + ".bias", None)))
    for module_name, module in list(model.named_modules()):
        if isinstance(module, Experts) and (module_name + ".gate_up_proj" in quantized
                                            or module_name + ".down_proj" in quantized):
            gate_up, down = (quantized.get(f"{module_name}.{p}") for p in ("gate_up_proj", "down_proj"))
            fallback = quantize or "int8"  # one half came quantized and the other dense: quantize that one too
            gate_up = gate_up if gate_up is not None else quantize_weight(dense.pop(module_name + ".gate_up_proj"),
                                                                          fallback)
            down = down if down is not None else quantize_weight(dense.pop(module_name + ".down_proj"), fallback)
            setattr_module(model, module_name, QuantExperts(gate_up, down))
    for param, tensor in dense.items():
        if param in quantized:
            continue
        module_name, _, attr = param.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    if tied and "lm_head.weight" not in quantized:
        model.lm_head.weight = model.embed_tokens.weight
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:  # pragma: no cover - every parameter was either filled or replaced above
        raise CheckpointError(f"parameter {leftover[0]!r} was never filled")
    weight_format = quantize or _dominant_format(quantized.values())
    dense.clear(), quantized.clear()  # the modules hold them now: fusing must not find the unfused copies alive
    fuse_quantized(model)
    model.materialize_buffers(torch.device("cpu"))
    model.weight_format = weight_format
    return model


def fuse_quantized(model: nn.Module) -> None:
    """q, k and v of each attention (and gate and up of each dense MLP and shared expert) in one quantized matrix,
    where they share a format: the compiled decode step runs one product for them. The projections then hold row
    views of it (every field of both formats has the rows at dim -2), so no weight is stored twice."""
    from workbench.engine.model import MLP, Attention

    for module in model.modules():
        if isinstance(module, Attention):
            parts = [module.q_proj, module.k_proj, module.v_proj]
        elif isinstance(module, MLP):
            parts = [module.gate_proj, module.up_proj]
        else:
            continue
        if not all(isinstance(p, QuantLinear) for p in parts) or \
                any(not _same_layout(p.qweight, parts[0].qweight) for p in parts):
            continue  # float, or formats that differ (a GGUF's Q4_K q beside a Q6_K v): the products stay apart
        fused = concat_rows([p.qweight for p in parts])
        biases = [p.bias for p in parts]
        bias = None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])
        start = 0
        for part in parts:
            rows = slice(start, start + part.out_features)
            part.set_weight(_map_tensors(fused, lambda t, r=rows: t[..., r, :]))
            if bias is not None:
                part.bias = nn.Parameter(bias[rows], requires_grad=False)
            start = rows.stop
        if isinstance(module, Attention):
            module.fused_qkv_quantized = (fused, bias)
        else:
            module.fused_gate_up_quantized = (fused, None)


def setattr_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _slot_shape(shape: torch.Size, part: str | None) -> tuple[int, ...]:
    _, rows, cols = shape
    return (rows // 2, cols) if part in ("gate", "up") else (rows, cols)


def _slot_index(shape: torch.Size, placement) -> tuple:
    half = shape[1] // 2
    rows = {"gate": slice(0, half), "up": slice(half, None)}.get(placement.part, slice(None))
    return (placement.expert, rows)


def _store_dense(dense: dict, param: str, placement, value, meta: torch.Tensor, dtype: torch.dtype) -> None:
    from workbench.engine.weights import CPU_ALIGNMENT

    source = blockquant.dequantize(value, dtype) if is_quantized(value) else value
    if placement.expert is None:
        if source.dtype == dtype and source.data_ptr() % CPU_ALIGNMENT == 0:
            dense[param] = source  # a view (of the mapped file, say): no copy
        else:
            dense[param] = huge_pages.empty(source.shape, dtype).copy_(source)
        return
    if param not in dense:
        dense[param] = huge_pages.empty(meta.shape, dtype)
    dense[param][_slot_index(meta.shape, placement)].copy_(source)


# --- reading a safetensors checkpoint -------------------------------------------------------------------------------
def checkpoint_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every tensor of a safetensors checkpoint, as views of the mapped files; once the
    consumer asks for the next one, the pages the previous one was read from are dropped again (a tensor it kept
    as a view reads them back from the file when used)."""
    from workbench.engine.quant import UNUSED_CHECKPOINT_TENSORS
    from workbench.engine.weights import iter_checkpoint_tensors

    for name, file in iter_checkpoint_tensors(Path(folder)):
        if UNUSED_CHECKPOINT_TENSORS.search(name):
            continue
        yield name, file.tensor(name)
        file.release(name)


# --- what a model reads -------------------------------------------------------------------------------------------
def _dominant_format(weights) -> str | None:
    """The format most of the quantized bytes are in (a GGUF Q4_K_M is "int4", though its lm_head is int8)."""
    totals: dict[str, int] = {}
    for weight in weights:
        totals[format_of(weight)] = totals.get(format_of(weight), 0) + weight.nbytes
    return max(totals, key=totals.get) if totals else None


def weight_summary(model: nn.Module) -> dict[str, Any]:
    """The weights' format, average bits per weight of the matrices, bytes in all, and bytes read per token.

    Bytes per token count what one decoded token reads: every matrix but the routed experts in full, the routed
    experts' top_k / E share (the active parameters), one row of the embedding table, the norms and router."""
    from workbench.engine.model import Experts
    from workbench.engine.quant import FP8Experts, FP8Linear

    config = model.config
    share = config.num_experts_per_tok / config.n_routed_experts
    total = per_token = matrix_bits = matrix_elements = 0
    seen: set[int] = set()
    for module in model.modules():
        tensors = [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                   if t is not getattr(model, "inv_freq", None)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors if id(t) not in seen)  # tied: counted once
        seen.update(id(t) for t in tensors)
        if isinstance(module, Experts | FP8Experts | QuantExperts):
            per_token += nbytes * share
        elif isinstance(module, nn.Embedding):
            per_token += nbytes / config.vocab_size
        else:
            per_token += nbytes
        if isinstance(module, QuantLinear | QuantExperts | FP8Linear | FP8Experts | Experts) or \
                type(module) is nn.Linear:
            elements = _matrix_elements(module)
            matrix_elements += elements
            matrix_bits += 8 * (nbytes - _bias_bytes(module))
    fmt = getattr(model, "weight_format", None) or getattr(getattr(model, "quant_scheme", None), "name", None)
    if fmt is None:
        fmt = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    formats: dict[str, int] = {}  # bytes per quantized format (a GGUF mixes them: Q4_K experts, a Q8_0 lm_head)
    for module in model.modules():
        for weight in [getattr(module, "qweight", None), getattr(module, "gate_up", None),
                       getattr(module, "down", None)]:
            if is_quantized(weight):
                formats[format_of(weight)] = formats.get(format_of(weight), 0) + weight.nbytes
    summary = {"format": fmt, "bits_per_weight": round(matrix_bits / max(matrix_elements, 1), 3),
               "weight_bytes": int(total), "bytes_per_token": int(per_token)}
    if len(formats) > 1:
        summary["format_bytes"] = formats
    return summary


def _matrix_elements(module: nn.Module) -> int:
    if isinstance(module, QuantLinear):
        return module.in_features * module.out_features
    if isinstance(module, QuantExperts):
        return math.prod(module.gate_up.shape) + math.prod(module.down.shape)
    from workbench.engine.quant import FP8Experts

    if isinstance(module, FP8Experts):
        return module.gate_up_proj.numel() + module.down_proj.numel()
    if hasattr(module, "gate_up_proj"):
        return module.gate_up_proj.numel() + module.down_proj.numel()
    return module.weight.numel()


def _bias_bytes(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel() * bias.element_size()
