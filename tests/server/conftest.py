"""Fixtures of the server tests: one torch thread for in-process engines, and the scripted checkpoint (see
glm_live.py), trained once and kept in pytest's cache."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import pytest
import torch
from glm_live import MODEL, SCRIPTS, train_scripted


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The in-process servers' engines compute with one thread: the machine's cores are shared, and torch's
    intra-op threads waiting on each other under contention make tiny steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def scripted_checkpoint(request, tmp_path_factory) -> Path:
    """Trained once, then kept in pytest's cache under a key of everything that shapes the weights."""
    from workbench.engine import testing

    key = hashlib.sha256(repr((SCRIPTS, inspect.getsource(train_scripted), torch.__version__)).encode())
    for module in ("model.py", "testing.py", "tokenizer.py", "glm45_template.py", "../chat/template.py", "weights.py"):
        key.update((Path(testing.__file__).parent / module).read_bytes())
    name = f"glm-scripted-{key.hexdigest()[:16]}"
    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`: train into a temp dir
    folder = (cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)) / MODEL
    if not (folder / "done").exists():
        train_scripted(testing.write_tiny_checkpoint(folder, "tiny", seed=0))
        (folder / "done").write_text("trained\n")
    return folder
