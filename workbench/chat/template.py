"""The GLM-4.5 chat template and a renderer that runs any checkpoint's template the way Hugging Face does.

Owns `render_chat`, the one renderer: prompt.py builds every prompt with it, in the checkpoint's own template
(`Tokenizer.chat_template`: GLM-4.5's, `workbench.engine.glm45_template`, for a checkpoint that ships none).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workbench.engine.glm45_template import GLM45_CHAT_TEMPLATE

__all__ = ["GLM45_CHAT_TEMPLATE", "ChatTemplateError", "normalize_messages", "render_chat"]

class ChatTemplateError(ValueError):
    """Messages the template cannot render (bad role, malformed tool call arguments, template error)."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Hugging Face's tojson: json.dumps with ensure_ascii off by default, unlike jinja2's own filter.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages as the template expects them: tool-call arguments decoded from JSON strings."""
    if not isinstance(messages, list):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"messages[{i}] must be an object with a 'role'")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise ChatTemplateError(f"messages[{i}].role = {message['role']!r}: expected system, user, assistant "
                                    "or tool")
        calls = message.get("tool_calls")
        if calls:
            message = dict(message, tool_calls=[_decode_call(call, i) for call in calls])
        if message.get("content") is None:
            message = dict(message, content="")
        out.append(message)
    return out


def _decode_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    function = call.get("function", call)
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(f"messages[{index}]: tool call {function.get('name')!r} has arguments that are "
                                    f"not valid JSON ({exc})") from exc
    if not isinstance(arguments, dict):
        raise ChatTemplateError(f"messages[{index}]: tool call arguments must be a JSON object")
    return dict(call, function=dict(function, arguments=arguments))


def render_chat(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    enable_thinking: bool = True,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **extra: Any,
) -> str:
    """Render messages into the prompt string with `template` (default: GLM-4.5's)."""
    compiled = _compile(template or GLM45_CHAT_TEMPLATE)
    try:
        return compiled.render(messages=normalize_messages(messages), tools=tools or None,
                               enable_thinking=enable_thinking, add_generation_prompt=add_generation_prompt,
                               **extra)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, AttributeError) as exc:
        raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from exc
