"""Fused MoE: the expert alignment and the grouped GEMMs against the torch references (bf16/fp16/fp32, FP8)."""

from __future__ import annotations

import pytest
import torch
from glm_kernels.fp8 import quantize_weight_blockwise, quantize_weight_per_channel
from glm_kernels.fused_moe import fused_moe_reference, fused_moe_triton
from glm_kernels.moe_align import moe_align_block_size, moe_align_reference
from kernel_testing import DTYPE_IDS, DTYPES


def topk_ids_for(kind: str, tokens: int, experts: int, top_k: int, gen: torch.Generator, device) -> torch.Tensor:
    """Distinct experts per token (as a router gives), drawn the way the case names."""
    if kind == "one expert":  # every token on expert E - 1 (top_k must be 1)
        return torch.full((tokens, 1), experts - 1, dtype=torch.int64, device=device)
    pool = experts if kind == "random" else experts // 2 + top_k // 2  # "some unused": experts past the pool idle
    pool = max(pool, top_k)
    scores = torch.rand(tokens, pool, generator=gen, device=device)
    return scores.argsort(dim=1)[:, :top_k]


ALIGN_CASES = [
    # (tokens, top_k, experts, block_m, kind)
    pytest.param(1, 8, 128, 16, "random", id="decode: one token, Air routing"),
    pytest.param(5, 3, 8, 16, "random", id="fewer pairs than a tile"),
    pytest.param(40, 1, 16, 16, "one expert", id="every token on one expert"),
    pytest.param(33, 4, 16, 32, "some unused", id="experts with no tokens"),
    pytest.param(300, 8, 64, 64, "random", id="many chunks (multi-launch path)"),
]


@pytest.mark.parametrize("tokens, top_k, experts, block_m, kind", ALIGN_CASES)
@pytest.mark.parametrize("path", ["one program", "three launches"])
def test_align_matches_reference(tokens, top_k, experts, block_m, kind, path, device, gen, poison):
    topk_ids = topk_ids_for(kind, tokens, experts, top_k, gen, device)
    with poison():
        sorted_ids, expert_ids, num_padded = moe_align_block_size(
            topk_ids, block_m, experts, single_program_chunks=1000 if path == "one program" else 0)
    ref_sorted, ref_experts, ref_padded = moe_align_reference(topk_ids.cpu(), block_m, experts)
    sorted_ids, expert_ids, padded = sorted_ids.cpu(), expert_ids.cpu(), int(num_padded)
    pairs = topk_ids.numel()
    assert padded == ref_padded
    tiles = padded // block_m
    assert torch.equal(expert_ids[:tiles], ref_experts), "one expert id per tile, in expert order"
    assert (expert_ids[tiles:] == -1).all(), "tiles past the padded runs are marked -1"
    for tile in range(tiles):  # the same pairs in every tile (order within an expert's run is free)
        got = sorted(sorted_ids[tile * block_m:(tile + 1) * block_m].tolist())
        assert got == sorted(ref_sorted[tile * block_m:(tile + 1) * block_m].tolist()), f"tile {tile}"
    assert (sorted_ids[padded:] == pairs).all(), "sentinel after the runs"
    real = sorted_ids[sorted_ids < pairs]
    assert torch.equal(real.sort().values, torch.arange(pairs, dtype=torch.int32)), "every pair exactly once"


MOE_CASES = [
    # (tokens, hidden, width, experts, top_k, kind)
    pytest.param(1, 64, 32, 8, 2, "random", id="one token"),
    pytest.param(5, 48, 40, 8, 3, "random", id="fewer tokens than a tile, hidden and width not powers of two"),
    pytest.param(12, 32, 24, 6, 2, "some unused", id="experts with no tokens"),
    pytest.param(20, 32, 16, 4, 1, "one expert", id="every token on one expert, top_k 1"),
    pytest.param(6, 32, 16, 4, 4, "random", id="top_k = E"),
    pytest.param(24, 24, 40, 6, 3, "random", id="more pairs than a tile per expert, several n-tiles"),
]


def make_experts(experts, hidden, width, dtype, gen, device):
    w_gate_up = (torch.randn(experts, 2 * width, hidden, generator=gen, device=device) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, width, generator=gen, device=device) / width**0.5).to(dtype)
    return w_gate_up, w_down


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens, hidden, width, experts, top_k, kind", MOE_CASES)
def test_fused_moe_matches_reference(tokens, hidden, width, experts, top_k, kind, dtype, device, gen, poison, close):
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    w_gate_up, w_down = make_experts(experts, hidden, width, dtype, gen, device)
    topk_ids = topk_ids_for(kind, tokens, experts, top_k, gen, device)
    topk_weights = torch.rand(tokens, top_k, generator=gen, device=device) + 0.1
    with poison():
        out = fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights)
    close(out, fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights))


