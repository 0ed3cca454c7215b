"""The one interface every backend offers: OpenAI-shaped chat completions, streamed or whole.

Owns the `Backend` contract and the folding of a chunk stream into a whole completion (with fold.py's
`MessageFold`). A backend is async (it
lives on the server's event loop and keeps heavy work off it); `stream()` is an async generator of
`ChatCompletionChunk`s, and closing it early (`aclose()`, or cancelling the task that iterates it) cancels the
generation. Errors are `APIError`s; one raised before the first chunk is the whole answer, one raised later
ends that stream.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from workbench.chat.fold import MessageFold, ToolCallFragment
from workbench.chat.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    FunctionCallOut,
    ModelCard,
    ResponseMessage,
    ToolCallOut,
)


class Backend(ABC):
    """Where completions come from: the local engine or a remote OpenAI-compatible GLM endpoint."""

    kind: str = "abstract"

    @property
    @abstractmethod
    def model_id(self) -> str:
        """The model name clients send in `model` (and `v1/models` lists)."""

    @abstractmethod
    async def start(self) -> None:
        """Get ready to serve (load the model, open connections). Requests made before it finishes wait."""

    @abstractmethod
    async def close(self) -> None:
        """Release what `start` took; in-flight generations are cancelled."""

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id)]

    @abstractmethod
    def stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """The completion as chunks; leaving the iteration early cancels the generation."""

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletion:
        """The whole completion (cancelling the awaiting task cancels the generation)."""
        return await fold_chunks(self.stream(request))

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """What `api/status` shows: backend, model, state, load, recent throughput."""

    async def count_prompt_tokens(self, request: ChatCompletionRequest) -> int:
        """The tokens of the prompt this request renders to (Anthropic's count_tokens)."""
        raise APIError(400, f"Counting tokens needs the model's tokenizer, and this server's {self.kind} backend "
                            "has none here: count with the endpoint that serves the model.",
                       code="count_tokens_unsupported")

    def routing_trace(self, completion_id: str) -> dict[str, Any] | None:
        """The routing trace of a recent completion made with `"routing": true`, when this backend keeps them."""
        return None

    def check_model(self, request: ChatCompletionRequest) -> None:
        if request.model != self.model_id:
            raise APIError(404, f"The model {request.model!r} does not exist here: this server serves "
                                f"{self.model_id!r} (see GET v1/models).", param="model", code="model_not_found")


async def fold_chunks(chunks: AsyncIterator[ChatCompletionChunk]) -> ChatCompletion:
    """Fold a chunk stream into the completion a non-streaming request returns (what a client does)."""
    completion_id, model, created = "", "", int(time.time())
    usage = stop_reason = None
    fold = MessageFold()
    try:
        async for chunk in chunks:
            completion_id, model, created = chunk.id, chunk.model, chunk.created
            usage = chunk.usage or usage
            for choice in chunk.choices:
                delta = choice.delta
                fragments = [ToolCallFragment(call.index, call.id, call.function and call.function.name,
                                              call.function and call.function.arguments)
                             for call in delta.tool_calls or []]
                fold.add(delta.reasoning_content, delta.content, fragments, choice.finish_reason)
                stop_reason = choice.stop_reason if choice.stop_reason is not None else stop_reason
    finally:
        await chunks.aclose()
    tool_calls = [ToolCallOut(id=c["id"] or f"call_{c['index']}",
                              function=FunctionCallOut(name=c["name"], arguments=c["arguments"]))
                  for c in fold.tool_calls]
    message = ResponseMessage(content=fold.content, reasoning_content=fold.reasoning_content,
                              tool_calls=tool_calls or None)
    return ChatCompletion(id=completion_id, model=model, created=created, usage=usage,
                          choices=[Choice(message=message, finish_reason=fold.finish_reason, stop_reason=stop_reason)])


class Throughput:
    """Tokens per second over a sliding window: the `recent tok/s` that `api/status` shows."""

    def __init__(self, window_seconds: float = 10.0) -> None:
        self.window = window_seconds
        self.events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int) -> None:
        now = time.monotonic()
        self.events.append((now, tokens))
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self.events if t >= now - self.window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return round(sum(n for _, n in recent) / span, 2)
