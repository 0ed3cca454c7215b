"""The GLM-4.5 router kernel against its torch reference: same experts, same order, same weights."""

from __future__ import annotations

import pytest
import torch
from glm_kernels.router import route_reference, route_triton

CASES = [
    # (tokens, hidden, experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    pytest.param(1, 32, 8, 2, 1, 1, True, 1.0, id="one token"),
    pytest.param(20, 48, 16, 4, 4, 2, False, 2.5, id="group-limited, unnormalised, scaled (GLM-4.5 355B style)"),
    pytest.param(5, 40, 8, 8, 1, 1, True, 1.0, id="top_k = E"),
    pytest.param(3, 24, 6, 1, 1, 1, True, 1.0, id="top_k 1, E not a power of two"),
    pytest.param(17, 64, 128, 8, 1, 1, True, 1.0, id="Air routing: 128 experts top-8, more tokens than a tile"),
    pytest.param(6, 36, 12, 3, 3, 3, True, 1.0, id="every group kept"),
]


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens, hidden, experts, top_k, n_group, topk_group, norm, scaling", CASES)
def test_router_matches_reference(tokens, hidden, experts, top_k, n_group, topk_group, norm, scaling, hidden_dtype,
                                  device, gen, poison, close):
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(hidden_dtype)
    gate = torch.randn(experts, hidden, generator=gen, device=device) / hidden**0.5
    bias = 0.1 * torch.randn(experts, generator=gen, device=device)
    args = (x, gate, bias, top_k, n_group, topk_group, norm, scaling)
    with poison():
        ids, weights, scores = route_triton(*args)
    ref_ids, ref_weights, ref_scores = route_reference(*args)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    close(weights, ref_weights, tolerance=1e-5)
    close(scores, ref_scores, tolerance=1e-5)


def test_router_breaks_exact_ties_by_index(device, gen, poison):
    # Experts 5 and 3 (and 9 and 2) have identical gate rows, so identical scores: the lower index comes first,
    # in the kernel as in the reference.
    x = torch.randn(8, 32, generator=gen, device=device)
    gate = torch.randn(12, 32, generator=gen, device=device)
    gate[5], gate[9] = gate[3], gate[2]
    bias = torch.zeros(12, device=device)
    with poison():
        ids, _, _ = route_triton(x, gate, bias, 6)
    ref_ids, _, _ = route_reference(x, gate, bias, 6)
    assert torch.equal(ids, ref_ids)
    for row in ids.tolist():
        for low, high in ((3, 5), (2, 9)):
            if low in row and high in row:
                assert row.index(low) < row.index(high)


def test_router_bias_selects_but_does_not_weigh(device, gen):
    x = torch.randn(4, 16, generator=gen, device=device)
    gate = torch.randn(8, 16, generator=gen, device=device)
    bias = torch.zeros(8, device=device)
    bias[7] = 10.0  # expert 7 always chosen, first, but weighted by its unbiased score
    ids, weights, scores = route_triton(x, gate, bias, 2, norm_topk_prob=False)
    assert (ids[:, 0] == 7).all()
    torch.testing.assert_close(weights[:, 0], scores[:, 7])


def test_router_rejects_bad_grouping(device):
    x, gate = torch.ones(2, 8, device=device), torch.ones(6, 8, device=device)
    with pytest.raises(ValueError, match="n_group = 4 must divide E = 6"):
        route_triton(x, gate, torch.zeros(6, device=device), 2, n_group=4, topk_group=1)
