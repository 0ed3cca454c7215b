"""Attention over the engine's paged KV cache: torch references and Triton kernels.

Cache layout (one layer): k_cache, v_cache [num_blocks, block_size, Hk, Dh]. A sequence's tokens live in the
blocks its block table lists, in order: token p sits at block_table[p // block_size], offset p % block_size.
Grouped-query: query head h reads kv head h // (Hq // Hk).

Triton kernels:
- decode: one program per (sequence, kv head, split of the sequence); it reads its split of the cache through
  the block table once for all the query heads that share the kv head (the G = Hq / Hk rows of one tile), with
  an online softmax; a second kernel combines the splits by their log-sum-exp. Splitting along the sequence
  keeps the GPU busy when the batch is small and the context long.
- prefill: causal flash attention (one program per BLOCK_M queries of one head; keys streamed in BLOCK_N
  tiles; the tiles past the diagonal are never read).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_kernels import cpu_compiled
from glm_kernels.triton_support import (
    INTERPRETER,
    check,
    new_output,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence from a paged cache: [length, Hk, Dh]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention for one sequence: q [Tq, Hq, Dh], k/v [Tk, Hk, Dh] with Tk >= Tq -> [Tq, Hq, Dh].

    The queries are the last Tq positions of the Tk keys: query i sees keys j <= i + (Tk - Tq).
    """
    num_q, num_heads = q.shape[0], q.shape[1]
    num_k, kv_heads = k.shape[0], k.shape[1]
    # [1, H, T, Dh]: SDPA picks its fused (flash) CPU kernel only for 4-D inputs; 3-D ones take the math path,
    # which materialises the [H, T, T] scores (half the prefill time at 512 tokens, measured).
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if kv_heads != num_heads:
        kh = kh.repeat_interleave(num_heads // kv_heads, dim=1)
        vh = vh.repeat_interleave(num_heads // kv_heads, dim=1)
    if num_q == num_k:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        offset = num_k - num_q
        allowed = torch.arange(num_k, device=q.device)[None, :] <= (
            torch.arange(num_q, device=q.device)[:, None] + offset
        )
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
    return out[0].transpose(0, 1)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new query per sequence: q [B, Hq, Dh], block_tables [B, max_blocks] int32, seq_lens [B]
    -> [B, Hq, Dh].

    seq_lens count the cached positions each query attends to, its own (already written) position included.
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    block_size = k_cache.shape[1]
    max_len = int(seq_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].long()
    keys = k_cache[table].reshape(batch, num_blocks * block_size, kv_heads, head_dim)[:, :max_len]
    values = v_cache[table].reshape(batch, num_blocks * block_size, kv_heads, head_dim)[:, :max_len]
    group = num_heads // kv_heads
    # [B, Hk, G, 1, Dh] x [B, Hk, 1, L, Dh]: grouped heads share their kv head without copying it.
    qg = q.view(batch, kv_heads, group, 1, head_dim)
    kt = keys.permute(0, 2, 1, 3)[:, :, None]
    vt = values.permute(0, 2, 1, 3)[:, :, None]
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].to(q.device)
    # Slots past a sequence's length hold whatever the pool held (uninitialised memory, other sequences):
    # zero probability is not enough, 0 * NaN is NaN, so those values are zeroed too.
    vt = vt.masked_fill(~valid[:, None, None, :, None], 0.0)
    scores = (qg.float() @ kt.float().transpose(-1, -2)) * scale  # [B, Hk, G, 1, L]
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    # past a sequence's length the (torch.empty) cache may hold NaN or inf, and 0 * NaN is NaN
    vt = vt.masked_fill(~valid[:, None, None, :, None], 0.0)
    probs = scores.softmax(dim=-1)
    out = probs @ vt.float()
    return out.view(batch, num_heads, head_dim).to(q.dtype)


# --- CPU: the engine's torch path and the compiled kernel --------------------------------------------------
def decode_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """`decode_attention_reference` (same arguments, same result), the engine's torch path: a single sequence
    needs no padding mask, so it takes one SDPA call over its gathered blocks with grouped-query heads (at decode
    sizes on a CPU the number of ops, not the arithmetic, costs); batches go to the reference."""
    if q.shape[0] != 1:
        return decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
    _, num_heads, head_dim = q.shape
    length = int(seq_lens[0])
    # [L, Hk, Dh] -> [Hk, L, Dh]: only this sequence's slots, so nothing past its length enters the softmax.
    keys = gather_kv(k_cache, block_tables[0], length).transpose(0, 1).float()
    values = gather_kv(v_cache, block_tables[0], length).transpose(0, 1).float()
    kv_heads = keys.shape[0]
    query = q[0].float().view(num_heads, 1, head_dim)
    out = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=num_heads != kv_heads)
    return out.view(1, num_heads, head_dim).to(q.dtype)


