"""bench/air_slice.py at test size: the slice it writes is a checkpoint the engine loads, with the real model's
structure and weight scale; its bytes-per-token counts (from a loaded model and from a GGUF's tensor table) match
a count by hand; the bandwidth probe and the whole round structure run (ours bf16; llama.cpp where installed)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def air_slice():
    return load_bench_script("air_slice")


def test_slice_config_is_glm45_air_with_few_layers(air_slice):
    config = air_slice.slice_config(1, 2)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        4096, 96, 8, 128)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (128, 8, 1408)
    assert (config.intermediate_size, config.vocab_size, config.partial_rotary_factor) == (10944, 151552, 0.5)
    assert config.attention_bias and config.norm_topk_prob and config.routed_scaling_factor == 1.0
    assert (config.num_hidden_layers, config.first_k_dense_replace, config.num_nextn_predict_layers) == (3, 1, 0)
    specs = air_slice.slice_tensors(config)
    # every parameter of the checkpoint, none twice: 6.2B parameters for 1 dense + 2 MoE layers
    assert len({name for name, *_ in specs}) == len(specs)
    assert sum(math.prod(shape) for _, shape, *_ in specs) == config.num_parameters()


@pytest.mark.parametrize("text, expected", [("1+2", (1, 2)), ("1+1", (1, 1)), ("0+3", (0, 3))])
def test_parse_layers(air_slice, text, expected):
    assert air_slice.parse_layers(text) == expected


@pytest.mark.parametrize("text", ["3", "1+0", "a+b", "-1+2"])
def test_parse_layers_refuses_what_is_not_dense_plus_moe(air_slice, text):
    with pytest.raises(SystemExit, match="--layers"):
        air_slice.parse_layers(text)


def test_written_slice_loads_with_realistic_scale(air_slice, tmp_path):
    from workbench.engine import Engine

    config = air_slice.slice_config(1, 2, "tiny")
    folder = air_slice.write_slice(tmp_path / "slice", config, shard_bytes=64 * 1024)  # several shards
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    engine = Engine.from_pretrained(folder, dtype="bfloat16", kernels="torch")  # refuses missing or extra names
    model = engine.model
    experts = model.layers[1].mlp.experts.gate_up_proj.float()
    assert abs(experts.std().item() - air_slice.WEIGHT_STD) < 0.1 * air_slice.WEIGHT_STD
    assert abs(model.layers[0].input_layernorm.weight.float().mean().item() - 1.0) < 0.05
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router, as real checkpoints keep it
    # distinct random values per expert (each expert's bytes are its own, as in a real checkpoint)
    assert not torch.equal(experts[0], experts[1])
    result = engine.generate([5, 6, 7], max_new_tokens=4, temperature=0.0, stop_token_ids=[])
    assert len(result.token_ids) == 4


def test_engine_bytes_per_token_is_the_active_weights(air_slice, tmp_path):
    from workbench.engine import Engine

    config = air_slice.slice_config(1, 1, "tiny")
    folder = air_slice.write_slice(tmp_path / "slice", config)
    engine = Engine.from_pretrained(folder, dtype="bfloat16", kernels="torch")
    expected = 0.0
    for name, shape, dtype, _ in air_slice.slice_tensors(config):
        nbytes = math.prod(shape) * dtype.itemsize
        if ".mlp.experts." in name:
            nbytes *= config.num_experts_per_tok / config.n_routed_experts
        elif name == "model.embed_tokens.weight":
            nbytes /= config.vocab_size
        expected += nbytes
    # the counter sees the model as loaded: fused q/k/v and gate/up views of one storage count once
    counted = air_slice.engine_bytes_per_token(engine.model, config)
    assert abs(counted - expected) <= 64 * 4, (counted, expected)  # the rotary table's few floats at most


def test_gguf_bytes_per_token_counts_top_k_of_the_experts(air_slice, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "toy.gguf"
    writer = gguf.GGUFWriter(str(path), "glm4moe")
    writer.add_expert_count(16)
    writer.add_expert_used_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float16))  # 100 rows of 32
    writer.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((16, 8, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = 32 * 2 + 16 * 8 * 32 * 4 * 4 / 16 + 32 * 32 * 2
    assert air_slice.gguf_bytes_per_token(path) == int(expected)


def test_bandwidth_probe_gives_plausible_figures(air_slice):
    bandwidth = air_slice.measure_bandwidth(1, nbytes=64 << 20, repeats=2)
    # any machine this runs on moves between 0.5 GB/s and 2 TB/s; a unit slip (bits, MiB, a missing factor)
    # lands outside
    assert 0.5 < bandwidth["read"] < 2000 and 0.5 < bandwidth["copy"] < 2000


@pytest.mark.slow  # two child processes load the tiny slice: ~20 s
def test_the_whole_run_at_test_size(air_slice, tmp_path, capsys):
    figures = air_slice.main(["--shape", "tiny", "--layers", "1+1", "--rounds", "2", "--decode-tokens", "8",
                              "--prefill-tokens", "32", "--contenders", "ours bf16,ours int4,llama.cpp Q4_K",
                              "--workdir", str(tmp_path), "--json", str(tmp_path / "figures.json")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("decode_vs_llamacpp_q8=nan decode_vs_llamacpp_q4=")
    assert "prefill_vs_llamacpp_q4=" in out[-1]
    scaling = next(line for line in out if line.startswith("decode_2t_vs_1t: "))  # each contender's 1->2 threads
    assert "ours_bf16=" in scaling and "ours_int4=" in scaling
    ours = figures["contenders"]["ours bf16"]
    assert ours["rounds"] == 2
    for threads in (1, 2):
        assert ours["figures"][threads]["decode"] > 0 and ours["figures"][threads]["prefill"] > 0
    assert ours["bytes_per_token"] > 0
    assert json.loads((tmp_path / "figures.json").read_text())["layers"] == "1+1"
    llama = figures["contenders"]["llama.cpp Q4_K"]
    if importlib.util.find_spec("llama_cpp") is None:
        assert "llama_cpp is not installed" in llama["error"]
    elif "error" not in llama:  # exported by export-gguf, run by llama.cpp: both sides of the comparison ran
        assert llama["figures"][1]["decode"] > 0 and llama["bytes_per_token"] > 0, llama
        assert not math.isnan(figures["last_line"]["decode_vs_llamacpp_q4"])
    assert (tmp_path / "slice-tiny-1+1-s0" / "config.json").is_file()  # a named workdir is kept
