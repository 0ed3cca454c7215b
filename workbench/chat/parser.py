"""GLM-4.5 model output -> OpenAI-style message: reasoning, content and tool calls, streamed or whole.

Owns the output format's parsing rules (GLM45_FORMAT.md section 4, `fixtures/glm45_output_parsing.json`):

- `<think>...</think>` (only at the very start of the output, after whitespace) is `reasoning_content`; when
  `</think>` never comes the reasoning runs to the first `<tool_call>` (if tools were offered) or to the end.
- `<tool_call>NAME\\n(<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n)*</tool_call>` for an offered function
  becomes a tool call; its values are typed by the function's JSON schema (a `string` property stays raw,
  anything else is JSON-decoded and kept raw when that fails). Without offered tools `<tool_call>` is not a tag.
- A call to an unknown function, a malformed call and a call cut off by the end of the output are content, raw:
  a half tool call is never emitted (clients show such a block as an unusable call, not as tags).
- When tools were offered, stray pieces of call markup outside a call (`</tool_call>`, `<arg_key>`,
  `</arg_value>`, ... with no `<tool_call>` before them: a small model loses track of the format) are dropped from
  the reasoning and the content, so they never show as raw tags; the text between them stays.
- Reasoning and content are stripped of surrounding whitespace.

There is one state machine, `OutputParser`; `parse_completion` feeds it the whole text at once, so the
streamed and the non-streamed results agree by construction for every way of cutting the output. The
streaming parser holds back a partial tag (`</thi`) and trailing whitespace until it knows what they are.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from workbench.chat.fold import MessageFold

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# call markup that means nothing outside `<tool_call>...</tool_call>`: dropped there when tools were offered
STRAY_TAGS = (CALL_CLOSE, "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")

# name, then argument pairs separated only by whitespace; values may hold anything but their closing tag.
_CALL_NAME = re.compile(r"\s*([^\s<]+)\s*", re.DOTALL)
_ARG_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)


@dataclass
class ParsedToolCall:
    """A complete tool call: the function name and its typed arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass
class ParserDelta:
    """One piece of streamed output: exactly one of the three fields is set."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_call: ParsedToolCall | None = None


@dataclass
class ParsedCompletion:
    """The whole message: what `parse_completion` returns."""

    reasoning_content: str | None
    content: str | None
    tool_calls: list[ParsedToolCall]
    finish_reason: str  # "tool_calls" | "length" | "stop"


def tool_schemas(tools: list[Any] | None) -> dict[str, dict[str, Any]]:
    """{function name: its JSON-schema `properties`} for OpenAI-style tool definitions (dicts or pydantic)."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump(exclude_none=True)
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        name = function.get("name")
        if isinstance(name, str) and name:
            parameters = function.get("parameters") or {}
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            schemas[name] = properties if isinstance(properties, dict) else {}
    return schemas


def _is_string_typed(prop: Any) -> bool:
    if not isinstance(prop, dict):
        return False
    kind = prop.get("type")
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


def _typed_value(raw: str, prop: Any) -> Any:
    if _is_string_typed(prop):
        return raw
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        return raw  # validating it is the caller's job; the model's text is passed on unchanged


def parse_tool_call(body: str, schemas: dict[str, dict[str, Any]]) -> ParsedToolCall | None:
    """The call in `body` (the text between `<tool_call>` and `</tool_call>`), or None when it is not a call
    to an offered function in the expected shape."""
    name_match = _CALL_NAME.match(body)
    if not name_match or name_match.group(1) not in schemas:
        return None
    name = name_match.group(1)
    properties = schemas[name]
    arguments: dict[str, Any] = {}
    position = name_match.end()
    while position < len(body):
        pair = _ARG_PAIR.match(body, position)
        if not pair:
            return None  # stray text between arguments: not the format, so not a call
        key = pair.group(1).strip()
        arguments[key] = _typed_value(pair.group(2), properties.get(key))
        position = pair.end()
    return ParsedToolCall(name=name, arguments=arguments)


