"""Building the compiled CPU kernels once per machine (glm_kernels.cpu_compiled): one folder per build key, built
aside and renamed into place, so that two processes building at once both end with a working module and one
complete folder. A small pybind11 source stands in for the kernels (it compiles in seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from glm_kernels import cpu_compiled

PROBE_SOURCE = """\
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""

# Each process waits in on_build (the moment it has found no build and is about to compile) until both are there:
# the two builds surely overlap, however the machine schedules the processes.
BUILDER = textwrap.dedent("""\
    import json, sys, time
    from pathlib import Path
    from glm_kernels import cpu_compiled

    source, rendezvous, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    built = []

    def meet(folder):
        built.append(str(folder))
        (rendezvous / me).touch()
        deadline = time.monotonic() + 120
        while len(list(rendezvous.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    on_build = built.append if me == "late" else meet
    module = cpu_compiled.load_extension("glm_probe", [source], ["-O1"], on_build=on_build)
    print(json.dumps({"answer": module.answer(), "built": built, "file": module.__file__}))
""")


def run_builder(source: Path, rendezvous: Path, me: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(source), str(rendezvous), me], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_building_at_once_leave_one_complete_build(tmp_path, monkeypatch):
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE_SOURCE)
    root, rendezvous = tmp_path / "extensions", tmp_path / "rendezvous"
    rendezvous.mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    builders = [run_builder(source, rendezvous, name, env) for name in ("first", "second")]
    results = []
    for process in builders:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    folder = cpu_compiled.build_dir("glm_probe", [source], ["-O1"])
    assert all(r["answer"] == 42 for r in results)
    assert [r["built"] for r in results] == [[str(folder)], [str(folder)]]  # both compiled, at the same time
    # One complete build in its keyed folder, no scratch folder left behind.
    assert sorted(p.name for p in root.iterdir()) == [folder.name]
    assert (folder / "glm_probe.so").is_file()

    # A later process imports that build without compiling.
    late = run_builder(source, rendezvous, "late", env)
    out, err = late.communicate(timeout=300)
    assert late.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["answer"] == 42 and result["built"] == [] and result["file"] == str(folder / "glm_probe.so")


def test_the_build_key_follows_sources_flags_torch_and_the_interpreter(tmp_path, monkeypatch):
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE_SOURCE)
    key = cpu_compiled.build_key([source], ["-O1"])
    assert cpu_compiled.build_key([source], ["-O1"]) == key  # stable
    assert cpu_compiled.build_key([source], ["-O2"]) != key
    source.write_text(PROBE_SOURCE + "// changed\n")
    assert cpu_compiled.build_key([source], ["-O1"]) != key
    source.write_text(PROBE_SOURCE)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert cpu_compiled.build_key([source], ["-O1"]) != key
    monkeypatch.undo()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "another-venv" / "bin" / "python"))
    assert cpu_compiled.build_key([source], ["-O1"]) != key
    monkeypatch.undo()
    # The same inputs in another checkout share the build (the key is of the bytes, not of the path).
    copy = tmp_path / "elsewhere" / "probe.cpp"
    copy.parent.mkdir()
    copy.write_text(PROBE_SOURCE)
    assert cpu_compiled.build_key([copy], ["-O1"]) == key


def test_the_kernels_are_built_in_their_keyed_folder_under_torch_extensions_dir(compiled_cpu_kernels):
    assert compiled_cpu_kernels is not None, cpu_compiled.build_error()
    folder = cpu_compiled.build_dir(cpu_compiled.NAME, cpu_compiled.SOURCES, cpu_compiled.CFLAGS, cpu_compiled.HEADERS)
    assert folder.parent == Path(os.environ["TORCH_EXTENSIONS_DIR"])  # tests/conftest.py's folder
    assert (folder / f"{cpu_compiled.NAME}.so").is_file()
    assert cpu_compiled.building() is None  # built: nothing to wait for


def test_building_says_so_while_it_compiles(tmp_path, monkeypatch, caplog):
    """`building()` (what the server's status shows while the model loads) and one warning in the log, both
    before the compile starts; both gone once it ends, even when it fails."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_compiled, "_module", None)
    monkeypatch.setattr(cpu_compiled, "_error", None)
    seen = []

    def fake_build(name, sources, cflags, folder):
        seen.append((cpu_compiled.building(), [r.getMessage() for r in caplog.records]))
        raise RuntimeError("error: no compiler in this test")

    monkeypatch.setattr(cpu_compiled, "_build", fake_build)
    with caplog.at_level("WARNING", logger="glm_kernels.cpu_compiled"):
        assert cpu_compiled.load() is None
    [(message, logged)] = seen
    assert message == cpu_compiled.BUILD_MESSAGE == "compiling CPU kernels, about a minute, once per machine"
    assert any(line.startswith(cpu_compiled.BUILD_MESSAGE) and str(tmp_path) in line for line in logged), logged
    assert cpu_compiled.building() is None
    assert "no compiler in this test" in cpu_compiled.build_error()


def test_a_killed_build_leaves_nothing_that_stops_the_next(tmp_path, monkeypatch):
    """A day-old scratch folder of a killed build goes; a build folder without its library is built anew."""
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE_SOURCE)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    folder = cpu_compiled.build_dir("glm_probe_left", [source], ["-O1"])
    stale = folder.parent / f".{folder.name}.building-x"
    for leftover in (folder, stale):
        leftover.mkdir(parents=True)
        (leftover / "build.ninja").write_text("")
    os.utime(stale, (0, 0))
    process = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""\
        from pathlib import Path
        from glm_kernels import cpu_compiled
        print(cpu_compiled.load_extension("glm_probe_left", [Path({str(source)!r})], ["-O1"]).answer())
        """)], capture_output=True, text=True, timeout=600)
    assert process.returncode == 0 and process.stdout.strip() == "42", process.stderr[-3000:]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    assert (folder / "glm_probe_left.so").is_file()
