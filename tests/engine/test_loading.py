"""Loading: config validation, weight files, tokenizer files. Every bad input is a clear error naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.engine import CheckpointError, ConfigError, Engine, GLMConfig, TokenizerError
from workbench.engine.testing import write_tiny_checkpoint


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def load(path, **kwargs):
    return Engine.from_pretrained(path, dtype="float32", kernels="torch", **kwargs)


def test_presets_are_valid_and_air_has_the_published_shape():
    for name in ("glm-4.5-air", "glm-4.5", "tiny", "tiny-grouped", "bench-10m"):
        GLMConfig.preset(name)
    air = GLMConfig.preset("glm-4.5-air")
    assert air.rotary_dim == 64 and len(air.moe_layer_ids) == 45
    assert 100e9 < air.num_parameters() < 112e9
    assert 10e9 < air.num_parameters(active_only=True) < 14e9


def test_config_reads_hf_fields_and_nested_rope_parameters(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.pop("rope_theta"), raw.pop("partial_rotary_factor")
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.25}
    config = GLMConfig.from_dict(raw)
    assert config.rope_theta == 5e5 and config.partial_rotary_factor == 0.25


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ({"n_group": 3}, "n_group"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4}}, "rope_type"),
])
def test_bad_config_names_the_field(checkpoint, change, field):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.update(change)
    (checkpoint / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=field):
        load(checkpoint)


def test_nonexistent_path_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json"):
        load(tmp_path)


def test_missing_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load(checkpoint)


def _rewrite_weights(checkpoint, edit):
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, checkpoint / "model.safetensors")


def test_missing_tensor_is_named(checkpoint):
    _rewrite_weights(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj\.bias"):
        load(checkpoint)


def test_missing_expert_is_named(checkpoint):
    _rewrite_weights(checkpoint, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load(checkpoint)


def test_wrong_shape_names_tensor_and_both_shapes(checkpoint):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    _rewrite_weights(checkpoint, edit)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight.*\[7, 64\].*\[128, 64\]"):
        load(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    _rewrite_weights(checkpoint, lambda t: t.update({"model.layers.0.self_attn.rotary.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.rotary.extra'"):
        load(checkpoint)


def test_mtp_layer_tensors_are_skipped_with_a_log_line(checkpoint, caplog):
    _rewrite_weights(checkpoint, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(64, 128),
                                                     "model.layers.3.enorm.weight": torch.zeros(64)}))
    with caplog.at_level("INFO"):
        load(checkpoint)
    assert any("multi-token-prediction" in r.message for r in caplog.records)


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(checkpoint)


def test_corrupt_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at "
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load(checkpoint)


def test_garbage_file(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(checkpoint)


def test_sharded_checkpoint_with_missing_shard(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "sharded", "tiny", max_shard_bytes=100_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    load(folder)  # loads when whole
    sorted(folder.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(CheckpointError, match="lists shard"):
        load(folder)


def test_bf16_checkpoint_loads_into_fp32_and_bf16(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "bf16", "tiny", dtype=torch.bfloat16)
    ids = list(range(30, 50))
    as_fp32 = load(folder).logits(ids)
    as_bf16 = Engine.from_pretrained(folder, dtype="bfloat16", kernels="torch").logits(ids)
    assert as_fp32.dtype == as_bf16.dtype == torch.float32
    assert (as_fp32 - as_bf16).abs().max() < 0.1 * as_fp32.abs().max()
    engine = Engine.from_pretrained(folder, dtype="bfloat16", kernels="torch")
    router = engine.model.layers[1].mlp.gate
    assert router.weight.dtype == torch.float32, "router weights stay fp32 whatever the model dtype"


def test_same_dtype_aligned_weights_are_views_of_the_mapped_file(tiny_checkpoint):
    from workbench.engine.weights import CPU_ALIGNMENT, SafetensorsFile

    engine = load(tiny_checkpoint)
    entries = SafetensorsFile(tiny_checkpoint / "model.safetensors").entries
    params = dict(engine.model.named_parameters())
    # plain (unstacked, non-router) tensors that sit aligned in the file: these must be used in place. (q/k/v
    # and gate/up are copied on purpose: fuse_projections() puts each group into one matrix.)
    fused = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    aligned = [name for name, e in entries.items() if e.begin % CPU_ALIGNMENT == 0 and "experts." not in name
               and ".mlp.gate." not in name and name.removeprefix("model.") in params
               and not any(f".{part}." in name for part in fused)]
    assert len(aligned) >= 2, "the test checkpoint has too few aligned tensors to check"
    first, second = aligned[0], aligned[1]
    # Zero-copy: the two tensors sit in memory exactly as far apart as they sit in the file.
    in_memory = params[second.removeprefix("model.")].data_ptr() - params[first.removeprefix("model.")].data_ptr()
    assert in_memory == entries[second].begin - entries[first].begin


def test_bad_dtype_and_kernels(tiny_checkpoint):
    with pytest.raises(ConfigError, match="dtype"):
        Engine.from_pretrained(tiny_checkpoint, dtype="int8")
    with pytest.raises(ValueError, match="kernels"):
        Engine.from_pretrained(tiny_checkpoint, kernels="fastest")
