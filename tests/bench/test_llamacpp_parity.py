"""llama.cpp loads our F32 GGUF export of the bundled model (`python -m workbench export-gguf ... --type f32`) and
decodes the same greedy tokens as our engine in fp32. Skipped where llama-cpp-python (the `bench` extra) is not
installed; the benchmarks (bench/air_slice.py, bench/engine_cpu.py) rely on both sides running one model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")

from bench_scripts import load_bench_script  # noqa: E402

import workbench  # noqa: E402
from workbench.chat.prompt import encode_chat  # noqa: E402
from workbench.engine import Engine  # noqa: E402

BUNDLED = Path(workbench.__file__).resolve().parent / "models" / "glm45-air-mini"
MESSAGES = [
    [{"role": "user", "content": "Write a function that returns the larger of two numbers."}],
    [{"role": "user", "content": "Return the lines of a file without their line endings. /nothink"}],
    [{"role": "system", "content": "You are a careful Python programmer."},
     {"role": "user", "content": "Split a path into its directory and file name."}],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llama_runner():
    return load_bench_script("air_slice").LlamaCpp


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "glm45-air-mini-f32.gguf"
    done = subprocess.run([sys.executable, "-m", "workbench", "export-gguf", str(BUNDLED), str(out), "--type", "f32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_llamacpp_decodes_our_greedy_tokens_from_our_f32_export(f32_gguf, llama_runner):
    engine = Engine.from_pretrained(BUNDLED, dtype="float32")
    llama = llama_runner(f32_gguf, threads=1, n_ctx=512, n_batch=256)
    try:
        assert llama.vocab == engine.config.vocab_size
        for messages in MESSAGES:
            _, prompt = encode_chat(engine.tokenizer, messages)
            ours = list(engine.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                        stop_token_ids=[]).token_ids)
            theirs, _ = llama.greedy(prompt, NEW_TOKENS)
            if theirs != ours:
                # Two fp32 sums in different orders may break a near-tie either way: allowed only where our top two
                # logits are that close, and the comparison stops there (the texts differ from then on).
                step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
                logits = engine.logits(prompt + ours[:step])[-1]
                gap = (logits[ours[step]] - logits[theirs[step]]).item()
                assert 0 <= gap < 1e-3 * logits.abs().max().item(), (
                    f"llama.cpp's greedy token {step} is {theirs[step]}, ours {ours[step]}: our logits differ by "
                    f"{gap:.4f}, not a tie\nours:   {ours}\ntheirs: {theirs}")
    finally:
        llama.close()


def test_llamacpp_tokenizes_text_as_our_tokenizer(f32_gguf, llama_runner):
    engine = Engine.from_pretrained(BUNDLED, dtype="float32")
    llama = llama_runner(f32_gguf, threads=1, n_ctx=256, n_batch=64)
    try:
        for messages in MESSAGES:
            text, _ = encode_chat(engine.tokenizer, messages)
            theirs = llama.llm.tokenize(text.encode(), add_bos=False, special=True)
            assert theirs == engine.tokenizer.encode(text), text
    finally:
        llama.close()
