"""Runners: a batch of sequences in, logits (and their routing) out.

A runner owns the forward passes of the engine's steps: `prefill` runs the newly admitted sequences' tokens
through the model in one batch and writes their keys and values to the paged cache; `decode` runs one token of
each running sequence. Both return the logits of the rows the scheduler samples from, and append each routed
sequence's expert choices to its `routing_chunks`. Runners never sample, admit or finish anything (scheduler.py
does) and do not advance `num_cached` (the scheduler does, once the step has succeeded).

Two runners, chosen once when the engine starts, with the kernel table, by `start_runner` (the one place where
kernels are chosen):
- `TorchRunner`: the model's own torch modules with the engine's kernel table (torch references or Triton);
- `CompiledCPURunner`: on the CPU, the compiled decode step (glm_kernels.cpu_compiled's DecodeModel: a whole
  decode step of the model in one call) and the compiled prefill kernels (attention, MoE, rotary) in the table.
  It computes what the torch runner computes (tests/engine/test_compiled_decode.py holds it to that).
"""

from __future__ import annotations

import logging

import torch
from glm_kernels import cpu_compiled

from workbench.engine import quant
from workbench.engine.kv_cache import PagedKVCache
from workbench.engine.model import AttentionBatch, GLMForCausalLM, Segment
from workbench.engine.ops import KernelChoice, KernelRequest, kernel_ops
from workbench.engine.request import Request
from workbench.engine.routing import RoutingRecorder

log = logging.getLogger(__name__)

class TorchRunner:
    choice: KernelChoice  # what start_runner decided

    def __init__(self, model: GLMForCausalLM, cache: PagedKVCache, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device
        # A prefill runs its last layer for each prompt's last row only (see GLMForCausalLM.hidden_states); False
        # runs every row through it, as a model without that saving would (benchmarks compare the two).
        self.prefill_last_rows_only = True

    def prefill(self, requests: list[Request]) -> torch.Tensor:
        """Every token of each request (its prompt; after a preemption, also what it had generated) through the
        model: the logits of each request's last row, [len(requests), V]."""
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
        return self._forward(self._tensor(rows), batch, requests, spans, batch.last_rows)

    def decode(self, requests: list[Request]) -> torch.Tensor:
        """The last token of each request, at position `num_cached`, through the model: [len(requests), V]."""
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

    def _tensor(self, values, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)


class CompiledCPURunner(TorchRunner):
    """The torch runner's prefill with the compiled prefill kernels, and the compiled decode step."""

    def __init__(self, model: GLMForCausalLM, cache: PagedKVCache, device: torch.device, decode_step) -> None:
        super().__init__(model, cache, device)
        self.decode_step = decode_step

    def decode(self, requests: list[Request]) -> torch.Tensor:
        for request in requests:
            if request.block_table is None:  # made anew when the request gains a block
                request.block_table = torch.tensor(request.blocks, dtype=torch.int32)
        if len(requests) == 1:
            tables = requests[0].block_table[None]
        else:
            tables = torch.nn.utils.rnn.pad_sequence([r.block_table for r in requests], batch_first=True)
        routing = any(r.routing for r in requests)
        logits, ids, weights, scores = self.decode_step.step(
            torch.tensor([r.output_ids[-1] for r in requests]), torch.tensor([r.num_cached for r in requests]),
            tables, routing, any(r.routing_scores for r in requests))
        for i, request in enumerate(requests):
            if request.routing:
                request.routing_chunks.append((ids[:, i:i + 1], weights[:, i:i + 1],
                                               scores[:, i:i + 1] if request.routing_scores else None))
        return logits


def start_message() -> str | None:
    """What an engine's start is waiting for, when it waits for something a user should know of: the first build
    of the compiled CPU kernels on this machine (about a minute). None otherwise."""
    return cpu_compiled.building()


def start_runner(model: GLMForCausalLM, cache: PagedKVCache, device: torch.device, kernels: str | None = None,
                 cpu_kernels: str | None = None) -> TorchRunner:
    """The one place where the engine's kernels are chosen, once, at start: the kernel table the model calls
    (set here and nowhere else: `model.ops`, and the FP8 linears' GEMM) and the runner, which carries the decision
    as `runner.choice` (a `KernelChoice`).

    `kernels` ("auto" | "torch" | "triton"; None: WORKBENCH_KERNELS, else "auto"): "auto" is Triton on CUDA.
    `cpu_kernels` ("auto" | "compiled" | "torch"; None: WORKBENCH_CPU_KERNELS, else "auto"): the compiled CPU
    kernels (glm_kernels.cpu_compiled: their decode step for this model, and their prefill attention, MoE and
    rotary in the kernel table). "auto" takes them where they can run (CPU, float weights, the torch kernels; the
    first use on a machine compiles them, about a minute) and says in the log why not otherwise; "compiled"
    insists (an error says why it cannot); "torch" never takes them."""
    request = KernelRequest.from_arguments(kernels, cpu_kernels)
    table = request.kernel_table(device)
    step = None
    wanted = request.cpu_kernels == "compiled" or (request.cpu_kernels == "auto" and device.type == "cpu"
                                                   and table == "torch")
    if wanted:
        try:
            if table != "torch":
                raise ValueError(f"they replace the torch kernels, and this engine runs kernels={table!r}")
            tensors = model.decode_step_tensors(cache.layers, cache.block_size)
            module = cpu_compiled.load()
            if module is None:
                raise RuntimeError(f"they could not be compiled here ({cpu_compiled.build_error()})")
            try:
                step = module.DecodeModel(**tensors)
            except TypeError as exc:  # pybind's message goes on to list every tensor: its first line says enough
                raise ValueError(f"the decode step does not take this model's weights "
                                 f"({str(exc).splitlines()[0]})") from exc
        except (ValueError, RuntimeError) as exc:
            if request.cpu_kernels == "compiled":
                raise ValueError(f"cpu_kernels='compiled' is not possible: {exc}") from exc
            log.info("running the torch CPU paths: the compiled CPU kernels are not used because %s", exc)
    if step is None and request.cpu_kernels != "torch" and getattr(model, "weight_format", None) in ("int8", "int4"):
        cpu_compiled.load()  # int8/int4 linears run the compiled integer kernels even where the decode step cannot
    choice = KernelChoice(kernels=table, cpu_kernels="torch" if step is None else "compiled",
                          ops=kernel_ops(table, compiled_cpu=step is not None))
    model.ops = choice.ops
    quant.use_kernels(model, choice.kernels)
    runner = TorchRunner(model, cache, device) if step is None else CompiledCPURunner(model, cache, device, step)
    runner.choice = choice
    return runner
