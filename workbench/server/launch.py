"""Run a Jupyter server with the GLM API in a subprocess: for benchmarks, tests and scripts that need the API
over real HTTP on this machine; and the user's workspace that `glm-workbench` opens JupyterLab in.

Owns the launch (a free loopback port, a token, private config/data/runtime folders, only this extension
enabled), a small handle (`GLMServer`: URLs, auth header, status, idle wait, log, stop), and `prepare_workspace`
(the workspace folder with the user's own copy of the demo notebooks).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

# The demo notebooks of a checkout (the README installs from one, editable); the workspace gets copies of them.
DEMO_NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
DEFAULT_WORKSPACE = Path("~/glm-workbench")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class GLMServer:
    """A `jupyter server` subprocess serving the GLM API; `stop()` ends it."""

    process: subprocess.Popen
    port: int
    token: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        """Base URL for OpenAI-style clients."""
        return f"{self.url}/glm/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def status(self) -> dict:
        return httpx.get(f"{self.url}/glm/api/status", headers=self.headers, timeout=10).json()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrubbed_log(self) -> str:
        """The log with the server's token masked (the server prints it in its URLs): fit for error messages."""
        return self.log_text().replace(self.token, "***")

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Wait until the engine holds no running or waiting sequence; return the last status."""
        deadline = time.monotonic() + timeout
        status = self.status()
        while (status["active_requests"] or status["queued_requests"]) and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.status()
        return status

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(workdir: Path, glm_config: dict, env: dict[str, str] | None = None, token: str | None = None,
                 ready_timeout: float = 180.0, log_level: str = "DEBUG") -> GLMServer:
    """`jupyter server` with only this extension, on a free loopback port, configured by `glm_config`
    (GLMWorkbench traitlets) and with its own config, data and runtime folders under `workdir`; returns once the
    backend is ready (or has said why it cannot be)."""
    tmp = Path(workdir)
    token = token or secrets.token_hex(16)
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("config", "data", "runtime", "root"):
        (tmp / name).mkdir(exist_ok=True)
    # only this extension (and no JupyterLab, LSP, ...): the server starts faster
    others = {name: False for name in ("jupyterlab", "jupyter_lsp", "notebook_shim", "notebook",
                                       "jupyter_server_terminals", "nbclassic", "voila")}
    config = {"ServerApp": {"jpserver_extensions": {**others, "workbench": True}, "open_browser": False},
              "IdentityProvider": {"token": token}, "GLMWorkbench": glm_config}
    (tmp / "config" / "jupyter_server_config.json").write_text(json.dumps(config))
    port = free_port()
    log_path = tmp / "server.log"
    process_env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_DATA_DIR": str(tmp / "data"),
                   "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", f"--port={port}", "--ip=127.0.0.1", "--ServerApp.port_retries=0",
             "--allow-root", f"--ServerApp.root_dir={tmp / 'root'}", f"--ServerApp.log_level={log_level}"],
            env=process_env, stdout=log, stderr=subprocess.STDOUT)
    server = GLMServer(process, port, token, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter server exited with {process.returncode}:\n{server.scrubbed_log()[-3000:]}")
        try:
            status = server.status()
            if status.get("state") in ("ready", "error", "unconfigured", "key_missing", "unreachable"):
                return server
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"jupyter server did not become ready in {ready_timeout}s:\n{server.scrubbed_log()[-3000:]}")


def prepare_workspace(folder: Path, demos: Path = DEMO_NOTEBOOKS) -> list[Path]:
    """The folder `glm-workbench` opens JupyterLab in, created if need be, with a copy of each demo notebook it
    does not hold yet. A notebook already there is the user's, edited or not: it is never overwritten (the tracked
    demos in the checkout are never opened, so autosave cannot write into them). Returns the copies made now."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the workspace {folder} is a file: choose a folder with --workspace DIR")
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for demo in sorted(demos.glob("*.ipynb")) if demos.is_dir() else []:
        target = folder / demo.name
        try:
            with demo.open("rb") as source, target.open("xb") as copy:  # "x": fails rather than overwrite
                shutil.copyfileobj(source, copy)
        except FileExistsError:
            continue
        copied.append(target)
    return copied
