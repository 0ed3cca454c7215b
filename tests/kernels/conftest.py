"""Kernel tests: every Triton kernel against its torch reference, on the GPU or in Triton's CPU interpreter.

Sets TRITON_INTERPRET=1 before anything imports Triton kernels when there is no GPU (the root conftest does
the same for whole-suite runs), and provides the fixtures the kernel test modules share: the device, a fresh seeded
generator per test case, the poisoning context (outputs start as NaN, so an element a kernel forgets to
write fails) and the comparison (`kernel_testing.assert_close`).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from glm_kernels.triton_support import interpreting, poisoned_outputs  # noqa: E402
from kernel_testing import assert_close  # noqa: E402


def pytest_collection_modifyitems(items):
    # Under the interpreter every kernel test is an interpreter case; on a GPU they are compiled.
    if interpreting():
        for item in items:
            if "tests/kernels" in str(item.path) and "gpu" not in item.keywords:
                item.add_marker(pytest.mark.interpreter)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen(request, device) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs for every case, the same ones on every run."""
    generator = torch.Generator(device=device)
    generator.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return generator


@pytest.fixture
def poison():
    """Context manager: outputs allocated by the wrappers inside it start as NaN (or -1 for integers)."""
    return poisoned_outputs


@pytest.fixture
def close():
    return assert_close
