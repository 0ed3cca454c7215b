"""Routed experts: every token through its top-k SwiGLU experts, weighted and summed.

Shape legend: T = tokens, D = hidden, E = experts, I = expert width, K = experts per token, P = T * K pairs.
Expert weights are stacked: w_gate_up [E, 2I, D] (gate rows first, then up rows), w_down [E, D, I]. FP8
experts carry scales (see `glm_kernels.fp8`): channel-wise w_gate_up_scale [E, 2I, 1], w_down_scale [E, D, 1];
block-wise (bn x bk) w_gate_up_scale [E, 2 ceil(I/bn), ceil(D/bk)] (the gate's block rows, then the up's: each
half is quantised on its own, as the checkpoint stores gate_proj and up_proj), w_down_scale [E, ceil(D/bn),
ceil(I/bk)].

The Triton path, in four launches:
1. `moe_align_block_size` (moe_align.py): the P (token, slot) pairs sorted by expert, each expert's run padded
   to BLOCK_M with a sentinel (P), one expert id per BLOCK_M tile; computed on the device, no host sync.
2. gate+up grouped GEMM: each tile multiplies the rows of its pairs (row = pair // K, read in place from x)
   by its one expert's gate and up weights, and writes SiLU(gate) * up per pair [P, I].
3. down grouped GEMM: [P, I] x expert's down^T, times the pair's routing weight -> [P, D].
4. the sum over the K slots of each token, in fp32 -> [T, D] (skipped when K = 1: step 3 writes the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_kernels import cpu_compiled
from glm_kernels.fp8 import (
    FP8_DTYPE,
    WEIGHT_BLOCK,
    WEIGHT_CHANNEL,
    WEIGHT_PLAIN,
    check_block_size,
    dequantize_activation,
    dequantize_weight,
    dot_precision,
    per_token_quant_reference,
    per_token_quant_triton,
    scaled_tile_dot,
)
from glm_kernels.moe_align import moe_align_block_size
from glm_kernels.moe_config import moe_tile_config
from glm_kernels.triton_support import cdiv, check, new_output, next_power_of_2, require_triton, tl, triton


# --- torch reference ----------------------------------------------------------------------------------------
def fused_moe_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """x [T, D], topk_ids/topk_weights [T, K] -> [T, D] in x's dtype.

    Groups the T*K (token, slot) pairs by expert with one sort and runs each expert that got tokens once on
    its contiguous run of rows, so the work is proportional to T*K, never to T*E. Rows are read in place
    (token = pair // K); the weighted outputs are summed back per token in fp32.

    FP8 experts (weights e4m3 with scales): each used expert is dequantised to fp32 and the GEMMs run in fp32;
    with `act_quant`, the GEMMs' inputs are first quantised per token (per token and bk-group when
    block-wise),
    exactly as the kernels do.
    """
    fp8 = _check_moe_args(
        x, w_gate_up, w_down, topk_ids, topk_weights, w_gate_up_scale, w_down_scale, block_size, act_quant
    )
    num_tokens, top_k = topk_ids.shape
    width = w_down.shape[-1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    token_of_pair = order // top_k
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    pair_weights = topk_weights.reshape(-1)[order].float()
    group = None if block_size is None else block_size[1]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of_pair[start : start + count]
        if not fp8:
            gate_up = F.linear(x[rows], w_gate_up[expert])
            hidden = F.silu(gate_up[:, :width]) * gate_up[:, width:]
            expert_out = F.linear(hidden, w_down[expert]).float()
        else:
            inputs = x[rows]
            a = dequantize_activation(*per_token_quant_reference(inputs, group), group) if act_quant else inputs.float()
            gate_up = a @ _dequantize_gate_up(w_gate_up[expert], w_gate_up_scale[expert], block_size).t()
            hidden = (F.silu(gate_up[:, :width]) * gate_up[:, width:]).to(x.dtype)
            a = dequantize_activation(*per_token_quant_reference(hidden, group), group) if act_quant else hidden.float()
            expert_out = (a @ dequantize_weight(w_down[expert], w_down_scale[expert], block_size).t()).to(x.dtype)
            expert_out = expert_out.float()
        out.index_add_(0, rows, expert_out * pair_weights[start : start + count, None])
        start += count
    return out.to(x.dtype)


def _dequantize_gate_up(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None) -> torch.Tensor:
    """One expert's e4m3 gate_up [2I, D] -> fp32; block-wise scales hold the gate's block rows, then the
    up's."""
    if block_size is None:
        return dequantize_weight(weight, scale)
    width = weight.shape[0] // 2
    half = scale.shape[0] // 2
    return torch.cat(
        (
            dequantize_weight(weight[:width], scale[:half], block_size),
            dequantize_weight(weight[width:], scale[half:], block_size),
        )
    )


