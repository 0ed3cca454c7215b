"""The local backend: chat completions from this process's engine, shared by every client of the server.

Owns the scheduler thread and the request lifecycle around `Engine.add_request` / `Engine.step()`:

- one thread drives `eng.step()` while any request is in flight; every step admits the requests that arrived
  since the last one (prefill) and advances all running ones by one token in a shared batched decode step;
- after each step the thread hands each request's new tokens to the event loop that asked for them, where the
  output parser turns them into OpenAI chunks; no engine work runs on the event loop;
- a client that goes away cancels its request: the engine drops it, and frees its cache, at the next step;
- admission is bounded: `max_concurrent_sequences` decode together, `max_queued_requests` more may wait, and
  one more is refused with a 429 (Retry-After) instead of queueing without end; a request without max_tokens
  may run to the end of the context (the engine takes KV blocks as it grows and preempts under pressure);
- an exception in a step ends the requests in that step with a 500 (the engine ends them); the thread and the
  server go on.

Prompts are built with `workbench.chat.render_prompt` (the checkpoint's own chat template when it has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from workbench.chat.backends.base import Backend, Throughput
from workbench.chat.parser import OutputParser, ParserDelta
from workbench.chat.prompt import prompt_ids as render_prompt_ids
from workbench.chat.protocol import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCallDelta,
    Usage,
    new_completion_id,
)

if TYPE_CHECKING:  # for the annotations only: the engine module is imported when the model loads
    from workbench.engine import Engine, SamplingParams

log = logging.getLogger(__name__)

# Prompts up to this many characters are rendered and tokenized on the event loop: a thread hop costs more than
# the work (and, on a busy machine, a scheduler time slice); longer ones go to a worker thread.
INLINE_PREPARE_CHARS = 8192


@dataclass
class _Prepared:
    prompt_ids: list[int]
    forced_text: str  # text forced after the generation prompt (tool_choice required / named), fed to the parser
    params: SamplingParams
    parse_tools: list[Any] | None


class LocalBackend(Backend):
    kind = "local"

    def __init__(self, engine: Engine | None = None, *, model_path: str | Path | None = None,
                 model_id: str | None = None, device: str = "cpu", dtype: str = "auto", kernels: str | None = None,
                 cpu_kernels: str | None = None, max_concurrent_sequences: int = 8, max_queued_requests: int = 64,
                 context_limit: int = 0, default_max_tokens: int = 0, kv_cache_tokens: int = 0,
                 routing_history: int = 32, quantize: str | None = None,
                 unconfigured_message: str | None = None) -> None:
        self.engine = engine
        self.model_path = Path(model_path).expanduser() if model_path else None
        self._model_id = model_id
        self.device, self.dtype, self.kernels, self.cpu_kernels = device, dtype, kernels, cpu_kernels
        self.quantize = quantize or None  # int8 | int4 (CPU) or an FP8 scheme, applied as the model loads
        self.max_concurrent_sequences = max_concurrent_sequences
        self.max_queued_requests = max_queued_requests
        self.context_limit_setting = context_limit
        self.default_max_tokens = default_max_tokens  # 0: the room left in the context
        self.kv_cache_tokens = kv_cache_tokens
        self.routing_history = routing_history
        self.state = "ready" if engine is not None else "stopped"
        self.message = unconfigured_message or ""
        self.throughput = Throughput()
        self._ready: asyncio.Future | None = None
        self._cond = threading.Condition()
        self._tracked: dict[Any, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._preparing = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._routing: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.requests_completed = 0
        self.requests_cancelled = 0

    # --- lifetime ---------------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        if self._model_id:
            return self._model_id
        if self.engine is not None:
            return self.engine.name
        if self.model_path is None:
            return "glm-workbench"
        from workbench.engine.gguf_file import gguf_model_name, is_gguf_path

        try:  # the name the engine will give a GGUF model once loaded, so that the id never changes
            return gguf_model_name(self.model_path) if is_gguf_path(self.model_path) else self.model_path.name
        except (OSError, ValueError):
            return self.model_path.name

    async def start(self) -> None:
        """Load the engine (in a worker thread) and start the scheduler; requests wait for the load."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        if self.engine is None:
            if self.model_path is None:
                self.state = "unconfigured"
                self._ready.set_result(None)
                return
            self.state = "loading"
            try:
                self.engine = await asyncio.to_thread(self._load)
            except Exception as exc:  # the server stays up and says why in api/status and every request
                log.error("could not load the model from %s: %s", self.model_path, exc)
                self.state, self.message = "error", f"could not load the model from {self.model_path}: {exc}"
                self._ready.set_result(None)
                return
        self._start_scheduler()
        self.state = "ready"
        self._ready.set_result(None)

    def _load(self) -> Engine:
        from workbench.engine import Engine

        quantized = f", quantize {self.quantize}" if self.quantize else ""
        log.info("loading %s (%s, dtype %s%s)", self.model_path, self.device, self.dtype, quantized)
        started = time.perf_counter()
        engine = Engine.from_pretrained(self.model_path, dtype=self.dtype, device=self.device, kernels=self.kernels,
                                        cpu_kernels=self.cpu_kernels, max_batch_size=self.max_concurrent_sequences,
                                        max_context=self.context_limit_setting or None,
                                        cache_tokens=self.kv_cache_tokens or None, quantize=self.quantize)
        # What runs, in api/status's words (the CLI prints the same line).
        log.info("loaded %s in %.1f s: %s", engine.name, time.perf_counter() - started, engine.describe())
        return engine

    def _start_scheduler(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run_scheduler, name="glm-scheduler", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        with self._cond:
            for request in self._tracked:
                request.cancel()
        deadline = time.monotonic() + 5.0
        while self._tracked and time.monotonic() < deadline:  # one step ends the cancelled requests
            await asyncio.sleep(0.01)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None

    async def _wait_ready(self) -> Engine:
        if self._ready is None:  # used without start(): an engine handed in, the scheduler starts on demand
            if self.engine is None:
                raise APIError(503, "The local backend was not started.", code="backend_not_ready")
            self._start_scheduler()
            self.state = "ready"
        else:
            await asyncio.shield(self._ready)
        if self.engine is None:
            message = self.message or "no model is configured"
            raise APIError(503, message, code="model_not_loaded")
        return self.engine

    @property
    def context_limit(self) -> int:
        limit = self.engine.max_context
        return min(self.context_limit_setting, limit) if self.context_limit_setting else limit

    # --- the scheduler thread -----------------------------------------------------------------------------------
    def _run_scheduler(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._stopping and not self._tracked:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                produced = engine.step()
            except Exception:  # the engine has ended every request of that step with an error
                log.exception("engine step failed; its requests answer 500, the server goes on")
                produced = 0
            if produced:
                self.throughput.add(produced)
            self._pump()
            if not produced and not engine.has_unfinished():
                time.sleep(0.001)  # only finished requests left to hand over: do not spin

    def _pump(self) -> None:
        """Hand each tracked request's new events to its event loop; forget the ones that ended."""
        with self._cond:
            tracked = list(self._tracked.items())
        for request, (loop, events_queue) in tracked:
            events = []
            while True:
                try:
                    event = request.events.get_nowait()
                except queue.Empty:
                    break
                events.append(event)
                if event is None:
                    break
            if not events:
                continue
            if events[-1] is None:
                with self._cond:
                    self._tracked.pop(request, None)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(events_queue.put_nowait, events)

    # --- requests -----------------------------------------------------------------------------------------------
    def _prepare(self, request: ChatCompletionRequest) -> _Prepared:
        """Render, tokenize and check one request (runs in a worker thread: it can take a while)."""
        from workbench.engine import SamplingParams

        engine = self.engine
        enable_thinking = request.enable_thinking
        forced_text = _tool_choice_forced_text(request, enable_thinking)
        # text inside messages is text: only the template's own special tokens are tokens
        _, prompt_ids = render_prompt_ids(engine.tokenizer, request.prompt_messages(), request.tools_for_prompt(),
                                          enable_thinking=enable_thinking, suffix=forced_text)
        limit = self.context_limit
        room = limit - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the messages take "
                                f"{len(prompt_ids)} tokens. Shorten the conversation.", param="messages",
                           code="context_length_exceeded")
        max_new_tokens = request.max_new_tokens
        if max_new_tokens is not None and max_new_tokens > room:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(prompt_ids) + max_new_tokens} tokens ({len(prompt_ids)} in the messages, "
                                f"{max_new_tokens} in the completion). Lower max_tokens or shorten the messages.",
                           param="max_tokens", code="context_length_exceeded")
        temperature = 0.0 if request.greedy else (1.0 if request.temperature is None else request.temperature)
        try:
            default = min(self.default_max_tokens, room) if self.default_max_tokens > 0 else room
            added = engine.tokenizer.added_tokens if request.thinking_budget is not None else {}
            params = SamplingParams(max_new_tokens=max_new_tokens or default,
                                    temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p,
                                    seed=request.seed, stop_strings=request.stop_list,
                                    stop_token_ids=[] if request.ignore_eos else None,
                                    thinking_budget=request.thinking_budget, think_open_id=added.get("<think>"),
                                    think_close_id=added.get("</think>"))
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from exc
        return _Prepared(prompt_ids, forced_text, params, request.tools_for_prompt())

    def _check_size(self, request: ChatCompletionRequest) -> None:
        """Refuse a prompt that cannot fit the context before rendering or tokenizing it: no token of the model
        stands for more than `max_token_chars` characters, so its messages' text is at least that many tokens."""
        per_token = getattr(self.engine.tokenizer, "longest_token_chars", None)  # computed once per tokenizer
        if not per_token:
            return
        chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(part.text) for part in m.content)
                    for m in request.messages if m.role != "assistant")  # text the template always shows
        at_least = -(-chars // per_token)
        limit = self.context_limit
        if at_least >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the messages hold "
                                f"{chars} characters, at least {at_least} tokens. Shorten the conversation.",
                           param="messages", code="context_length_exceeded")

    def _take_a_place(self) -> None:
        capacity = self.max_concurrent_sequences + self.max_queued_requests
        with self._cond:
            if len(self._tracked) + self._preparing >= capacity:
                raise APIError(429, f"The server is busy: {capacity} requests are already running or queued. "
                                    "Retry shortly.", code="queue_full", headers={"Retry-After": "1"})
            self._preparing += 1

    async def count_prompt_tokens(self, request: ChatCompletionRequest) -> int:
        self.check_model(request)
        await self._wait_ready()
        self._check_size(request)
        if request.text_chars < INLINE_PREPARE_CHARS:
            return len(self._prepare(request).prompt_ids)
        return len((await asyncio.to_thread(self._prepare, request)).prompt_ids)

    def stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        return self._generate(request, include_usage=request.include_usage)

    async def complete(self, request: ChatCompletionRequest):
        from workbench.chat.backends.base import fold_chunks

        return await fold_chunks(self._generate(request, include_usage=True))

    async def _generate(self, request: ChatCompletionRequest, include_usage: bool) -> AsyncIterator[
            ChatCompletionChunk]:
        self.check_model(request)
        engine = await self._wait_ready()
        self._check_size(request)
        self._take_a_place()
        try:
            if request.text_chars < INLINE_PREPARE_CHARS:
                prepared = self._prepare(request)  # a short prompt renders and tokenizes in well under a ms
            else:  # a long one could hold the event loop up: a worker thread does it
                prepared = await asyncio.to_thread(self._prepare, request)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            try:
                engine_request = engine.add_request(prepared.prompt_ids, prepared.params, routing=request.routing)
            except ValueError as exc:  # the engine's own prompt checks
                raise APIError(400, str(exc), param="messages", code="invalid_value") from exc
            with self._cond:
                self._tracked[engine_request] = (loop, events)
                self._cond.notify()
        finally:
            with self._cond:
                self._preparing -= 1

        completion_id, created, model = new_completion_id(), int(time.time()), self.model_id

        def chunk(delta: Delta, finish_reason: str | None = None, stop_reason: str | None = None) -> \
                ChatCompletionChunk:
            return ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[
                ChunkChoice(delta=delta, finish_reason=finish_reason, stop_reason=stop_reason)])

        parser = OutputParser(prepared.parse_tools)
        call_count = 0

        def to_chunks(deltas: list[ParserDelta]) -> list[ChatCompletionChunk]:
            nonlocal call_count
            out = []
            for delta in deltas:
                if delta.tool_call is not None:
                    call = delta.tool_call
                    out.append(chunk(Delta(tool_calls=[ToolCallDelta(
                        index=call_count, id=call.id, type="function",
                        function=FunctionCallDelta(name=call.name, arguments=call.arguments_json))])))
                    call_count += 1
                else:
                    out.append(chunk(Delta(content=delta.content, reasoning_content=delta.reasoning_content)))
            return out

        try:
            yield chunk(Delta(role="assistant", content=""))
            pending = to_chunks(parser.feed(prepared.forced_text))
            for item in pending:
                yield item
            finished = False
            while not finished:
                for event in await events.get():
                    if event is None:
                        finished = True
                        break
                    for item in to_chunks(parser.feed(event.text)):
                        yield item
            if engine_request.error is not None:
                error = engine_request.error
                raise APIError(500, f"The engine failed while generating this completion ({type(error).__name__}: "
                                    f"{error}). The server is still running: retry the request.",
                               code="engine_error")
            result = engine_request.result()
            for item in to_chunks(parser.finish(truncated=result.finish_reason == "length")):
                yield item
            if request.routing and result.routing is not None:  # kept before the client can see the end
                self._keep_routing(completion_id, result.routing)
            yield chunk(Delta(), finish_reason=parser.finish_reason, stop_reason=result.stop_string)
            if include_usage:
                completion_tokens = result.completion_tokens
                # The engine's clock, so every client shows the same speed: prompt_seconds from the request's
                # arrival to its first token (queue and prefill), decode_seconds from the first generated token
                # to the last; tok/s = (completion_tokens - 1) / decode_seconds.
                yield ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[],
                                          usage=Usage(prompt_tokens=result.prompt_tokens,
                                                      completion_tokens=completion_tokens,
                                                      total_tokens=result.prompt_tokens + completion_tokens,
                                                      prompt_seconds=round(result.prefill_seconds, 6),
                                                      decode_seconds=round(result.decode_seconds, 6)))
            self.requests_completed += 1
        finally:
            if not engine_request.finished:
                engine_request.cancel()  # the client left (or the task was cancelled): stop at the next step
                self.requests_cancelled += 1

    # --- routing traces and status --------------------------------------------------------------------------------
    def _keep_routing(self, completion_id: str, trace: Any) -> None:
        self._routing[completion_id] = trace
        while len(self._routing) > self.routing_history:
            self._routing.popitem(last=False)

    def routing_trace(self, completion_id: str) -> dict[str, Any] | None:
        trace = self._routing.get(completion_id)
        if trace is None:
            return None
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is not None and trace.token_texts is None:
            trace.token_texts = [tokenizer.decode([token]) for token in trace.token_ids.tolist()]
        data = trace.to_dict()
        data["completion_id"] = completion_id
        return data

    def status(self) -> dict[str, Any]:
        engine = self.engine
        memory: dict[str, Any] = {"process_rss_bytes": psutil.Process().memory_info().rss}
        info: dict[str, Any] = {
            "backend": self.kind, "model": self.model_id, "state": self.state, "message": self.message or None,
            "model_path": str(self.model_path) if self.model_path else None, "device": self.device,
            # Until the engine has started: what was asked ("auto": not pinned; the engine's start decides, with
            # WORKBENCH_KERNELS and WORKBENCH_CPU_KERNELS as defaults); then the engine's kernel choice.
            "dtype": self.dtype, "kernels": self.kernels or "auto", "cpu_kernels": self.cpu_kernels or "auto",
            "quantize": self.quantize,
            "max_concurrent_sequences": self.max_concurrent_sequences,
            "max_queued_requests": self.max_queued_requests, "active_requests": 0,
            "queued_requests": self._preparing, "recent_tokens_per_second": self.throughput.rate(),
            "requests_completed": self.requests_completed, "requests_cancelled": self.requests_cancelled,
            "memory": memory,
        }
        if self.state == "loading" and not self.message:
            from workbench.engine.runner import start_message  # e.g. the first build of the CPU kernels

            info["message"] = start_message()
        if engine is not None:
            info.update(device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
                        kernels=engine.kernel_choice.kernels, cpu_kernels=engine.kernel_choice.cpu_kernels,
                        context_limit=self.context_limit,
                        active_requests=engine.num_running,
                        queued_requests=engine.num_waiting + self._preparing)
            weights = _safe(lambda: engine.weights) or {}
            memory["model_bytes"] = weights.get("weight_bytes")
            info["weights"] = {key: weights.get(key) for key in ("format", "bits_per_weight", "bytes_per_token")}
            memory["kv_cache_blocks_free"] = _safe(lambda: engine.cache.num_free_blocks)
            memory["kv_cache_blocks_total"] = _safe(lambda: engine.cache.num_blocks)
            memory["kv_cache_blocks_used"] = _safe(lambda: engine.cache.num_blocks - engine.cache.num_free_blocks)
            memory["kv_cache_block_tokens"] = _safe(lambda: engine.cache.block_size)
            info["preempted_requests"] = _safe(lambda: engine.num_preempted)
            info["preemptions_total"] = _safe(lambda: engine.preemptions)
            if str(engine.device).startswith("cuda"):
                import torch

                memory["cuda_allocated_bytes"] = torch.cuda.memory_allocated(engine.device)
                memory["cuda_reserved_bytes"] = torch.cuda.memory_reserved(engine.device)
        return info


def _safe(read: Any) -> Any:
    try:
        return read()
    except AttributeError:
        return None


def _tool_choice_forced_text(request: ChatCompletionRequest, enable_thinking: bool) -> str:
    """Text forced after the generation prompt so that the model calls a tool now (`required`) or a named one.

    The model writes `<tool_call>NAME` itself under `auto`; forcing the tag (and the name) is how a plain
    decoder honours `required` and a named choice. Thinking is skipped: the call comes first.
    """
    if request.tool_choice != "required" and not isinstance(request.tool_choice, NamedToolChoice):
        return ""
    text = ("\n" if not enable_thinking else "\n<think></think>\n") + "<tool_call>"
    if isinstance(request.tool_choice, NamedToolChoice):
        text += f"{request.tool_choice.function.name}\n"
    return text
