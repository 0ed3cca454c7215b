"""Tokenizer: `tokenizers` over the checkpoint's tokenizer.json, its special tokens, stop ids and chat template text.

Owns text <-> token ids (`encode`; `encode_text`, which reads every added token's string as plain text;
`encode_with_offsets`), the stop ids, the chat template text the checkpoint ships (GLM-4.5's when it ships none), and
incremental detokenisation for streaming. Reads tokenizer_config.json and generation_config.json.

Renders nothing: messages become a prompt in the chat layer (`workbench.chat.render_prompt`, and
`workbench.chat.prompt.encode_chat` for the ids, with text inside messages kept as text). Importing
`workbench.chat` gives this class Hugging Face's `apply_chat_template` (and `encode_chat`) as a thin
convenience that calls those functions.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from workbench.engine.glm45_template import GLM45_CHAT_TEMPLATE

# The tokens that end a GLM-4.5 turn (GLM45_FORMAT.md section 2), used when generation_config.json is absent.
GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


class TokenizerError(ValueError):
    """A checkpoint whose tokenizer files are missing or unusable."""


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 stop_token_ids: list[int] | None = None, special_tokens: dict[str, int] | None = None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template or GLM45_CHAT_TEMPLATE  # the checkpoint's own, else GLM-4.5's (text)
        self.special_tokens = special_tokens or {}
        if stop_token_ids is None:
            stop_token_ids = [i for t in GLM_STOP_TOKENS if (i := tokenizer.token_to_id(t)) is not None]
        self.stop_token_ids = list(stop_token_ids)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}: the engine needs the checkpoint's fast tokenizer "
                                 "(copy tokenizer.json, tokenizer_config.json from the model's repository)")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path} could not be read: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        special = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()
                   if isinstance(t, dict) and t.get("special") and "content" in t}
        stop_ids = generation.get("eos_token_id")
        if isinstance(stop_ids, int):
            stop_ids = [stop_ids]
        if stop_ids is None and isinstance(config.get("eos_token"), str):
            eos = tokenizer.token_to_id(config["eos_token"])
            extra = [i for t in GLM_STOP_TOKENS if (i := tokenizer.token_to_id(t)) is not None]
            stop_ids = sorted({*extra, *([eos] if eos is not None else [])}) or None
        return cls(tokenizer, template, stop_ids, special)

    # --- ids <-> text -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def added_tokens(self) -> dict[str, int]:
        """Every added token (special or not: role tokens, `<think>`, `<tool_call>`, ...) by its text."""
        return {token.content: token_id for token_id, token in self._tok.get_added_tokens_decoder().items()}

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token of the model's vocabulary stands for (added tokens aside).

        A text of n characters is at least n / max_token_chars tokens: a bound checked before tokenizing.
        """
        return max((len(token) for token in self._tok.get_vocab(with_added_tokens=False)), default=1) or 1

    @cached_property
    def longest_token_chars(self) -> int:
        """The most characters any one token stands for, added tokens included: a text of n characters is at
        least n / longest_token_chars tokens however it is tokenized."""
        return max(self.max_token_chars, *(len(token) for token in self.added_tokens or [""]))

    @cached_property
    def _text_tokenizer(self) -> HFTokenizer:
        # The same tokenizer with every added token marked special and special tokens encoded as text: added
        # tokens are then never matched, only the model's vocabulary is.
        data = json.loads(self._tok.to_str())
        for token in data.get("added_tokens") or []:
            token["special"] = True
        plain = HFTokenizer.from_str(json.dumps(data))
        plain.encode_special_tokens = True
        return plain

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with every added token's string read as plain text (`<|user|>` is `<|`, `user`, `|>`)."""
        return self._text_tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """(id, start, end) of each token of `text`, where text[start:end] is what the token stands for: added
        tokens are matched as single ids (as `encode` does). The chat layer's safe prompt tokenization
        (`workbench.chat.prompt.encode_chat`) cuts a rendered prompt at the added tokens the template wrote."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return [(token_id, begin, end) for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True)]

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas, never splitting a multi-byte character.

    Decodes a short window (the last few ids before the pending ones, for context-dependent decoders) and emits
    what extends beyond what that window decoded to; a trailing U+FFFD means a character is incomplete: wait.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._tok.decode(self.ids[self._prefix:self._read])
        new_text = self._tok.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix_text = self._tok.decode(self.ids[self._prefix:self._read])
        new_text = self._tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
