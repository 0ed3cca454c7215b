"""FP8 (e4m3) weights and activations: quantisation, the dequantising linear, and their Triton kernels.

Owns the number formats, as pure functions on tensors (checkpoint names and modules live in
`workbench.engine.quant`):
- weights e4m3 with a per-output-channel fp32 scale, `scale` [..., N, 1] (compressed-tensors "channel");
- weights e4m3 with one fp32 scale per (bn x bk) block, `scale` [..., ceil(N/bn), ceil(K/bk)] (the block-wise
  `weight_scale_inv` of DeepSeek-style checkpoints, 128 x 128; despite its name it is multiplied in);
- activations either left in bf16/fp16/fp32 (weights dequantised inside the GEMM), or quantised dynamically to
  e4m3 per token (one scale a row, or one per bk-wide group of a row when the weights are block-wise).
In every mode: value = e4m3 * scale, products accumulated in fp32.

The Triton GEMM here (`fp8_linear_triton`) and the fused MoE kernels share the per-tile dequantising dot,
`scaled_tile_dot`.
"""

from __future__ import annotations

import torch

from glm_kernels.triton_support import (
    INTERPRETER,
    cdiv,
    check,
    new_output,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_SCALE = 1e-12 / FP8_MAX  # all-zero rows or blocks get this scale instead of 0 (no division by zero)

# Weight modes of the kernels (constexpr ints).
WEIGHT_PLAIN, WEIGHT_CHANNEL, WEIGHT_BLOCK = 0, 1, 2


# --- torch: formats and references --------------------------------------------------------------------------
def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] -> (e4m3 [..., N, K], fp32 scale [..., N, 1]) with weight ~= e4m3 * scale."""
    w32 = weight.float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_weight_blockwise(
    weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] -> (e4m3 [..., N, K], fp32 scale [..., ceil(N/bn), ceil(K/bk)])."""
    bn, bk = block_size
    *lead, n, k = weight.shape
    pad_n, pad_k = cdiv(n, bn) * bn - n, cdiv(k, bk) * bk - k
    w32 = torch.nn.functional.pad(weight.float(), (0, pad_k, 0, pad_n))
    blocks = w32.view(*lead, cdiv(n, bn), bn, cdiv(k, bk), bk)
    scale = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=MIN_SCALE)  # [..., N/bn, K/bk]
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, cdiv(n, bn) * bn, cdiv(k, bk) * bk)[..., :n, :k].contiguous(), scale


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """A block scale [..., N/bn, K/bk] repeated to one value per weight element [..., N, K]."""
    n, k = shape
    bn, bk = block_size
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def dequantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """e4m3 weight [..., N, K] and its scale (channel-wise when block_size is None) -> `dtype` weight."""
    check_weight_scale(weight, scale, block_size)
    if block_size is None:
        full = scale.float()
    else:
        full = expand_block_scale(scale.float(), tuple(weight.shape[-2:]), block_size)
    return (weight.float() * full).to(dtype)


def check_weight_scale(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None) -> None:
    """Raise a ValueError naming the expected scale shape when `scale` does not fit `weight`."""
    check(weight.dtype == FP8_DTYPE, f"fp8: weight dtype is {weight.dtype}, expected {FP8_DTYPE} (e4m3)")
    *lead, n, k = weight.shape
    if block_size is None:
        want = (*lead, n, 1)
        how = "per-output-channel: one scale a row"
    else:
        bn, bk = block_size
        want = (*lead, cdiv(n, bn), cdiv(k, bk))
        how = f"one scale per {bn}x{bk} block"
    check(
        tuple(scale.shape) == want,
        f"fp8: weight {list(weight.shape)} needs a scale of shape {list(want)} ({how}); got {list(scale.shape)}",
    )


