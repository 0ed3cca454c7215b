"""A server's first start on a machine compiles the CPU kernels (about a minute): its status says so while the
model waits (the sidebar's loading banner shows the status message), its log says so, and once loaded the log,
api/status and the CLI describe what runs in the same words."""

from __future__ import annotations

import asyncio
import logging
import threading

from workbench.chat.backends import LocalBackend
from workbench.server.launch import start_server


def test_status_says_the_cpu_kernels_compile_while_the_model_waits(tiny_checkpoint, tmp_path, monkeypatch,
                                                                   compiled_cpu_kernels, caplog):
    from glm_kernels import cpu_compiled

    # As on a fresh machine: nothing loaded in this process, nothing built in the extensions folder. The compile
    # itself is a stand-in that holds until the test has seen the status, then hands over the built module.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(cpu_compiled, "_module", None)
    monkeypatch.setattr(cpu_compiled, "_error", None)
    release = threading.Event()

    def held_build(name, sources, cflags, folder):
        assert release.wait(120), "the test never saw the compile in the status"
        return compiled_cpu_kernels

    monkeypatch.setattr(cpu_compiled, "_build", held_build)
    backend = LocalBackend(model_path=tiny_checkpoint, dtype="float32", cpu_kernels="auto")

    async def scenario() -> list[dict]:
        started = asyncio.ensure_future(backend.start())
        seen = [backend.status()]
        for _ in range(1200):  # up to 2 minutes for the weights to load and the build to start
            if seen[-1]["message"]:
                break
            await asyncio.sleep(0.1)
            seen.append(backend.status())
        release.set()
        await started
        seen.append(backend.status())
        await backend.close()
        return seen

    with caplog.at_level(logging.INFO, "workbench"), caplog.at_level(logging.INFO, "glm_kernels"):
        seen = asyncio.run(scenario())
    while_building, ready = seen[-2], seen[-1]
    assert while_building["state"] == "loading", seen
    assert while_building["message"] == "compiling CPU kernels, about a minute, once per machine"
    assert ready["state"] == "ready" and ready["message"] is None
    assert (ready["kernels"], ready["cpu_kernels"]) == ("torch", "compiled")
    logged = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("compiling CPU kernels, about a minute, once per machine") for line in logged)
    assert any(line.startswith(f"loaded {tiny_checkpoint.name} in ") and
               line.endswith(": float32 on cpu, kernels=torch, cpu_kernels=compiled") for line in logged), logged


def test_the_server_log_says_what_loads_and_what_runs(tiny_checkpoint, tmp_path):
    """A real server, on a machine where the CPU kernels cannot be compiled (a compiler that fails): its log has
    the compile's announcement and the loaded line, both in the server's own log format, and api/status agrees."""
    compiler = tmp_path / "failing-c++"
    compiler.write_text("#!/bin/sh\necho 'error: this compiler compiles nothing' >&2\nexit 1\n")
    compiler.chmod(0o755)
    server = start_server(tmp_path / "server", {"model_path": str(tiny_checkpoint), "dtype": "float32"},
                          env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "CXX": str(compiler)},
                          log_level="INFO")
    try:
        status = server.status()
    finally:
        server.stop()
    log = server.log_text()
    assert status["state"] == "ready" and (status["kernels"], status["cpu_kernels"]) == ("torch", "torch"), status
    assert "glm_kernels.cpu_compiled] compiling CPU kernels, about a minute, once per machine" in log, log
    assert "glm_kernels.cpu_compiled] compiled CPU kernels unavailable" in log, log
    assert f"workbench.chat.backends.local] loaded {tiny_checkpoint.name} in " in log, log
    assert ": float32 on cpu, kernels=torch, cpu_kernels=torch\n" in log, log
