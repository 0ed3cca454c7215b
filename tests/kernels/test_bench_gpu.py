"""bench/gpu.py --tiny: the GPU benchmark's whole code path, at small shapes on the CPU (Triton interpreter),
so the script is known to run before anyone spends GPU time on it."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script


def load_bench():
    return load_bench_script("gpu")


@pytest.mark.slow  # about 35 s of CPU: every kernel and the whole model path in the interpreter
def test_gpu_bench_tiny_runs_every_section(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    load_bench().main(["--tiny", "--out", str(out)])
    figures = json.loads(out.read_text())
    assert figures["meta"]["tiny"] is True
    assert figures["ceilings"]["copy"]["gb_s"] > 0 and figures["ceilings"]["bf16_matmul"]["tflop_s"] > 0
    checked = [v for section in ("kernels", "fused_moe", "attention", "fp8_linear") for v in figures[section].values()]
    assert len(checked) >= 25
    assert all(v["correct"] for v in checked), [k for s in figures.values() for k, v in s.items()
                                                 if isinstance(v, dict) and v.get("correct") is False]
    assert {"bf16 T=1", "fp8-channel-w8a16 T=1", "fp8-block-w8a16 T=1", "fp8-block-w8a8 T=1"} <= set(
        figures["fused_moe"])
    model = figures["model"]
    for key in ("batch1_decode_engine w8a8", "batch1_decode_tok_s w8a8", "batch2_decode_tok_s w8a8",
                "prefill_3 w8a8", "prefill_6 w8a8", "batch2_decode_engine w8a8"):
        assert model[key]["tok_s"] > 0, key
    table = capsys.readouterr().out
    assert "roofline / check" in table and "FAIL" not in table


def test_gpu_bench_refuses_to_run_without_a_gpu_unless_tiny(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.main([])
