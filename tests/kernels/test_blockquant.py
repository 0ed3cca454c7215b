"""The quantized CPU weight formats (glm_kernels.blockquant): layouts, quantizers, dequantization, references."""

from __future__ import annotations

import pytest
import torch
from glm_kernels.blockquant import (
    Int4Weight,
    Int8Weight,
    QuantFormatError,
    dequantize,
    linear_q8a_reference,
    linear_reference,
    quantize,
    quantize_activations,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

# (N, K) with the edge case each names.
SHAPES = {
    "one-group": (3, 32),
    "one-super-block": (4, 256),
    "partial-super-block-air-expert-width": (5, 1408),
    "several-super-blocks": (2, 768),
    "single-row": (1, 512),
}


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.02


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("group", [32, 16], ids=["group32", "group16-q6k"])
def test_int8_error_is_at_most_half_a_step(shape, group):
    w = weights(*shape)
    qw = quantize_int8(w, group)
    assert qw.q.dtype == torch.int8 and qw.scales.shape == (shape[0], shape[1] // group)
    step = qw.scales.repeat_interleave(group, dim=-1)
    assert torch.all((dequantize(qw) - w).abs() <= step / 2 * (1 + 1e-6))
    assert qw.bits_per_weight == pytest.approx(8 + 32 / group)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_int4_error_stays_within_a_step_of_its_group(shape):
    w = weights(*shape)
    qw = quantize_int4(w)
    groups = shape[1] // 32
    assert qw.packed.shape == (shape[0], shape[1] // 2) and qw.sc.shape == (shape[0], groups)
    assert qw.d.shape == (shape[0], -(-shape[1] // 256))
    spread = w.reshape(shape[0], groups, 32)
    step = (spread.amax(-1).clamp(min=0) - spread.amin(-1).clamp(max=0)) / 15
    error = (dequantize(qw) - w).abs().reshape(shape[0], groups, 32).amax(-1)
    # Half a step from rounding q, plus the rounding of the 8-bit sub-scale and offset (a 255th of the largest).
    assert torch.all(error <= 0.5 * step + 2 * step.amax() / 255 * 16)
    assert (dequantize(qw) - w).abs().mean() < 0.3 * step.mean()
    assert qw.bits_per_weight <= 4.75 + 64 / shape[1]  # a partial super-block still carries one d and dmin


def test_int4_nibbles_are_in_llamacpp_order():
    """Byte i of a group holds element i in its low nibble and element i + 16 in its high one."""
    q = torch.arange(32, dtype=torch.uint8) % 16
    w = Int4Weight(packed=torch.zeros(1, 16, dtype=torch.uint8), d=torch.ones(1, 1), dmin=torch.zeros(1, 1),
                   sc=torch.ones(1, 1, dtype=torch.uint8), mn=torch.zeros(1, 1, dtype=torch.uint8))
    packed = (q[:16] | (q[16:] << 4)).reshape(1, 16)
    assert torch.equal(unpack_nibbles(packed)[0], q)
    assert torch.equal(dequantize(Int4Weight(packed, w.d, w.dmin, w.sc, w.mn))[0], q.float())
    assert torch.equal(quantize_int4(q.float().reshape(1, 32)).packed, packed)  # the quantizer packs the same way


def test_int4_dequantizes_by_the_q4k_formula_products_first():
    """(d * sc) * q - (dmin * mn), each product rounded to fp32, as llama.cpp's dequantize_row_q4_K."""
    gen = torch.Generator().manual_seed(3)
    k = 320  # a full super-block and a partial one
    d = (torch.rand(2, 2, generator=gen) * 1e-3).half().float()  # fp16 values, as a GGUF file stores them
    dmin = (torch.rand(2, 2, generator=gen) * 1e-3).half().float()
    sc = torch.randint(0, 64, (2, k // 32), generator=gen, dtype=torch.uint8)
    mn = torch.randint(0, 64, (2, k // 32), generator=gen, dtype=torch.uint8)
    packed = torch.randint(0, 256, (2, k // 2), generator=gen, dtype=torch.uint8)
    weight = Int4Weight(packed, d, dmin, sc, mn)
    q = unpack_nibbles(packed)
    expected = torch.empty(2, k)
    for n in range(2):
        for i in range(k):
            g, s = i // 32, i // 256
            scale = torch.tensor(d[n, s].item(), dtype=torch.float32) * float(sc[n, g])
            offset = torch.tensor(dmin[n, s].item(), dtype=torch.float32) * float(mn[n, g])
            expected[n, i] = scale * float(q[n, i]) - offset
    assert torch.equal(dequantize(weight), expected)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_zero_rows_quantize_to_zeros_not_nan(fmt):
    w = weights(3, 64)
    w[1] = 0
    values = dequantize(quantize(w, fmt))
    assert torch.isfinite(values).all() and torch.equal(values[1], torch.zeros(64))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_stacked_experts_index_to_one_expert(fmt):
    stacked = torch.stack([weights(4, 64, seed) for seed in range(3)])
    qw = quantize(stacked, fmt)
    assert qw.shape == (3, 4, 64)
    for e in range(3):
        assert torch.equal(dequantize(qw[e]), dequantize(quantize(stacked[e], fmt)))


def test_activations_quantize_per_block_with_sums():
    x = torch.randn(3, 96)
    x[1, 32:64] = 0  # an all-zero block
    x[2, 5] = 1e4  # an outlier owns its block's scale
    q, scales, sums = quantize_activations(x)
    assert q.dtype == torch.int8 and scales.shape == (3, 3) and sums.shape == (3, 3)
    assert torch.equal(sums, q.reshape(3, 3, 32).sum(-1, dtype=torch.int32))
    assert scales[1, 1] == 0 and not q[1, 32:64].any()
    assert q.abs().max() <= 127 and q[2, 5] == 127
    back = scales.repeat_interleave(32, dim=-1) * q.float()
    assert torch.all((back - x).abs() <= scales.repeat_interleave(32, dim=-1) / 2 * (1 + 1e-6))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_references_agree_up_to_activation_rounding(fmt):
    w = weights(16, 256)
    x = torch.randn(5, 256)
    qw = quantize(w, fmt)
    plain = linear_reference(x, qw)
    assert torch.allclose(plain, x @ dequantize(qw).T)
    with_q8_activations = linear_q8a_reference(x, qw)
    assert (with_q8_activations - plain).abs().max() < 0.02 * plain.abs().max()
    assert not torch.equal(with_q8_activations, plain)  # the activation rounding is really modelled


def test_bad_shapes_and_fields_name_what_is_wrong():
    with pytest.raises(QuantFormatError, match="K=40 must be a multiple of 32"):
        quantize_int4(torch.zeros(2, 40))
    with pytest.raises(QuantFormatError, match="multiple of 16"):
        quantize_int8(torch.zeros(2, 40), group=16)
    with pytest.raises(QuantFormatError, match="int8 q and float32 scales"):
        Int8Weight(torch.zeros(2, 32), torch.zeros(2, 1))
    with pytest.raises(QuantFormatError, match="Int4Weight.d must be"):
        Int4Weight(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2), torch.zeros(2, 1),
                   torch.zeros(2, 1, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(QuantFormatError, match="use one of int8, int4"):
        quantize(torch.zeros(2, 32), "int3")
