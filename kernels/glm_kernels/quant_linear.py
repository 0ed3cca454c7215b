"""Linears and routed experts with quantized weights (`glm_kernels.blockquant`'s Int8Weight / Int4Weight) on the
CPU: the wrappers that run the compiled integer kernels (csrc/quant_kernels.cpp) once this process has loaded
them (`cpu_compiled.load()`) and their torch references otherwise, and the choice of instruction set.

- `quantized_linear(x, qw)`: x [M, K] @ qw.T -> [M, N] in x's dtype; `linear_q8a_reference`'s numbers
  (activations quantized per block of 32, integer dot products, fp32 accumulation), except for prefill-sized bf16
  products on CPUs that multiply bf16 natively (AVX512-BF16, AMX-BF16), which go through a bf16 GEMM over the
  weights dequantized a block at a time: `linear_bf16_reference`'s numbers (`bf16_gemm()` / `set_bf16_gemm()`;
  the environment variable WORKBENCH_CPU_BF16_GEMM = auto | always | never; why: csrc/quant_kernels.cpp).
- `quantized_fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)`: `fused_moe_reference`'s contract with
  stacked quantized experts (gate_up [E, 2I, D], down [E, D, I]); each expert's inputs quantized as above, or, for
  an expert given at least BF16_GEMM_MIN_ROWS bf16 rows where the bf16 GEMM is on, both its products through it.
- `isa()` / `set_isa(name)`: which compiled path runs ("avx512vnni", "avx2" or "scalar"); the environment variable
  WORKBENCH_CPU_ISA sets it at load. A lower path than the best one is for tests and comparisons.

The fallback is `linear_q8a_reference` rather than `linear_reference` so that a result does not depend on whether
the kernels happened to be compiled: both paths quantize the activations the same way (and the bf16 GEMM's
choice, made here, picks `linear_bf16_reference` for both).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from glm_kernels import cpu_compiled
from glm_kernels.blockquant import (
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    linear_bf16_reference,
    linear_q8a_reference,
)

ISAS = ("scalar", "avx2", "avx512vnni")
BF16_GEMM_MODES = ("auto", "always", "never")
BF16_GEMM_ENV = "WORKBENCH_CPU_BF16_GEMM"
# Activation rows from which a bf16 product takes the bf16 GEMM: below this, dequantizing the weights costs more
# than the GEMM saves (a decode step's few rows always take the integer kernels).
BF16_GEMM_MIN_ROWS = 64


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), from its instruction-set flags."""
    flags = cpu_compiled._cpu_id().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _mode_from(value: str | None, where: str) -> str:
    mode = (value or "auto").strip().lower()
    if mode not in BF16_GEMM_MODES:
        raise ValueError(f"{where}={value!r}: use one of {', '.join(BF16_GEMM_MODES)} (auto: CPUs with native bf16 "
                         "take the bf16 GEMM for prefill-sized products; always: every CPU, slowly without it; never: "
                         "the integer kernels only)")
    return mode


_bf16_gemm_mode: str | None = None  # read from the environment on first use


def bf16_gemm() -> str:
    """The bf16 GEMM setting now: "auto", "always" or "never"."""
    global _bf16_gemm_mode
    if _bf16_gemm_mode is None:
        _bf16_gemm_mode = _mode_from(os.environ.get(BF16_GEMM_ENV), BF16_GEMM_ENV)
    return _bf16_gemm_mode


def set_bf16_gemm(mode: str | None) -> None:
    """Set which bf16 products take the bf16 GEMM ("auto", "always", "never"; None: back to the environment's)."""
    global _bf16_gemm_mode
    _bf16_gemm_mode = None if mode is None else _mode_from(mode, "set_bf16_gemm")


def bf16_gemm_min_rows(dtype: torch.dtype) -> int:
    """The fewest rows with which a product of activations of `dtype` goes through the bf16 GEMM:
    BF16_GEMM_MIN_ROWS where the setting allows it (bf16, and native bf16 under "auto"), else 0 (never)."""
    if dtype != torch.bfloat16:
        return 0
    mode = bf16_gemm()
    return BF16_GEMM_MIN_ROWS if mode == "always" or (mode == "auto" and native_bf16()) else 0


def takes_bf16_gemm(x: torch.Tensor) -> bool:
    """Whether `quantized_linear` computes x through the bf16 GEMM (see the module docstring)."""
    rows = bf16_gemm_min_rows(x.dtype)
    return 0 < rows <= x.shape[0]


def weight_parts(qw: QuantizedWeight) -> list[torch.Tensor]:
    """The tensors the compiled kernels take for a quantized weight, in their order: [q, scales] for
    Int8Weight, [packed, d, dmin, sc, mn] for Int4Weight (the suffixes of decode_model.cpp's keys)."""
    if isinstance(qw, Int8Weight):
        return [qw.q, qw.scales]
    if isinstance(qw, Int4Weight):
        return [qw.packed, qw.d, qw.dmin, qw.sc, qw.mn]
    raise TypeError(f"not a quantized weight: {type(qw).__name__} (use glm_kernels.blockquant.quantize)")


SUFFIXES = {"int8": ("q", "scales"), "int4": ("packed", "d", "dmin", "sc", "mn")}


