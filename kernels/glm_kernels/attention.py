"""Attention over the engine's paged KV cache.

Cache layout (one layer): k_cache, v_cache [num_blocks, block_size, Hk, Dh]. A sequence's tokens live in the
blocks its block table lists, in order: token p sits at block_table[p // block_size], offset p % block_size.
Grouped-query: query head h reads kv head h // (Hq // Hk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if kv_heads != num_heads:
        kh = kh.repeat_interleave(num_heads // kv_heads, dim=0)
        vh = vh.repeat_interleave(num_heads // kv_heads, dim=0)
    if num_q == num_k:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        offset = num_k - num_q
        allowed = torch.arange(num_k, device=q.device)[None, :] <= (torch.arange(num_q, device=q.device)[:, None] + offset)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
    return out.transpose(0, 1)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new query per sequence: q [B, Hq, Dh], block_tables [B, max_blocks] int32, seq_lens [B] -> [B, Hq, Dh].

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
    scores = (qg.float() @ kt.float().transpose(-1, -2)) * scale  # [B, Hk, G, 1, L]
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = probs @ vt.float()
    return out.view(batch, num_heads, head_dim).to(q.dtype)
