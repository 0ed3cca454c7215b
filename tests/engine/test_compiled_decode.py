"""The compiled CPU decode step (glm_kernels/csrc/decode_model.cpp) against the engine's torch path, its slow
twin.

Each case switches on a part of the architecture the step has its own code for; the two engines load the same
checkpoint, prefill the same prompt (a block size of 4 so that the cache spans many blocks), then every decode
step's logits, the greedy tokens and the routing trace must agree.
"""

from __future__ import annotations

import pytest
import torch
from decode_steps import rerouted_decode_steps
from glm_kernels import fused_moe_compiled, prefill_attention_compiled, rotary_compiled

from workbench.engine import Engine, GLMConfig
from workbench.engine.ops import TORCH_OPS
from workbench.engine.sampling import SamplingParams
from workbench.engine.testing import write_tiny_checkpoint

CASES = {
    # name: (preset, overrides)
    "tiny": ("tiny", {}),  # dense first layer, GQA 4:2, q/k/v bias, partial rotary, shared expert
    "grouped_qk_norm_unnormed_scaled": ("tiny-grouped", {}),  # qk-norm, n_group 4 / topk_group 2, no norm, x2.5
    "no_bias_tied_no_shared_full_rotary": ("tiny", dict(attention_bias=False, tie_word_embeddings=True,
                                                        n_shared_experts=0, partial_rotary_factor=1.0,
                                                        first_k_dense_replace=0, num_key_value_heads=1)),
    "odd_widths": ("tiny", dict(hidden_size=52, head_dim=12, moe_intermediate_size=13, intermediate_size=27,
                                num_attention_heads=3, num_key_value_heads=3)),  # no multiple of 4 or 8 anywhere
}
# fp32: the same arithmetic in another order; bf16 and fp16: one rounding more or less here and there.
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def _engines(folder, dtype):
    kwargs = dict(dtype=dtype, kernels="torch", block_size=4, cache_tokens=256)
    return (Engine.from_pretrained(folder, cpu_kernels="compiled", **kwargs),
            Engine.from_pretrained(folder, cpu_kernels="torch", **kwargs))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    preset, overrides = CASES[request.param]
    config = GLMConfig.preset(preset, **overrides)
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), config, seed=7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_decode_step_matches_the_torch_path(checkpoint, dtype):
    compiled, reference = _engines(checkpoint, dtype)
    assert compiled.compiled_decode is not None and reference.compiled_decode is None
    prompt = torch.randint(3, 500, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    # In bf16 (and fp16) a router near-tie can go the other way after one rounding more or less (the scores differ
    # by ~2e-3 there, bf16's resolution near 0.5; measured: 2-6 steps of 30 in the grouped case), never in fp32.
    rerouted = rerouted_decode_steps(compiled, reference, prompt, 30, TOLERANCE[getattr(torch, dtype)])
    assert rerouted <= (0 if dtype == "float32" else 10)


def test_greedy_generation_and_routing_trace_are_the_same(checkpoint):
    compiled, reference = _engines(checkpoint, "float32")
    prompt = torch.randint(3, 500, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    kwargs = dict(max_new_tokens=32, temperature=0.0, stop_token_ids=[], routing_scores=True)
    ours, theirs = compiled.generate(prompt, **kwargs), reference.generate(prompt, **kwargs)
    assert ours.token_ids == theirs.token_ids
    assert torch.equal(ours.routing.expert_ids, theirs.routing.expert_ids)
    assert ours.routing.expert_ids.shape[1] == len(prompt) + 32
    torch.testing.assert_close(ours.routing.weights.float(), theirs.routing.weights.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(ours.routing.scores.float(), theirs.routing.scores.float(), atol=2e-3, rtol=0)


def test_sampled_generation_with_a_seed_is_the_same(checkpoint):
    compiled, reference = _engines(checkpoint, "float32")
    prompt = list(range(5, 25))
    kwargs = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=50, seed=11, stop_token_ids=[])
    assert compiled.generate(prompt, **kwargs).token_ids == reference.generate(prompt, **kwargs).token_ids


def test_batched_requests_agree_with_the_torch_batch(checkpoint):
    # Sequences of different lengths decode together (one compiled step for all of them), some with a trace.
    compiled, reference = _engines(checkpoint, "float32")
    prompts = [list(range(5, 15)), list(range(40, 47)), [9] * 20, [3, 4]]
    results = []
    for engine in (compiled, reference):
        requests = [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=[]),
                                       routing=i % 2 == 0, routing_scores=i == 2)
                    for i, (p, n) in enumerate(zip(prompts, (12, 5, 9, 12)))]
        while engine.has_unfinished():
            engine.step()
        results.append([r.result() for r in requests])
    for ours, theirs in zip(*results, strict=True):
        assert ours.token_ids == theirs.token_ids
        assert (ours.routing is None) == (theirs.routing is None)
        if ours.routing is not None:
            assert torch.equal(ours.routing.expert_ids, theirs.routing.expert_ids)
            torch.testing.assert_close(ours.routing.weights, theirs.routing.weights, atol=2e-3, rtol=0)
            assert (ours.routing.scores is None) == (theirs.routing.scores is None)


def test_the_compiled_engine_also_takes_the_compiled_prefill_kernels(checkpoint):
    compiled, reference = _engines(checkpoint, "float32")
    assert compiled.model.ops.prefill_attention is prefill_attention_compiled
    assert compiled.model.ops.fused_moe is fused_moe_compiled and compiled.model.ops.rotary is rotary_compiled
    assert reference.model.ops is TORCH_OPS and (compiled.cpu_kernels, reference.cpu_kernels) == ("compiled", "torch")


def test_choice_is_checked_and_impossible_requests_say_why(tmp_path, monkeypatch):
    folder = write_tiny_checkpoint(tmp_path / "m", "tiny")
    with pytest.raises(ValueError, match="cpu_kernels='fast'.*auto, compiled, torch"):
        Engine.from_pretrained(folder, cpu_kernels="fast")
    with pytest.raises(ValueError, match="cpu_kernels='compiled' is not possible.*quantised"):
        Engine.from_pretrained(folder, cpu_kernels="compiled", quantize="fp8-channel")
    # "auto" takes the torch path where the compiled step cannot serve, and the model still generates.
    engine = Engine.from_pretrained(folder, cpu_kernels="auto", quantize="fp8-channel")
    assert engine.compiled_decode is None
    assert len(engine.generate([5, 6, 7], max_new_tokens=3, temperature=0.0, stop_token_ids=[]).token_ids) == 3
    monkeypatch.setenv("WORKBENCH_CPU_KERNELS", "torch")  # a default only: an explicit argument wins
    assert Engine.from_pretrained(folder).compiled_decode is None
    assert Engine.from_pretrained(folder, cpu_kernels="compiled").compiled_decode is not None


def test_the_step_rejects_a_position_outside_its_blocks(tmp_path):
    engine = Engine.from_pretrained(write_tiny_checkpoint(tmp_path / "m", "tiny"), cpu_kernels="compiled",
                                    block_size=4)
    with pytest.raises(RuntimeError, match="position 9 lies past the sequence's 2 blocks"):
        engine.compiled_decode.step(torch.tensor([5]), torch.tensor([9]), torch.tensor([[0, 1]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32"):
        engine.compiled_decode.step(torch.tensor([5]), torch.tensor([1]), torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="token id 100000 out of range"):
        engine.compiled_decode.step(torch.tensor([100000]), torch.tensor([1]),
                                    torch.tensor([[0, 1]], dtype=torch.int32))
