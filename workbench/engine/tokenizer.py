"""Tokenizer: `tokenizers` over the checkpoint's tokenizer.json, its special tokens, stop ids and chat template.

Owns text <-> token ids, the chat template of the checkpoint (or the workbench's GLM-4.5 template when it has
none), and incremental detokenisation for streaming. Reads tokenizer_config.json and generation_config.json.

Chat prompts are tokenized so that text inside a message is text (`encode_chat`): a user who writes
`<|assistant|>` or `</tool_response>` gets the characters, never the token id; special and added tokens come
only from the template. Each message's token strings are swapped for unique placeholders, the template renders
the escaped messages, and the prompt is cut at the token strings the template itself wrote: each piece between
them is encoded with every added token read as plain text. A prompt with no token strings in its messages
tokenizes exactly as `encode(rendered prompt)` does.
"""

from __future__ import annotations

import json
import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from workbench.engine.chat_template import GLM45_CHAT_TEMPLATE, ChatTemplateError, render_chat

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

    # --- chat ---------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            enable_thinking: bool = True, add_generation_prompt: bool = True,
                            tokenize: bool = True, **extra: Any) -> list[int] | str:
        if tokenize:
            return self.encode_chat(messages, tools, enable_thinking=enable_thinking,
                                    add_generation_prompt=add_generation_prompt, **extra)[1]
        return render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                           add_generation_prompt=add_generation_prompt, template=self.chat_template, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    enable_thinking: bool = True, add_generation_prompt: bool = True, suffix: str = "",
                    template: str | None = None, **extra: Any) -> tuple[str, list[int]]:
        """The rendered prompt (plus `suffix`, text the server forces after it) and its ids, where token strings
        inside messages and tools are text and only the template's own are tokens.

        The prompt string is exactly what `render_chat` renders. A template that reads token strings inside a
        message as structure (beyond GLM-4.5's own: `<think>...</think>` in an assistant's content, a trailing
        `/nothink` in a user's) cannot be honoured safely: that is a `ChatTemplateError`.
        """
        def render(msgs: list[dict[str, Any]], tool_list: list[dict[str, Any]] | None) -> str:
            return render_chat(msgs, tools=tool_list, enable_thinking=enable_thinking,
                               add_generation_prompt=add_generation_prompt, template=template or self.chat_template,
                               **extra) + suffix

        text = render(messages, tools)
        literals = sorted(self.added_tokens, key=len, reverse=True)
        if not literals:
            return text, self.encode(text)
        finder = re.compile("|".join(re.escape(literal) for literal in literals))
        escaper = _Escaper(finder, text)
        escaped_messages = [escaper.message(message) for message in messages]
        escaped_tools = escaper.value(tools) if tools else tools
        if not escaper.swapped:  # no token string in any message: the plain encoding is the same
            return text, self.encode(text)
        escaped = render(escaped_messages, escaped_tools)
        if escaper.expand(escaped) != text:
            raise ChatTemplateError("this chat template treats special-token text inside a message as structure, "
                                    "so the message cannot be tokenized safely: remove the special-token text "
                                    "(e.g. '<|assistant|>') from the messages")
        ids: list[int] = []
        start = 0
        encoding = self._tok.encode(escaped, add_special_tokens=False)
        template_ids = set(self.added_tokens.values())
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in template_ids:  # a token string the template wrote (message ones are placeholders)
                ids += self.encode_text(escaper.expand(escaped[start:begin]))
                ids.append(token_id)
                start = end
        ids += self.encode_text(escaper.expand(escaped[start:]))
        return text, ids

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class _Escaper:
    """Swaps token strings inside messages for placeholders (`expand` swaps them back), leaving what GLM-4.5's
    template reads as structure: `<think>`/`</think>` in an assistant's content (split off into
    reasoning_content first, as the template would) and a user's trailing `/nothink`."""

    _NOTHINK = "/nothink"

    def __init__(self, finder: re.Pattern[str], rendered: str) -> None:
        self.finder = finder
        nonce = secrets.token_hex(4)
        while nonce in rendered:
            nonce = secrets.token_hex(4)
        self.open, self.close = f"\u27e6{nonce}:", "\u27e7"
        self.placeholder = re.compile(re.escape(self.open) + r"(\d+)" + re.escape(self.close))
        self.literals: list[str] = []
        self.index: dict[str, int] = {}
        self.swapped = False

    def _swap(self, match: re.Match[str]) -> str:
        literal = match.group()
        if literal not in self.index:
            self.index[literal] = len(self.literals)
            self.literals.append(literal)
        self.swapped = True
        return f"{self.open}{self.index[literal]}{self.close}"

    def text(self, value: str) -> str:
        return self.finder.sub(self._swap, value)

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k) if isinstance(k, str) else k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

    def message(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return message
        role, content = message.get("role"), message.get("content")
        if role == "assistant" and not isinstance(message.get("reasoning_content"), str):
            visible = _visible_text(content)
            if "</think>" in visible:  # the template's own split, done here so that both halves are escaped
                reasoning = visible.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                message = dict(message, content=visible.split("</think>")[-1].lstrip("\n"),
                               reasoning_content=reasoning)
        if message.get("tool_calls"):  # arguments sent as JSON text are escaped as the values the template shows
            message = dict(message, tool_calls=[_decoded_call(call) for call in message["tool_calls"]])
        escaped = {key: value if key == "role" else self.value(value) for key, value in message.items()}
        if role == "user" and isinstance(content, str) and content.endswith(self._NOTHINK):
            escaped["content"] = self.text(content[:-len(self._NOTHINK)]) + self._NOTHINK  # GLM's thinking switch
        return escaped

    def expand(self, text: str) -> str:
        if not self.swapped:
            return text
        return self.placeholder.sub(lambda match: self.literals[int(match.group(1))], text)


def _decoded_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call  # the template says what is wrong with it
    return dict(call, function=dict(function, arguments=arguments))


def _visible_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] if isinstance(part, dict) and part.get("type") == "text" else
                       part if isinstance(part, str) else "" for part in content)
    return "" if content is None else str(content)


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