def _check_moe_args(
    x, w_gate_up, w_down, topk_ids, topk_weights, w_gate_up_scale, w_down_scale, block_size, act_quant
) -> bool:
    """Validate shapes and dtypes; True when the experts are FP8."""
    check(x.dim() == 2, f"fused_moe: x must be [T, D]; got {list(x.shape)}")
    num_tokens, hidden = x.shape
    check(
        w_gate_up.dim() == 3 and w_gate_up.shape[2] == hidden and w_gate_up.shape[1] % 2 == 0,
        f"fused_moe: w_gate_up must be [E, 2I, D={hidden}]; got {list(w_gate_up.shape)}",
    )
    experts, width = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    check(
        tuple(w_down.shape) == (experts, hidden, width),
        f"fused_moe: w_down must be [E={experts}, D={hidden}, I={width}]; got {list(w_down.shape)}",
    )
    check(
        topk_ids.dim() == 2 and topk_ids.shape[0] == num_tokens,
        f"fused_moe: topk_ids must be [T={num_tokens}, K]; got {list(topk_ids.shape)}",
    )
    check(
        topk_weights.shape == topk_ids.shape,
        f"fused_moe: topk_weights {list(topk_weights.shape)} must match topk_ids {list(topk_ids.shape)}",
    )
    check(not topk_ids.dtype.is_floating_point, f"fused_moe: topk_ids must be integers; got {topk_ids.dtype}")
    fp8 = w_gate_up.dtype == FP8_DTYPE
    check((w_down.dtype == FP8_DTYPE) == fp8, "fused_moe: w_gate_up and w_down must both be FP8 or both not")
    if not fp8:
        check(
            w_gate_up_scale is None and w_down_scale is None and block_size is None and not act_quant,
            "fused_moe: scales, block_size and act_quant apply to FP8 (e4m3) expert weights only",
        )
        check(
            w_gate_up.dtype == x.dtype and w_down.dtype == x.dtype,
            f"fused_moe: expert weights ({w_gate_up.dtype}) must have x's dtype ({x.dtype})",
        )
        return False
    check(
        w_gate_up_scale is not None and w_down_scale is not None,
        "fused_moe: FP8 expert weights need w_gate_up_scale and w_down_scale",
    )
    check_block_size(block_size)
    if block_size is None:
        want_gu, want_dn = (experts, 2 * width, 1), (experts, hidden, 1)
    else:
        bn, bk = block_size
        want_gu = (experts, 2 * cdiv(width, bn), cdiv(hidden, bk))
        want_dn = (experts, cdiv(hidden, bn), cdiv(width, bk))
    check(
        tuple(w_gate_up_scale.shape) == want_gu,
        f"fused_moe: w_gate_up_scale must be {list(want_gu)}; got {list(w_gate_up_scale.shape)}",
    )
    check(
        tuple(w_down_scale.shape) == want_dn,
        f"fused_moe: w_down_scale must be {list(want_dn)}; got {list(w_down_scale.shape)}",
    )
    return True


# --- CPU: the engine's torch path and the compiled kernel ----------------------------------------------------
def fused_moe_cpu(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args) -> torch.Tensor:
    """`fused_moe_reference` (same arguments, same result), the engine's torch path: one unquantised token runs
    expert by expert (no sort, no bincount, no scatter: at decode sizes on a CPU the number of ops, not the
    arithmetic, costs); anything else goes to the reference."""
    if x.shape[0] != 1 or fp8_args or w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        return fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args)
    width = w_down.shape[-1]
    out = torch.zeros(1, x.shape[1], dtype=torch.float32, device=x.device)
    for expert, weight in zip(topk_ids[0].tolist(), topk_weights[0].tolist()):
        gate_up = F.linear(x, w_gate_up[expert])
        hidden = F.silu(gate_up[:, :width]) * gate_up[:, width:]
        out.add_(F.linear(hidden, w_down[expert]).float(), alpha=weight)
    return out.to(x.dtype)


def fused_moe_compiled(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args) -> torch.Tensor:
    """`fused_moe_reference` (same arguments, same result): many fp32 tokens through the compiled CPU kernel
    (csrc/prefill_kernels.cpp) once the process has loaded it (`cpu_compiled.load()`) and no gradient is wanted;
    one token, FP8 experts, other dtypes and training through `fused_moe_cpu`."""
    module = None if fp8_args or x.shape[0] == 1 else cpu_compiled.module_for(x, w_gate_up, w_down, topk_weights)
    if module is None:
        return fused_moe_cpu(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args)
    return module.fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights.float())


