"""`%glm --help`, `%glm help` and `%%glm --help` (with or without a body) print the usage and every option, and
send nothing; an empty `%%glm` cell gets the magic's own message, not IPython's."""

from __future__ import annotations

import pytest
from glm_upstream import SCRIPTED_MODEL
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from workbench.magics import USAGE, empty_glm_cell


def run(shell, code: str):
    with capture_output() as captured:
        result = shell.run_cell(code)
    return result, captured


@pytest.mark.parametrize("cell", [
    "%glm --help", "%glm -h", "%glm help", "%glm",
    "%%glm --help", "%%glm --help\n", "%%glm -h\n\n  \n",
    "%%glm --help\nWrite a function", "%%glm -f markdown --help\nhi",
])
def test_every_way_of_asking_shows_the_usage(shell, cell):
    result, captured = run(shell, cell)
    assert result.success, result.error_in_exec
    out = captured.stdout
    assert out.startswith(USAGE)
    # every option of %%glm, with its meaning, from the parser itself
    for option in ("--format", "--think", "--no-think", "--model", "--temperature", "--max-tokens", "--replace",
                   "--run", "--cells", "--trace", "--no-stream"):
        assert option in out, option
    assert "longest answer, in tokens" in out and "%glm help | --help" in out
    assert "empty" not in captured.stderr and "unknown subcommand" not in captured.stderr


def test_help_sends_nothing(shell, upstream):
    assert shell.run_cell("%glm config api_key_env=").success
    run(shell, f"%glm use remote {upstream.url} {SCRIPTED_MODEL}")
    upstream.requests.clear()
    result, _ = run(shell, "%%glm --help\nWrite a function")
    assert result.success and upstream.requests == []


def test_an_empty_cell_gets_the_magics_own_message(shell):
    result, captured = run(shell, "%%glm -t 0\n")
    assert isinstance(result.error_in_exec, UsageError)
    assert "the prompt is empty" in captured.stderr and "%glm --help shows the usage" in captured.stderr
    assert "Did you mean the line magic" not in captured.stderr


def test_the_transformer_leaves_other_cells_alone():
    for lines in (["%%glm\n", "hi\n"], ["%%glmx --help\n"], ["x = 1\n"], [], ["%%time\n"]):
        assert empty_glm_cell(lines) == lines
    assert empty_glm_cell(["%%glm --help\n", "\n"]) == ["get_ipython().find_cell_magic('glm')('--help', '')\n"]
    assert empty_glm_cell(["  %%glm"]) == ["get_ipython().find_cell_magic('glm')('', '')\n"]
