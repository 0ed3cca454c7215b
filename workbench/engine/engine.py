"""The engine: token ids in, token ids (and on request a routing trace) out.

Owns loading a checkpoint (config, weights, tokenizer), the paged KV cache, and the generation loop with
continuous batching: requests are admitted between steps, their prompts prefilled together, and every running
request advances by one token per batched decode step. Knows nothing of messages, prompts or HTTP: callers
bring token ids (the tokenizer is here to turn text into ids and back, and to render chat templates).

KV memory on demand: a request holds cache blocks for the tokens it has, one more block each time it fills its
last. When the pool runs out, the most recently admitted request is preempted: its blocks are freed, it goes back
to the front of the queue, and when it is admitted again one prefill recomputes its prompt and everything it had
generated; its stream goes on with the next token, without a gap or a repeat. The oldest running request always
progresses, so nothing deadlocks, and nothing fails for want of memory.

Failures stay with their owner: a sequence whose sampling or stop strings fail ends alone with an error; a failure
of the shared forward pass ends the requests of that step, and the engine serves the next ones.

Threading: `step()` runs under a lock, so any number of threads may call `stream()`/`generate()` at once; each
step serves every request, whichever thread runs it. `Request.cancel()` is safe from any thread and takes effect
at the next step, which frees the request's cache blocks.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from glm_kernels import cpu_compiled

from workbench.engine import quant
from workbench.engine.config import ConfigError, GLMConfig
from workbench.engine.kv_cache import PagedKVCache
from workbench.engine.model import AttentionBatch, GLMForCausalLM, Segment
from workbench.engine.ops import select_kernels
from workbench.engine.routing import RoutingRecorder, RoutingTrace
from workbench.engine.sampling import SamplingParams, make_generator, sample
from workbench.engine.stop_strings import StopMatcher
from workbench.engine.tokenizer import Tokenizer
from workbench.engine.weights import CheckpointError, load_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class StreamToken:
    token_id: int
    text: str  # the text this token adds (may be "" while a character or a possible stop string is incomplete)
    index: int  # position among the generated tokens


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    routing: RoutingTrace | None = None
    stop_token_id: int | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


CPU_KERNEL_CHOICES = ("auto", "compiled", "torch")

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
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # engine-side state
    blocks: list[int] = field(default_factory=list)  # cache blocks holding its tokens; grows as it generates
    block_table: torch.Tensor | None = None  # blocks as an int32 tensor, for the compiled decode step
    num_cached: int = 0
    generator: torch.Generator | None = None
    decoder: object = None
    emitted_chars: int = 0
    routing_chunks: list = field(default_factory=list)
    routing_pending: bool = False  # finished, but its last token still has to go through the model for the trace
    stop_matcher: StopMatcher | None = None  # holds back decoded text that may begin a stop string
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

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

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
            prefill_seconds=first - self.created, decode_seconds=self.finished_time - first,
        )


class TokenStream:
    """Iterator over the tokens of one request; drives the engine's steps when no one else does."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine, self.request = engine, request

    def __iter__(self) -> Iterator[StreamToken]:
        return self

    def __next__(self) -> StreamToken:
        while True:
            try:
                event = self.request.events.get_nowait()
            except queue.Empty:
                if self.request.finished:  # its end marker was already consumed
                    raise StopIteration from None
                self._engine._step_or_wait(self.request)
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


