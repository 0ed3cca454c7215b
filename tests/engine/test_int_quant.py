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


def plain_fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights):
    """The routed experts with dequantized weights and unquantized activations, in fp32."""
    out = torch.zeros(x.shape[0], w_down.shape[-2])
    for expert in torch.unique(topk_ids).tolist():
        rows, slot = (topk_ids == expert).nonzero(as_tuple=True)
        gate, up = blockquant.linear_reference(x[rows], w_gate_up[expert]).chunk(2, dim=-1)
        y = blockquant.linear_reference(torch.nn.functional.silu(gate) * up, w_down[expert])
        out.index_add_(0, rows, y * topk_weights[rows, slot, None].float())
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_logits_match_the_dequantized_reference(name, fmt, monkeypatch):
    """With the plain references (dequantize, then matmul) in the modules, the quantized model computes exactly what
    a plain model holding the dequantized weights does: every matrix, expert slot and bias is where it belongs."""
    config = CONFIGS[name]
    dense = random_model(config, seed=1)
    model = build_quantized_model(config, hf_tensors(dense), fmt).eval()
    kinds = {type(m) for m in model.modules()}
    assert QuantLinear in kinds and QuantExperts in kinds and torch.nn.Linear not in kinds
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = dequantized_reference(model, config, dense)(ids)
        plain = dense.eval()(ids)
        kernels = model(ids)  # glm_kernels.quant_linear: the compiled kernels or their q8a reference
        monkeypatch.setattr(int_quant, "_KERNELS", (blockquant.linear_reference, plain_fused_moe))
        got = model(ids)
    assert relative(got, want) < 1e-5
    assert relative(plain, want) > 1e-3  # the weights really are quantized
    # The integer kernels quantize activations to 8 bits per block as well (as large an error as int8 weights').
    assert relative(kernels, want) < 0.4


def test_the_compiled_kernels_and_their_reference_agree_in_the_model(monkeypatch, compiled_cpu_kernels):
    from glm_kernels import cpu_compiled

    if compiled_cpu_kernels is None:
        pytest.skip("the compiled CPU kernels could not be built here")
    config = CONFIGS["partial-superblock"]
    for fmt in ("int8", "int4"):
        model = build_quantized_model(config, hf_tensors(random_model(config, seed=1)), fmt).eval()
        ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            compiled = model(ids)
            with monkeypatch.context() as patch:
                patch.setattr(cpu_compiled, "_module", None)  # quant_linear's fallback: linear_q8a_reference
                reference = model(ids)
        assert relative(compiled, reference) < 0.03, fmt


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
    o_proj = model.layers[0].self_attn.o_proj
    assert o_proj.qweight.packed is given["model.layers.0.self_attn.o_proj.weight"].packed  # no copy
    assert torch.equal(model.layers[0].self_attn.q_proj.qweight.packed,  # q, k and v fused: one copy, then views
                       given["model.layers.0.self_attn.q_proj.weight"].packed)
    assert model.layers[0].mlp.down_proj.qweight.group == 16
    experts = model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up[5].packed[32:], given["model.layers.1.mlp.experts.5.up_proj.weight"].packed)
    assert torch.equal(experts.down[7].q, given["model.layers.1.mlp.experts.7.down_proj.weight"].q)
    embed = given["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, blockquant.dequantize(embed))
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_projections_of_one_format_are_fused_into_views_of_one_matrix():
    config = CONFIGS["tiny"]
    state = hf_tensors(random_model(config))
    model = build_quantized_model(config, state, "int4")
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    fused, bias = attn.fused_qkv_quantized
    assert fused.shape == (64 + 2 * 32, 64) and bias.shape == (128,)
    assert attn.k_proj.qweight.packed.data_ptr() == fused.packed[64:].data_ptr()  # a view, not a copy
    assert attn.v_proj.bias.data_ptr() == bias[96:].data_ptr()
    assert mlp.fused_gate_up_quantized[0].shape == (2 * 128, 64)
    # A v of another format (a GGUF's Q6_K beside Q4_K) stays apart, and goes to the compiled decode step as the
    # parts of q/k/v, each in its format, with the three biases joined.
    mixed = [(n, blockquant.quantize_int8(t, group=16)) if n == "model.layers.0.self_attn.v_proj.weight" else (n, t)
             for n, t in state]
    model = build_quantized_model(config, mixed, "int4")
    attn = model.layers[0].self_attn
    assert attn.fused_qkv_quantized is None
    assert model.layers[1].self_attn.fused_qkv_quantized is not None
    cache = [(torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)) for _ in range(config.num_hidden_layers)]
    first = model.decode_step_tensors(cache, 16)["layers"][0]
    assert {"q_weight.packed", "k_weight.packed", "v_weight.q", "v_weight.scales"} <= set(first)
    assert not any(key.startswith("qkv_weight") for key in first)
    assert torch.equal(first["qkv_bias"], torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))


