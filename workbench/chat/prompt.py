"""Messages -> GLM-4.5 prompt: the one way every layer builds a prompt (the server, the magics, the CLI).

`render_prompt` gives the prompt text and `prompt_ids` the text and its token ids, both with `APIError`s for
messages that cannot be rendered; they accept OpenAI-style messages and tools as dicts or as the protocol's
pydantic models. The renderer is template.py's; the template text is the checkpoint's own when it ships one, else
GLM-4.5's (`Tokenizer.chat_template` holds whichever).

`encode_chat` is how a prompt is tokenized: text inside a message is text (a user who writes `<|assistant|>` or
`</tool_response>` gets the characters, never the token id); special and added tokens come only from the
template. Each message's token strings are swapped for unique placeholders, the template renders the escaped
messages, and the prompt is cut at the token strings the template itself wrote: each piece between them is
encoded with every added token read as plain text. A prompt with no token strings in its messages tokenizes
exactly as `encode(rendered prompt)` does.

The engine renders nothing (it knows no messages); importing this module gives its `Tokenizer` Hugging Face's
`apply_chat_template` and `encode_chat` as thin conveniences that call the functions here.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from workbench.chat.protocol import APIError
from workbench.chat.template import ChatTemplateError, normalize_messages, render_chat
from workbench.engine.tokenizer import Tokenizer


def _plain(items: list[Any] | None) -> list[dict[str, Any]] | None:
    if items is None:
        return None
    return [item.model_dump(exclude_none=True) if hasattr(item, "model_dump") else item for item in items]


def render_prompt(messages: list[Any], tools: list[Any] | None = None, enable_thinking: bool = True,
                  add_generation_prompt: bool = True, template: str | None = None) -> str:
    """The prompt string for `messages` (and `tools`), byte for byte what the official template renders.

    `template`: a checkpoint's own chat template (jinja, e.g. `Tokenizer.chat_template`); default GLM-4.5's.
    """
    try:
        return render_chat(_plain(messages) or [], tools=_plain(tools) or None, enable_thinking=enable_thinking,
                           add_generation_prompt=add_generation_prompt, template=template)
    except ChatTemplateError as exc:
        raise APIError(400, f"messages cannot be rendered into a GLM-4.5 prompt: {exc}", param="messages",
                       code="invalid_messages") from exc


def prompt_ids(tokenizer: Tokenizer, messages: list[Any], tools: list[Any] | None = None,
               enable_thinking: bool = True, suffix: str = "") -> tuple[str, list[int]]:
    """The prompt string (plus `suffix`, text the server forces after the generation prompt) and its token ids,
    with token strings inside messages and tools encoded as plain text; the tokenizer's own chat template."""
    try:
        return encode_chat(tokenizer, _plain(messages) or [], _plain(tools) or None, enable_thinking=enable_thinking,
                           suffix=suffix)
    except ChatTemplateError as exc:
        raise APIError(400, f"messages cannot be rendered into a GLM-4.5 prompt: {exc}", param="messages",
                       code="invalid_messages") from exc


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
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
                           add_generation_prompt=add_generation_prompt, template=template or tokenizer.chat_template,
                           **extra) + suffix

    messages = normalize_messages(messages)  # tool-call arguments decoded from JSON once, for every render below
    text = render(messages, tools)
    literals = sorted(tokenizer.added_tokens, key=len, reverse=True)
    if not literals:
        return text, tokenizer.encode(text)
    finder = re.compile("|".join(re.escape(literal) for literal in literals))
    escaper = _Escaper(finder, text)
    escaped_messages = [escaper.message(message) for message in messages]
    escaped_tools = escaper.value(tools) if tools else tools
    if not escaper.swapped:  # no token string in any message: the plain encoding is the same
        return text, tokenizer.encode(text)
    escaped = render(escaped_messages, escaped_tools)
    if escaper.expand(escaped) != text:
        raise ChatTemplateError("this chat template treats special-token text inside a message as structure, "
                                "so the message cannot be tokenized safely: remove the special-token text "
                                "(e.g. '<|assistant|>') from the messages")
    ids: list[int] = []
    start = 0
    template_ids = set(tokenizer.added_tokens.values())
    for token_id, begin, end in tokenizer.encode_with_offsets(escaped):
        if token_id in template_ids:  # a token string the template wrote (message ones are placeholders)
            ids += tokenizer.encode_text(escaper.expand(escaped[start:begin]))
            ids.append(token_id)
            start = end
    ids += tokenizer.encode_text(escaper.expand(escaped[start:]))
    return text, ids


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                        tools: list[dict[str, Any]] | None = None, enable_thinking: bool = True,
                        add_generation_prompt: bool = True, tokenize: bool = True, **extra: Any) -> list[int] | str:
    """Hugging Face's `tokenizer.apply_chat_template`: the prompt's ids (`encode_chat`'s), or with
    `tokenize=False` its text, in the tokenizer's own chat template. Raises ChatTemplateError."""
    if tokenize:
        return encode_chat(tokenizer, messages, tools, enable_thinking=enable_thinking,
                           add_generation_prompt=add_generation_prompt, **extra)[1]
    return render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                       add_generation_prompt=add_generation_prompt, template=tokenizer.chat_template, **extra)


# The thin conveniences on the engine's tokenizer (see the module docstring): `eng.tokenizer.apply_chat_template(...)`
# as with Hugging Face's tokenizers, once the chat layer is imported.
Tokenizer.apply_chat_template = apply_chat_template
Tokenizer.encode_chat = encode_chat


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
