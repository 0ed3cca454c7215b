"""Folding a streamed answer into one message, as a client does: the one place in Python that does it.

`MessageFold.add` takes one delta (reasoning text, answer text, tool-call fragments, a finish reason) and keeps
the message so far: texts appended, tool-call fragments merged by their index (id, name and arguments as they
come), the last finish reason given. The backends' `fold_chunks` (a chunk stream into the whole completion a
non-streaming request returns), the parser's `collect` (parser deltas into a parsed completion) and the magics
(a stream shown as it comes) fold with it. (The browser's `applyChunk`, in TypeScript, is the front end's.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCallFragment:
    """A piece of a streamed tool call: the call at `index` gains `name` and `arguments` text, and `id` if given."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class MessageFold:
    _reasoning: list[str] = field(default_factory=list)
    _content: list[str] = field(default_factory=list)
    _calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def add(self, reasoning_content: str | None = None, content: str | None = None,
            tool_calls: Iterable[ToolCallFragment] = (), finish_reason: str | None = None) -> None:
        """Fold one delta into the message."""
        if reasoning_content:
            self._reasoning.append(reasoning_content)
        if content:
            self._content.append(content)
        for call in tool_calls:
            slot = self._calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = call.id or slot["id"]
            slot["name"] += call.name or ""
            slot["arguments"] += call.arguments or ""
        self.finish_reason = finish_reason or self.finish_reason

    def add_delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> None:
        """Fold one delta in the API's JSON shape (a chunk's `choices[i].delta`, or a whole `message`)."""
        fragments = []
        for position, call in enumerate(delta.get("tool_calls") or []):
            function = call.get("function") or {}
            fragments.append(ToolCallFragment(call.get("index", position), call.get("id"), function.get("name"),
                                              function.get("arguments")))
        self.add(delta.get("reasoning_content"), delta.get("content"), fragments, finish_reason)

    @property
    def reasoning_content(self) -> str | None:
        """The thinking so far; None when there is none."""
        return "".join(self._reasoning) or None

    @property
    def content(self) -> str | None:
        """The answer so far; None when there is none."""
        return "".join(self._content) or None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls so far in index order, each {"index", "id" (None until one came), "name", "arguments"}."""
        return [{"index": index, **call} for index, call in sorted(self._calls.items())]
