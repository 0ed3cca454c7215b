"""The bundled model's tokenizer recipe: GLM-4.5 special tokens as single ids, files transformers can read."""

from __future__ import annotations

import json

import pytest

from workbench.models.recipe.tokenizer_build import (
    ALL_ADDED_TOKENS,
    CONTROL_TOKENS,
    MARKUP_TOKENS,
    STOP_TOKENS,
    save_tokenizer,
    train_tokenizer,
)

TEXTS = [
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Experts route tokens.\n",
    "[gMASK]<sop><|user|>\nWrite a function that returns x.<|assistant|>\n<think>It returns x.</think>\n```python"
    "\ndef f(x):\n    return x\n```<|user|>",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=320)


def test_every_glm_token_is_one_id_and_the_vocab_is_exact(tokenizer):
    assert tokenizer.get_vocab_size() == 320
    for token in ALL_ADDED_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False).ids == [tokenizer.token_to_id(token)]
    text = "[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>\n<tool_call>f\n<arg_key>a</arg_key>"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_byte_level_round_trip_of_unseen_scripts(tokenizer):
    text = "Привет, мир! 你好，世界。 tabs\tand  spaces\n\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_markup_survives_a_decode_that_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("<|assistant|>\n<think>r</think>\nA<|user|>").ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\n<think>r</think>\nA"


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_saved_files_load_in_transformers_and_render_the_chat_fixtures(tokenizer, tmp_path,
                                                                     check_chat_fixtures):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tokenizer, tmp_path, model_max_length=1024)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    flags = {entry["content"]: entry["special"] for entry in config["added_tokens_decoder"].values()}
    assert all(flags[t] for t in CONTROL_TOKENS) and not any(flags[t] for t in MARKUP_TOKENS)

    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for rendered in check_chat_fixtures(hf):
        # and the ids are the ones our own tokenizer gives that text
        assert hf.encode(rendered, add_special_tokens=False) == tokenizer.encode(rendered).ids, rendered
