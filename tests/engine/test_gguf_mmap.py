"""A GGUF memory-mapped from its repack cache (workbench.engine.gguf_cache): the routed experts page in as they are
used (peak RSS of a load and a short decode far below the file, logits equal to loading it into memory), the
cache is made once and reused, rebuilt when the GGUF changes or the cache is damaged, and a cache that cannot be
written falls back to memory (or is a clear error where the weights would not fit), leaving nothing behind."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.engine import Engine, GLMConfig, gguf_cache
from workbench.engine.gguf_file import GGUFError
from workbench.engine.model import GLMForCausalLM
from workbench.engine.testing import write_synthetic_gguf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and maps")

# Loads in one fresh process, one phase after another: a small GGUF first (so that imports and the fixed cost of any
# load are paid), then each (cache, tokens) phase: its peak RSS growth over the RSS it started at (writing 5 to
# clear_refs resets VmHWM, this process's own peak), the logits of the prompt's last token and the greedy tokens.
_CHILD = r"""
import gc, json, sys
from pathlib import Path
from workbench.engine import Engine

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def load(path, cache):
    return Engine.from_pretrained(path, dtype="float32", gguf_cache=cache, cache_tokens=256)

warm, path, *phases = sys.argv[1:]
engine = load(warm, "off")
engine.generate([10, 11], max_new_tokens=2, temperature=0.0)
results = []
for phase in phases:
    cache, decode = phase.rsplit(":", 1)
    del engine
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    engine = load(path, cache)
    result = {"load": status("VmHWM") - before, "logits": [], "tokens": []}
    if int(decode):
        prompt = [10, 11, 12, 13]
        result["logits"] = engine.logits(prompt)[-1].tolist()
        result["tokens"] = engine.generate(prompt, max_new_tokens=int(decode), temperature=0.0).token_ids
    result["peak"] = status("VmHWM") - before
    results.append(result)
