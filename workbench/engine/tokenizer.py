"""Tokenizer: `tokenizers` over the checkpoint's tokenizer.json, its special tokens, stop ids and chat template.

Owns text <-> token ids, the chat template of the checkpoint (or the workbench's GLM-4.5 template when it has
none), and incremental detokenisation for streaming. Reads tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from workbench.engine.chat_template import GLM45_CHAT_TEMPLATE, render_chat

# The tokens that end a GLM-4.5 turn (GLM45_FORMAT.md section 2), used when generation_config.json is absent.
GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


class TokenizerError(ValueError):
    """A checkpoint whose tokenizer files are missing or unusable."""


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 stop_token_ids: list[int] | None = None, special_tokens: dict[str, int] | None = None) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template or GLM45_CHAT_TEMPLATE
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

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # --- chat ---------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            enable_thinking: bool = True, add_generation_prompt: bool = True,
                            tokenize: bool = True, **extra: Any) -> list[int] | str:
        text = render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                           add_generation_prompt=add_generation_prompt, template=self.chat_template, **extra)
        return self.encode(text) if tokenize else text

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
