"""Shared fixtures: tiny checkpoints built in code (no downloads), the shared fixture folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton chooses between compiling and interpreting when glm_kernels is first imported (by any test module,
# e.g. through workbench.engine); without a GPU only the interpreter can run the kernels, so choose it here,
# before collection imports anything.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.fail(f"the shared fixtures are missing: expected {SHARED_FIXTURES} (../shared beside the repo)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight checkpoint of the 'tiny' preset with a GLM-special-token tokenizer, made once per run."""
    from workbench.engine.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from workbench.engine import Engine

    return Engine.from_pretrained(tiny_checkpoint, dtype="float32", device="cpu", kernels="torch")
