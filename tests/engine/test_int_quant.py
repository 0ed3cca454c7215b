"""Integer CPU weights in the engine (int_quant.py): the quantized model computes what a plain model with the
dequantized weights computes; quantize-at-load of a saved checkpoint; pre-quantized weights stored as given; no
full-precision copy of the model alive while it builds; the bad inputs, each a clear error."""

from __future__ import annotations

import gc
import logging
import shutil
import weakref

import pytest
import torch
from glm_kernels import blockquant

from workbench.engine import CheckpointError, Engine, GLMConfig, int_quant
from workbench.engine.int_quant import (
    QUANTIZED_PARAMS,
    QuantExperts,
    QuantizeError,
    QuantLinear,
    build_quantized_model,
    weight_summary,
)
from workbench.engine.model import GLMForCausalLM
from workbench.engine.testing import random_model, write_tiny_checkpoint
from workbench.engine.weights import checkpoint_state_dict, map_name

# Small configs that differ where the builder could go wrong: qk-norm, untied and tied embeddings, grouped
# routing, no shared expert, every input width a multiple of 32 (the formats' group) and one K of 256 + 32
# (a partial Q4_K super-block).
CONFIGS = {
    "tiny": GLMConfig.preset("tiny"),
    "grouped-qknorm": GLMConfig.preset("tiny-grouped", moe_intermediate_size=32),
    "tied-no-shared": GLMConfig.preset("tiny", tie_word_embeddings=True, n_shared_experts=0),
    "partial-superblock": GLMConfig.preset("tiny", hidden_size=288, num_attention_heads=4, head_dim=72,
                                           moe_intermediate_size=64, intermediate_size=96),
}


def hf_tensors(model: GLMForCausalLM) -> list[tuple[str, torch.Tensor]]:
    return list(checkpoint_state_dict(model).items())


def dequantized_reference(quantized: GLMForCausalLM, config: GLMConfig, dense: GLMForCausalLM) -> GLMForCausalLM:
    """A plain model holding the quantized model's weights, dequantized (and the dense model's other tensors)."""
    reference = random_model(config, seed=99)
    reference.load_state_dict(dense.state_dict())
    if config.tie_word_embeddings:  # the quantized model holds its own lm_head, quantized from the embeddings
        reference.lm_head.weight = torch.nn.Parameter(reference.embed_tokens.weight.detach().clone())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear):
                reference.get_submodule(name).weight.copy_(blockquant.dequantize(module.qweight))
            elif isinstance(module, QuantExperts):
                target = reference.get_submodule(name)
                target.gate_up_proj.copy_(blockquant.dequantize(module.gate_up))
                target.down_proj.copy_(blockquant.dequantize(module.down))
    return reference.eval()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_logits_match_the_dequantized_reference(name, fmt):
    config = CONFIGS[name]
    dense = random_model(config, seed=1)
    model = build_quantized_model(config, hf_tensors(dense), fmt).eval()
    kinds = {type(m) for m in model.modules()}
    assert QuantLinear in kinds and QuantExperts in kinds and torch.nn.Linear not in kinds
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(ids)
        want = dequantized_reference(model, config, dense)(ids)
        plain = dense.eval()(ids)
    # The compiled kernels quantize activations to 8 bits per block as well: allow for that, far below what a
    # wrong scale, nibble order or expert slot gives (the quantized model against the dense one, below).
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.02 * scale, (got - want).abs().max() / scale
    assert (plain - want).abs().max() > 5 * (got - want).abs().max()  # the check above can tell them apart


