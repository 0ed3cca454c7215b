"""GPU-only: the kernels at GLM-4.5-Air shapes against their references (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from glm_kernels.attention import decode_attention_reference, decode_attention_triton
from glm_kernels.fp8 import quantize_weight_per_channel
from glm_kernels.fused_moe import fused_moe_reference, fused_moe_triton
from kernel_testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("tokens", [1, 64, 4096])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8 channel"])
def test_fused_moe_at_air_shapes(tokens, fp8):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    experts, hidden, width, top_k = 128, 4096, 1408, 8
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    w_gate_up = (torch.randn(experts, 2 * width, hidden, device="cuda", generator=gen) / 64).bfloat16()
    w_down = (torch.randn(experts, hidden, width, device="cuda", generator=gen) / 38).bfloat16()
    kwargs = {}
    if fp8:
        (w_gate_up, gu_scale), (w_down, dn_scale) = quantize_weight_per_channel(w_gate_up), quantize_weight_per_channel(
            w_down)
        kwargs = dict(w_gate_up_scale=gu_scale, w_down_scale=dn_scale)
    ids = torch.rand(tokens, experts, device="cuda", generator=gen).topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, device="cuda", generator=gen).softmax(-1)
    out = fused_moe_triton(x, w_gate_up, w_down, ids, weights, **kwargs)
    assert_close(out, fused_moe_reference(x, w_gate_up, w_down, ids, weights, **kwargs), tolerance=2e-2)


@pytest.mark.parametrize("context", [1, 4097, 32768])
def test_decode_attention_at_air_shapes(context):
    gen = torch.Generator(device="cuda").manual_seed(context)
    batch, block = 4, 16
    blocks = -(-context // block)
    k_cache = torch.randn(batch * blocks, block, 8, 128, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(batch * blocks, block, 8, 128, device="cuda", generator=gen).bfloat16()
    tables = torch.randperm(batch * blocks, device="cuda", generator=gen).view(batch, blocks).int()
    lens = torch.tensor([context, max(1, context // 2), 1, context], dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 96, 128, device="cuda", generator=gen).bfloat16()
    out = decode_attention_triton(q, k_cache, v_cache, tables, lens, 128**-0.5)
    assert_close(out, decode_attention_reference(q, k_cache, v_cache, tables, lens, 128**-0.5))