def per_token_quant_reference(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantisation: x [M, K] -> (e4m3 [M, K], fp32 scale [M, G]).

    One scale per row (G = 1) or, with `group_size`, one per group of `group_size` columns
    (G = ceil(K/group)).
    """
    rows, cols = x.shape
    group = cols if group_size is None else group_size
    num_groups = cdiv(cols, group)
    x32 = torch.nn.functional.pad(x.float(), (0, num_groups * group - cols)).view(rows, num_groups, group)
    scale = (x32.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (x32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(rows, num_groups * group)[:, :cols].contiguous(), scale


def dequantize_activation(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """The fp32 values that per-token e4m3 activations `q` [M, K] with `scale` [M, G] stand for."""
    cols = q.shape[1]
    return q.float() * scale.repeat_interleave(cols if group_size is None else group_size, dim=1)[:, :cols]


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """y = x @ dequant(weight)^T + bias for x [..., K], e4m3 weight [N, K] -> [..., N] in x's dtype.

    With `act_quant`, x is first quantised per token (per token and bk-group when block-wise), as the
    kernel does.
    """
    check_weight_scale(weight, weight_scale, block_size)
    rows = x.reshape(-1, x.shape[-1])
    if act_quant:
        group = None if block_size is None else block_size[1]
        a = dequantize_activation(*per_token_quant_reference(rows, group), group)
    else:
        a = rows.float()
    out = a @ dequantize_weight(weight, weight_scale, block_size).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


# --- Triton -------------------------------------------------------------------------------------------------
@triton.jit
def round_to_e4m3(v):
    """fp32 -> e4m3, round to nearest even, saturating at +-448; `v` must be finite.

    Rounds in fp32 arithmetic first so that the final cast is exact: Triton's CPU interpreter drops the carry
    when a conversion rounds up across a power of two (1.98 -> 1.0), and exact casts sidestep that.
    """
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 the spacing is that of the subnormals
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    scaled = v / ulp  # exact: ulp is a power of two
    magic = 12582912.0  # 1.5 * 2^23: adding and removing it rounds |scaled| < 2^22 to an integer, ties to even
    rounded = (scaled + magic) - magic
    return (rounded * ulp).to(tl.float8e4nv)


@triton.jit
def _per_token_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    num_rows,
    num_cols,
    num_groups,
    stride_x,
    stride_q,
    stride_scale,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # BLOCK_R rows a program, their groups one after the other; a group wider than BLOCK_K is read twice
    # (largest magnitude, then quantise).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_q
    for group in range(0, num_groups):
        start = group * GROUP
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, GROUP, BLOCK_K):
            cols = start + c0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & ((cols < num_cols) & (c0 + tl.arange(0, BLOCK_K) < GROUP))[None, :]
            values = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(values), axis=1))
        scale = tl.maximum(amax / 448.0, 1e-12 / 448.0)
        tl.store(scale_ptr + rows.to(tl.int64) * stride_scale + group, scale, mask=row_mask)
        for c0 in range(0, GROUP, BLOCK_K):
            cols = start + c0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & ((cols < num_cols) & (c0 + tl.arange(0, BLOCK_K) < GROUP))[None, :]
            values = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + cols[None, :], round_to_e4m3(values / scale[:, None]), mask=mask)


def per_token_quant_triton(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `per_token_quant_reference`."""
    require_triton(x.device)
    check(x.dim() == 2, f"per_token_quant: x must be [M, K]; got {list(x.shape)}")
    rows, cols = x.shape
    group = cols if group_size is None else group_size
    check(group >= 1, f"per_token_quant: group_size = {group_size} must be positive")
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_groups = cdiv(cols, group)
    q = new_output((rows, cols), FP8_DTYPE, x.device)
    scale = new_output((rows, num_groups), torch.float32, x.device)
    if rows and cols:
        block_k = min(1024, max(16, next_power_of_2(group)))
        block_r = max(1, min(16, 2048 // block_k))
        _per_token_quant_kernel[(triton.cdiv(rows, block_r),)](
            x,
            q,
            scale,
            rows,
            cols,
            num_groups,
            x.stride(0),
            q.stride(0),
            scale.stride(0),
            GROUP=group,
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return q, scale


@triton.jit
def scaled_tile_dot(
    acc,
    a,
    b,
    a_scale,
    b_scale,
    WEIGHT_MODE: tl.constexpr,
    ACT_QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc += a [BM, BK] @ b [BK, BN] for one k-tile, dequantising as the mode says.

    WEIGHT_PLAIN: a and b share a float dtype. WEIGHT_CHANNEL: b is e4m3, its (and a's) scales are
    applied once after the k-loop by the caller. WEIGHT_BLOCK: this k-tile lies in one scale block;
    b_scale [1, BN] (and a_scale [BM, 1] with ACT_QUANT) scale the tile's partial product here.
    """
    if not ACT_QUANT:
        b = b.to(a.dtype)  # e4m3 -> bf16/fp16/fp32 is exact
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if WEIGHT_MODE == 2:
        if ACT_QUANT:
            return acc + tl.dot(a, b) * a_scale * b_scale
        return acc + tl.dot(a, b, input_precision=DOT_PRECISION) * b_scale
    if ACT_QUANT:
        return tl.dot(a, b, acc)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _fp8_linear_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    num_rows,
    num_cols,
    depth,
    stride_am,
    stride_asm,
    stride_wn,
    stride_wsn,
    stride_wsk,
    stride_om,
    WEIGHT_MODE: tl.constexpr,
    ACT_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out [M, N] = a [M, K] @ w[N, K]^T, the weight tile read as [BK, BN] straight from its [N, K] rows.
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)  # n fastest: programs running together share the same rows of a
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    col_mask = cols < num_cols
    a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_am
    w_cols = w_ptr + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        # Per-iteration (not loop-carried): with block scales they become tiles below.
        a_scale = 1.0
        b_scale = 1.0
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < depth
        a = tl.load(a_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if WEIGHT_MODE == 2:
            b_scale = tl.load(
                w_scale_ptr + (cols // GROUP_N)[None, :] * stride_wsn + (k0 // GROUP_K) * stride_wsk,
                mask=col_mask[None, :],
                other=0.0,
            )
            if ACT_QUANT:
                a_scale = tl.load(
                    a_scale_ptr + rows[:, None].to(tl.int64) * stride_asm + k0 // GROUP_K,
                    mask=row_mask[:, None],
                    other=0.0,
                )
        acc = scaled_tile_dot(acc, a, b, a_scale, b_scale, WEIGHT_MODE, ACT_QUANT, DOT_PRECISION)
    if WEIGHT_MODE == 1:
        acc = acc * tl.load(w_scale_ptr + cols * stride_wsn, mask=col_mask, other=0.0)[None, :]
        if ACT_QUANT:
            acc = acc * tl.load(a_scale_ptr + rows.to(tl.int64) * stride_asm, mask=row_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands are multiplied exactly ("ieee"), not through TF32; 16-bit ones are exact either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_block_size(block_size: tuple[int, int] | None) -> None:
    if block_size is None:
        return
    bn, bk = block_size
    check(
        bn >= 1 and bk >= 16 and (bk % 128 == 0 or bk & (bk - 1) == 0),
        f"fp8: block size {block_size} unsupported; the k block must be a power of two >= 16 or a "
        "multiple of 128 "
        "(checkpoints use 128 x 128)",
    )


def fp8_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """Same contract as `fp8_linear_reference`."""
    require_triton(x.device)
    check_weight_scale(weight, weight_scale, block_size)
    check_block_size(block_size)
    check(weight.dim() == 2, f"fp8_linear: weight must be [N, K]; got {list(weight.shape)}")
    num_cols, depth = weight.shape
    check(x.shape[-1] == depth, f"fp8_linear: x's last dim {x.shape[-1]} != weight's K = {depth}")
    check(
        x.dtype in (torch.float32, torch.bfloat16, torch.float16),
        f"fp8_linear: activations must be fp32, bf16 or fp16; got {x.dtype}",
    )
    check(bias is None or bias.shape == (num_cols,), f"fp8_linear: bias must be [{num_cols}]")
    check(weight.stride(-1) == 1, "fp8_linear: weight needs contiguous rows")
    rows = x.reshape(-1, depth)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    num_rows = rows.shape[0]
    out = new_output((num_rows, num_cols), x.dtype, x.device)
    if num_rows == 0:
        return out.view(*x.shape[:-1], num_cols)
    group_n, group_k = block_size if block_size is not None else (1, 1)
    if act_quant:
        a, a_scale = per_token_quant_triton(rows, None if block_size is None else group_k)
    else:
        a, a_scale = rows, rows  # a_scale unused
    block_m = 16 if num_rows <= 16 else (32 if num_rows <= 64 else 64)
    block_k = max(16, min(128, next_power_of_2(depth), group_k if block_size is not None else 128))
    block_n = max(16, min(64 if num_rows <= 64 else 128, next_power_of_2(num_cols)))
    mode = WEIGHT_CHANNEL if block_size is None else WEIGHT_BLOCK
    grid = (triton.cdiv(num_cols, block_n), triton.cdiv(num_rows, block_m))
    _fp8_linear_kernel[grid](
        a,
        a_scale,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        out,
        num_rows,
        num_cols,
        depth,
        a.stride(0),
        a_scale.stride(0),
        weight.stride(0),
        weight_scale.stride(0),
        weight_scale.stride(1),
        out.stride(0),
        WEIGHT_MODE=mode,
        ACT_QUANT=bool(act_quant),
        HAS_BIAS=bias is not None,
        GROUP_N=group_n,
        GROUP_K=group_k,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=4 if num_rows <= 64 else 3,
    )
    return out.view(*x.shape[:-1], num_cols)