def quantize_experts(w_gate_up, w_down, block_size):
    """Stacked FP8 experts as the loader makes them: gate and up quantised separately when block-wise."""
    if block_size is None:
        (gu, gu_scale), (dn, dn_scale) = quantize_weight_per_channel(w_gate_up), quantize_weight_per_channel(w_down)
        return gu, gu_scale, dn, dn_scale
    width = w_gate_up.shape[1] // 2
    gate, gate_scale = quantize_weight_blockwise(w_gate_up[:, :width], block_size)
    up, up_scale = quantize_weight_blockwise(w_gate_up[:, width:], block_size)
    dn, dn_scale = quantize_weight_blockwise(w_down, block_size)
    return torch.cat((gate, up), 1), torch.cat((gate_scale, up_scale), 1), dn, dn_scale


FP8_CASES = [
    # (tokens, hidden, width, experts, top_k, block size)
    pytest.param(1, 64, 32, 8, 2, None, id="decode, per-channel scales"),
    pytest.param(1, 64, 64, 4, 2, (32, 32), id="decode, block scales"),
    pytest.param(9, 80, 40, 8, 3, (16, 32), id="block scales, partial blocks at the edges, dims not powers of 2"),
]


@pytest.mark.parametrize("act_quant", [False, True], ids=["w8a16", "w8a8 per-token"])
@pytest.mark.parametrize("tokens, hidden, width, experts, top_k, block_size", FP8_CASES)
def test_fused_moe_fp8_matches_reference(tokens, hidden, width, experts, top_k, block_size, act_quant, device, gen,
                                         poison, close):
    dtype = torch.bfloat16
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    gu, gu_scale, dn, dn_scale = quantize_experts(*make_experts(experts, hidden, width, torch.float32, gen, device),
                                                  block_size)
    topk_ids = topk_ids_for("random", tokens, experts, top_k, gen, device)
    topk_weights = torch.rand(tokens, top_k, generator=gen, device=device)
    kwargs = dict(w_gate_up_scale=gu_scale, w_down_scale=dn_scale, block_size=block_size, act_quant=act_quant)
    with poison():
        out = fused_moe_triton(x, gu, dn, topk_ids, topk_weights, **kwargs)
    # With FP8 activations, a last-bit difference in the bf16 intermediate can move an element to the
    # neighbouring e4m3 value (a step of 6-12%), so the two paths agree less closely than with bf16 inputs.
    close(out, fused_moe_reference(x, gu, dn, topk_ids, topk_weights, **kwargs), tolerance=0.08 if act_quant else None)


def test_fp8_reference_is_close_to_full_precision(device, gen):
    # The FP8 twin itself: e4m3 weights keep the MoE output within a few percent of the unquantised one.
    x = torch.randn(16, 64, generator=gen, device=device)
    w_gate_up, w_down = make_experts(8, 64, 32, torch.float32, gen, device)
    topk_ids = topk_ids_for("random", 16, 8, 2, gen, device)
    topk_weights = torch.rand(16, 2, generator=gen, device=device)
    full = fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights)
    for block_size in (None, (32, 32)):
        gu, gu_scale, dn, dn_scale = quantize_experts(w_gate_up, w_down, block_size)
        fp8 = fused_moe_reference(x, gu, dn, topk_ids, topk_weights, w_gate_up_scale=gu_scale,
                                  w_down_scale=dn_scale, block_size=block_size)
        assert (fp8 - full).norm() / full.norm() < 0.06


def test_fused_moe_explains_bad_shapes(device):
    x = torch.ones(2, 16, device=device)
    w_gate_up, w_down = torch.ones(4, 8, 16, device=device), torch.ones(4, 16, 5, device=device)
    ids, weights = torch.zeros(2, 1, dtype=torch.int64, device=device), torch.ones(2, 1, device=device)
    with pytest.raises(ValueError, match=r"w_down must be \[E=4, D=16, I=4\]"):
        fused_moe_triton(x, w_gate_up, w_down, ids, weights)
    with pytest.raises(ValueError, match="need w_gate_up_scale and w_down_scale"):
        fused_moe_triton(x, w_gate_up.to(torch.float8_e4m3fn), torch.ones(4, 16, 4, device=device).to(
            torch.float8_e4m3fn), ids, weights)
