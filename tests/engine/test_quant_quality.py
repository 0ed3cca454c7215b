"""The integer weights keep the bundled model's quality (issue 14's targets): on held-out text (standard-library
packages the model never trained on), int8 loss within +0.5% of fp32 and int4 within +3%. bench/quant_quality.py
gives the full figures (every held-out kind, greedy agreement); this is a few rows of it, not timed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.engine import Engine
from workbench.models import default_model_path
from workbench.models.recipe.corpus import is_heldout, iter_stdlib_files

ROWS, ROW_TOKENS = 6, 256


@pytest.fixture(scope="module")
def bundled():
    path = default_model_path()
    if not (path / "model.safetensors").is_file():
        pytest.skip("the bundled model is not installed")
    return path


@pytest.fixture(scope="module")
def heldout_rows(bundled) -> torch.Tensor:
    tokenizer = Engine.from_pretrained(bundled, dtype="float32", kernels="torch", cpu_kernels="torch").tokenizer
    ids: list[int] = []
    for module, path in sorted(iter_stdlib_files()):
        if is_heldout(module):
            ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) > ROWS * (ROW_TOKENS + 1):
            break
    return torch.tensor(ids[: ROWS * (ROW_TOKENS + 1)]).view(ROWS, ROW_TOKENS + 1)


@torch.inference_mode()
def heldout_loss(engine: Engine, rows: torch.Tensor) -> float:
    logits = engine.model(rows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("fmt, target", [("int8", 0.005), ("int4", 0.03)])
def test_quantized_bundled_model_loss_stays_within_target(bundled, heldout_rows, fmt, target):
    dense = Engine.from_pretrained(bundled, dtype="float32", kernels="torch", cpu_kernels="torch")
    quantized = Engine.from_pretrained(bundled, dtype="float32", quantize=fmt, cpu_kernels="torch")
    base, loss = heldout_loss(dense, heldout_rows), heldout_loss(quantized, heldout_rows)
    assert 2.0 < base < 6.0  # the model card's held-out source loss is 3.84: these are held-out rows
    assert loss <= base * (1 + target), f"{fmt}: {loss:.4f} against fp32 {base:.4f} ({loss / base - 1:+.2%})"
