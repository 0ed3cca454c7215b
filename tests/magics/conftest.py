"""Fixtures for the `%%glm` tests: an IPython shell with the extension, a tiny checkpoint, a scripted remote
GLM endpoint (the network boundary: what an OpenAI-compatible server would answer) and a live Jupyter server
running the workbench extension on the tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from glm_upstream import ScriptedUpstream, magics_of
from IPython.core.interactiveshell import InteractiveShell

from workbench.engine.testing import write_tiny_checkpoint
from workbench.magics import Session
from workbench.server.launch import free_port


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
    runtime = tmp_path_factory.mktemp("runtime")
    port, token = free_port(), "magic-test-token"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    extensions = "{'workbench': True, 'jupyterlab': False, 'jupyter_lsp': False, 'notebook_shim': False, " \
                 "'jupyter_server_terminals': False}"
    log = open(runtime / "server.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={port}",
         "--ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={runtime}",
         f"--ServerApp.jpserver_extensions={extensions}", f"--GLMWorkbench.model_path={tiny_checkpoint}",
         "--GLMWorkbench.dtype=float32"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    state = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("jupyter server exited: " + (runtime / "server.log").read_text()[-2000:])
        try:
            state = httpx.get(url + "glm/api/status", headers={"Authorization": f"token {token}"}, timeout=5).json()
            if state.get("state") == "ready":
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    else:
        process.terminate()
        raise RuntimeError(f"jupyter server not ready after 180 s (last status {state})")
    yield {"url": url, "token": token, "runtime": runtime, "pid": process.pid}
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
