"""The labextension's unit tests (vitest: SSE parsing with chunks split mid-event, message state, tool
approval, the chat controller's tool loop and stop, routing-panel numbers, failure states), run from pytest so
that CI counts them. Needs labextension/node_modules (`pip install -e .` or `cd labextension && jlpm install`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

LABEXTENSION = Path(__file__).resolve().parents[2] / "labextension"


def test_frontend_unit_tests_pass():
    if shutil.which("jlpm") is None or not (LABEXTENSION / "node_modules" / "vitest").is_dir():
        reason = "the labextension's node packages are not installed: cd labextension && jlpm install"
        if os.environ.get("GLM_UI_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(["jlpm", "test"], cwd=LABEXTENSION, capture_output=True, text=True, timeout=600)
    print(result.stdout[-10000:], result.stderr[-3000:])
    assert result.returncode == 0, f"vitest failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout
