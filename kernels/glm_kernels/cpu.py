"""Torch implementations for the engine's CPU path: the references' contracts, with fewer and larger ops.

At decode sizes on a CPU (one token, hidden 256 to 4096) each torch op costs a few microseconds of dispatch
whatever its size, so a batch-1 decode step is dominated by the number of ops, not by the arithmetic. These
functions keep the reference's signature and results (each is tested against its reference) and take a short
path for the shapes decode produces, handing everything else to the reference:

- `fused_moe_cpu`: one token -> a loop over its K experts (no sort, no bincount, no scatter);
- `decode_attention_cpu`: one sequence -> gather its cache blocks, one SDPA call with grouped-query heads;
- `rms_norm_cpu`: torch's fused `rms_norm` instead of five elementwise ops;
- `rotary_cpu`: one token -> q and k rotated together, in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_kernels.attention import decode_attention_reference, gather_kv
from glm_kernels.fused_moe import fused_moe_reference
from glm_kernels.rotary import rotary_reference


def fused_moe_cpu(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args) -> torch.Tensor:
    """`fused_moe_reference` (same arguments, same result); one unquantised token runs expert by expert."""
    if x.shape[0] != 1 or fp8_args or w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        return fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args)
    width = w_down.shape[-1]
    out = torch.zeros(1, x.shape[1], dtype=torch.float32, device=x.device)
    for expert, weight in zip(topk_ids[0].tolist(), topk_weights[0].tolist()):
        gate_up = F.linear(x, w_gate_up[expert])
        hidden = F.silu(gate_up[:, :width]) * gate_up[:, width:]
        out.add_(F.linear(hidden, w_down[expert]).float(), alpha=weight)
    return out.to(x.dtype)


def decode_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """`decode_attention_reference` (same arguments, same result); a single sequence needs no padding mask."""
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


def rms_norm_cpu(x, weight, eps: float, residual=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_reference` (same arguments, same result): statistics in fp32, cast back, then the weight."""
    hidden = x if residual is None else x + residual
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype), hidden


def rotary_cpu(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_reference` (same arguments, same result); one token's q and k heads are rotated as one tensor.

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