def test_a_model_of_mixed_formats_decodes_compiled_as_on_the_torch_path(compiled_cpu_kernels):
    """q and k in int4 beside v in int8 (groups of 16), as a Q4_K_M GGUF holds them: the compiled decode step runs
    the model (its q/k/v in parts) and decodes the torch path's greedy tokens."""
    if compiled_cpu_kernels is None:
        pytest.skip("the compiled CPU kernels could not be built here")
    config = CONFIGS["tiny"]
    state = [(n, blockquant.quantize_int8(t.float(), group=16)) if n.endswith("v_proj.weight") else (n, t)
             for n, t in hf_tensors(random_model(config, seed=1))]
    engines = [Engine(build_quantized_model(config, state, "int4").eval(), None, device=torch.device("cpu"),
                      dtype=torch.float32, cpu_kernels=choice) for choice in ("compiled", "torch")]
    assert engines[0].compiled_decode is not None and engines[1].compiled_decode is None
    prompt = list(range(3, 40, 2))
    ours, theirs = (e.generate(prompt, max_new_tokens=16, temperature=0.0, stop_token_ids=[]).token_ids
                    for e in engines)
    assert ours[:8] == theirs[:8] and sum(a == b for a, b in zip(ours, theirs)) >= 13, (ours, theirs)


def test_decode_step_tensors_hand_over_the_quantized_weights():
    config = CONFIGS["tiny"]
    model = build_quantized_model(config, hf_tensors(random_model(config)), "int4")
    cache = [(torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)) for _ in range(config.num_hidden_layers)]
    tensors = model.decode_step_tensors(cache, 16)
    assert tensors["lm_head"] is None and set(tensors["quantized"]) == {"lm_head.q", "lm_head.scales"}
    dense_layer, moe_layer = tensors["layers"][0], tensors["layers"][1]
    assert {"qkv_weight.packed", "qkv_weight.d", "qkv_weight.dmin", "qkv_weight.sc", "qkv_weight.mn", "qkv_bias",
            "o_weight.packed", "mlp_gate_up.packed", "mlp_down.mn"} <= set(dense_layer)
    assert "qkv_weight" not in dense_layer and "o_weight" not in dense_layer
    assert moe_layer["experts_gate_up.packed"].shape == (8, 64, 32)
    assert moe_layer["router_weight"].dtype == torch.float32
    assert moe_layer["experts_down.sc"].shape == (8, 64, 1)


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


def test_a_cpu_without_avx2_runs_the_slow_path_with_one_log_line(tiny_checkpoint, monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with caplog.at_level(logging.INFO, logger="workbench"):
        engine = Engine.from_pretrained(tiny_checkpoint, dtype="auto", quantize="int8")
    lines = [r.getMessage() for r in caplog.records if "AVX2" in r.getMessage()]
    assert len(lines) == 1 and "scalar path" in lines[0]
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


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_compiled_decode_step_runs_a_quantized_engine(fmt, compiled_cpu_kernels):
    """Engine.from_pretrained(quantize=...) hands its quantized weights to the compiled decode step
    (decode_step_tensors), which then decodes the bundled model's greedy tokens as the torch path does."""
    from workbench.models import default_model_path

    if compiled_cpu_kernels is None:
        pytest.skip("the compiled CPU kernels could not be built here")
    path = default_model_path()
    compiled = Engine.from_pretrained(path, dtype="float32", quantize=fmt, cpu_kernels="compiled")
    torch_path = Engine.from_pretrained(path, dtype="float32", quantize=fmt, cpu_kernels="torch")
    assert compiled.compiled_decode is not None and torch_path.compiled_decode is None
    prompt = compiled.tokenizer.encode("def merge_sorted(a, b):\n    ")
    ours, theirs = (e.generate(prompt, max_new_tokens=24, temperature=0.0, stop_token_ids=[]).token_ids
                    for e in (compiled, torch_path))
    # The same weights and the same 8-bit activations on both paths: only fp32 summation order differs.
    assert ours[:8] == theirs[:8] and sum(a == b for a, b in zip(ours, theirs)) >= 20, (ours, theirs)


def test_loading_threads_leave_busy_cores_alone(monkeypatch):
    """A load's elementwise loops run on the cores other processes leave idle (an OpenMP op waits for its slowest
    thread: on a busy core every op waits for a timeslice), $WORKBENCH_LOAD_THREADS when set; restored after."""
    import os

    from workbench.engine import int_quant

    before = torch.get_num_threads()
    monkeypatch.delenv(int_quant.LOAD_THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert int_quant.loading_thread_count() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))  # this process alone
    assert int_quant.loading_thread_count() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert int_quant.loading_thread_count() == 2
    monkeypatch.setenv(int_quant.LOAD_THREADS_ENV, "3")
    assert int_quant.loading_thread_count() == 3
    monkeypatch.undo()
    monkeypatch.setenv(int_quant.LOAD_THREADS_ENV, "1")
    with int_quant.loading_threads() as threads:
        assert threads == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
