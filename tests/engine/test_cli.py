"""The command line: `python -m workbench generate` streams thinking and answer apart and ends with the speed line;
its arguments are checked before anything loads; it describes what runs in api/status's words and says before
the first start's wait that it compiles the CPU kernels. `glm-workbench` opens JupyterLab in the user's own
workspace, on copies of the demo notebooks."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.server import launch

LOADED = re.compile(r"\[loaded (\S+) in [\d.]+ s: (\w+) on (\S+), kernels=(\w+), cpu_kernels=(\w+)"
                    r"(, weights [^\]]+)?\]")


def test_generate_streams_an_answer_and_reports_speed(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Write fizzbuzz", "--max-tokens", "6",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"\[(stop|length): \d+ prompt tokens at [\d.]+ tok/s, \d+ generated at [\d.]+ tok/s\]",
                     captured.out), captured.out
    loaded = LOADED.search(captured.err)
    assert loaded, captured.err
    assert loaded.group(2, 3) == ("float32", "cpu")  # dtype auto: float32 on the CPU


def test_generate_quantizes_the_weights_as_they_load(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Write fizzbuzz", "--max-tokens", "4",
                 "--temperature", "0", "--quantize", "int4"]) == 0
    err = capsys.readouterr().err
    assert LOADED.search(err), err
    assert re.search(r", weights int4 \([\d.]+ bits per weight, [\d.]+ [KMG]iB read per token\)\]", err), err


@pytest.mark.parametrize("option,value,why", [
    ("--max-tokens", "0", "must be at least 1, got 0"),
    ("--max-tokens", "-3", "must be at least 1, got -3"),
    ("--max-tokens", "many", "'many' is not a whole number"),
    ("--temperature", "-0.5", "must lie in [0.0, inf], got -0.5"),
    ("--temperature", "nan", "must lie in [0.0, inf], got nan"),
    ("--top-p", "0", "must lie in (0.0, 1.0], got 0"),
    ("--top-p", "1.5", "must lie in (0.0, 1.0], got 1.5"),
    ("--seed", "-1", "must be at least 0, got -1"),
    ("--dtype", "int3", "invalid choice: 'int3'"),
    ("--cpu-kernels", "fast", "invalid choice: 'fast'"),
    ("--device", "toaster", "'toaster' is not a torch device"),
    ("--quantize", "int3", "invalid choice: 'int3'"),
])
def test_bad_arguments_are_rejected_before_the_engine_loads(tiny_checkpoint, capsys, monkeypatch, option, value,
                                                            why):
    from workbench.engine import Engine

    def no_load(*args, **kwargs):
        raise AssertionError("the engine started loading before the arguments were checked")

    monkeypatch.setattr(Engine, "from_pretrained", no_load)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: {why}" in capsys.readouterr().err


def test_the_cli_describes_what_runs_as_the_status_api_does(tiny_checkpoint, capsys, compiled_cpu_kernels):
    """One description of what runs: the CLI's line names the kernels and the CPU kernels with api/status's fields
    and values (it once printed kernels=torch alone while api/status said cpu_kernels: compiled)."""
    from workbench.chat.backends import LocalBackend

    assert compiled_cpu_kernels is not None
    for choice, expected in (("auto", "compiled"), ("torch", "torch")):
        assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--max-tokens", "2",
                     "--cpu-kernels", choice]) == 0
        name, dtype, device, kernels, cpu_kernels, _ = LOADED.search(capsys.readouterr().err).groups()

        backend = LocalBackend(model_path=tiny_checkpoint, dtype="auto", cpu_kernels=choice)
        asyncio.run(backend.start())
        status = backend.status()
        asyncio.run(backend.close())
        assert cpu_kernels == expected
        assert (name, dtype, device, kernels, cpu_kernels) == (
            status["model"], status["dtype"], status["device"], status["kernels"], status["cpu_kernels"])


def test_the_cli_says_it_compiles_the_cpu_kernels_before_it_waits(tiny_checkpoint, tmp_path):
    """On the terminal, as the first start on a machine does it: the announcement comes first, then what runs.
    (A compiler that fails at once stands in for the minute of a real compile.)"""
    compiler = tmp_path / "failing-c++"
    compiler.write_text("#!/bin/sh\necho 'error: this compiler compiles nothing' >&2\nexit 1\n")
    compiler.chmod(0o755)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "CXX": str(compiler)}
    process = subprocess.run([sys.executable, "-m", "workbench", "generate", "--model", str(tiny_checkpoint),
                              "--prompt", "hi", "--max-tokens", "2"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stderr
    lines = process.stderr.splitlines()
    announced = next(i for i, line in enumerate(lines)
                     if line.startswith("[compiling CPU kernels, about a minute, once per machine"))
    loaded = next(i for i, line in enumerate(lines) if LOADED.match(line))
    assert announced < loaded and lines[loaded].endswith("cpu_kernels=torch]"), process.stderr


# --- glm-workbench: JupyterLab in the user's workspace ------------------------------------------------------

@pytest.fixture
def lab_command(monkeypatch):
    """What `glm-workbench` would run: the command is recorded instead of starting JupyterLab."""
    commands = []
    monkeypatch.setattr(subprocess, "call", lambda command: commands.append(command) or 0)
    return commands


def test_glm_workbench_opens_copies_of_the_demos_in_the_users_workspace(tmp_path, monkeypatch, lab_command):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    demos = sorted(p.name for p in launch.DEMO_NOTEBOOKS.glob("*.ipynb"))
    assert "01_quickstart.ipynb" in demos

    assert main([]) == 0
    workspace = tmp_path / "home" / "glm-workbench"  # the default
    [command] = lab_command
    assert f"--ServerApp.root_dir={workspace}" in command and str(workspace / "01_quickstart.ipynb") in command
    assert not any(str(launch.DEMO_NOTEBOOKS) in arg for arg in command)  # never the checkout's tracked notebooks
    assert sorted(p.name for p in workspace.iterdir()) == demos
    for name in demos:
        assert (workspace / name).read_bytes() == (launch.DEMO_NOTEBOOKS / name).read_bytes()

    # The user's edits stay: a second start copies nothing over them (and brings back only what is missing).
    edited = workspace / "01_quickstart.ipynb"
    edited.write_text("my experiments")
    (workspace / demos[-1]).unlink()
    assert main(["--workspace", str(workspace)]) == 0
    assert edited.read_text() == "my experiments"
    assert (workspace / demos[-1]).exists()


def test_the_workspace_option_and_its_errors(tmp_path, lab_command, capsys):
    chosen = tmp_path / "elsewhere" / "ws"
    assert main([f"--workspace={chosen}", "--no-browser"]) == 0
    assert f"--ServerApp.root_dir={chosen}" in lab_command[-1] and "--no-browser" in lab_command[-1]
    assert "--workspace" not in " ".join(lab_command[-1])  # ours, not JupyterLab's
    assert (chosen / "01_quickstart.ipynb").exists()

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for argv, why in ((["--workspace", str(a_file)], "is a file"), (["--workspace"], "needs a folder"),
                      (["lab", "--workspace", "--no-browser"], "needs a folder"),
                      (["--workspace", str(chosen), "--ServerApp.root_dir=/tmp"], "choose one")):
        assert main(argv) == 2, argv
        assert why in capsys.readouterr().err, argv
    assert len(lab_command) == 1  # none of those started JupyterLab


def test_a_notebook_or_folder_of_the_users_own_opens_as_given(tmp_path, monkeypatch, lab_command):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    notebook = tmp_path / "mine.ipynb"
    assert main(["lab", str(notebook)]) == 0
    assert main(["lab", f"--ServerApp.root_dir={tmp_path}"]) == 0
    assert [c[4:5] for c in lab_command] == [[str(notebook)], [f"--ServerApp.root_dir={tmp_path}"]]
    assert not any("--ServerApp.root_dir=" + str(tmp_path / "home") in " ".join(c) for c in lab_command)
    assert not (tmp_path / "home" / "glm-workbench").exists()


def test_prepare_workspace_never_overwrites(tmp_path):
    demos = tmp_path / "demos"
    demos.mkdir()
    (demos / "a.ipynb").write_text("demo a")
    (demos / "b.ipynb").write_text("demo b")
    (demos / "notes.txt").write_text("not a notebook")
    workspace = tmp_path / "ws"
    assert launch.prepare_workspace(workspace, demos) == [workspace / "a.ipynb", workspace / "b.ipynb"]
    (workspace / "a.ipynb").write_text("mine")
    (demos / "c.ipynb").write_text("demo c")  # a newer version of the workbench brings a new demo
    assert launch.prepare_workspace(workspace, demos) == [workspace / "c.ipynb"]
    assert {p.name: p.read_text() for p in workspace.iterdir()} == {"a.ipynb": "mine", "b.ipynb": "demo b",
                                                                      "c.ipynb": "demo c"}
    assert launch.prepare_workspace(tmp_path / "empty", tmp_path / "no-demos-here") == []  # e.g. a wheel install
    assert Path(tmp_path / "empty").is_dir()
