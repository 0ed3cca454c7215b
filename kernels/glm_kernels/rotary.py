"""Partial rotary position embedding (rotate-half style) on the first `rotary_dim` dims of q and k.

The torch reference and the Triton kernel: one program a token, rotating all its q heads then all its k heads.
"""

from __future__ import annotations

import torch

from glm_kernels import cpu_compiled
from glm_kernels.triton_support import check, new_output, next_power_of_2, require_triton, tl, triton


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [T, rotary_dim] for integer positions [T] (fp32 math, as transformers does)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, Dh], k [T, Hk, Dh], cos/sin [T, R] with R <= Dh even -> rotated (q, k), new tensors.

    Dims [0, R) are rotated, dims [R, Dh) pass through untouched.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]

    def apply(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)

    return apply(q), apply(k)


def rotary_cpu(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` (same arguments, same result), the engine's torch path: one token's q and k heads are
    rotated as one tensor, in one pass; more tokens go to the reference.

    Rotate-half written out: with x = (x1, x2) the two halves of the rotated dims, the result is
    (x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2). The returned q and k are views of one new tensor."""
    if q.shape[0] != 1:
        return rotary_reference(q, k, cos, sin)
    rotary_dim, num_q_heads = cos.shape[-1], q.shape[1]
    half = rotary_dim // 2
    heads = torch.cat((q, k), dim=1)
    x1, x2 = heads[..., :half], heads[..., half:rotary_dim]
    cos1, cos2 = cos[:, None, :half], cos[:, None, half:]
    sin1, sin2 = sin[:, None, :half], sin[:, None, half:]
    rotated = torch.cat((x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2, heads[..., rotary_dim:]), dim=-1)
    return rotated[:, :num_q_heads], rotated[:, num_q_heads:]


def rotary_compiled(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` (same arguments, same result): many fp32 tokens through the compiled CPU kernel
    (csrc/prefill_kernels.cpp) once the process has loaded it (`cpu_compiled.load()`) and no gradient is wanted;
    one token, other dtypes and training through `rotary_cpu`."""
    module = None if q.shape[0] == 1 else cpu_compiled.module_for(q, k, cos, sin)
    if module is None:
        return rotary_cpu(q, k, cos, sin)
    q_out, k_out = module.rotary(q, k, cos, sin)
    return q_out, k_out


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    token,
    num_heads,
    stride_src_t,
    stride_src_h,
    stride_dst_t,
    stride_dst_h,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[:h] = x1 * cos[:h] - x2 * sin[:h]; out[h:2h] = x2 * cos[h:] + x1 * sin[h:]; out[2h:] = x[2h:].
    heads = tl.arange(0, BLOCK_H)
    half = tl.arange(0, BLOCK_HALF)
    dims = tl.arange(0, BLOCK_D)
    head_mask = heads < num_heads
    rot_mask = head_mask[:, None] & (half < HALF)[None, :]
    src = src_ptr + token * stride_src_t + heads[:, None] * stride_src_h
    dst = dst_ptr + token * stride_dst_t + heads[:, None] * stride_dst_h
    x1 = tl.load(src + half[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + half[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    out_lo = x1 * cos_lo[None, :] - x2 * sin_lo[None, :]
    out_hi = x2 * cos_hi[None, :] + x1 * sin_hi[None, :]
    tl.store(dst + half[None, :], out_lo.to(dst_ptr.dtype.element_ty), mask=rot_mask)
    tl.store(dst + HALF + half[None, :], out_hi.to(dst_ptr.dtype.element_ty), mask=rot_mask)
    if 2 * HALF < HEAD_DIM:  # the pass-through dims
        rest = 2 * HALF + dims
        rest_mask = head_mask[:, None] & (rest < HEAD_DIM)[None, :]
        tl.store(dst + rest[None, :], tl.load(src + rest[None, :], mask=rest_mask), mask=rest_mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    num_q_heads,
    num_k_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cos,
    stride_sin,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    mask = half < HALF
    cos_lo = tl.load(cos_ptr + token * stride_cos + half, mask=mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + token * stride_cos + HALF + half, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + token * stride_sin + half, mask=mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + token * stride_sin + HALF + half, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        cos_lo,
        cos_hi,
        sin_lo,
        sin_hi,
        token,
        num_q_heads,
        stride_qt,
        stride_qh,
        stride_qot,
        stride_qoh,
        HALF,
        HEAD_DIM,
        BLOCK_HQ,
        BLOCK_HALF,
        BLOCK_D,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        cos_lo,
        cos_hi,
        sin_lo,
        sin_hi,
        token,
        num_k_heads,
        stride_kt,
        stride_kh,
        stride_kot,
        stride_koh,
        HALF,
        HEAD_DIM,
        BLOCK_HK,
        BLOCK_HALF,
        BLOCK_D,
    )


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `rotary_reference`."""
    require_triton(q.device)
    check(
        q.dim() == 3 and k.dim() == 3,
        f"rotary: q and k must be [T, H, Dh]; got {list(q.shape)} and {list(k.shape)}",
    )
    tokens, _, head_dim = q.shape
    rotary_dim = cos.shape[-1]
    check(
        k.shape[0] == tokens and k.shape[2] == head_dim,
        f"rotary: k {list(k.shape)} must have q's token count and head dim ({tokens}, {head_dim})",
    )
    check(
        cos.shape == (tokens, rotary_dim) and sin.shape == cos.shape,
        f"rotary: cos/sin must both be [T={tokens}, R]; got {list(cos.shape)} and {list(sin.shape)}",
    )
    check(
        rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim,
        f"rotary: rotary dims R = {rotary_dim} must be even and in (0, head_dim = {head_dim}]",
    )
    check(q.stride(-1) == 1 and k.stride(-1) == 1, "rotary: q and k need a contiguous last (head) dimension")
    q_out = new_output(q.shape, q.dtype, q.device)
    k_out = new_output(k.shape, k.dtype, k.device)
    if tokens == 0:
        return q_out, k_out
    cos, sin = cos.contiguous(), sin.contiguous()
    _rotary_kernel[(tokens,)](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        q.shape[1],
        k.shape[1],
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos.stride(0),
        sin.stride(0),
        HALF=rotary_dim // 2,
        HEAD_DIM=head_dim,
        BLOCK_HQ=next_power_of_2(q.shape[1]),
        BLOCK_HK=next_power_of_2(k.shape[1]),
        BLOCK_HALF=next_power_of_2(rotary_dim // 2),
        BLOCK_D=next_power_of_2(max(head_dim - rotary_dim, 1)),
    )
    return q_out, k_out
