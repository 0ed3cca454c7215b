"""Fixtures for the `%%glm` tests: an IPython shell with the extension, a tiny checkpoint, a scripted remote
GLM endpoint (the network boundary: what an OpenAI-compatible server would answer) and a live Jupyter server
running the workbench extension on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from glm_upstream import ScriptedUpstream, magics_of
from IPython.core.interactiveshell import InteractiveShell

from workbench.engine.testing import write_tiny_checkpoint
from workbench.magics import Session
from workbench.server.launch import start_server


@pytest.fixture(scope="session")
def upstream():
    server = ScriptedUpstream()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("glm") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def ipython() -> InteractiveShell:
    shell = InteractiveShell.instance()
    assert shell.run_cell("%load_ext workbench").success
    return shell


@pytest.fixture
def shell(ipython):
    """The shell with a fresh %%glm session (no memory, default settings) for each test."""
    magics = magics_of(ipython)
    magics.session.disconnect()
    magics.session = Session()
    ipython.rl_next_input = None
    yield ipython
    magics.session.disconnect()


@pytest.fixture(scope="module")
def jupyter_server(tiny_checkpoint, tmp_path_factory):
    """A real `jupyter server` with the workbench extension on the tiny checkpoint, in its own runtime dir."""
    workdir = tmp_path_factory.mktemp("jupyter")
    server = start_server(workdir, {"model_path": str(tiny_checkpoint), "dtype": "float32"},
                          env={"PYTHONUNBUFFERED": "1"}, token="magic-test-token")
    try:
        state = server.status()
        assert state["state"] == "ready", f"{state}\n{server.log_text()[-2000:]}"
        yield {"url": server.url + "/", "token": server.token, "runtime": workdir / "runtime",
               "pid": server.process.pid}
    finally:
        server.stop()