print(json.dumps(results))
"""


def run_child(warm: Path, path: Path, *phases: str) -> list[dict]:
    env = {**os.environ, "WORKBENCH_LOAD_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(warm), str(path), *phases], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def moe_config(hidden: int, experts: int, layers: int) -> GLMConfig:
    """1 dense + (layers - 1) MoE layers whose experts are nearly all the bytes; top-2 routing."""
    return GLMConfig.preset("tiny", vocab_size=4096, hidden_size=hidden, intermediate_size=hidden,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                            n_routed_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden,
                            first_k_dense_replace=1)


def check_pages_in_on_use(tmp_path: Path, config: GLMConfig) -> None:
    path = write_synthetic_gguf(tmp_path / "big.gguf", config, "q8_0")
    warm = write_synthetic_gguf(tmp_path / "warm.gguf", moe_config(hidden=256, experts=4, layers=2), "q8_0")
    size = path.stat().st_size
    cache = tmp_path / "cache"
    # the repack, the mapped load + a 4-token prompt and 4 greedy tokens, the same loaded into memory
    first, mapped, in_memory = run_child(warm, path, f"{cache}:0", f"{cache}:4", "off:4")
    assert len(list(cache.glob("*.wbq"))) == 1
    assert mapped["logits"] == in_memory["logits"] and mapped["tokens"] == in_memory["tokens"]
    assert in_memory["load"] > 0.8 * size, "the in-memory load must hold the file: else this test measures nothing"
    assert first["peak"] < size / 4, (first["peak"], size)  # the repack: one expert at a time
    assert mapped["peak"] < size / 4, (mapped["peak"], size)  # 8 tokens x 2 of 128 experts a layer, the rest


def test_a_gguf_pages_its_experts_in_as_they_are_used(tmp_path):
    """~320 MB Q8_0 file (128 experts x 3 MoE layers): the repack and a mapped load + decode each peak below a
    quarter of the file; the in-memory load holds all of it; both decode the same logits and tokens."""
    check_pages_in_on_use(tmp_path, moe_config(hidden=512, experts=128, layers=4))


@pytest.mark.slow
def test_a_2gb_gguf_pages_its_experts_in_as_they_are_used(tmp_path):
    """The same at ~2.1 GB (hidden 1024, 5 MoE layers)."""
    check_pages_in_on_use(tmp_path, moe_config(hidden=1024, experts=128, layers=6))


# --- the cache ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mmap-gguf")
    return write_synthetic_gguf(folder / "small.gguf", moe_config(hidden=256, experts=8, layers=3), "q4_k")


def load(path: Path, cache) -> Engine:
    return Engine.from_pretrained(path, dtype="float32", gguf_cache=cache, cache_tokens=64)


def logits(engine: Engine) -> torch.Tensor:
    return engine.logits(list(range(10, 18)))


def glm_models_alive() -> int:
    gc.collect()
    return sum(type(o) is GLMForCausalLM for o in gc.get_objects())


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    return [tuple(int(x, 16) for x in fields[0].split("-")) for fields in maps
            if fields[-1] == str(path.resolve())]


def test_the_cache_is_made_once_reused_and_holds_the_experts(small_gguf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="workbench.engine.gguf_cache")
    reference = logits(load(small_gguf, "off"))
    first = load(small_gguf, tmp_path)
    assert "repacked small" in caplog.text
    (cache,) = tmp_path.glob("*.wbq")
    caplog.clear()
    second = load(small_gguf, tmp_path)
    assert "mapping" in caplog.text and "repack" not in caplog.text
    assert torch.equal(logits(first), reference) and torch.equal(logits(second), reference)
    ranges = mapped_ranges(cache)
    for engine in (first, second):
        experts = engine.model.layers[1].mlp.experts
        for tensor in (experts.gate_up.packed, experts.gate_up.d, experts.down.sc):  # Q4_K -> int4, stacked
            assert any(lo <= tensor.data_ptr() < hi for lo, hi in ranges)


def test_a_changed_gguf_or_a_damaged_cache_is_rebuilt(small_gguf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="workbench.engine.gguf_cache")
    reference = logits(load(small_gguf, tmp_path))
    (cache,) = tmp_path.glob("*.wbq")
    os.utime(small_gguf, ns=(small_gguf.stat().st_atime_ns, small_gguf.stat().st_mtime_ns + 10**9))
    caplog.clear()
    assert torch.equal(logits(load(small_gguf, tmp_path)), reference)
    assert "repacked" in caplog.text
    (rebuilt,) = tmp_path.glob("*.wbq")  # the old one removed
    assert rebuilt != cache
    data = rebuilt.read_bytes()
    rebuilt.write_bytes(data[:len(data) // 2])  # truncated: no footer
    caplog.clear()
    assert torch.equal(logits(load(small_gguf, tmp_path)), reference)
    assert "is damaged (no footer" in caplog.text and "repacked" in caplog.text
    assert rebuilt.stat().st_size == len(data)


def test_an_unwritable_cache_folder_falls_back_to_memory(small_gguf, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    reference = logits(load(small_gguf, "off"))
    with caplog.at_level(logging.WARNING, logger="workbench.engine.gguf_cache"):
        engine = load(small_gguf, tmp_path / "a-file" / "cache")
    assert "GGUF cache unavailable (cannot create the GGUF cache folder" in caplog.text
    assert "set WORKBENCH_GGUF_CACHE to a writable folder" in caplog.text
    assert torch.equal(logits(engine), reference)


def test_a_full_disk_falls_back_to_memory_or_says_how_to_fix_it(small_gguf, tmp_path, caplog, monkeypatch):
    reference = logits(load(small_gguf, "off"))
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(gguf_cache.os, "pwrite", full)
    with caplog.at_level(logging.WARNING, logger="workbench.engine.gguf_cache"):
        engine = load(small_gguf, tmp_path)
    assert "No space left on device" in caplog.text and "loading small into memory instead" in caplog.text
    assert torch.equal(logits(engine), reference)
    assert not list(tmp_path.iterdir()), "no cache file, whole or partial, is left"
    # too little space said up front, and the weights too big for memory: an error saying what to do
    monkeypatch.setattr(gguf_cache.os, "pwrite", real_pwrite)
    monkeypatch.setattr(gguf_cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    monkeypatch.setattr(gguf_cache, "_available_memory", lambda: 1 << 20)
    before = glm_models_alive()
    with pytest.raises(GGUFError, match=r"cannot be memory-mapped: the GGUF cache needs .* GiB free.*do not fit in "
                                        r"the available memory.*set WORKBENCH_GGUF_CACHE to a writable folder"):
        load(small_gguf, tmp_path)
    assert glm_models_alive() == before and not list(tmp_path.iterdir())


def test_the_cache_folder_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf_cache.CACHE_ENV, raising=False)
    assert gguf_cache.cache_dir() == Path("~/.cache/glm-workbench/gguf").expanduser()
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    assert gguf_cache.cache_dir() == tmp_path
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_dir() is None
    assert gguf_cache.cache_dir(tmp_path / "x") == tmp_path / "x"  # an argument wins


def test_caches_of_gguf_files_that_are_gone_are_pruned(tmp_path):
    config = moe_config(hidden=256, experts=8, layers=2)
    kept, gone = (write_synthetic_gguf(tmp_path / f"{name}.gguf", config, "q8_0") for name in ("kept", "gone"))
    cache = tmp_path / "cache"
    load(gone, cache)
    gone.unlink()
    load(kept, cache)
    assert [p.name.split("-")[0] for p in cache.glob("*.wbq")] == ["kept"]


def test_a_gguf_missing_half_of_an_expert_stack_is_named(tmp_path):
    """The repack stores gate and up stacked together: a GGUF without the up half is an error naming it, not a
    model whose up rows read as zeros."""
    import gguf

    source = write_synthetic_gguf(tmp_path / "full.gguf", moe_config(hidden=256, experts=8, layers=2), "q8_0")
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(tmp_path / "cut.gguf", "glm4moe")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for tensor in reader.tensors:
        if tensor.name != "blk.1.ffn_up_exps.weight":
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = glm_models_alive()
    with pytest.raises(Exception, match=r"missing tensor 'blk.1.ffn_up_exps.weight'"):
        load(tmp_path / "cut.gguf", tmp_path / "cache")
    assert glm_models_alive() == before and not list((tmp_path / "cache").iterdir())