def _held_prefix_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`: text to hold back."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest


class _StrippedField:
    """Streams one text field so that the concatenation equals the whole field `.strip()`ped: leading
    whitespace is dropped, trailing whitespace is held until more text shows it was inner whitespace."""

    def __init__(self) -> None:
        self.started = False
        self.pending_whitespace = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending_whitespace + text
        visible = text.rstrip()
        self.pending_whitespace = text[len(visible):]
        return visible


class OutputParser:
    """Streaming parser: `feed(chunk)` returns the deltas that chunk completes, `finish()` flushes the rest.

    `finish_reason` is set by `finish`. Deltas carry reasoning text, content text or one whole tool call.
    """

    _START, _THINK, _CONTENT, _CALL = "start", "think", "content", "call"

    def __init__(self, tools: list[Any] | None = None) -> None:
        self.schemas = tool_schemas(tools)
        self.state = self._START
        self.buffer = ""
        self.reasoning = _StrippedField()
        self.content = _StrippedField()
        self.tool_calls: list[ParsedToolCall] = []
        self.finish_reason: str | None = None
        self._finished = False

    # The tags each state looks for; `<tool_call>` is a tag only when there are tools to call.
    def _tags(self) -> tuple[str, ...]:
        call = (CALL_OPEN, *STRAY_TAGS) if self.schemas else ()
        if self.state == self._THINK:
            return (THINK_CLOSE, *call)
        if self.state == self._CONTENT:
            return call
        return (CALL_CLOSE,)

    def feed(self, chunk: str) -> list[ParserDelta]:
        if self._finished:
            raise RuntimeError("OutputParser.feed() after finish(): make a new parser for a new output")
        self.buffer += chunk
        deltas: list[ParserDelta] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self, truncated: bool = False) -> list[ParserDelta]:
        """Flush what was held back. `truncated`: generation stopped at max_tokens (the text cannot tell)."""
        if self._finished:
            return []
        deltas: list[ParserDelta] = []
        if self.state == self._START:
            self._emit_content(self.buffer, deltas)
        elif self.state == self._THINK:
            self._emit_reasoning(self.buffer, deltas)
        elif self.state == self._CONTENT:
            self._emit_content(self.buffer, deltas)
        else:  # an unclosed call: its raw text is content, never half a tool call
            self._emit_content(CALL_OPEN + self.buffer, deltas)
        self.buffer = ""
        self._finished = True
        self.finish_reason = "tool_calls" if self.tool_calls else ("length" if truncated else "stop")
        return deltas

    def _emit_reasoning(self, text: str, deltas: list[ParserDelta]) -> None:
        visible = self.reasoning.push(text)
        if visible:
            deltas.append(ParserDelta(reasoning_content=visible))

    def _emit_content(self, text: str, deltas: list[ParserDelta]) -> None:
        visible = self.content.push(text)
        if visible:
            deltas.append(ParserDelta(content=visible))

    def _step(self, deltas: list[ParserDelta]) -> bool:
        """Consume what the buffer settles; True when the state changed and the buffer should be looked at again."""
        if self.state == self._START:
            stripped = self.buffer.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.buffer = stripped[len(THINK_OPEN):]
                self.state = self._THINK
                return True
            if THINK_OPEN.startswith(stripped):
                return False  # whitespace or a partial `<think>`: wait for more
            self.state = self._CONTENT
            return True

        tags = self._tags()
        found = [(self.buffer.find(tag), tag) for tag in tags]
        found = [(index, tag) for index, tag in found if index >= 0]
        if not found:
            if self.state == self._CALL:
                return False  # a call is held whole until it closes
            keep = _held_prefix_length(self.buffer, tags)
            settled, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
            if self.state == self._THINK:
                self._emit_reasoning(settled, deltas)
            else:
                self._emit_content(settled, deltas)
            return False

        index, tag = min(found)
        before, self.buffer = self.buffer[:index], self.buffer[index + len(tag):]
        if tag in STRAY_TAGS and self.state != self._CALL:  # stray call markup: keep the text, drop the tag
            if self.state == self._THINK:
                self._emit_reasoning(before, deltas)
            else:
                self._emit_content(before, deltas)
            return True
        if self.state == self._THINK:
            self._emit_reasoning(before, deltas)
            self.state = self._CALL if tag == CALL_OPEN else self._CONTENT
        elif self.state == self._CONTENT:
            self._emit_content(before, deltas)
            self.state = self._CALL
        else:
            call = parse_tool_call(before, self.schemas)
            if call is None:
                self._emit_content(CALL_OPEN + before + CALL_CLOSE, deltas)
            else:
                self.tool_calls.append(call)
                deltas.append(ParserDelta(tool_call=call))
            self.state = self._CONTENT
        return True


def collect(deltas: list[ParserDelta], finish_reason: str) -> ParsedCompletion:
    """Fold streamed deltas into the whole message (what a client does with a stream; fold.py's `MessageFold`
    joins the texts, and each delta's tool call is whole)."""
    fold = MessageFold()
    for delta in deltas:
        fold.add(delta.reasoning_content, delta.content)
    return ParsedCompletion(reasoning_content=fold.reasoning_content, content=fold.content,
                            tool_calls=[d.tool_call for d in deltas if d.tool_call], finish_reason=finish_reason)


def parse_completion(text: str, tools: list[Any] | None = None, truncated: bool = False) -> ParsedCompletion:
    """Parse one whole model output. `truncated`: generation stopped at max_tokens."""
    parser = OutputParser(tools)
    deltas = parser.feed(text) + parser.finish(truncated=truncated)
    return collect(deltas, parser.finish_reason or "stop")
