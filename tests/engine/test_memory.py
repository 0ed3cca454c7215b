"""Loading keeps the resident set near the weights' size: mapped in place or copied once, never twice."""

from __future__ import annotations

import sys

import pytest
import torch

from workbench.engine import GLMConfig
from workbench.engine.testing import measure_load_memory, write_tiny_checkpoint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype, shard", [("bfloat16", None), ("float32", 16 * 2**20)])
def test_peak_rss_growth_is_at_most_1_3x_the_weights(tmp_path, tiny_checkpoint, dtype, shard):
    config = GLMConfig.preset("tiny", vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=64, n_routed_experts=16,
                              num_experts_per_tok=4, moe_intermediate_size=256)
    folder = write_tiny_checkpoint(tmp_path / "ckpt", config, dtype=torch.bfloat16, max_shard_bytes=shard)
    figures = measure_load_memory(folder, dtype)
    # What any load costs whatever its size (allocator arenas, tokenizer, modules), from a ~1 MB checkpoint;
    # the weights must account for the rest. bench/load_memory.py shows the ratio at 300M parameters.
    fixed = measure_load_memory(tiny_checkpoint, dtype)
    weights = figures["weights"] - fixed["weights"]
    assert weights > 40 * 2**20, "the checkpoint must be big enough to measure"
    assert figures["growth"] - fixed["growth"] <= 1.3 * weights, (figures, fixed)
