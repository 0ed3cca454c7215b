"""FP8 in the engine (workbench.engine.quant): checkpoint configs, FP8 modules, quantise-at-load, FP8 checkpoints.

Torch references only (fast); the Triton path through the same modules is covered by test_engine_triton.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from glm_kernels.fp8 import fp8_linear_reference

from workbench.engine import Engine, GLMConfig
from workbench.engine.model import AttentionBatch
from workbench.engine.quant import (
    FP8Experts,
    FP8Linear,
    QuantConfigError,
    QuantScheme,
    parse_quantization_config,
    quantization_config,
    quantize_model,
    save_fp8_checkpoint,
)
from workbench.engine.testing import random_model

COMPRESSED_TENSORS_CHANNEL = {  # the shape of the GLM-4.5-Air FP8 checkpoint's config, as far as known
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
    "ignore": ["lm_head", "re:.*mlp.gate$"],
}
BLOCKWISE = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def test_parse_checkpoint_quantization_configs():
    assert parse_quantization_config(None) is None
    channel = parse_quantization_config(COMPRESSED_TENSORS_CHANNEL)
    assert channel.block_size is None and channel.act_quant and "lm_head" in channel.ignore
    block = parse_quantization_config(BLOCKWISE)
    assert block.block_size == (128, 128) and block.act_quant
    for scheme in (QuantScheme.channel(), QuantScheme.block((64, 128), act_quant=True)):
        assert parse_quantization_config(quantization_config(scheme)) == QuantScheme(
            scheme.block_size, scheme.act_quant, ("lm_head",))


@pytest.mark.parametrize("raw, message", [
    ({"quant_method": "gptq", "bits": 4}, "'gptq': this engine reads FP8"),
    ({**COMPRESSED_TENSORS_CHANNEL, "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group"}}}}, "only 8-bit float"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "only e4m3"),
])
def test_unsupported_quantization_configs_are_explained(raw, message):
    with pytest.raises(QuantConfigError, match=message):
        parse_quantization_config(raw)


def test_scheme_ignore_rules():
    scheme = parse_quantization_config(COMPRESSED_TENSORS_CHANNEL)
    assert scheme.quantizes("layers.1.self_attn.q_proj")
    assert not scheme.quantizes("layers.1.mlp.gate")  # re: rule
    assert not scheme.quantizes("lm_head")


@pytest.mark.parametrize("block_size", [None, (32, 32)], ids=["channel", "block"])
def test_fp8_linear_module(block_size, gen):
    dense = torch.nn.Linear(96, 40, bias=True)
    scheme = QuantScheme(block_size)
    fp8 = FP8Linear.from_linear(dense, scheme)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == scheme.scale_shape(40, 96)
    x = torch.randn(3, 96, generator=gen)
    out = fp8(x)
    torch.testing.assert_close(out, fp8_linear_reference(x, fp8.weight, fp8.weight_scale, fp8.bias, block_size))
    with torch.no_grad():
        rel = (out - dense(x)).norm() / dense(x).norm()
    assert rel < 0.05


def tiny_config(**overrides) -> GLMConfig:
    return GLMConfig.preset("tiny", **overrides)


@pytest.mark.parametrize("scheme", [QuantScheme.channel(), QuantScheme.block((32, 32), act_quant=True)],
                         ids=["channel w8a16", "block w8a8"])
def test_quantize_model_keeps_the_model_close(scheme, gen):
    config = tiny_config()
    dense = random_model(config, seed=1)
    fp8 = quantize_model(random_model(config, seed=1), scheme)
    experts = fp8.layers[1].mlp.experts
    assert isinstance(experts, FP8Experts) and isinstance(fp8.layers[0].self_attn.q_proj, FP8Linear)
    assert not isinstance(fp8.lm_head, FP8Linear)  # lm_head, embeddings and the router stay dense
    assert fp8.layers[1].mlp.gate.weight.dtype == torch.float32
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        ref, out = dense(ids), fp8(ids)
    # Random tiny weights pass every quantisation error through all layers (and can flip a routing choice):
    # about 10% relative logit error; a wrong scale or layout gives ~100%.
    assert (out - ref).norm() / ref.norm() < 0.2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7


def hidden_of(engine: Engine, ids: list[int]) -> torch.Tensor:
    batch = AttentionBatch.uniform(1, len(ids), engine.device)
    with torch.no_grad():
        return engine.model.hidden_states(torch.tensor(ids, device=engine.device), batch)


@pytest.mark.parametrize("quantize", ["fp8-channel", "fp8-block-w8a8"])
def test_quantise_at_load_matches_quantising_in_memory(tiny_checkpoint, quantize):
    engine = Engine.from_pretrained(tiny_checkpoint, dtype="float32", device="cpu", kernels="torch",
                                    quantize=quantize)
    assert isinstance(engine.model.layers[1].mlp.experts, FP8Experts)
    in_memory = quantize_model(random_model(engine.config, seed=0), engine.model.quant_scheme)
    loaded = dict(engine.model.named_parameters())
    for name, param in in_memory.named_parameters():
        assert torch.equal(loaded[name].float(), param.float()), name
    result = engine.generate(list(range(5, 20)), max_new_tokens=4)
    assert len(result.token_ids) == 4


@pytest.mark.parametrize("scheme", [QuantScheme.channel(act_quant=True), QuantScheme.block((32, 32))],
                         ids=["compressed-tensors channel", "block weight_scale_inv"])
def test_fp8_checkpoint_loads(tiny_checkpoint, tmp_path, scheme):
    model = quantize_model(random_model(tiny_config(), seed=0), scheme)
    folder = save_fp8_checkpoint(model, tmp_path / "fp8", dtype=torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, folder / name)
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    names = set(tensors)
    suffix = "weight_scale" if scheme.block_size is None else "weight_scale_inv"
    assert f"model.layers.1.mlp.experts.3.up_proj.{suffix}" in names
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    tensors["model.layers.0.self_attn.q_proj.input_scale"] = torch.ones(1)  # static activation scale: unused
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    engine = Engine.from_pretrained(folder, dtype="bfloat16", device="cpu", kernels="torch")
    assert engine.model.quant_scheme.block_size == scheme.block_size
    loaded = dict(engine.model.named_parameters())
    for name, param in model.named_parameters():
        if param.dtype in (torch.float8_e4m3fn,) or name.endswith("_scale"):
            assert torch.equal(loaded[name].float(), param.float()), name
    assert len(engine.generate([5, 6, 7], max_new_tokens=3).token_ids) == 3


def test_fp8_checkpoint_without_quantization_config_is_refused(tiny_checkpoint, tmp_path):
    model = quantize_model(random_model(tiny_config(), seed=0), QuantScheme.channel())
    folder = save_fp8_checkpoint(model, tmp_path / "fp8")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="weight_scale|quantization_config"):
        Engine.from_pretrained(folder, dtype="float32", device="cpu", kernels="torch")