class Engine:
    def __init__(self, model: GLMForCausalLM, tokenizer: Tokenizer | None, *, device: torch.device,
                 dtype: torch.dtype, max_batch_size: int = 32, cache_tokens: int | None = None,
                 max_context: int | None = None, block_size: int = 16, name: str = "glm",
                 cpu_kernels: str = "auto") -> None:
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        self.device, self.dtype, self.name = device, dtype, name
        self.kernels = model.ops.name
        self.max_batch_size = max_batch_size
        limit = self.config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        # By default the pool holds a full context for every sequence of a batch, up to 64K tokens (a real
        # GLM-4.5-Air's 64K take 12 GB in bf16); blocks are taken as sequences grow, so a smaller pool only means
        # more preemption under load.
        cache_tokens = cache_tokens or min(self.max_context * max_batch_size, 65536)
        self.max_context = min(self.max_context, cache_tokens)
        config = self.config
        self.cache = PagedKVCache(config.num_hidden_layers, -(-cache_tokens // block_size), block_size,
                                  config.num_key_value_heads, config.head_dim, dtype, device)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in order of admission: the last is the first to be preempted
        self.preemptions = 0
        self._step_lock = threading.Lock()
        self._admit_lock = threading.Lock()
        self._progress = threading.Condition()
        self.moe_layer_ids = config.moe_layer_ids
        # A prefill runs its last layer for each prompt's last row only (see GLMForCausalLM.hidden_states); False
        # runs every row through it, as a model without that saving would (benchmarks compare the two).
        self.prefill_last_rows_only = True
        self.compiled_decode = self._use_compiled_cpu_kernels(cpu_kernels)
        self.cpu_kernels = "compiled" if self.compiled_decode is not None else "torch"

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                        kernels: str = "auto", quantize: str | None = None, **engine_kwargs) -> Engine:
        """Load a checkpoint folder. FP8 checkpoints (a `quantization_config` in config.json) load as FP8;
        `quantize="fp8-channel" | "fp8-block"` (add "-w8a8" for FP8 activations) quantises a dense one."""
        folder = Path(path).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"model path {folder} does not exist")
        if not folder.is_dir():
            raise CheckpointError(f"model path {folder} is a file: point at the checkpoint folder holding config.json")
        torch_device = torch.device(device)
        torch_dtype = _parse_dtype(dtype, torch_device)
        config = GLMConfig.from_json(folder)
        tokenizer = Tokenizer.from_pretrained(folder)  # checked before the (slow) weights
        ops = select_kernels(kernels, torch_device)
        scheme = quant.parse_quantization_config(config.extra.get("quantization_config"))
        if quantize is not None:
            if scheme is not None:
                raise ValueError(f"{folder.name} is already quantised ({scheme.name}); drop quantize={quantize!r}")
            scheme = quant.scheme_from_name(quantize)
        try:
            with torch.device("meta"):
                model = GLMForCausalLM(config)
                if scheme is not None:
                    quant.quantize_model(model, scheme)  # FP8 shells, filled (or quantised into) by the loader
            load_weights(model, config, folder, torch_dtype, torch_device)
            model.materialize_buffers(torch_device)
            model.ops = ops
            quant.use_kernels(model, ops.name)
            model.fuse_projections()
        except BaseException:
            model = None
            gc.collect()  # nothing partially loaded stays in memory
            raise
        return cls(model, tokenizer, device=torch_device, dtype=torch_dtype, name=folder.name, **engine_kwargs)

    def _use_compiled_cpu_kernels(self, choice: str):
        """Put glm_kernels.cpu_compiled to work where it can: its decode step for this model (returned; None means
        the torch path) and its prefill attention, MoE and rotary (in the model's kernel table).

        `choice` (or the environment variable WORKBENCH_CPU_KERNELS): "auto" takes them where they can run (CPU,
        float weights, the torch kernels; the first use on a machine compiles them, about a minute) and says in
        the log why not otherwise; "compiled" insists (an error says why it cannot); "torch" never takes them."""
        choice = os.environ.get("WORKBENCH_CPU_KERNELS") or choice
        if choice not in CPU_KERNEL_CHOICES:
            raise ValueError(f"cpu_kernels={choice!r}: choose one of {', '.join(CPU_KERNEL_CHOICES)} "
                             "(argument `cpu_kernels` or environment variable WORKBENCH_CPU_KERNELS)")
        if choice == "torch" or (choice == "auto" and (self.device.type != "cpu" or self.kernels != "torch")):
            return None
        try:
            if self.kernels != "torch":
                raise ValueError(f"they replace the torch kernels, and this engine runs kernels={self.kernels!r}")
            tensors = self.model.decode_step_tensors(self.cache.layers, self.cache.block_size)
            module = cpu_compiled.load()
            if module is None:
                raise RuntimeError(f"they could not be compiled here ({cpu_compiled.build_error()})")
            step = module.DecodeModel(**tensors)
        except (ValueError, RuntimeError) as exc:
            if choice == "compiled":
                raise ValueError(f"cpu_kernels='compiled' is not possible: {exc}") from exc
            log.info("running the torch CPU paths: the compiled CPU kernels are not used because %s", exc)
            return None
        self.model.ops = dataclasses.replace(self.model.ops, prefill_attention=cpu_compiled.prefill_attention,
                                             fused_moe=cpu_compiled.fused_moe, rotary=cpu_compiled.rotary)
        return step

    # --- requests -------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, routing: bool = False,
                    routing_scores: bool = False) -> Request:
        params = params or SamplingParams()
        prompt_ids = self._check_prompt(prompt_ids, params)
        stop_ids = params.stop_token_ids
        if stop_ids is None:
            stop_ids = self.tokenizer.stop_token_ids if self.tokenizer else []
        request = Request(prompt_ids, params, frozenset(stop_ids), routing=routing or routing_scores,
                          routing_scores=routing_scores)
        request.generator = make_generator(params.seed, self.device)
        request.decoder = self.tokenizer.incremental_decoder() if self.tokenizer else None
        if params.stop_strings:
            request.stop_matcher = StopMatcher(params.stop_strings)
        with self._admit_lock:
            self._waiting.append(request)
        return request

    def _check_prompt(self, prompt_ids, params: SamplingParams) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token id")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={params.max_new_tokens} is "
                             f"{total} tokens, over this engine's context limit of {self.max_context}: shorten "
                             "the prompt or lower max_new_tokens")
        return prompt_ids

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

    # --- the step -------------------------------------------------------------------------------------------
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

    def _step_or_wait(self, request: Request) -> None:
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

    def _admit(self) -> list[Request]:
        """Admit waiting requests (preempted ones first) while their tokens, and the next token's slot, fit in the
        free blocks left after this step's decode takes what the running requests need."""
        admitted, budget = [], 8192  # tokens prefilled per step: bounds the pause other requests see
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

    def _prefill(self, requests: list[Request]) -> int:
        """One forward over the prompts of newly admitted requests (a resumed one's whole sequence so far)."""
        rows, segments, positions, slots = [], [], [], []
        for request in requests:
            ids = request.token_ids
            segments.append(Segment(start=len(rows), length=len(ids)))
            rows.extend(ids)
            positions.extend(range(len(ids)))
            slots.extend(self.cache.slots(request.blocks, 0, len(ids)))
        batch = AttentionBatch(positions=self._tensor(positions), segments=segments,
                               slot_mapping=self._tensor(slots))
        spans = [(s.start, s.length) for s in segments]
        logits = self._forward(self._tensor(rows), batch, requests, spans, batch.last_rows)
        for request in requests:
            request.num_cached = len(request.token_ids)
        routed = [r for r in requests if r.routing_pending]
        for request in routed:  # resumed only to route its last token: its generation was already complete
            request.routing_pending = False
            self._complete(request)
        live = [i for i, r in enumerate(requests) if r not in routed]
        return self._emit([requests[i] for i in live], logits[live])

    def _decode(self, requests: list[Request]) -> int:
        decode = self._decode_compiled if self.compiled_decode is not None else self._decode_batch
        logits = decode(requests)
        for request in requests:
            request.num_cached += 1
        flushed = [r for r in requests if r.routing_pending]
        for request in flushed:  # this step only routed its last token: its generation was already complete
            request.routing_pending = False
            self._complete(request)
        live = [i for i, r in enumerate(requests) if not r.finished and r not in flushed]
        return self._emit([requests[i] for i in live], logits[live])

    def _decode_compiled(self, requests: list[Request]) -> torch.Tensor:
        """One token for each request through the compiled step: the same result as `_decode_batch`."""
        for request in requests:
            if request.block_table is None:  # made anew when the request gains a block
                request.block_table = torch.tensor(request.blocks, dtype=torch.int32)
        if len(requests) == 1:
            tables = requests[0].block_table[None]
        else:
            tables = torch.nn.utils.rnn.pad_sequence([r.block_table for r in requests], batch_first=True)
        routing = any(r.routing for r in requests)
        logits, ids, weights, scores = self.compiled_decode.step(
            torch.tensor([r.output_ids[-1] for r in requests]), torch.tensor([r.num_cached for r in requests]),
            tables, routing, any(r.routing_scores for r in requests))
        for i, request in enumerate(requests):
            if request.routing:
                request.routing_chunks.append((ids[:, i:i + 1], weights[:, i:i + 1],
                                               scores[:, i:i + 1] if request.routing_scores else None))
        return logits

    def _decode_batch(self, requests: list[Request]) -> torch.Tensor:
        last = [r.output_ids[-1] for r in requests]
        positions = [r.num_cached for r in requests]
        slots = [self.cache.slots(r.blocks, p, p + 1)[0] for r, p in zip(requests, positions)]
        width = max(len(r.blocks) for r in requests)
        tables = [r.blocks + [0] * (width - len(r.blocks)) for r in requests]
        batch = AttentionBatch(positions=self._tensor(positions), slot_mapping=self._tensor(slots),
                               block_tables=self._tensor(tables, torch.int32),
                               seq_lens=self._tensor([p + 1 for p in positions], torch.int32))
        return self._forward(self._tensor(last), batch, requests, [(i, 1) for i in range(len(requests))],
                             list(range(len(requests))))

    def _forward(self, input_ids, batch, requests, row_spans, logit_rows) -> torch.Tensor:
        recorder = None
        if any(r.routing for r in requests):
            recorder = RoutingRecorder(keep_scores=any(r.routing_scores for r in requests))
        # A prefill wants the logits of each prompt's last row only: without a routing trace (which covers every
        # row) the model's last layer then runs for those rows alone.
        last_rows_only = self.prefill_last_rows_only and batch.segments is not None and recorder is None
        hidden = self.model.hidden_states(input_ids, batch, self.cache.layers, recorder, last_rows_only)
        logits = self.model.compute_logits(hidden if last_rows_only else hidden[logit_rows])
        if recorder is not None:
            ids, weights, scores = recorder.stacked()
            for request, (start, length) in zip(requests, row_spans):
                if request.routing:
                    rows = slice(start, start + length)
                    request.routing_chunks.append(
                        (ids[:, rows], weights[:, rows], None if scores is None else scores[:, rows]))
        return logits

    def _emit(self, requests: list[Request], logits: torch.Tensor) -> int:
        if not requests:
            return 0
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        now = time.perf_counter()
        for request, token in zip(requests, tokens):
            try:
                if isinstance(token, Exception):
                    raise token
                self._accept(request, token, now)
            except Exception as exc:  # this sequence's own failure: it ends alone, the batch goes on
                self._fail(request, exc)
        return len(tokens)

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
        request.text += text
        request.events.put(StreamToken(token, text, len(request.output_ids) - 1))
        if reason is None and len(request.output_ids) >= request.params.max_new_tokens:
            reason = "length"
        if reason:
            self._finish(request, reason)

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
            request._trace = self._build_trace(request)
        request.finished_time = time.perf_counter()
        request._done.set()
        request.events.put(None)

    def _build_trace(self, request: Request) -> RoutingTrace:
        ids = torch.cat([c[0] for c in request.routing_chunks], dim=1)
        weights = torch.cat([c[1] for c in request.routing_chunks], dim=1)
        scores = None
        if request.routing_scores and request.routing_chunks[0][2] is not None:
            scores = torch.cat([c[2] for c in request.routing_chunks], dim=1)
        tokens = (request.prompt_ids + request.output_ids)[: ids.shape[1]]
        return RoutingTrace(expert_ids=ids, weights=weights, token_ids=torch.tensor(tokens, dtype=torch.int64),
                            layer_ids=list(self.moe_layer_ids), num_experts=self.config.n_routed_experts,
                            prompt_len=len(request.prompt_ids), scores=scores,
                            meta={"model": self.name, "dtype": str(self.dtype).removeprefix("torch."),
                                  "kernels": self.kernels})

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

    def _tensor(self, values, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    # --- convenience API --------------------------------------------------------------------------------------
    def stream(self, prompt_ids, routing: bool = False, routing_scores: bool = False, **sampling) -> TokenStream:
        request = self.add_request(prompt_ids, SamplingParams(**sampling), routing=routing,
                                   routing_scores=routing_scores)
        return TokenStream(self, request)

    def generate(self, prompt_ids, routing: bool = False, routing_scores: bool = False,
                 **sampling) -> GenerationResult:
        return self.stream(prompt_ids, routing=routing, routing_scores=routing_scores, **sampling).result

    def generate_batch(self, prompts: list, routing: bool = False, **sampling) -> list[GenerationResult]:
        """Generate for several prompts at once: they share every decode step."""
        requests = [self.add_request(p, SamplingParams(**sampling), routing=routing) for p in prompts]
        while not all(r.finished for r in requests):
            self.step()
        return [r.result() for r in requests]

    @torch.inference_mode()
    def logits(self, prompt_ids) -> torch.Tensor:
        """Full forward over the prompt without the cache: [T, V] float32."""
        ids = self._check_prompt(prompt_ids, SamplingParams(max_new_tokens=1))
        input_ids = self._tensor(ids)
        return self.model(input_ids[None, :])[0]

    def __repr__(self) -> str:
        c = self.config
        return (f"Engine({self.name}: {c.num_hidden_layers} layers, {c.n_routed_experts} experts top-"
                f"{c.num_experts_per_tok}, {self.dtype}, {self.device}, kernels={self.kernels}, "
                f"context {self.max_context})")


def _parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A dtype name or torch dtype; "auto" is float32 on the CPU (CPUs without bf16 units run it slower than
    fp32) and bfloat16 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
