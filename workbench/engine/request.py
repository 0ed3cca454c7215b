"""A generation in flight and what it gives back: `Request` (its settings, its tokens so far, its place in the KV
cache), `TokenStream` (an iterator over its tokens), `StreamToken` and `GenerationResult`.

Owns the request's state only; the scheduler (scheduler.py) moves it through admission, prefill, decode,
preemption and completion, and the runner (runner.py) reads its tokens and cache blocks.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from workbench.engine.routing import RoutingTrace
from workbench.engine.sampling import SamplingParams
from workbench.engine.stop_strings import StopMatcher

if TYPE_CHECKING:
    from workbench.engine.scheduler import Scheduler


@dataclass
class StreamToken:
    token_id: int
    text: str  # the text this token adds (may be "" while a character or a possible stop string is incomplete)
    index: int  # position among the generated tokens


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    routing: RoutingTrace | None = None
    stop_token_id: int | None = None
    stop_string: str | None = None  # the stop string that ended the text (not part of it)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        """Tokens the model generated: the text's, and the stop token that ended it (as OpenAI's usage counts)."""
        return len(self.token_ids) + (self.stop_token_id is not None)

    @property
    def decode_tokens_per_second(self) -> float:
        """From the first generated token to the last: decode_seconds spans completion_tokens - 1 steps."""
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


_request_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One generation in flight. Its tokens arrive in `events` (StreamToken..., then None)."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    routing: bool = False
    routing_scores: bool = False
    id: int = field(default_factory=lambda: next(_request_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_token_id: int | None = None
    stop_string: str | None = None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # the scheduler's and the runner's state
    blocks: list[int] = field(default_factory=list)  # cache blocks holding its tokens; grows as it generates
    block_table: torch.Tensor | None = None  # blocks as an int32 tensor, for the compiled decode step
    num_cached: int = 0
    generator: torch.Generator | None = None
    decoder: object = None
    routing_chunks: list = field(default_factory=list)
    routing_pending: bool = False  # finished, but its last token still has to go through the model for the trace
    stop_matcher: StopMatcher | None = None  # holds back decoded text that may begin a stop string
    thinking_since: int | None = None  # output position of an open <think> (a thinking budget's count starts there)
    preemptions: int = 0  # times its cache was taken back for older requests (and recomputed on resumption)
    error: BaseException | None = None
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finished_time: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _trace: RoutingTrace | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def token_ids(self) -> list[int]:
        """Every token of the sequence so far: what a prefill after a preemption recomputes."""
        return self.prompt_ids + self.output_ids

    def result(self) -> GenerationResult:
        if not self.finished:
            raise RuntimeError(f"request {self.id} has not finished")
        first = self.first_token_time or self.finished_time
        return GenerationResult(
            token_ids=list(self.output_ids), text=self.text, finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids), routing=self._trace, stop_token_id=self.stop_token_id,
            stop_string=self.stop_string, prefill_seconds=first - self.created,
            decode_seconds=self.finished_time - first,
        )


class TokenStream:
    """Iterator over the tokens of one request; drives the scheduler's steps when no one else does."""

    def __init__(self, scheduler: Scheduler, request: Request) -> None:
        self._scheduler, self.request = scheduler, request

    def __iter__(self) -> Iterator[StreamToken]:
        return self

    def __next__(self) -> StreamToken:
        while True:
            try:
                event = self.request.events.get_nowait()
            except queue.Empty:
                if self.request.finished:  # its end marker was already consumed
                    raise StopIteration from None
                self._scheduler.step_or_wait(self.request)
                continue
            if event is None:
                raise StopIteration
            return event

    def cancel(self) -> None:
        self.request.cancel()

    @property
    def result(self) -> GenerationResult:
        for _ in self:  # drain (a cancelled stream ends at the next step)
            pass
        return self.request.result()
