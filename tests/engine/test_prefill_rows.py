"""hidden_states(last_rows_only=True): a prefill's last layer runs for each prompt's last row alone, same results."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import GLMConfig
from workbench.engine.kv_cache import PagedKVCache
from workbench.engine.model import AttentionBatch, Segment
from workbench.engine.routing import RoutingRecorder
from workbench.engine.testing import random_model


def _prefill(model, cache, prompts, cached=None, last_rows_only=False):
    """Prefill `prompts` (one segment each) into `cache`; `cached[i]` tokens of prompt i are already there."""
    cached = cached or [0] * len(prompts)
    rows, segments, positions, slots = [], [], [], []
    for prompt, blocks, done in zip(prompts, cache.owned, cached, strict=True):
        new = prompt[done:]
        table = torch.tensor(blocks, dtype=torch.int32)
        segments.append(Segment(start=len(rows), length=len(new), cached=done, block_table=table))
        rows.extend(new)
        positions.extend(range(done, len(prompt)))
        slots.extend(cache.slots(blocks, done, len(prompt)))
    batch = AttentionBatch(positions=torch.tensor(positions), segments=segments, slot_mapping=torch.tensor(slots))
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor(rows), batch, cache.layers, None, last_rows_only)
    return hidden if last_rows_only else hidden[batch.last_rows]


def _cache(config, prompts):
    cache = PagedKVCache(config.num_hidden_layers, 32, 4, config.num_key_value_heads, config.head_dim,
                         torch.float32, torch.device("cpu"))
    cache.owned = [cache.allocate(len(p)) for p in prompts]
    return cache


@pytest.mark.parametrize("preset", ["tiny", "tiny-grouped"])
def test_last_rows_only_gives_the_same_rows_and_the_same_cache(preset):
    config = GLMConfig.preset(preset)
    model = random_model(config, seed=5).eval()
    model.fuse_projections()
    prompts = [list(range(3, 10)), list(range(40, 52)), [7]]  # one of a single token
    full_cache, short_cache = _cache(config, prompts), _cache(config, prompts)
    want = _prefill(model, full_cache, prompts)
    got = _prefill(model, short_cache, prompts, last_rows_only=True)
    assert got.shape == (3, config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written = [s for p, blocks in zip(prompts, full_cache.owned) for s in full_cache.slots(blocks, 0, len(p))]
    for (k, v), (k_want, v_want) in zip(short_cache.layers, full_cache.layers, strict=True):
        for pool, want_pool in ((k, k_want), (v, v_want)):
            flat, want_flat = pool.flatten(0, 1), want_pool.flatten(0, 1)
            torch.testing.assert_close(flat[written], want_flat[written], rtol=0, atol=0)


def test_last_rows_only_after_a_cached_prefix():
    config = GLMConfig.preset("tiny")
    model = random_model(config, seed=6).eval()
    model.fuse_projections()
    prompts = [list(range(3, 20)), list(range(60, 70))]
    full_cache, short_cache = _cache(config, prompts), _cache(config, prompts)
    for cache in (full_cache, short_cache):  # the first 9 and 4 tokens go in first, the rest continue after them
        _prefill(model, cache, [p[:n] for p, n in zip(prompts, (9, 4))])
    want = _prefill(model, full_cache, prompts, cached=[9, 4])
    got = _prefill(model, short_cache, prompts, cached=[9, 4], last_rows_only=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_last_rows_only_refuses_a_routing_trace_and_other_batch_forms():
    config = GLMConfig.preset("tiny")
    model = random_model(config, seed=1).eval()
    with pytest.raises(ValueError, match="segments form.*no routing recorder"):
        model.hidden_states(torch.arange(4), AttentionBatch.uniform(1, 4, torch.device("cpu")), last_rows_only=True)
    batch = AttentionBatch(positions=torch.arange(4), segments=[Segment(0, 4)])
    with pytest.raises(ValueError, match="no routing recorder"):
        model.hidden_states(torch.arange(4), batch, None, RoutingRecorder(), last_rows_only=True)


def test_the_engine_generates_the_same_with_and_without_the_saving(tmp_path):
    from workbench.engine import Engine
    from workbench.engine.testing import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "m", "tiny", seed=2)
    saving, every_row = Engine.from_pretrained(folder), Engine.from_pretrained(folder)
    every_row.prefill_last_rows_only = False
    prompts = [list(range(3, 30)), [5, 6]]
    kwargs = dict(max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    assert [r.token_ids for r in saving.generate_batch(prompts, **kwargs)] == \
        [r.token_ids for r in every_row.generate_batch(prompts, **kwargs)]
