"""Fixtures for every test: tiny checkpoints built in code (no downloads), the chat-format fixture files
(tests/fixtures, rendered by the official GLM-4.5-Air chat template), the compiled CPU kernels built up front."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

# Triton chooses between compiling and interpreting when glm_kernels is first imported (by any test module,
# e.g. through workbench.engine); without a GPU only the interpreter can run the kernels, so choose it here,
# before collection imports anything.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The engine compiles its CPU kernels once per machine into torch's extensions folder, under HOME; pytest-jupyter
# gives its servers a temporary HOME, where each would compile them anew (a minute): one folder for the whole run,
# inherited by every server and kernel the tests start.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(get_default_build_root()) / "glm-workbench-tests"))

# GGUF loads repack into a cache folder (workbench/engine/gguf_cache.py), by default under HOME: the tests' GGUFs
# go to one temporary folder instead (a cache whose GGUF is gone is removed when the next one is written).
os.environ.setdefault("WORKBENCH_GGUF_CACHE", str(Path(tempfile.gettempdir()) / "glm-workbench-tests-gguf-cache"))

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The web_fetch tests' page server and loopback guard (fixtures `pages` and `guard`), shared by tests/tools,
# tests/server and tests/magics.
pytest_plugins = ["web_pages"]


@pytest.fixture(scope="session", autouse=True)
def compiled_cpu_kernels():
    """Build the engine's compiled CPU kernels before the first test, not inside one that times a server's
    answer (on a fresh machine the build takes about a minute; afterwards loading them takes a moment)."""
    from glm_kernels import cpu_compiled

    return cpu_compiled.load()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: the GLM-4.5 chat-format and output-parsing cases (see its README)."""
    return FIXTURES


@pytest.fixture(scope="session")
def check_chat_fixtures(fixtures_dir):
    """A check that a tokenizer's `apply_chat_template` (ours or Hugging Face's) renders every case of the
    chat-format fixtures byte for byte; it returns the rendered texts."""
    import workbench.chat  # noqa: F401  (gives the engine's Tokenizer apply_chat_template)

    cases = json.loads((fixtures_dir / "glm45_chat_format.json").read_text())["cases"]
    assert len(cases) >= 10

    def check(tokenizer) -> list[str]:
        rendered = []
        for case in cases:
            text = tokenizer.apply_chat_template(case["messages"], tools=case["tools"], tokenize=False,
                                                 enable_thinking=case["enable_thinking"],
                                                 add_generation_prompt=case["add_generation_prompt"])
            assert text == case["expected"], case["name"]
            rendered.append(text)
        return rendered

    return check


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight checkpoint of the 'tiny' preset with a GLM-special-token tokenizer, made once per run."""
    from workbench.engine.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from workbench.engine import Engine

    return Engine.from_pretrained(tiny_checkpoint, dtype="float32", device="cpu", kernels="torch")
