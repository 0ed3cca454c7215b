"""The compiled CPU prefill kernels (glm_kernels/csrc/prefill_kernels.cpp) against their torch references:
`prefill_attention_compiled`, `fused_moe_compiled` and `rotary_compiled` against `prefill_attention_reference`,
`fused_moe_reference` and `rotary_reference`.

(The compiled decode step is tested against the engine's torch path in tests/engine/test_compiled_decode.py.)
"""

from __future__ import annotations

import pytest
import torch
from glm_kernels import (
    cpu_compiled,
    fused_moe_compiled,
    fused_moe_reference,
    prefill_attention_compiled,
    prefill_attention_reference,
    rotary_compiled,
    rotary_reference,
)
from glm_kernels.rotary import rotary_cos_sin
from kernel_testing import assert_close


@pytest.fixture(scope="module")
def compiled():
    module = cpu_compiled.load()  # the first run on a machine compiles it (about a minute)
    assert module is not None, f"the compiled CPU kernels did not build: {cpu_compiled.build_error()}"
    return module


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu")  # CPU kernels: the seeded `gen` fixture makes its inputs here, even with a GPU


@pytest.mark.parametrize("num_q, num_k, heads, kv_heads, head_dim, block_rows", [
    pytest.param(48, 48, 8, 2, 32, 256, id="bench shape: GQA 4 to 1, every query in one block"),
    pytest.param(40, 40, 96, 8, 128, 256, id="GLM-4.5-Air heads: 96 query, 8 kv, dim 128"),
    pytest.param(37, 37, 4, 2, 16, 8, id="blocks of 4 positions, the last one partial"),
    pytest.param(29, 29, 4, 1, 16, 1, id="one query row per block: every causal edge apart"),
    pytest.param(1, 37, 8, 2, 32, 256, id="one query after 36 cached keys (a prefill's last row)"),
    pytest.param(20, 53, 6, 2, 16, 12, id="queries continuing after a cached prefix"),
    pytest.param(33, 33, 6, 6, 12, 64, id="no grouping, head dim not a multiple of 8"),
    pytest.param(11, 11, 3, 1, 8, 256, id="more rows than keys in a block: tails everywhere"),
])
def test_prefill_attention_matches_reference(compiled, num_q, num_k, heads, kv_heads, head_dim, block_rows, gen):
    q = torch.randn(num_q, heads, head_dim, generator=gen)
    k = torch.randn(num_k, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_k, kv_heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    assert_close(compiled.prefill_attention(q, k, v, scale, block_rows), prefill_attention_reference(q, k, v, scale))


def test_prefill_attention_reads_strided_inputs(compiled, gen):
    # The model hands over k and v as column slices of one [T, q + k + v] projection.
    qkv = torch.randn(30, 8 * 16 + 2 * 2 * 16, generator=gen)
    q, k, v = qkv.split((128, 32, 32), dim=-1)
    q, k, v = q.view(30, 8, 16), k.view(30, 2, 16), v.view(30, 2, 16)
    assert_close(compiled.prefill_attention(q, k, v, 0.25), prefill_attention_reference(q, k, v, 0.25))


def test_large_scores_do_not_overflow(compiled, gen):
    # Logits of several hundred: the softmax subtracts each row's max before its exp.
    q = 30 * torch.randn(24, 4, 16, generator=gen)
    k = 30 * torch.randn(24, 2, 16, generator=gen)
    v = torch.randn(24, 2, 16, generator=gen)
    assert_close(compiled.prefill_attention(q, k, v, 1.0), prefill_attention_reference(q, k, v, 1.0))


def test_the_wrapper_sends_what_the_kernel_does_not_take_to_the_reference(compiled, gen):
    q = torch.randn(9, 4, 16, generator=gen).bfloat16()
    k, v = torch.randn(9, 2, 16, generator=gen).bfloat16(), torch.randn(9, 2, 16, generator=gen).bfloat16()
    assert torch.equal(prefill_attention_compiled(q, k, v, 0.25), prefill_attention_reference(q, k, v, 0.25))


def test_bad_inputs_say_what_is_wrong(compiled):
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        compiled.prefill_attention(torch.randn(4, 2, 8).double(), torch.randn(4, 2, 8), torch.randn(4, 2, 8), 1.0)
    with pytest.raises(RuntimeError, match="do not fit"):
        compiled.prefill_attention(torch.randn(4, 3, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8), 1.0)
    with pytest.raises(RuntimeError, match="do not fit"):  # more queries than keys
        compiled.prefill_attention(torch.randn(5, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8), 1.0)


@pytest.mark.parametrize("tokens, experts, top_k, hidden, width, routing", [
    pytest.param(64, 16, 4, 64, 32, "random", id="bench-like: 16 experts top-4"),
    pytest.param(33, 8, 1, 52, 13, "random", id="top-1, widths with no multiple of 8"),
    pytest.param(20, 8, 2, 32, 16, "one_expert_idle", id="an expert nobody chose"),
    pytest.param(12, 4, 4, 32, 16, "all", id="every token to every expert"),
    pytest.param(2, 6, 2, 24, 8, "random", id="two tokens"),
])
def test_fused_moe_matches_reference(compiled, tokens, experts, top_k, hidden, width, routing, gen):
    x = torch.randn(tokens, hidden, generator=gen)
    w_gate_up = torch.randn(experts, 2 * width, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(experts, hidden, width, generator=gen) / width**0.5
    if routing == "all":
        topk_ids = torch.arange(experts).repeat(tokens, 1)
    else:
        choices = experts - (routing == "one_expert_idle")  # the last expert never chosen
        topk_ids = torch.stack([torch.randperm(choices, generator=gen)[:top_k] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    assert_close(compiled.fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights),
                 fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights))


def test_fused_moe_wrapper_routes_what_the_kernel_does_not_take(compiled, gen):
    x = torch.randn(6, 32, generator=gen).bfloat16()
    w_gate_up = torch.randn(4, 32, 32, generator=gen).bfloat16()
    w_down = torch.randn(4, 32, 16, generator=gen).bfloat16()
    ids, weights = torch.tensor([[0, 1]] * 6), torch.rand(6, 2, generator=gen)
    assert torch.equal(fused_moe_compiled(x, w_gate_up, w_down, ids, weights),
                       fused_moe_reference(x, w_gate_up, w_down, ids, weights))


def test_fused_moe_bad_inputs_say_what_is_wrong(compiled):
    x, w1, w2 = torch.randn(3, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    with pytest.raises(RuntimeError, match="expert id 2 out of range"):
        compiled.fused_moe(x, w1, w2, torch.tensor([[0], [1], [2]]), torch.rand(3, 1))
    with pytest.raises(RuntimeError, match="do not fit"):
        compiled.fused_moe(x, w1, torch.randn(2, 8, 5), torch.tensor([[0], [1], [1]]), torch.rand(3, 1))
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        compiled.fused_moe(x.double(), w1, w2, torch.tensor([[0], [1], [1]]), torch.rand(3, 1))


@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim, rotary_dim", [
    pytest.param(40, 8, 2, 32, 16, id="half the head rotated (GLM-4.5)"),
    pytest.param(9, 4, 4, 16, 16, id="the whole head rotated"),
    pytest.param(13, 3, 1, 12, 6, id="odd sizes: 3 rotated pairs, 6 dims passed through"),
])
def test_rotary_matches_reference_exactly(compiled, tokens, q_heads, kv_heads, head_dim, rotary_dim, gen):
    q = torch.randn(tokens, q_heads, head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    cos, sin = rotary_cos_sin(torch.arange(100, 100 + tokens), inv_freq, torch.float32)
    (q_out, k_out), (q_want, k_want) = compiled.rotary(q, k, cos, sin), rotary_reference(q, k, cos, sin)
    assert torch.equal(q_out, q_want) and torch.equal(k_out, k_want)  # the same products, in the same order
    # strided inputs (column slices of one projection), as the model hands them over
    qk = torch.cat((q.flatten(1), k.flatten(1)), dim=1)
    q_view = qk[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k_view = qk[:, q_heads * head_dim:].view(tokens, kv_heads, head_dim)
    q_out, k_out = rotary_compiled(q_view, k_view, cos, sin)
    assert torch.equal(q_out, q_want) and torch.equal(k_out, k_want)
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        compiled.rotary(q, k, cos[:, :-1], sin[:, :-1])


def test_training_takes_the_torch_path_and_gets_the_same_gradients(compiled, gen):
    # The kernels compute without autograd: inputs that require grad go to the references, which autograd sees.
    from glm_kernels.rotary import rotary_cos_sin

    x = torch.randn(10, 32, generator=gen, requires_grad=True)
    w_gate_up = torch.randn(4, 32, 32, generator=gen).requires_grad_()
    w_down = torch.randn(4, 32, 16, generator=gen).requires_grad_()
    ids, weights = torch.randint(0, 4, (10, 2), generator=gen), torch.rand(10, 2, generator=gen)
    q, k = torch.randn(10, 4, 16, generator=gen, requires_grad=True), torch.randn(10, 2, 16, generator=gen)
    cos, sin = rotary_cos_sin(torch.arange(10), torch.rand(4, generator=gen), torch.float32)

    def loss(moe, rope, attention):
        rotated, _ = rope(q, k, cos, sin)
        return moe(x, w_gate_up, w_down, ids, weights).square().sum() + attention(rotated, k, k, 0.25).sum()

    loss(fused_moe_compiled, rotary_compiled, prefill_attention_compiled).backward()
    got = [t.grad.clone() for t in (x, w_gate_up, w_down, q)]
    for t in (x, w_gate_up, w_down, q):
        t.grad = None
    loss(fused_moe_reference, rotary_reference, prefill_attention_reference).backward()
    for grad, t in zip(got, (x, w_gate_up, w_down, q), strict=True):
        assert torch.equal(grad, t.grad)
