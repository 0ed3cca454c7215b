"""The GLM-4.5 MoE router ("noaux_tc"): sigmoid scores, correction bias for selection only, group-limited top-k."""

from __future__ import annotations

import torch


def route_reference(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, D], gate_weight [E, D] -> (topk_ids [T, K] int64, topk_weights [T, K] fp32, scores [T, E] fp32).

    T = tokens, D = hidden, E = experts, K = top_k. Ids are ordered by descending biased score (torch.topk's
    order; ties go to the lower index). Weights are the *unbiased* sigmoid scores of the chosen experts.
    """
    logits = hidden.float() @ gate_weight.float().t()
    scores = logits.sigmoid()
    choice = scores + correction_bias.float()
    if n_group > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        kept_groups = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, topk_weights * routed_scaling_factor, scores
