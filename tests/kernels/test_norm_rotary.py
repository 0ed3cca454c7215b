"""RMSNorm and partial rotary embedding: Triton kernels against their torch references."""

from __future__ import annotations

import pytest
import torch
from glm_kernels.rms_norm import rms_norm_reference, rms_norm_triton
from glm_kernels.rotary import rotary_cos_sin, rotary_reference, rotary_triton
from kernel_testing import DTYPE_IDS, DTYPES

RMS_CASES = [
    # (rows, hidden, residual)
    pytest.param(1, 64, False, id="one token"),
    pytest.param(7, 100, True, id="hidden not a power of two, fused residual"),
    pytest.param(3, 4096, True, id="Air hidden size"),
    pytest.param(2, 3, False, id="hidden smaller than a warp"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows, hidden, with_residual", RMS_CASES)
def test_rms_norm_matches_reference(rows, hidden, with_residual, dtype, device, gen, poison, close):
    x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen, device=device).to(dtype) if with_residual else None
    with poison():
        normed, summed = rms_norm_triton(x, weight, 1e-5, residual)
    ref_normed, ref_summed = rms_norm_reference(x, weight, 1e-5, residual)
    close(normed, ref_normed)
    close(summed, ref_summed)
    if not with_residual:
        assert summed is x  # the contract: without a residual, the carried sum is the input itself


def test_rms_norm_fp32_weight_promotes_like_the_reference(device, gen, poison, close):
    # The engine keeps norm weights in the model dtype, but a fp32 weight with bf16 activations must still
    # give what the reference gives: `weight * normed` promotes to fp32.
    x = torch.randn(4, 48, 10, generator=gen, device=device).to(torch.bfloat16)  # leading dims flattened
    weight = torch.randn(10, generator=gen, device=device)
    with poison():
        normed, _ = rms_norm_triton(x, weight, 1e-6)
    close(normed, rms_norm_reference(x, weight, 1e-6)[0], dtype=torch.bfloat16)


def test_rms_norm_rejects_mismatched_weight(device):
    with pytest.raises(ValueError, match=r"weight has shape \[5\], expected \[4\]"):
        rms_norm_triton(torch.ones(2, 4, device=device), torch.ones(5, device=device), 1e-5)


ROTARY_CASES = [
    # (tokens, q heads, kv heads, head dim, rotary dims, positions start)
    pytest.param(1, 4, 2, 16, 8, 0, id="one token, half of the head rotated (Air's factor)"),
    pytest.param(5, 6, 1, 24, 24, 3, id="whole head rotated, one kv head"),
    pytest.param(3, 5, 5, 20, 12, 1000, id="head dim not a power of two, Hq == Hk, far positions"),
    pytest.param(9, 96 // 8, 1, 128, 64, 7, id="Air head dim 128, rotary 64"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim, rotary_dim, start", ROTARY_CASES)
def test_rotary_matches_reference(tokens, q_heads, kv_heads, head_dim, rotary_dim, start, dtype, device, gen,
                                  poison, close):
    # q and k as the model makes them: views into one projection output (strided over tokens).
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen, device=device).to(dtype)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    positions = torch.arange(start, start + tokens, device=device)
    cos, sin = rotary_cos_sin(positions, inv_freq, dtype)
    with poison():
        q_out, k_out = rotary_triton(q, k, cos, sin)
    q_ref, k_ref = rotary_reference(q, k, cos, sin)
    close(q_out, q_ref)
    close(k_out, k_ref)
    # The pass-through dims are copied bit for bit.
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


def test_rotary_rejects_odd_rotary_dims(device):
    q = torch.ones(2, 2, 8, device=device)
    with pytest.raises(ValueError, match="must be even"):
        rotary_triton(q, q, torch.ones(2, 3, device=device), torch.ones(2, 3, device=device))
