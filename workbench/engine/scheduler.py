"""The scheduler: continuous batching over the paged KV cache, one step at a time.

Owns the queue of waiting requests, the running batch and a request's way through them: admission (its tokens
must fit the free blocks), prefill, one decode token per step, KV blocks on demand, preemption, stop tokens and
stop strings, the text it streams, completion, and the routing trace it leaves. The forward passes are the
runner's (runner.py); sampling is sampling.py's.

KV memory on demand: a request holds cache blocks for the tokens it has, one more block each time it fills its
last. When the pool runs out, the most recently admitted request is preempted: its blocks are freed, it goes back
to the front of the queue, and when it is admitted again one prefill recomputes its prompt and everything it had
generated; its stream goes on with the next token, without a gap or a repeat. The oldest running request always
progresses, so nothing deadlocks, and nothing fails for want of memory.

Failures stay with their owner: a request whose sampling or stop strings fail ends alone with an error; a failure
of the shared forward pass ends the requests of that step, and the next step serves the waiting ones.

Threading: `step()` runs under a lock, so any number of threads may drive it; each step serves every request,
whichever thread runs it. `Request.cancel()` is safe from any thread and takes effect at the next step, which
frees the request's cache blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from workbench.engine.kv_cache import PagedKVCache
from workbench.engine.request import Request, StreamToken
from workbench.engine.routing import RoutingTrace
from workbench.engine.runner import TorchRunner
from workbench.engine.sampling import close_thinking_at_budget, sample

log = logging.getLogger(__name__)

PREFILL_TOKENS_PER_STEP = 8192  # bounds the pause a step's prefill makes the running requests see


class Scheduler:
    def __init__(self, cache: PagedKVCache, runner: TorchRunner, max_batch_size: int,
                 make_trace: Callable[[Request], RoutingTrace]) -> None:
        self.cache, self.runner, self.max_batch_size = cache, runner, max_batch_size
        self._make_trace = make_trace
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in order of admission: the last is the first to be preempted
        self.preemptions = 0
        self._step_lock = threading.Lock()
        self._admit_lock = threading.Lock()
        self._progress = threading.Condition()

    # --- the queue ----------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        with self._admit_lock:
            self._waiting.append(request)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_preempted(self) -> int:
        """Requests waiting to resume after a preemption."""
        with self._admit_lock:
            return sum(1 for r in self._waiting if r.output_ids)

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    # --- the step -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> int:
        """Admit waiting requests, prefill them, then decode one token for every running request.

        Returns the number of tokens produced.
        """
        with self._step_lock:
            try:
                self._drop_cancelled()
                admitted = self._admit()
                produced = self._prefill(admitted) if admitted else 0
                decoding = self._reserve_decode_slots([r for r in self._running if r not in admitted])
                produced += self._decode(decoding) if decoding else 0
            except BaseException as exc:
                self._fail_all(exc)
                raise
            finally:
                with self._progress:
                    self._progress.notify_all()
            return produced

    def step_or_wait(self, request: Request) -> None:
        """Run a step if no other thread is; otherwise wait until one finishes."""
        if self._step_lock.acquire(blocking=False):
            self._step_lock.release()
            if not request.finished and request.events.empty():
                self.step()
        else:
            with self._progress:
                self._progress.wait(timeout=0.05)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._running if r.cancelled and not r.finished]:
            self._finish(request, "cancelled")
        with self._admit_lock:
            cancelled = [r for r in self._waiting if r.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
        for request in cancelled:
            self._finish(request, "cancelled")

    # --- KV blocks: admission, growth, preemption ---------------------------------------------------------------------
    def _admit(self) -> list[Request]:
        """Admit waiting requests (preempted ones first) while their tokens, and the next token's slot, fit in the
        free blocks left after this step's decode takes what the running requests need."""
        admitted, budget = [], PREFILL_TOKENS_PER_STEP
        growing = sum(1 for r in self._running if self._blocks_to_write_next(r) > len(r.blocks))
        with self._admit_lock:
            while self._waiting and len(self._running) < self.max_batch_size:
                request = self._waiting[0]
                rows = len(request.token_ids)
                if admitted and rows > budget:
                    break
                # Nothing running: the first request always fits (a request's tokens never exceed max_context,
                # which the pool holds), so the queue cannot stall.
                if self.cache.blocks_for(rows + 1) + growing > self.cache.num_free_blocks and self._running:
                    break
                self._waiting.popleft()
                request.blocks = self.cache.allocate(rows)
                budget -= rows
                admitted.append(request)
                self._running.append(request)
        return admitted

    def _blocks_to_write_next(self, request: Request) -> int:
        """Blocks a running request needs for the token its next decode step writes (at position num_cached)."""
        return self.cache.blocks_for(request.num_cached + 1)

    def _reserve_decode_slots(self, decoding: list[Request]) -> list[Request]:
        """Give each decoding request the block its next token needs, oldest first; when the pool is empty,
        preempt the most recently admitted request until it is not. Returns the requests still running."""
        for request in decoding:
            while request in self._running and self._blocks_to_write_next(request) > len(request.blocks):
                if self.cache.num_free_blocks:
                    request.blocks += self.cache.allocate(1)
                    request.block_table = None
                else:
                    self._preempt(self._running[-1])
        return [r for r in decoding if r in self._running]

    def _preempt(self, request: Request) -> None:
        """Take a running request's cache back and queue it first in line; its next admission recomputes it."""
        self._running.remove(request)
        self.cache.free(request.blocks)
        request.blocks, request.block_table, request.num_cached = [], None, 0
        request.routing_chunks.clear()  # the recomputing prefill records the routing of every token again
        request.preemptions += 1
        self.preemptions += 1
        with self._admit_lock:
            self._waiting.appendleft(request)
        log.info("KV cache full: request %d preempted after %d tokens (it resumes when blocks free up)",
                 request.id, len(request.output_ids))

    # --- forward passes and their tokens ---------------------------------------------------------------------------
    def _prefill(self, requests: list[Request]) -> int:
        logits = self.runner.prefill(requests)
        for request in requests:
            request.num_cached = len(request.token_ids)
        routed = [r for r in requests if r.routing_pending]
        for request in routed:  # resumed only to route its last token: its generation was already complete
            request.routing_pending = False
            self._complete(request)
        live = [i for i, r in enumerate(requests) if r not in routed]
        return self._emit([requests[i] for i in live], logits[live])

    def _decode(self, requests: list[Request]) -> int:
        logits = self.runner.decode(requests)
        for request in requests:
            request.num_cached += 1
        flushed = [r for r in requests if r.routing_pending]
        for request in flushed:  # this step only routed its last token: its generation was already complete
            request.routing_pending = False
            self._complete(request)
        live = [i for i, r in enumerate(requests) if not r.finished and r not in flushed]
        return self._emit([requests[i] for i in live], logits[live])

    def _emit(self, requests: list[Request], logits: torch.Tensor) -> int:
        if not requests:
            return 0
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        now = time.perf_counter()
        for request, token in zip(requests, tokens):
            try:
                if isinstance(token, Exception):
                    raise token
                if request.params.thinking_budget is not None:
                    token = self._budgeted(request, token)
                self._accept(request, token, now)
            except Exception as exc:  # this request's own failure: it ends alone, the batch goes on
                self._fail(request, exc)
        return len(tokens)

    @staticmethod
    def _budgeted(request: Request, token: int) -> int:
        """The sampled token, or `</think>` where the request's thinking budget is spent; tracks where the
        reasoning opened so each step's check is O(1)."""
        token = close_thinking_at_budget(request.params, request.thinking_since, len(request.output_ids), token)
        if token == request.params.think_open_id:
            request.thinking_since = len(request.output_ids)
        elif token == request.params.think_close_id:
            request.thinking_since = None
        return token

    def _accept(self, request: Request, token: int, now: float) -> None:
        """Append a sampled token to its request: stream its text, and end the request on a stop or the limit."""
        request.first_token_time = request.first_token_time or now
        if token in request.stop_ids:
            request.stop_token_id = token
            self._finish(request, "stop")
            return
        request.output_ids.append(token)
        text = request.decoder.push(token) if request.decoder else ""
        reason = None
        if request.stop_matcher is not None:
            text, hit = request.stop_matcher.push(text)
            reason = "stop" if hit else None
            request.stop_string = request.stop_matcher.matched
        request.text += text
        request.events.put(StreamToken(token, text, len(request.output_ids) - 1))
        if reason is None and len(request.output_ids) >= request.params.max_new_tokens:
            reason = "length"
        if reason:
            self._finish(request, reason)

    # --- the end of a request ----------------------------------------------------------------------------------------
    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request in self._running:
            stopped_by_string = reason == "stop" and request.stop_token_id is None
            if reason in ("stop", "length") and not stopped_by_string:
                self._flush_text(request)
            # With routing on, the last generated token has not been through the model yet: one more decode
            # step routes it (its logits are ignored), then the request completes.
            unrouted = len(request.prompt_ids) + len(request.output_ids) - request.num_cached
            if request.routing and reason in ("stop", "length") and unrouted > 0:
                request.routing_pending = True
                return
        self._complete(request)

    def _flush_text(self, request: Request) -> None:
        """Emit what the detokeniser and the stop-string check still hold once generation has ended."""
        tail = request.decoder.flush() if request.decoder else ""
        if request.stop_matcher is not None:
            tail, hit = request.stop_matcher.push(tail)
            if not hit:
                tail += request.stop_matcher.flush()
        request.text += tail
        if tail:
            request.events.put(StreamToken(request.output_ids[-1], tail, len(request.output_ids) - 1))

    def _complete(self, request: Request) -> None:
        if request in self._running:
            self._running.remove(request)
            self.cache.free(request.blocks)
            request.blocks, request.block_table = [], None
        if request.routing and request.routing_chunks:
            request._trace = self._make_trace(request)
        request.finished_time = time.perf_counter()
        request._done.set()
        request.events.put(None)

    def _fail(self, request: Request, exc: BaseException) -> None:
        log.warning("request %d failed alone: %s: %s", request.id, type(exc).__name__, exc)
        request.error = exc
        request.routing = False
        self._finish(request, "error")

    def _fail_all(self, exc: BaseException) -> None:
        """An exception in the shared part of a step (the forward pass): end the requests it ran for, so no caller
        waits forever. Waiting requests were not part of it: the next step serves them."""
        log.exception("engine step failed; ending its %d running requests", len(self._running))
        for request in list(self._running):
            request.error = exc
            request.routing = False
            self._finish(request, "error")
