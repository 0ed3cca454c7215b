"""The compiled CPU decode step (glm_kernels/csrc/decode_model.cpp) with quantized weights against the engine's
torch path with the same quantized weights.

Two ways in: the engine's own int8/int4 models (`Engine.from_pretrained(..., quantize=...)`: q/k/v and gate/up
reach the step as quantized parts, the lm_head int8), and a model quantized here by hand, which reaches the
formats and layouts the engine does not make (fused q/k/v and gate/up matrices quantized whole, int8 in groups
of 16, an int4 lm_head): every linear of a tiny checkpoint is quantized once, the compiled step is given those
weights under decode_model.cpp's key suffixes (`quant_linear.decode_step_weight`), and the torch path computes
each of those linears with `quant_linear.quantized_linear` (F.linear swapped for the test) and its routed experts
with `quantized_fused_moe`. Both paths quantize activations the same way, so they agree up to fp32 rounding (and
the odd activation that lands on the other side of a rounding tie), and far more closely than either agrees with
the float model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from decode_steps import rerouted_decode_steps
from glm_kernels import blockquant, cpu_compiled
from glm_kernels.quant_linear import decode_step_weight, quantized_fused_moe, quantized_linear

from workbench.engine import Engine, GLMConfig
from workbench.engine.model import MLP, MoE
from workbench.engine.sampling import SamplingParams
from workbench.engine.testing import write_tiny_checkpoint

CASES = {
    # name: (preset, overrides); every linear's input width a multiple of 32, as the formats need
    "tiny_hidden_96": ("tiny", dict(hidden_size=96)),  # hidden 96: three groups; dense layer, shared expert, bias
    "grouped_qk_norm": ("tiny-grouped", dict(moe_intermediate_size=32, num_attention_heads=6)),
}
# Formats per weight kind: (attention, dense MLP / shared expert, routed experts, lm_head)
FORMATS = {
    "int8": ("int8", "int8", "int8", "int8"),
    "int4": ("int4", "int4", "int4", "int4"),
    "mixed": ("int8", "int8-g16", "int4", "int4"),
}
# Largest logit difference allowed, relative to the largest logit: fp32 rounding and an occasional activation on
# the other side of a rounding tie (one step of its 8-bit block); bf16 as the float decode test allows.
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 6e-2}


def _quantize(w: torch.Tensor, fmt: str):
    if fmt == "int8-g16":
        return blockquant.quantize_int8(w.float(), group=16)
    return blockquant.quantize(w.float(), fmt)


# (case, dtype, formats, q/k/v and gate/up in parts), sampled (CI has 2 cores): the engine's models below cover
# plain int8 and int4 with fused q/k/v and gate/up.
RUNS = [("tiny_hidden_96", "float32", "mixed", False), ("tiny_hidden_96", "bfloat16", "mixed", True),
        ("grouped_qk_norm", "float32", "int4", True)]
ENGINE_RUNS = [("tiny_hidden_96", "float32", "int8"), ("tiny_hidden_96", "float32", "int4"),
               ("tiny_hidden_96", "bfloat16", "int4"), ("grouped_qk_norm", "float32", "int4"),
               ("grouped_qk_norm", "bfloat16", "int8")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def checkpoint(case: str):
        if case not in made:
            preset, overrides = CASES[case]
            config = GLMConfig.preset(preset, **overrides)
            made[case] = write_tiny_checkpoint(tmp_path_factory.mktemp(case), config, seed=7)
        return made[case]

    return checkpoint


def _quantized_layers(model, formats):
    """Per layer {decode-step key: quantized weight} and the lm_head's, from the model's float weights."""
    attn_fmt, mlp_fmt, experts_fmt, head_fmt = formats
    layers = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights = {"qkv_weight": _quantize(attn.fused_qkv[0], attn_fmt),
                   "o_weight": _quantize(attn.o_proj.weight, attn_fmt)}
        dense = mlp if isinstance(mlp, MLP) else mlp.shared_experts
        if isinstance(mlp, MoE):
            weights["experts_gate_up"] = _quantize(mlp.experts.gate_up_proj, experts_fmt)
            weights["experts_down"] = _quantize(mlp.experts.down_proj, experts_fmt)
        if dense is not None:
            weights["mlp_gate_up"] = _quantize(dense.fused_gate_up[0], mlp_fmt)
            weights["mlp_down"] = _quantize(dense.down_proj.weight, mlp_fmt)
        layers.append(weights)
    return layers, _quantize(model.lm_head.weight, head_fmt)


def _torch_tensor_of(model, index: int, key: str) -> torch.Tensor:
    layer = model.layers[index]
    attn, mlp = layer.self_attn, layer.mlp
    dense = mlp if isinstance(mlp, MLP) else mlp.shared_experts
    return {"qkv_weight": lambda: attn.fused_qkv[0], "o_weight": lambda: attn.o_proj.weight,
            "experts_gate_up": lambda: mlp.experts.gate_up_proj, "experts_down": lambda: mlp.experts.down_proj,
            "mlp_gate_up": lambda: dense.fused_gate_up[0], "mlp_down": lambda: dense.down_proj.weight}[key]()


def _quantize_torch_path(monkeypatch, model, layers, lm_head) -> None:
    """The torch path computes with the quantized weights: F.linear on one of the quantized weights goes through
    quantized_linear (in fp32, the bias added, one rounding to the dtype: the compiled step's order), and the
    routed experts through quantized_fused_moe."""
    by_pointer = {model.lm_head.weight.data_ptr(): lm_head}
    experts = {}
    for index, weights in enumerate(layers):
        for key, qw in weights.items():
            tensor = _torch_tensor_of(model, index, key)
            if key == "experts_gate_up":
                experts[tensor.data_ptr()] = (qw, weights["experts_down"])
            elif key != "experts_down":
                by_pointer[tensor.data_ptr()] = qw
    float_linear = F.linear

    def linear(x, weight, bias=None):
        qw = by_pointer.get(weight.data_ptr())
        if qw is None or tuple(weight.shape) != qw.shape:
            return float_linear(x, weight, bias)
        y = quantized_linear(x.reshape(-1, x.shape[-1]).float(), qw)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights, **kwargs):
        gate_up, down = experts[w_gate_up.data_ptr()]
        return quantized_fused_moe(x, gate_up, down, topk_ids, topk_weights)

    monkeypatch.setattr(F, "linear", linear)
    model.ops = dataclasses.replace(model.ops, fused_moe=fused_moe)


def _rows(qw, start: int, stop: int):
    """Rows [start, stop) of a quantized [N, K] weight: its own weight (rows are quantized independently)."""
    return dataclasses.replace(qw, **{f.name: getattr(qw, f.name)[start:stop].contiguous()
                                      for f in dataclasses.fields(qw) if isinstance(getattr(qw, f.name), torch.Tensor)})


def _quantized_decode_step(engine, layers, lm_head, in_parts: bool = False):
    """A compiled decode step of `engine`'s model with these quantized weights in place of its float ones; with
    `in_parts`, q/k/v and gate/up go in as their parts (decode_model.cpp's q_weight/k_weight/v_weight and
    mlp_gate/mlp_up), each computed into its columns."""
    config = engine.model.config
    q_rows, kv_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    tensors = engine.model.decode_step_tensors(engine.cache.layers, engine.cache.block_size)
    for layer_tensors, weights in zip(tensors["layers"], layers, strict=True):
        for key, qw in weights.items():
            del layer_tensors[key]
            if in_parts and key == "qkv_weight":
                bounds = {"q_weight": (0, q_rows), "k_weight": (q_rows, q_rows + kv_rows),
                          "v_weight": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
            elif in_parts and key == "mlp_gate_up":
                half = qw.shape[0] // 2
                bounds = {"mlp_gate": (0, half), "mlp_up": (half, 2 * half)}
            else:
                layer_tensors |= decode_step_weight(key, qw)
                continue
            for part, (start, stop) in bounds.items():
                layer_tensors |= decode_step_weight(part, _rows(qw, start, stop))
    tensors["lm_head"], tensors["quantized"] = None, decode_step_weight("lm_head", lm_head)
    return cpu_compiled.load().DecodeModel(**tensors)


@pytest.mark.parametrize("case, dtype, formats, in_parts", RUNS,
                         ids=["-".join(run[:3]) + ("-parts" if run[3] else "") for run in RUNS])
def test_quantized_decode_steps_match_the_torch_path(checkpoints, case, dtype, formats, in_parts, monkeypatch):
    checkpoint = checkpoints(case)
    kwargs = dict(dtype=dtype, kernels="torch", block_size=4, cache_tokens=256)
    compiled = Engine.from_pretrained(checkpoint, cpu_kernels="compiled", **kwargs)
    reference = Engine.from_pretrained(checkpoint, cpu_kernels="torch", **kwargs)
    layers, lm_head = _quantized_layers(reference.model, FORMATS[formats])
    compiled.runner.decode_step = _quantized_decode_step(compiled, layers, lm_head, in_parts=in_parts)
    # The float model's logits, to show the quantized paths agree with each other far more than with it.
    float_decode = Engine.from_pretrained(checkpoint, cpu_kernels="torch", **kwargs)
    _quantize_torch_path(monkeypatch, reference.model, layers, lm_head)

    prompt = torch.randint(3, 500, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[])
    requests = [engine.add_request(prompt, params, routing=True) for engine in (compiled, reference, float_decode)]
    for engine in (compiled, reference, float_decode):
        engine.step()  # prefill: the torch path
    tolerance, rerouted, float_gap, quant_gap = TOLERANCE[getattr(torch, dtype)], 0, 0.0, 0.0
    for _ in range(20):
        # Each step starts from the reference's cache, so a difference cannot carry over into later steps.
        for engine in (compiled, float_decode):
            for (k, v), (k_ref, v_ref) in zip(engine.cache.layers, reference.cache.layers, strict=True):
                k.copy_(k_ref), v.copy_(v_ref)
        for engine, request in zip((compiled, reference, float_decode), requests, strict=True):
            engine.scheduler._reserve_decode_slots([request])
        ours, theirs, plain = requests
        logits = compiled.runner.decode([ours])
        expected = reference.runner.decode([theirs])
        unquantized = float_decode.runner.decode([plain])
        scale = max(expected.abs().max().item(), 1.0)
        if not torch.equal(ours.routing_chunks[-1][0], theirs.routing_chunks[-1][0]):
            rerouted += 1  # a router near-tie (see test_compiled_decode.py)
        else:
            quant_gap = max(quant_gap, (logits - expected).abs().max().item() / scale)
            assert (logits - expected).abs().max().item() <= tolerance * scale
        float_gap = max(float_gap, (unquantized - expected).abs().max().item() / scale)
        token = int(expected.argmax())
        for request in requests:
            request.num_cached += 1
            request.output_ids.append(token)
    assert rerouted <= (1 if dtype == "float32" else 6)
    if dtype == "float32":  # the test can tell quantized weights from float ones
        assert quant_gap < float_gap / 4, (quant_gap, float_gap)


@pytest.mark.parametrize("case, dtype, quantize", ENGINE_RUNS, ids=["-".join(run) for run in ENGINE_RUNS])
def test_quantized_engine_decode_steps_match_the_torch_path(checkpoints, case, dtype, quantize):
    kwargs = dict(dtype=dtype, kernels="torch", block_size=4, cache_tokens=256, quantize=quantize)
    compiled = Engine.from_pretrained(checkpoints(case), cpu_kernels="compiled", **kwargs)
    reference = Engine.from_pretrained(checkpoints(case), cpu_kernels="torch", **kwargs)
    assert compiled.compiled_decode is not None and reference.compiled_decode is None
    prompt = torch.randint(3, 500, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    rerouted = rerouted_decode_steps(compiled, reference, prompt, 20, TOLERANCE[getattr(torch, dtype)])
    assert rerouted <= (1 if dtype == "float32" else 6)


def test_lm_head_given_twice_or_a_part_missing_is_an_error(checkpoints):
    engine = Engine.from_pretrained(checkpoints("tiny_hidden_96"), dtype="float32", kernels="torch",
                                    cpu_kernels="torch", block_size=4, cache_tokens=64)
    tensors = engine.model.decode_step_tensors(engine.cache.layers, engine.cache.block_size)
    head = decode_step_weight("lm_head", blockquant.quantize_int8(engine.model.lm_head.weight.detach()))
    module = cpu_compiled.load()
    with pytest.raises(RuntimeError, match="either as a float tensor or quantized"):
        module.DecodeModel(**(tensors | {"quantized": head}))
    layer = tensors["layers"][0]
    qkv = decode_step_weight("qkv_weight", blockquant.quantize_int8(layer.pop("qkv_weight")))
    del qkv["qkv_weight.scales"]
    layer |= qkv
    with pytest.raises(RuntimeError, match="lacks 'qkv_weight.scales'"):
        module.DecodeModel(**tensors)
