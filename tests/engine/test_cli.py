"""`python -m workbench generate`: streams thinking and answer apart and ends with the speed line."""

from __future__ import annotations

import re

import pytest

from workbench.cli import main


def test_generate_streams_an_answer_and_reports_speed(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Write fizzbuzz", "--max-tokens", "6",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"\[(stop|length): \d+ prompt tokens at [\d.]+ tok/s, \d+ generated at [\d.]+ tok/s\]",
                     captured.out), captured.out
    assert "torch.float32, cpu" in captured.err, captured.err  # dtype auto: float32 on the CPU


def test_generate_rejects_an_unknown_dtype(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--dtype", "int3"])
    assert "invalid choice" in capsys.readouterr().err
