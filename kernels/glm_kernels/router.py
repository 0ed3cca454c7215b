"""The GLM-4.5 MoE router ("noaux_tc"): sigmoid scores, selection-only correction bias, group-limited top-k.

The torch reference and the Triton kernel. The kernel does the whole router for a tile of tokens in one
program: the fp32 logits GEMM, sigmoid, bias, group-limited selection and the top-k by repeated argmax (which
breaks ties to the lower expert index, like the reference's stable sort), normalisation and scaling.
"""

from __future__ import annotations

import torch

from glm_kernels.triton_support import check, new_output, next_power_of_2, require_triton, tl, triton


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
    """hidden [T, D], gate_weight [E, D] -> (topk_ids [T, K] int64, topk_weights [T, K] fp32,
    scores [T, E] fp32).

    T = tokens, D = hidden, E = experts, K = top_k. Ids are ordered by descending biased score, ties going to
    the lower index (a stable sort: `torch.topk` itself orders equal values arbitrarily, differently on CPU
    and GPU, so it cannot be the contract). Weights are the *unbiased* sigmoid scores of the chosen experts.
    """
    logits = hidden.float() @ gate_weight.float().t()
    scores = logits.sigmoid()
    choice = scores + correction_bias.float()
    if n_group > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        kept_groups = _top_indices(group_scores, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    topk_ids = _top_indices(choice, top_k)
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, topk_weights * routed_scaling_factor, scores


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values of each row, descending, equal values in index order."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


@triton.jit
def _route_kernel(
    hidden_ptr,
    gate_ptr,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    scores_ptr,
    num_tokens,
    hidden_size,
    num_experts,
    stride_hidden,
    stride_gate,
    scaling,
    TOP_K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    token_mask = tokens < num_tokens
    expert_mask = experts < num_experts
    # Logits in fp32 ("ieee": no TF32 rounding, the choice of experts depends on small differences).
    logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, hidden_size, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < hidden_size
        h = tl.load(
            hidden_ptr + tokens[:, None].to(tl.int64) * stride_hidden + dims[None, :],
            mask=token_mask[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            gate_ptr + experts[None, :] * stride_gate + dims[:, None],
            mask=expert_mask[None, :] & dim_mask[:, None],
            other=0.0,
        ).to(tl.float32)
        logits = tl.dot(h, w, logits, input_precision="ieee")
    scores = tl.sigmoid(logits)
    bias = tl.load(bias_ptr + experts, mask=expert_mask, other=0.0).to(tl.float32)
    neg_inf = float("-inf")
    choice = tl.where(expert_mask[None, :], scores + bias[None, :], neg_inf)

    if N_GROUP > 1:
        group_size = num_experts // N_GROUP
        group_of = experts // group_size
        groups = tl.arange(0, BLOCK_G)
        group_scores = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)
        for g in tl.static_range(N_GROUP):  # group score: sum of the group's two best biased scores
            in_group = tl.where((group_of == g)[None, :], choice, neg_inf)
            best = tl.max(in_group, axis=1)
            best_at = tl.argmax(in_group, axis=1)
            second = tl.max(tl.where(experts[None, :] == best_at[:, None], neg_inf, in_group), axis=1)
            group_scores = tl.where(groups[None, :] == g, (best + second)[:, None], group_scores)
        kept = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            g_best = tl.argmax(group_scores, axis=1)
            kept += (group_of[None, :] == g_best[:, None]).to(tl.int32)
            group_scores = tl.where(groups[None, :] == g_best[:, None], neg_inf, group_scores)
        choice = tl.where(kept > 0, choice, neg_inf)

    slots = tl.arange(0, BLOCK_K)
    top_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    top_weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # tl.argmax takes the lowest index among equal maxima, as torch.topk does
        pick = tl.argmax(choice, axis=1)
        picked = experts[None, :] == pick[:, None]
        weight = tl.sum(tl.where(picked, scores, 0.0), axis=1)
        top_ids = tl.where(slots[None, :] == k, pick[:, None].to(tl.int64), top_ids)
        top_weights = tl.where(slots[None, :] == k, weight[:, None], top_weights)
        choice = tl.where(picked, neg_inf, choice)
    if NORMALIZE:
        top_weights = top_weights / (tl.sum(top_weights, axis=1)[:, None] + 1e-20)
    top_weights = top_weights * scaling

    rows = tokens[:, None].to(tl.int64)
    out_mask = token_mask[:, None] & (slots < TOP_K)[None, :]
    tl.store(ids_ptr + rows * TOP_K + slots[None, :], top_ids, mask=out_mask)
    tl.store(weights_ptr + rows * TOP_K + slots[None, :], top_weights, mask=out_mask)
    tl.store(
        scores_ptr + rows * num_experts + experts[None, :],
        scores,
        mask=token_mask[:, None] & expert_mask[None, :],
    )


def route_triton(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `route_reference`."""
    require_triton(hidden.device)
    check(hidden.dim() == 2, f"route: hidden must be [T, D]; got {list(hidden.shape)}")
    num_tokens, hidden_size = hidden.shape
    check(
        gate_weight.dim() == 2 and gate_weight.shape[1] == hidden_size,
        f"route: gate_weight must be [E, D={hidden_size}]; got {list(gate_weight.shape)}",
    )
    num_experts = gate_weight.shape[0]
    check(
        correction_bias.shape == (num_experts,),
        f"route: correction_bias must be [E={num_experts}]; got {list(correction_bias.shape)}",
    )
    check(0 < top_k <= num_experts, f"route: top_k = {top_k} must be in [1, E = {num_experts}]")
    check(
        n_group >= 1 and num_experts % n_group == 0,
        f"route: n_group = {n_group} must divide E = {num_experts}",
    )
    check(1 <= topk_group <= n_group, f"route: topk_group = {topk_group} must be in [1, n_group = {n_group}]")
    check(n_group == 1 or num_experts // n_group >= 2, "route: group-limited routing needs >= 2 experts a group")
    check(
        topk_group * (num_experts // n_group) >= top_k,
        f"route: {topk_group} kept group(s) of {num_experts // n_group} experts hold fewer than top_k = {top_k}",
    )
    check(
        num_experts <= 1024,
        f"route: E = {num_experts} experts exceeds the kernel's 1024 (one tile of experts)",
    )
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    gate_weight = gate_weight.contiguous()
    ids = new_output((num_tokens, top_k), torch.int64, hidden.device)
    weights = new_output((num_tokens, top_k), torch.float32, hidden.device)
    scores = new_output((num_tokens, num_experts), torch.float32, hidden.device)
    if num_tokens == 0:
        return ids, weights, scores
    block_t = 16  # tl.dot needs >= 16 rows
    block_e = max(16, next_power_of_2(num_experts))
    block_d = max(16, min(64, next_power_of_2(hidden_size), 8192 // block_e))
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        hidden,
        gate_weight,
        correction_bias.contiguous(),
        ids,
        weights,
        scores,
        num_tokens,
        hidden_size,
        num_experts,
        hidden.stride(0),
        gate_weight.stride(0),
        float(routed_scaling_factor),
        TOP_K=top_k,
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        NORMALIZE=bool(norm_topk_prob),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_D=block_d,
        BLOCK_G=max(2, next_power_of_2(n_group)),
        BLOCK_K=max(2, next_power_of_2(top_k)),
        num_warps=4 if block_e <= 128 else 8,
    )
    return ids, weights, scores
