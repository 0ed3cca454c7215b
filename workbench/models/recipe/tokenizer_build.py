"""The bundled model's tokenizer: a byte-level BPE trained with `tokenizers`, with GLM-4.5's special tokens.

Owns the tokenizer files of a checkpoint folder: `tokenizer.json`, `tokenizer_config.json` (with the GLM-4.5
chat template) and `generation_config.json` (the stop ids). Every token of GLM45_FORMAT.md section 2 is one added
token that the BPE never splits. As in the real GLM-4.5 tokenizer, the control tokens (roles, `[gMASK]`, `<sop>`,
end of text) are marked special, while the markup the output parsers read (`<think>`, `<tool_call>`, `<arg_key>`,
`/nothink`, ...) is not, so a decode that skips special tokens still shows reasoning and tool calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from workbench.chat.template import GLM45_CHAT_TEMPLATE

# GLM45_FORMAT.md section 2, in the order of their ids in the real vocabulary.
CONTROL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                 "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink")
ALL_ADDED_TOKENS = CONTROL_TOKENS + MARKUP_TOKENS
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6144, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids (added tokens included) trained on `texts`."""
    if vocab_size < 256 + len(ALL_ADDED_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs the 256 bytes, "
                         f"{len(ALL_ADDED_TOKENS)} added tokens and at least one merge")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: code is whitespace-sensitive and text must round-trip byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # The markup tokens are added after training: leave room so the total is exactly vocab_size.
        vocab_size=vocab_size - len(MARKUP_TOKENS), min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS],
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The markup tokens go in after training, so they take ids but never take part in merges.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False, lstrip=False,
                                     rstrip=False) for t in MARKUP_TOKENS])
    if tokenizer.get_vocab_size() > vocab_size:  # pragma: no cover - tokenizers guarantees the bound
        raise RuntimeError(f"trained vocabulary has {tokenizer.get_vocab_size()} ids, more than {vocab_size}")
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    added = tokenizer.get_added_tokens_decoder()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())
        },
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": [t for t in CONTROL_TOKENS if t != "<|endoftext|>"],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": GLM45_CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tokenizer, model_max_length), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")
    stop_ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    generation = {"eos_token_id": stop_ids, "pad_token_id": stop_ids[0], "do_sample": False,
                  "_from_model_config": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