def test_what_stays_dense_and_why_the_lm_head_is_int8():
    config = CONFIGS["tiny"]
    model = build_quantized_model(config, hf_tensors(random_model(config)), "int4")
    assert model.lm_head.format == "int8"  # see int_quant.LM_HEAD_FORMAT
    assert model.layers[0].self_attn.q_proj.format == "int4"
    assert model.layers[1].mlp.experts.gate_up.shape == (8, 64, 64)
    router = model.layers[1].mlp.gate
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    assert isinstance(model.embed_tokens.weight, torch.nn.Parameter) and model.norm.weight.dtype == torch.float32
    assert model.layers[0].self_attn.q_proj.bias is not None  # q/k/v biases kept dense beside the int4 matrix
    summary = weight_summary(model)
    assert summary["format"] == "int4" and 4.75 < summary["bits_per_weight"] < 9  # the int8 lm_head raises it
    assert 0 < summary["bytes_per_token"] < summary["weight_bytes"]


def test_chunked_quantization_is_exactly_whole_matrix_quantization(monkeypatch):
    weight = torch.randn(70, 320, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(int_quant, "CHUNK_ELEMENTS", 320 * 16)  # 16 rows a chunk: 5 chunks, the last partial
    for fmt, whole in (("int8", blockquant.quantize_int8(weight)), ("int4", blockquant.quantize_int4(weight))):
        chunked = int_quant.quantize_weight(weight, fmt)
        for field in int_quant._tensor_fields(whole):
            assert torch.equal(getattr(chunked, field), getattr(whole, field)), (fmt, field)


def test_prequantized_weights_are_stored_as_given():
    """The GGUF door: quantized values go in as they are (whole matrices without a copy; per-expert ones into their
    slot), a quantized embedding is dequantized, and dense tensors beside them stay dense when quantize is None."""
    config = CONFIGS["tiny"]
    dense = random_model(config, seed=2)
    given = {}
    tensors = []
    for name, tensor in hf_tensors(dense):
        placement = map_name(name)
        if placement and QUANTIZED_PARAMS.search(placement.param) or name == "model.embed_tokens.weight":
            value = blockquant.quantize_int4(tensor) if "down_proj" not in name else blockquant.quantize_int8(
                tensor, group=16)  # Q4_K_M mixes Q4_K and Q6_K (int8 groups of 16)
            given[name] = value
            tensors.append((name, value))
        else:
            tensors.append((name, tensor))
    model = build_quantized_model(config, tensors, None)
    q_proj = model.layers[0].self_attn.q_proj
    assert q_proj.qweight.packed is given["model.layers.0.self_attn.q_proj.weight"].packed  # no copy
    assert model.layers[0].mlp.down_proj.qweight.group == 16
    experts = model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up[5].packed[32:], given["model.layers.1.mlp.experts.5.up_proj.weight"].packed)
    assert torch.equal(experts.down[7].q, given["model.layers.1.mlp.experts.7.down_proj.weight"].q)
    embed = given["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, blockquant.dequantize(embed))
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_no_full_precision_copy_of_the_layers_is_alive_while_building():
    """Every dense tensor bound for a quantized matrix is dropped once the next one is asked for: at no point do
    two of them (let alone all layers) exist at once."""
    config = GLMConfig.preset("tiny", num_hidden_layers=6)
    state = hf_tensors(random_model(config))
    refs: list[weakref.ref] = []
    most_alive = 0

    def stream():
        nonlocal most_alive
        for name, tensor in state:
            gc.collect()
            most_alive = max(most_alive, sum(r() is not None for r in refs))
            fresh = tensor.clone()  # the only reference is the builder's
            placement = map_name(name)
            if QUANTIZED_PARAMS.search(placement.param):
                refs.append(weakref.ref(fresh))
            yield name, fresh
            del fresh

    model = build_quantized_model(config, stream(), "int8")
    assert len(refs) > 6 * 4 and most_alive == 0
    assert isinstance(model.layers[5].mlp.experts, QuantExperts)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("q") / "ckpt", "tiny", seed=5, dtype=torch.bfloat16,
                                 max_shard_bytes=64 * 1024)


