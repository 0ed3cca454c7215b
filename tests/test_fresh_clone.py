"""The project is whole on its own: a clone of this checkout's HEAD into a folder with nothing beside it collects
every test without an error, and nothing in it refers to a folder beside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A folder beside the checkout, as some files once named it (built here so that this file does not name it).
BESIDE = "/".join(["..", "shared"])


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout (or no git): nothing to clone")
    lonely = tmp_path_factory.mktemp("lonely")  # the clone's parent holds the clone and nothing else
    clone = lonely / "glm-workbench"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(clone)], check=True, timeout=300)
    subprocess.run(["git", "checkout", "--quiet", head.stdout.strip()], cwd=clone, check=True, timeout=300)
    assert [p.name for p in lonely.iterdir()] == ["glm-workbench"]
    return clone


def test_a_fresh_clone_collects_every_test(fresh_clone):
    # The clone's own code (not this checkout's, which may be what is installed), and no pytest cache written.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fresh_clone), str(fresh_clone / "kernels")])}
    process = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                             cwd=fresh_clone, env=env, capture_output=True, text=True, timeout=900)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    summary = re.search(r"^(\d+) tests collected( in|, (\d+) errors?)", output, re.M)
    assert summary and summary.group(3) is None, output[-6000:]  # no collection error
    assert int(summary.group(1)) > 500, output[-3000:]
    assert "tests/chat/test_parser.py::" in output and "tests/chat/test_protocol_and_prompt.py::" in output


def test_nothing_in_the_project_reads_a_folder_beside_it(fresh_clone):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=fresh_clone, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    naming = []
    for name in filter(None, tracked):
        if name.endswith(".lock"):
            continue
        text = (fresh_clone / name).read_bytes()
        if BESIDE.encode() in text or BESIDE.replace("/", "\\").encode() in text:
            naming.append(name)
    assert naming == []
    # The fixtures the format tests read are in the project, as the README there says.
    for fixture in ("glm45_chat_format.json", "glm45_output_parsing.json"):
        assert (fresh_clone / "tests" / "fixtures" / fixture).is_file()
    assert "GLM-4.5-Air chat template" in (fresh_clone / "tests" / "fixtures" / "README.md").read_text()
