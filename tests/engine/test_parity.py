"""Parity with the reference implementation: transformers' Glm4MoeForCausalLM on tiny random configs.

Each config switches on a different part of the architecture; the engine must load what save_pretrained
wrote and agree on logits (fp32, 1e-4), greedy tokens with the cache, and the router's top-k choices.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from workbench.engine import Engine  # noqa: E402
from workbench.engine.routing import RoutingRecorder  # noqa: E402
from workbench.engine.testing import build_tokenizer, write_tokenizer_files  # noqa: E402

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, attention_bias=True, max_position_embeddings=512)
CASES = {
    # name: (config overrides, max shard size for save_pretrained)
    "air_like": (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}), None),
    "qk_norm_grouped_unnormed_scaled": (dict(use_qk_norm=True, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                             topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5,
                                             first_k_dense_replace=0, num_attention_heads=6), None),
    "two_dense_layers_sharded": (dict(first_k_dense_replace=2, num_hidden_layers=4, num_key_value_heads=1,
                                      routed_scaling_factor=1.7), "60KB"),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    overrides, shard = CASES[request.param]
    config = transformers.Glm4MoeConfig(**{**BASE, **overrides})
    torch.manual_seed(0)
    reference = transformers.Glm4MoeForCausalLM(config).eval()
    _randomize(reference, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    if shard:
        reference.save_pretrained(folder, max_shard_size=shard)
        assert (folder / "model.safetensors.index.json").is_file(), "the sharded case must really be sharded"
    else:
        reference.save_pretrained(folder)
    write_tokenizer_files(folder, build_tokenizer(512))
    engine = Engine.from_pretrained(folder, dtype="float32", device="cpu", kernels="torch")
    return reference, engine


def _prompt(length: int = 24, seed: int = 0) -> list[int]:
    return torch.randint(30, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_reference(pair):
    reference, engine = pair
    ids = _prompt()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].float()
    ours = engine.logits(ids)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4


def test_greedy_generation_with_cache_matches_reference(pair):
    reference, engine = pair
    ids = _prompt(seed=1)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, min_new_tokens=32)
    expected = out[0, len(ids):].tolist()
    result = engine.generate(ids, max_new_tokens=32, temperature=0.0, stop_token_ids=[])
    assert result.token_ids == expected
    assert result.finish_reason == "length"


def test_router_choices_match_reference_gate(pair):
    reference, engine = pair
    ids = _prompt(seed=2)
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _i, out: captured.append(out[2]))
             for layer in reference.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        reference(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    recorder = RoutingRecorder()
    with torch.no_grad():
        engine.model(torch.tensor([ids]), recorder=recorder)
    assert len(recorder.ids) == len(captured) == len(engine.config.moe_layer_ids) > 0
    for theirs, ours in zip(captured, recorder.ids):
        assert torch.equal(theirs.sort(dim=-1).values, ours.sort(dim=-1).values)