def prefill_attention_compiled(q, k, v, scale: float) -> torch.Tensor:
    """`prefill_attention_reference` (same arguments, same result) through the compiled CPU kernel
    (csrc/prefill_kernels.cpp) for fp32 CPU tensors without gradient, once the process has loaded it
    (`cpu_compiled.load()`); everything else through the reference."""
    module = cpu_compiled.module_for(q, k, v)
    if module is None:
        return prefill_attention_reference(q, k, v, scale)
    return module.prefill_attention(q, k, v, scale)


# --- Triton: decode -----------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale,
    split_len,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    rows = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    lse_ptrs = part_lse_ptr + seq * stride_lb + heads * stride_lh + split
    if start >= end:  # this split lies past the sequence: it contributes nothing
        tl.store(lse_ptrs, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=row_mask)
        return
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if INTERPRETER:
        q = q.to(tl.float32)
    # Online softmax in base 2: scores scaled by log2(e) once, exp2 instead of exp.
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        block = tl.load(table + pos // KV_BLOCK, mask=pos_mask, other=0).to(tl.int64)
        slot = pos % KV_BLOCK
        kv_mask = pos_mask[:, None] & dim_mask[None, :]
        k = tl.load(
            k_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if INTERPRETER:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        scores = tl.where(pos_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        part_out_ptr + seq * stride_pb + heads[:, None] * stride_ph + split * stride_ps + dims[None, :],
        out,
        mask=row_mask[:, None] & dim_mask[None, :],
    )
    tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=row_mask)  # base-2 log-sum-exp of the split's scores


@triton.jit
def _decode_combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    split_len,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_splits = (seq_len + split_len - 1) // split_len  # only the splits that saw keys
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    lse_row = part_lse_ptr + seq * stride_lb + head * stride_lh
    part_row = part_out_ptr + seq * stride_pb + head * stride_ph
    # Two passes over the splits in tiles of BLOCK_S: the largest lse, then the weighted sum.
    lse_max = float("-inf")
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_row + splits, mask=splits < num_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(lse, axis=0))
    total = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        split_mask = splits < num_splits
        weight = tl.exp2(tl.load(lse_row + splits, mask=split_mask, other=float("-inf")) - lse_max)
        part = tl.load(
            part_row + splits[:, None] * stride_ps + dims[None, :],
            mask=split_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        total += tl.sum(weight, axis=0)
        acc += tl.sum(part * weight[:, None], axis=0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + dims,
        (acc / total).to(out_ptr.dtype.element_ty),
        mask=dim_mask,
    )


def decode_split_len(capacity: int, block_n: int) -> int:
    """Keys per split: at least 256, and at most 64 splits of the longest sequence the table can hold."""
    per_split = max(256, next_power_of_2(-(-capacity // 64)))
    return -(-per_split // block_n) * block_n


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    split_len: int | None = None,
) -> torch.Tensor:
    """Same contract as `decode_attention_reference`; `split_len` (keys per split) overrides the automatic
    choice.

    Needs no host sync: the split count comes from the block table's width, and splits past a sequence's
    end exit early.
    """
    require_triton(q.device)
    check(q.dim() == 3, f"decode_attention: q must be [B, Hq, Dh]; got {list(q.shape)}")
    batch, num_heads, head_dim = q.shape
    check(
        k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim,
        f"decode_attention: k/v caches must both be [blocks, block_size, Hk, Dh={head_dim}]; got "
        f"{list(k_cache.shape)} and {list(v_cache.shape)}",
    )
    kv_heads, kv_block = k_cache.shape[2], k_cache.shape[1]
    check(num_heads % kv_heads == 0, f"decode_attention: Hq = {num_heads} must be a multiple of Hk = {kv_heads}")
    check(
        block_tables.dim() == 2 and block_tables.shape[0] == batch,
        f"decode_attention: block_tables must be [B={batch}, max_blocks]; got {list(block_tables.shape)}",
    )
    check(
        seq_lens.shape == (batch,),
        f"decode_attention: seq_lens must be [B={batch}]; got {list(seq_lens.shape)}",
    )
    check(
        k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1,
        "decode_attention: q and the caches need a contiguous head dimension",
    )
    check(
        k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
        f"decode_attention: caches ({k_cache.dtype}) must have q's dtype ({q.dtype})",
    )
    out = new_output(q.shape, q.dtype, q.device)
    if batch == 0:
        return out
    group = num_heads // kv_heads
    block_n = 64 if head_dim <= 128 else 32
    if split_len is None:
        split_len = decode_split_len(block_tables.shape[1] * kv_block, block_n)
    check(split_len >= 1, f"decode_attention: split_len = {split_len} must be positive")
    num_splits = max(1, -(-(block_tables.shape[1] * kv_block) // split_len))
    part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    seq_lens = seq_lens.to(torch.int32) if seq_lens.dtype != torch.int32 else seq_lens
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    block_d = max(16, next_power_of_2(head_dim))
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part_out,
        part_lse,
        float(scale),
        split_len,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        KV_BLOCK=kv_block,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        num_warps=4,
        num_stages=2,
    )
    _decode_combine_kernel[(batch, num_heads)](
        part_out,
        part_lse,
        seq_lens,
        out,
        split_len,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=16,
        num_warps=1,
    )
    return out


# --- Triton: prefill ----------------------------------------------------------------------------------------
@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    num_q,
    num_k,
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Query i (of the last num_q positions) sees keys j <= i + (num_k - num_q).
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_q
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    offset = num_k - num_q
    q = tl.load(
        q_ptr + rows[:, None].to(tl.int64) * stride_qt + head * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if INTERPRETER:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last_key = tl.minimum((tl.program_id(0) + 1) * BLOCK_M - 1 + offset, num_k - 1)  # the tile's last visible key
    for n0 in range(0, last_key + 1, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_mask = keys < num_k
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(
            k_ptr + keys[:, None].to(tl.int64) * stride_kt + kv_head * stride_kh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_ptr + keys[:, None].to(tl.int64) * stride_vt + kv_head * stride_vh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if INTERPRETER:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (keys[None, :] <= rows[:, None] + offset) & key_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Rows that have seen no key yet keep m = -inf; shift by 0 for them so that exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as `prefill_attention_reference`: causal flash attention for one sequence."""
    require_triton(q.device)
    check(
        q.dim() == 3 and k.dim() == 3 and k.shape == v.shape,
        f"prefill_attention: q [Tq, Hq, Dh] and k, v [Tk, Hk, Dh]; got {list(q.shape)}, {list(k.shape)}, "
        f"{list(v.shape)}",
    )
    num_q, num_heads, head_dim = q.shape
    num_k, kv_heads = k.shape[0], k.shape[1]
    check(k.shape[2] == head_dim, f"prefill_attention: k head dim {k.shape[2]} != q head dim {head_dim}")
    check(num_k >= num_q, f"prefill_attention: {num_k} keys < {num_q} queries (queries are the last positions)")
    check(
        num_heads % kv_heads == 0,
        f"prefill_attention: Hq = {num_heads} must be a multiple of Hk = {kv_heads}",
    )
    check(k.dtype == q.dtype and v.dtype == q.dtype, "prefill_attention: q, k and v must share a dtype")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = new_output(q.shape, q.dtype, q.device)
    if num_q == 0:
        return out
    block_d = max(16, next_power_of_2(head_dim))
    block_m = 64 if num_q >= 64 else 16
    block_n = 64 if block_d <= 128 else 32
    _prefill_kernel[(triton.cdiv(num_q, block_m), num_heads)](
        q,
        k,
        v,
        out,
        num_q,
        num_k,
        float(scale),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // kv_heads,
        HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4 if block_m <= 64 else 8,
        num_stages=3,
    )
    return out