@pytest.mark.parametrize("fmt, tolerance", [("int8", 0.03), ("int4", 0.3)])
def test_quantize_at_load_of_a_saved_checkpoint(bf16_checkpoint, fmt, tolerance):
    plain = Engine.from_pretrained(bf16_checkpoint, dtype="float32", kernels="torch", cpu_kernels="torch")
    engine = Engine.from_pretrained(bf16_checkpoint, dtype="auto", quantize=fmt)
    assert engine.dtype == torch.float32 and engine.weights["format"] == fmt
    assert isinstance(engine.model.layers[2].mlp.experts, QuantExperts)
    ids = list(range(5, 40))
    want, got = plain.logits(ids), engine.logits(ids)
    # Random weights are the hard case for 4 bits (no outliers to spare, errors compound over the layers): the
    # bundled model's held-out loss is the quality test (test_quant_quality.py); here, the right neighbourhood.
    assert (got - want).norm() <= tolerance * want.norm(), (got - want).norm() / want.norm()
    result = engine.generate(ids[:8], max_new_tokens=6, temperature=0.0)
    assert len(result.token_ids) + (result.stop_token_id is not None) >= 1


# --- bad input ------------------------------------------------------------------------------------------------------
def test_an_unknown_quantize_value_lists_the_valid_ones(tiny_checkpoint):
    with pytest.raises(QuantizeError, match=r"'int3'.*int8 or int4.*fp8-channel"):
        Engine.from_pretrained(tiny_checkpoint, quantize="int3")


@pytest.mark.parametrize("kwargs, says", [
    ({"device": "cuda"}, r"CPU only.*on a GPU use FP8"),
    ({"device": "cuda:1"}, r"CPU only.*fp8-channel"),
    ({"kernels": "triton"}, r"not kernels='triton'.*FP8"),
])
def test_quantize_on_a_gpu_or_with_triton_says_what_works(tiny_checkpoint, kwargs, says, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that kernels='triton' resolves on this CPU
    with pytest.raises(QuantizeError, match=says):
        Engine.from_pretrained(tiny_checkpoint, quantize="int4", **kwargs)


def test_widths_that_are_not_multiples_of_32_are_refused(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "odd", "tiny", moe_intermediate_size=48)
    with pytest.raises(QuantizeError, match="moe_intermediate_size is 48"):
        Engine.from_pretrained(folder, quantize="int8")


def test_a_missing_expert_or_mixed_formats_is_a_checkpoint_error():
    config = CONFIGS["tiny"]
    state = hf_tensors(random_model(config))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj"):
        build_quantized_model(config, [t for t in state if t[0] != "model.layers.1.mlp.experts.3.up_proj.weight"],
                              "int4")
    mixed = [(n, blockquant.quantize_int8(t) if n.endswith("experts.0.gate_proj.weight") else
              blockquant.quantize_int4(t) if ".experts." in n else t) for n, t in state]
    with pytest.raises(CheckpointError, match="one format per stacked expert tensor"):
        build_quantized_model(config, mixed, None)


def test_a_cpu_without_avx2_runs_the_torch_path_with_one_log_line(tiny_checkpoint, monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with caplog.at_level(logging.INFO, logger="workbench"):
        engine = Engine.from_pretrained(tiny_checkpoint, dtype="auto", quantize="int8")
    lines = [r.getMessage() for r in caplog.records if "AVX2" in r.getMessage()]
    assert len(lines) == 1 and "torch path" in lines[0]
    assert engine.generate([1, 2, 3], max_new_tokens=2, temperature=0.0).finish_reason in ("length", "stop")


def test_a_failed_quantized_load_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors.pop("model.layers.2.self_attn.o_proj.weight")
    save_file(tensors, folder / "model.safetensors")
    gc.collect()
    before = sum(isinstance(o, blockquant.Int4Weight) for o in gc.get_objects())
    with pytest.raises(CheckpointError, match="o_proj"):
        Engine.from_pretrained(folder, quantize="int4")
    gc.collect()
    assert sum(isinstance(o, blockquant.Int4Weight) for o in gc.get_objects()) == before
