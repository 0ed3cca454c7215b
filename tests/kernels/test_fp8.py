"""FP8 formats: quantisation round trips, the per-token activation quantiser and the dequantising GEMM."""

from __future__ import annotations

import pytest
import torch
from glm_kernels.fp8 import (
    FP8_MAX,
    dequantize_activation,
    dequantize_weight,
    fp8_linear_reference,
    fp8_linear_triton,
    per_token_quant_reference,
    per_token_quant_triton,
    quantize_weight_blockwise,
    quantize_weight_per_channel,
)


@pytest.mark.parametrize("block_size", [None, (128, 128), (32, 16)], ids=["channel", "block128", "block32x16"])
def test_weight_quantisation_round_trip(block_size, gen):
    weight = torch.randn(3, 200, 136, generator=gen)  # stacked experts, edges not multiples of the block
    weight[0, 5] *= 1000  # one loud row must not spoil the others' scales
    weight[1, 7] = 0  # an all-zero row or block must not divide by zero
    if block_size is None:
        q, scale = quantize_weight_per_channel(weight)
        assert scale.shape == (3, 200, 1)
    else:
        q, scale = quantize_weight_blockwise(weight, block_size)
        assert scale.shape == (3, -(-200 // block_size[0]), -(-136 // block_size[1]))
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert q.float().abs().max() <= FP8_MAX
    back = dequantize_weight(q, scale, block_size)
    # e4m3 keeps 3 mantissa bits: every element within half a step (1/16) of its block's scale range.
    rel = (back - weight).abs() / weight.abs().clamp(min=1e-3)
    assert torch.isfinite(back).all() and (back[1, 7] == 0).all()
    assert rel[weight.abs() > 0.5].max() < 0.07


@pytest.mark.parametrize("group_size", [None, 128, 32], ids=["per token", "per token, 128 groups", "32 groups"])
def test_per_token_quant_matches_reference(group_size, device, gen, poison):
    x = torch.randn(7, 200, generator=gen, device=device).to(torch.bfloat16) * 3
    x[2] = 0  # all-zero token
    x[3, :4] = torch.tensor([1.984375, -7.9375, 0.0305, 448.0])  # round up across a power of two (see round_to_e4m3)
    with poison():
        q, scale = per_token_quant_triton(x, group_size)
    ref_q, ref_scale = per_token_quant_reference(x, group_size)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    deq, ref_deq = dequantize_activation(q, scale, group_size), dequantize_activation(ref_q, ref_scale, group_size)
    # Same e4m3 codes; allow one step apart where a GPU's division rounds differently.
    assert ((deq - ref_deq).abs() <= 0.125 * ref_deq.abs() + 1e-6).all()
    assert (deq == ref_deq).float().mean() > 0.99


LINEAR_CASES = [
    # (rows, in features, out features, block size)
    pytest.param(1, 64, 48, None, id="decode row, per-channel"),
    pytest.param(19, 200, 72, None, id="rows past a tile, K not a power of two"),
    pytest.param(1, 128, 64, (32, 32), id="decode row, block scales"),
    pytest.param(19, 200, 72, (32, 64), id="block scales, partial edge blocks"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act_quant", [False, True], ids=["w8a16", "w8a8 per-token"])
@pytest.mark.parametrize("rows, in_features, out_features, block_size", LINEAR_CASES)
def test_fp8_linear_matches_reference(rows, in_features, out_features, block_size, act_quant, dtype, device, gen,
                                      poison, close):
    weight = torch.randn(out_features, in_features, generator=gen, device=device) / in_features**0.5
    q, scale = quantize_weight_per_channel(weight) if block_size is None else quantize_weight_blockwise(weight,
                                                                                                        block_size)
    bias = torch.randn(out_features, generator=gen, device=device).to(dtype)
    x = torch.randn(2, rows, in_features, generator=gen, device=device).to(dtype)  # leading dims are flattened
    with poison():
        out = fp8_linear_triton(x, q, scale, bias, block_size, act_quant)
    ref = fp8_linear_reference(x, q, scale, bias, block_size, act_quant)
    assert out.shape == (2, rows, out_features)
    close(out, ref, tolerance=0.05 if act_quant and dtype == torch.bfloat16 else None)


def test_fp8_linear_explains_a_wrong_scale(device):
    q = torch.zeros(64, 32, device=device).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"needs a scale of shape \[2, 1\] \(one scale per 32x32 block\)"):
        fp8_linear_triton(torch.ones(1, 32, device=device), q, torch.ones(64, 1, device=device), None, (32, 32))
    with pytest.raises(ValueError, match="expected torch.float8_e4m3fn"):
        fp8_linear_reference(torch.ones(1, 32), torch.zeros(64, 32), torch.ones(64, 1))
