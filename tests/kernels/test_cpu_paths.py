"""The engine's CPU paths (each op's `*_cpu`) against the torch references they stand in for."""

from __future__ import annotations

import pytest
import torch
from glm_kernels import (
    decode_attention_cpu,
    decode_attention_reference,
    fused_moe_cpu,
    fused_moe_reference,
    rms_norm_cpu,
    rms_norm_reference,
    rotary_cpu,
    rotary_reference,
)
from glm_kernels.rotary import rotary_cos_sin
from kernel_testing import DTYPE_IDS, DTYPES, assert_close


@pytest.fixture
def device() -> torch.device:
    """These are the CPU paths: the kernel tests' seeded `gen` fixture makes its inputs here, even with a GPU."""
    return torch.device("cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens, experts, top_k, hidden, width", [
    pytest.param(1, 16, 4, 64, 32, id="one token: the expert-by-expert path"),
    pytest.param(1, 8, 1, 32, 16, id="one token, top-1"),
    pytest.param(1, 4, 4, 32, 16, id="one token routed to every expert"),
    pytest.param(5, 8, 2, 32, 16, id="several tokens: handed to the reference"),
])
def test_fused_moe_cpu_matches_reference(tokens, experts, top_k, hidden, width, dtype, gen):
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w_gate_up = (torch.randn(experts, 2 * width, hidden, generator=gen) / hidden**0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, width, generator=gen) / width**0.5).to(dtype)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    assert_close(fused_moe_cpu(x, w_gate_up, w_down, topk_ids, topk_weights),
                 fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights))


def test_fused_moe_cpu_rejects_what_the_reference_rejects():
    x = torch.randn(1, 32)
    with pytest.raises(ValueError, match="must have x's dtype"):
        fused_moe_cpu(x, torch.randn(4, 32, 32, dtype=torch.float64), torch.randn(4, 32, 16, dtype=torch.float64),
                      torch.tensor([[0, 1]]), torch.rand(1, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("q_heads, kv_heads, head_dim, block_size, lens", [
    pytest.param(4, 2, 16, 4, [1], id="one cached token"),
    pytest.param(6, 2, 24, 4, [16], id="ending exactly on a block edge"),
    pytest.param(5, 5, 16, 8, [17], id="no grouping, one token into a new block"),
    pytest.param(12, 1, 32, 16, [70], id="Air head group 12"),
    pytest.param(4, 2, 16, 4, [9, 3], id="two sequences: handed to the reference"),
])
def test_decode_attention_cpu_matches_reference(q_heads, kv_heads, head_dim, block_size, lens, dtype, gen):
    num_blocks = 24
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    width = max(-(-n // block_size) for n in lens) + 1
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in lens]).to(torch.int32)
    # Slots past each length hold NaN: they must not reach the output.
    for row, length in enumerate(lens):
        last_block = tables[row, (length - 1) // block_size].long()
        k_cache[last_block, (length - 1) % block_size + 1:] = float("nan")
        v_cache[last_block, (length - 1) % block_size + 1:] = float("nan")
    q = torch.randn(len(lens), q_heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim**-0.5
    assert_close(decode_attention_cpu(q, k_cache, v_cache, tables, seq_lens, scale),
                 decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, scale))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows, with_residual", [pytest.param(1, True, id="decode row with residual"),
                                                 pytest.param(7, False, id="prefill rows, no residual")])
def test_rms_norm_cpu_matches_reference(rows, with_residual, dtype, gen):
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    residual = torch.randn(rows, 96, generator=gen).to(dtype) if with_residual else None
    weight = torch.rand(96, generator=gen).to(dtype)
    normed, summed = rms_norm_cpu(x, weight, 1e-6, residual)
    want_normed, want_summed = rms_norm_reference(x, weight, 1e-6, residual)
    assert_close(normed, want_normed)
    assert torch.equal(summed, want_summed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim, rotary_dim", [
    pytest.param(1, 8, 2, 32, 16, id="one token, half the head rotated (GLM-4.5)"),
    pytest.param(1, 4, 4, 16, 16, id="one token, the whole head rotated"),
    pytest.param(6, 4, 2, 32, 16, id="several tokens: handed to the reference"),
])
def test_rotary_cpu_matches_reference(tokens, q_heads, kv_heads, head_dim, rotary_dim, dtype, gen):
    q = torch.randn(tokens, q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    cos, sin = rotary_cos_sin(torch.arange(37, 37 + tokens), inv_freq, dtype)
    (q_out, k_out), (q_want, k_want) = rotary_cpu(q, k, cos, sin), rotary_reference(q, k, cos, sin)
    assert_close(q_out, q_want)
    assert_close(k_out, k_want)