def decode_step_weight(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A quantized weight as the compiled decode step (csrc/decode_model.cpp) takes it in place of the float
    tensor `name`: {f"{name}.q": ..., f"{name}.scales": ...} for Int8Weight, {f"{name}.packed", ".d", ".dmin",
    ".sc", ".mn"} for Int4Weight (contiguous; the lm_head goes into DecodeModel's `quantized` map as "lm_head")."""
    parts = weight_parts(qw)
    return {f"{name}.{suffix}": t.contiguous() for suffix, t in zip(SUFFIXES[qw.format], parts, strict=True)}


def _compiled_can_take(x: torch.Tensor, *weights: QuantizedWeight):
    """The loaded module if the compiled kernels can run these arguments (CPU, a float x without grad,
    contiguous weight tensors), else None."""
    module = cpu_compiled._module
    if module is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    if not all(t.device.type == "cpu" and t.is_contiguous() for w in weights for t in weight_parts(w)):
        return None
    return module


def quantized_linear(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x [M, K] (float32, bfloat16 or float16) @ qw.T -> [M, N] in x's dtype, computed in fp32."""
    if x.dim() != 2 or x.shape[1] != qw.shape[-1] or len(qw.shape) != 2:
        raise ValueError(f"quantized_linear: x must be [M, K] and the weight [N, K] with the same K, got x "
                         f"{tuple(x.shape)} and weight {qw.shape}")
    bf16 = takes_bf16_gemm(x)
    module = _compiled_can_take(x, qw)
    if module is not None:
        return module.quantized_linear(x, weight_parts(qw), bf16)
    return linear_bf16_reference(x, qw) if bf16 else linear_q8a_reference(x, qw).to(x.dtype)


def quantized_fused_moe_reference(x: torch.Tensor, w_gate_up: QuantizedWeight, w_down: QuantizedWeight,
                                  topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """x [T, D], topk_ids/topk_weights [T, K] -> [T, D] in x's dtype: `fused_moe_reference`'s FP8 branch with
    quantized experts. Each expert's input quantized per block of 32 (`linear_q8a_reference`), gate_up in fp32,
    the hidden activations and each expert's output rounded to x's dtype, summed per token in fp32. An expert given
    at least `bf16_gemm_min_rows(x.dtype)` rows computes both its products with `linear_bf16_reference` instead."""
    top_k = topk_ids.shape[1]
    width = w_down.shape[-1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    token_of_pair = order // top_k
    pair_weights = topk_weights.reshape(-1)[order].float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    gemm_rows = bf16_gemm_min_rows(x.dtype)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of_pair[start : start + count]
        product = linear_bf16_reference if 0 < gemm_rows <= count else linear_q8a_reference
        gate_up = product(x[rows], w_gate_up[expert]).float()
        hidden = (F.silu(gate_up[:, :width]) * gate_up[:, width:]).to(x.dtype)
        expert_out = product(hidden, w_down[expert]).to(x.dtype).float()
        out.index_add_(0, rows, expert_out * pair_weights[start : start + count, None])
        start += count
    return out.to(x.dtype)


def quantized_fused_moe(x: torch.Tensor, w_gate_up: QuantizedWeight, w_down: QuantizedWeight,
                        topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """`quantized_fused_moe_reference` (same arguments, same result up to fp32 rounding) through the compiled
    kernel when loaded: every (expert, block of output rows) of the call split over torch's threads."""
    if len(w_gate_up.shape) != 3 or len(w_down.shape) != 3:
        raise ValueError(f"quantized_fused_moe: stacked experts gate_up [E, 2I, D] and down [E, D, I], got "
                         f"{w_gate_up.shape} and {w_down.shape}")
    module = _compiled_can_take(x, w_gate_up, w_down)
    if module is not None:
        # The router's top-k comes as a view of a wider tensor (a row stride of the expert count): the kernel reads
        # rows of top_k, so it gets them packed.
        return module.quantized_fused_moe(x.contiguous(), weight_parts(w_gate_up), weight_parts(w_down),
                                          topk_ids.contiguous(), topk_weights.contiguous(), bf16_gemm_min_rows(x.dtype))
    return quantized_fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights)


def isa() -> str | None:
    """The instruction set the compiled quantized kernels use now, or None when they are not loaded."""
    module = cpu_compiled._module
    return None if module is None else module.isa()


def best_isa() -> str | None:
    """The widest instruction set compiled on this machine, or None when the kernels are not loaded."""
    module = cpu_compiled._module
    return None if module is None else module.best_isa()


def set_isa(name: str | None) -> None:
    """Run the compiled quantized kernels with `name` ("avx512vnni", "avx2", "scalar"; None: the best compiled).
    Raises ValueError for an unknown name or one this machine's build lacks."""
    module = cpu_compiled.load()
    if module is None:
        raise RuntimeError(f"the compiled CPU kernels are unavailable: {cpu_compiled.build_error()}")
    if name is not None and name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}: use one of {', '.join(ISAS)}")
    try:
        module.set_isa(name or "")
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


__all__ = ["BF16_GEMM_MIN_ROWS", "ISAS", "SUFFIXES", "best_isa", "bf16_gemm", "bf16_gemm_min_rows",
           "decode_step_weight", "isa",
           "native_bf16", "quantized_fused_moe", "quantized_fused_moe_reference", "quantized_linear", "set_bf16_gemm",
           "set_isa", "takes_bf16_gemm", "weight_parts"]
