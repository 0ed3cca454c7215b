"""GGUF block codecs (workbench.engine.gguf_blocks) against the gguf package's own numpy decoders: the exact
imports give `dequantize(ours)` bit for bit equal to gguf's values, the dequantized types equal them too, and our
Q4_K encoder writes blocks gguf (hence llama.cpp) reads back as we do."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from glm_kernels.blockquant import Int4Weight, Int8Weight, dequantize

from workbench.engine import gguf_blocks

# where each block type keeps its fp16 scale(s), so random blocks get finite ones
FP16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0], T.Q6_K: [208], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
               T.Q4_1: [0, 2], T.Q5_1: [0, 2], T.Q2_K: [80, 82], T.Q3_K: [108]}


def random_blocks(qtype: T, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes of a tensor of `shape` (values) in `qtype`: every bit pattern of the quants and sub-scales
    occurs; the fp16 scales are finite, of both signs, some zero."""
    rng = np.random.default_rng(seed)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    *lead, k = shape
    raw = rng.integers(0, 256, size=(*lead, k // block, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = rng.normal(0, 0.02, size=raw.shape[:-1]).astype(np.float16)
        scales.flat[::7] = 0  # an all-zero scale
        raw[..., offset:offset + 2] = scales[..., None].view(np.uint8)
    return raw.reshape(*lead, -1)


def same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    return a.dtype == torch.float32 and np.array_equal(a.numpy().view(np.uint32), b.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize(("qtype", "kind", "group"), [
    (T.Q8_0, Int8Weight, 32), (T.Q4_0, Int8Weight, 32), (T.Q5_0, Int8Weight, 32), (T.Q6_K, Int8Weight, 16),
    (T.Q4_K, Int4Weight, None)])
@pytest.mark.parametrize("shape", [(3, 512), (4, 2, 768)], ids=["matrix", "stacked-experts"])
def test_exact_import_dequantizes_to_gguf_values_bit_for_bit(qtype, kind, group, shape):
    raw = random_blocks(qtype, shape)
    ours = gguf_blocks.decode(torch.from_numpy(raw), qtype)
    assert isinstance(ours, kind) and ours.shape == shape
    if group is not None:
        assert ours.group == group
    reference = gguf.quants.dequantize(raw, qtype)
    assert same_bits(dequantize(ours), reference)
    assert same_bits(dequantize(ours[1]), reference[1])  # one expert of a stack, as the loader takes it


@pytest.mark.parametrize("qtype", [T.Q5_K, T.Q4_1, T.Q5_1, T.Q2_K, T.Q3_K])
def test_dequantized_types_equal_gguf_values(qtype):
    raw = random_blocks(qtype, (2, 3, 512))
    values = gguf_blocks.decode(torch.from_numpy(raw), qtype)
    assert isinstance(values, torch.Tensor) and values.shape == (2, 3, 512)
    assert same_bits(values, gguf.quants.dequantize(raw, qtype))


def test_float_types_are_views():
    raw = torch.arange(12, dtype=torch.int16).view(torch.uint8).reshape(2, 12)
    bf16 = gguf_blocks.decode(raw, T.BF16)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (2, 6) and bf16.data_ptr() == raw.data_ptr()
    f16 = torch.randn(3, 4).half()
    assert gguf_blocks.decode(f16, T.F16) is f16


def test_unsupported_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"IQ2_XXS is not supported; supported: F32, F16, BF16, Q8_0.*Q4_K.*Q5_K"):
        gguf_blocks.decode(torch.zeros(1, 66, dtype=torch.uint8), T.IQ2_XXS)


@pytest.mark.parametrize("case", ["normal", "outliers", "zero-rows", "one-sided"])
def test_q4_k_encoder_writes_blocks_gguf_reads_as_we_do(case):
    torch.manual_seed(0)
    w = torch.randn(6, 512) * 0.05
    if case == "outliers":
        w[:, ::97] *= 40
    elif case == "zero-rows":
        w[1:3] = 0
    elif case == "one-sided":
        w = w.abs() + 0.01  # no negative values: the minimum is clamped to 0
    raw = gguf_blocks.encode_q4_k(w)
    assert raw.dtype == np.uint8 and raw.shape == (6, 2 * 144)
    reference = gguf.quants.dequantize(raw, T.Q4_K)
    ours = gguf_blocks.decode_q4_k(torch.from_numpy(raw))
    assert same_bits(dequantize(ours), reference)
    # round to nearest on each group's [min, max] range, with 6-bit sub-scales: half a step, plus what rounding
    # the group's scale (at most d / 2, times 15 steps) and minimum (dmin / 2) to the super-block's grid costs
    groups = w.reshape(6, 2, 8, 32)
    low = groups.amin(-1).clamp(max=0)
    step = (groups.amax(-1).clamp(min=0) - low) / 15
    d = step.amax(-1, keepdim=True) / 63
    dmin = (-low).amax(-1, keepdim=True) / 63
    error = (torch.from_numpy(reference) - w).abs().reshape(6, 2, 8, 32).amax(-1)
    assert torch.all(error <= step / 2 + 7.5 * d + dmin / 2 + 1e-6)
    if case == "normal":  # no outlier: close to plain 4-bit rounding
        assert torch.all(error <= step * 0.75 + 1e-6)
    if case == "zero-rows":
        assert torch.all(torch.from_numpy(reference[1:3]) == 0)


def test_q4_k_encoder_refuses_rows_off_the_super_block():
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_blocks.encode_q4_k(torch.zeros(2, 128))


def test_q8_0_encoding_is_ggmls():
    w = torch.randn(4, 64)
    raw = gguf_blocks.encode_with_gguf(w, T.Q8_0)
    q8 = gguf_blocks.decode_q8_0(torch.from_numpy(raw))
    assert torch.allclose(dequantize(q8), w, atol=float(w.abs().max()) / 127)