# --- Triton: grouped GEMMs ----------------------------------------------------------------------------------
@triton.jit
def _moe_gate_up_kernel(
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    out_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_pairs,
    hidden,
    width,
    stride_xm,
    stride_xsm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_om,
    TOP_K: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    ACT_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[pair, n] = silu(x[token] . gate[e, n]) * (x[token] . up[e, n]), token = pair // TOP_K.
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # tiles past the padded runs: the grid is an upper bound, sized without a device sync
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < width
    x_rows = x_ptr + tokens[:, None] * stride_xm
    gate_cols = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn
    up_cols = gate_cols + width * stride_wn
    scale_base = w_scale_ptr + expert * stride_wse
    if WEIGHT_MODE == 2:  # block rows of the gate half, then of the up half
        gate_scale_rows = scale_base + (cols // GROUP_N)[None, :] * stride_wsn
        up_scale_rows = scale_base + ((width + GROUP_N - 1) // GROUP_N + cols // GROUP_N)[None, :] * stride_wsn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        # Per-iteration (not loop-carried): with block scales they become tiles below.
        a_scale = 1.0
        gate_scale = 1.0
        up_scale = 1.0
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        a = tl.load(x_rows + ks[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        b_mask = col_mask[None, :] & k_mask[:, None]
        b_gate = tl.load(gate_cols + ks[:, None], mask=b_mask, other=0.0)
        b_up = tl.load(up_cols + ks[:, None], mask=b_mask, other=0.0)
        if WEIGHT_MODE == 2:
            gate_scale = tl.load(gate_scale_rows + (k0 // GROUP_K) * stride_wsk, mask=col_mask[None, :], other=0.0)
            up_scale = tl.load(up_scale_rows + (k0 // GROUP_K) * stride_wsk, mask=col_mask[None, :], other=0.0)
            if ACT_QUANT:
                a_scale = tl.load(
                    x_scale_ptr + tokens[:, None] * stride_xsm + k0 // GROUP_K, mask=valid[:, None], other=0.0
                )
        gate = scaled_tile_dot(gate, a, b_gate, a_scale, gate_scale, WEIGHT_MODE, ACT_QUANT, DOT_PRECISION)
        up = scaled_tile_dot(up, a, b_up, a_scale, up_scale, WEIGHT_MODE, ACT_QUANT, DOT_PRECISION)
    if WEIGHT_MODE == 1:
        gate = gate * tl.load(scale_base + cols * stride_wsn, mask=col_mask, other=0.0)[None, :]
        up = up * tl.load(scale_base + (cols + width) * stride_wsn, mask=col_mask, other=0.0)[None, :]
        if ACT_QUANT:
            token_scale = tl.load(x_scale_ptr + tokens * stride_xsm, mask=valid, other=0.0)[:, None]
            gate = gate * token_scale
            up = up * token_scale
    hidden_act = gate * tl.sigmoid(gate) * up
    tl.store(
        out_ptr + pairs[:, None].to(tl.int64) * stride_om + cols[None, :],
        hidden_act.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & col_mask[None, :],
    )


@triton.jit
def _moe_down_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    out_ptr,
    topk_weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_pairs,
    hidden,
    width,
    stride_am,
    stride_asm,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_om,
    WEIGHT_MODE: tl.constexpr,
    ACT_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[pair, n] = weight[pair] * (a[pair] . down[e, n]); with TOP_K = 1 the caller passes out = [T, D].
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = pairs.to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    a_rows = a_ptr + rows[:, None] * stride_am
    w_cols = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn
    scale_base = w_scale_ptr + expert * stride_wse
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        # Per-iteration (not loop-carried): with block scales they become tiles below.
        a_scale = 1.0
        b_scale = 1.0
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < width
        a = tl.load(a_rows + ks[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if WEIGHT_MODE == 2:
            b_scale = tl.load(
                scale_base + (cols // GROUP_N)[None, :] * stride_wsn + (k0 // GROUP_K) * stride_wsk,
                mask=col_mask[None, :],
                other=0.0,
            )
            if ACT_QUANT:
                a_scale = tl.load(
                    a_scale_ptr + rows[:, None] * stride_asm + k0 // GROUP_K, mask=valid[:, None], other=0.0
                )
        acc = scaled_tile_dot(acc, a, b, a_scale, b_scale, WEIGHT_MODE, ACT_QUANT, DOT_PRECISION)
    if WEIGHT_MODE == 1:
        acc = acc * tl.load(scale_base + cols * stride_wsn, mask=col_mask, other=0.0)[None, :]
        if ACT_QUANT:
            acc = acc * tl.load(a_scale_ptr + rows * stride_asm, mask=valid, other=0.0)[:, None]
    # Rounded to the activation dtype before the routing weight, as the reference's F.linear output is.
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    acc = acc * tl.load(topk_weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & col_mask[None, :],
    )


@triton.jit
def _moe_sum_kernel(pair_out_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < hidden
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(pair_out_ptr + (token * TOP_K + k) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _weight_dtype_name(x_dtype: torch.dtype, fp8: bool, block_size, act_quant: bool) -> str:
    if not fp8:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[x_dtype]
    return f"fp8_w8a{'8' if act_quant else '16'}" + (
        "" if block_size is None else f"_block{block_size[0]}x{block_size[1]}"
    )


def fused_moe_triton(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as `fused_moe_reference`. `config` overrides the tile config (BLOCK_SIZE_M/N/K,
    num_warps, num_stages) that `moe_tile_config` would pick; the tuner uses it."""
    require_triton(x.device)
    fp8 = _check_moe_args(
        x, w_gate_up, w_down, topk_ids, topk_weights, w_gate_up_scale, w_down_scale, block_size, act_quant
    )
    check(
        x.dtype in (torch.float32, torch.bfloat16, torch.float16),
        f"fused_moe: activations must be fp32, bf16 or fp16; got {x.dtype}",
    )
    check(w_gate_up.stride(-1) == 1 and w_down.stride(-1) == 1, "fused_moe: expert weights need contiguous rows")
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    experts, width = w_gate_up.shape[0], w_down.shape[2]
    out = new_output((num_tokens, hidden), x.dtype, x.device)
    if num_tokens == 0:
        return out
    num_pairs = num_tokens * top_k
    x = x if x.stride(-1) == 1 else x.contiguous()
    if config is None:
        config = moe_tile_config(
            experts,
            width,
            num_tokens,
            _weight_dtype_name(x.dtype, fp8, block_size, act_quant),
            hidden=hidden,
            device=x.device,
        )
    block_m = config["BLOCK_SIZE_M"]
    group_n, group_k = block_size if block_size is not None else (1, 1)
    block_k = config["BLOCK_SIZE_K"]
    if block_size is not None:  # a k-tile must not straddle two scale blocks
        block_k = max(16, min(block_k, group_k))
    launch = dict(num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    mode = WEIGHT_PLAIN if not fp8 else (WEIGHT_CHANNEL if block_size is None else WEIGHT_BLOCK)
    group = None if block_size is None else group_k

    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, block_m, experts)
    max_blocks = expert_ids.shape[0]
    gu_scale = w_gate_up_scale if fp8 else w_gate_up  # placeholder pointer when unused
    dn_scale = w_down_scale if fp8 else w_down

    if act_quant:
        a, a_scale = per_token_quant_triton(x, group)
    else:
        a, a_scale = x, x
    intermediate = torch.empty((num_pairs, width), dtype=x.dtype, device=x.device)
    block_n = min(config["BLOCK_SIZE_N"], max(16, next_power_of_2(width)))
    _moe_gate_up_kernel[(triton.cdiv(width, block_n), max_blocks)](
        a,
        a_scale,
        w_gate_up,
        gu_scale,
        intermediate,
        sorted_ids,
        expert_ids,
        num_padded,
        num_pairs,
        hidden,
        width,
        a.stride(0),
        a_scale.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        gu_scale.stride(0),
        gu_scale.stride(1),
        gu_scale.stride(2),
        intermediate.stride(0),
        TOP_K=top_k,
        WEIGHT_MODE=mode,
        ACT_QUANT=bool(act_quant),
        GROUP_N=group_n,
        GROUP_K=group_k,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=max(16, min(block_k, next_power_of_2(hidden))),
        **launch,
    )

    if act_quant:
        a, a_scale = per_token_quant_triton(intermediate, group)
    else:
        a, a_scale = intermediate, intermediate
    pair_out = out if top_k == 1 else torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)
    flat_weights = topk_weights.reshape(-1)
    flat_weights = flat_weights if flat_weights.is_contiguous() else flat_weights.contiguous()
    block_n = min(config["BLOCK_SIZE_N"], max(16, next_power_of_2(hidden)))
    _moe_down_kernel[(triton.cdiv(hidden, block_n), max_blocks)](
        a,
        a_scale,
        w_down,
        dn_scale,
        pair_out,
        flat_weights,
        sorted_ids,
        expert_ids,
        num_padded,
        num_pairs,
        hidden,
        width,
        a.stride(0),
        a_scale.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        dn_scale.stride(0),
        dn_scale.stride(1),
        dn_scale.stride(2),
        pair_out.stride(0),
        WEIGHT_MODE=mode,
        ACT_QUANT=bool(act_quant),
        GROUP_N=group_n,
        GROUP_K=group_k,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=max(16, min(block_k, next_power_of_2(width))),
        **launch,
    )
    if top_k > 1:
        block_d = min(1024, next_power_of_2(hidden))
        _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block_d))](
            pair_out, out, hidden, TOP_K=top_k, BLOCK_D=block_d, num_warps=4
        )
    return out
