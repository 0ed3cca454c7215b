"""Messages -> GLM-4.5 prompt text: the one entry point every layer uses to build a prompt.

Owns nothing of the format itself: the template lives in `workbench.engine.chat_template` (shared with the
engine's tokenizer, so there is one renderer). This module accepts OpenAI-style messages and tools as dicts
or as the protocol's pydantic models, and turns template failures into `APIError`s.

`prompt_ids` is how a server tokenizes a prompt: text inside a message is text (a user's `<|assistant|>` is
characters, never the role token), special tokens come only from the template (`Tokenizer.encode_chat`).
"""

from __future__ import annotations

from typing import Any

from workbench.chat.protocol import APIError
from workbench.engine.chat_template import ChatTemplateError, render_chat


def _plain(items: list[Any] | None) -> list[dict[str, Any]] | None:
    if items is None:
        return None
    return [item.model_dump(exclude_none=True) if hasattr(item, "model_dump") else item for item in items]


def render_prompt(messages: list[Any], tools: list[Any] | None = None, enable_thinking: bool = True,
                  add_generation_prompt: bool = True, template: str | None = None) -> str:
    """The prompt string for `messages` (and `tools`), byte for byte what the official template renders.

    `template`: a checkpoint's own chat template (jinja); default GLM-4.5's.
    """
    try:
        return render_chat(_plain(messages) or [], tools=_plain(tools) or None, enable_thinking=enable_thinking,
                           add_generation_prompt=add_generation_prompt, template=template)
    except ChatTemplateError as exc:
        raise APIError(400, f"messages cannot be rendered into a GLM-4.5 prompt: {exc}", param="messages",
                       code="invalid_messages") from exc


def prompt_ids(tokenizer: Any, messages: list[Any], tools: list[Any] | None = None, enable_thinking: bool = True,
               suffix: str = "") -> tuple[str, list[int]]:
    """The prompt string (plus `suffix`, text the server forces after the generation prompt) and its token ids,
    with token strings inside messages and tools encoded as plain text; the tokenizer's own chat template."""
    try:
        return tokenizer.encode_chat(_plain(messages) or [], _plain(tools) or None, enable_thinking=enable_thinking,
                                     suffix=suffix)
    except ChatTemplateError as exc:
        raise APIError(400, f"messages cannot be rendered into a GLM-4.5 prompt: {exc}", param="messages",
                       code="invalid_messages") from exc
