"""Routed experts: every token through its top-k SwiGLU experts, weighted and summed.

Shape legend: T = tokens, D = hidden, E = experts, I = expert width, K = experts per token.
Expert weights are stacked: w_gate_up [E, 2I, D] (gate rows first, then up), w_down [E, D, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """x [T, D], topk_ids/topk_weights [T, K] -> [T, D] in x's dtype.

    Groups the T*K (token, slot) pairs by expert with one sort and runs each expert that got tokens once on
    its contiguous run of rows, so the work is proportional to T*K, never to T*E. Rows are read in place
    (token = pair // K); the weighted outputs are summed back per token in fp32.
    """
    num_tokens, top_k = topk_ids.shape
    width = w_down.shape[-1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    token_of_pair = order // top_k
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    pair_weights = topk_weights.reshape(-1)[order].float()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of_pair[start:start + count]
        gate_up = F.linear(x[rows], w_gate_up[expert])
        hidden = F.silu(gate_up[:, :width]) * gate_up[:, width:]
        expert_out = F.linear(hidden, w_down[expert]).float() * pair_weights[start:start + count, None]
        out.index_add_(0, rows, expert_out)
        start += count
    return out.to(x.dtype)
