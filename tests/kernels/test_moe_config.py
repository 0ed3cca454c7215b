"""Tile configs: tuned JSON files keyed by experts, width, device and dtype, defaults otherwise; the tuner."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from glm_kernels import moe_config

TUNER = Path(__file__).resolve().parents[2] / "bench" / "tune_moe.py"


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_KERNELS_CONFIG_DIR", str(tmp_path))
    moe_config.clear_cache()
    yield tmp_path
    moe_config.clear_cache()


def entry(m, n=64, k=128):
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "num_warps": 4, "num_stages": 3}


def test_defaults_when_no_file_matches(config_dir):
    small = moe_config.moe_tile_config(128, 1408, 1, "fp8_w8a16", device="cpu")
    large = moe_config.moe_tile_config(128, 1408, 4096, "fp8_w8a16", device="cpu")
    assert small["BLOCK_SIZE_M"] == 16 and large["BLOCK_SIZE_M"] == 64
    assert set(small) == set(moe_config.CONFIG_KEYS)


def test_tuned_file_wins_and_the_nearest_token_count_is_used(config_dir):
    name = moe_config.config_file_name(16, 96, "cpu", "bf16")
    (config_dir / name).write_text(json.dumps({"1": entry(16), "64": entry(32), "1024": entry(128)}))
    assert moe_config.moe_tile_config(16, 96, 2, "bf16", device="cpu") == entry(16)
    assert moe_config.moe_tile_config(16, 96, 100, "bf16", device="cpu") == entry(32)
    assert moe_config.moe_tile_config(16, 96, 9000, "bf16", device="cpu") == entry(128)
    assert moe_config.moe_tile_config(16, 96, 2, "fp16", device="cpu")["BLOCK_SIZE_K"] == 64  # other dtype: default


def test_malformed_file_is_explained(config_dir):
    (config_dir / moe_config.config_file_name(4, 8, "cpu", "bf16")).write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    with pytest.raises(ValueError, match="missing BLOCK_SIZE_N"):
        moe_config.moe_tile_config(4, 8, 1, "bf16", device="cpu")


def test_tuner_writes_a_file_the_kernels_then_use(config_dir):
    spec = importlib.util.spec_from_file_location("bench_tune_moe", TUNER)
    tuner = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tuner
    spec.loader.exec_module(tuner)
    [path] = tuner.main(["--tiny", "--dtypes", "fp8_w8a16_block128x128", "--out-dir", str(config_dir)])
    assert path.name == "E=8,N=32,device_name=cpu,dtype=fp8_w8a16_block128x128.json"
    tuned = json.loads(path.read_text())["1"]
    assert moe_config.moe_tile_config(8, 32, 1, "fp8_w8a16_block128x128", device="cpu") == tuned
    # Every candidate of the real search space respects the block-scale constraint.
    space = tuner.search_space(1, 8, 128, "fp8_w8a16_block128x128", quick=False)
    assert space and all(c["BLOCK_SIZE_K"] <= 128 for c in space)
