"""GPU benchmark of the kernels and of an Air-shaped FP8 model, side by side with the torch references.

One call, under 10 minutes on one H200:
  (a) the card's ceilings: device-to-device copy GB/s and bf16 matmul TFLOP/s;
  (b) every kernel at GLM-4.5-Air shapes (hidden 4096, 128 experts top-8, expert width 1408; 1 to 4096 tokens)
      against its torch reference and against the roofline (bytes / copy bandwidth, flops / matmul rate), with
      a correctness check on the same inputs;
  (c) a random-weight GLM-4.5-Air-shaped model in FP8, built directly on the GPU (all 46 layers, no disk) with
      the engine's model class and `workbench.engine.quant`: batch-1 decode tok/s (the engine's own loop, and
      the model's decode step replayed as a CUDA graph), prefill tok/s at 2K and 32K tokens, batch-32 decode;
  (d) one table at the end and a JSON file of every figure.

    python bench/gpu.py [--out bench/out/gpu.json] [--sections ceilings,kernels,model] [--tiny]

`--tiny` runs the same code at small shapes on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set
here before the kernels are imported): the script is known to work before anyone spends GPU time on it.
Figures in --tiny mode measure the interpreter, not a GPU: only their presence means anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

if "--tiny" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before glm_kernels defines its kernels

import torch.nn.functional as F  # noqa: E402
from glm_kernels import attention, fp8, fused_moe, rms_norm, rotary, router  # noqa: E402

from workbench.engine.config import GLMConfig  # noqa: E402

TARGETS = {"fused_moe_decode_roofline_pct": 60.0, "batch1_decode_tok_s": 150.0}


@dataclass(frozen=True)
class Shapes:
    """Everything the benchmark sizes; `AIR` is the real model's, `TINY` the CPU smoke run's."""

    hidden: int
    experts: int
    top_k: int
    width: int
    token_counts: tuple[int, ...]
    q_heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    decode_batches: tuple[int, ...]
    decode_context: int
    long_context: int
    prefill_lengths: tuple[int, ...]
    linear_out: int
    model_preset: str
    model_overrides: dict = field(default_factory=dict)
    model_prefill: tuple[int, ...] = (2048, 32768)
    model_decode_tokens: int = 64
    model_batch: int = 32
    model_prompt: int = 128  # prompt tokens of the decode runs
    model_modes: tuple[str, ...] = ("w8a16", "w8a8")  # activations: bf16, or FP8 per token
    copy_bytes: int = 2 << 30
    matmul_size: int = 8192
    budget_ms: int = 100  # timing budget per measurement


AIR = Shapes(hidden=4096, experts=128, top_k=8, width=1408, token_counts=(1, 8, 64, 512, 4096), q_heads=96,
             kv_heads=8, head_dim=128, rotary_dim=64, decode_batches=(1, 8, 64), decode_context=4096,
             long_context=32768, prefill_lengths=(512, 4096), linear_out=12288, model_preset="glm-4.5-air")
TINY = Shapes(hidden=64, experts=8, top_k=2, width=32, token_counts=(1, 5), q_heads=4, kv_heads=2, head_dim=16,
              rotary_dim=8, decode_batches=(1,), decode_context=32, long_context=48, prefill_lengths=(16,),
              linear_out=48, model_preset="tiny", model_prefill=(3, 6), model_decode_tokens=2, model_batch=2,
              model_prompt=4, model_modes=("w8a8",),
              copy_bytes=4 << 20, matmul_size=128, budget_ms=1)


class Report:
    """Collects every figure (for the JSON) and the rows of the final table."""

    def __init__(self) -> None:
        self.figures: dict = {}
        self.rows: list[tuple[str, str, str, str, str, str]] = []

    def add(self, section: str, name: str, **values) -> None:
        self.figures.setdefault(section, {})[name] = values

    def row(self, what: str, shape: str, ours: str, reference: str = "", ratio: str = "", extra: str = "") -> None:
        self.rows.append((what, shape, ours, reference, ratio, extra))
        print(f"  {what:<28} {shape:<22} {ours:>14} {reference:>14} {ratio:>8}  {extra}", flush=True)

    def table(self) -> str:
        head = ("what", "shape", "ours", "torch ref", "speedup", "roofline / check")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *self.rows]]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# --- timing ---------------------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device, budget_ms: int) -> float:
    """Median milliseconds of `fn`: CUDA events with the L2 cache flushed between runs (triton's do_bench) on a
    GPU; wall clock on the CPU (as many runs as fit the budget, at least one; callers have run `fn` before)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(5, budget_ms // 4), rep=budget_ms, return_mode="median"))
    times = []
    deadline = time.perf_counter() + budget_ms / 1000
    while not times or (time.perf_counter() < deadline and len(times) < 5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp(min=1e-12))


def fmt_ms(ms: float) -> str:
    return f"{ms * 1000:.1f} us" if ms < 1 else f"{ms:.2f} ms"


# --- (a) ceilings ---------------------------------------------------------------------------------------------------
def measure_ceilings(shapes: Shapes, device: torch.device, report: Report) -> dict:
    numel = shapes.copy_bytes // 2
    src = torch.randn(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(partial(dst.copy_, src), device, max(shapes.budget_ms, 50))
    copy_gbs = 2 * shapes.copy_bytes / (copy_ms / 1000) / 1e9  # read + write
    n = shapes.matmul_size
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm_ms = time_ms(partial(torch.matmul, a, b), device, max(shapes.budget_ms, 50))
    tflops = 2 * n**3 / (mm_ms / 1000) / 1e12
    report.add("ceilings", "copy", bytes=shapes.copy_bytes, ms=copy_ms, gb_s=copy_gbs)
    report.add("ceilings", "bf16_matmul", n=n, ms=mm_ms, tflop_s=tflops)
    report.row("D2D copy", f"{shapes.copy_bytes >> 20} MiB", f"{copy_gbs:.0f} GB/s")
    report.row("bf16 matmul", f"{n}^3", f"{tflops:.1f} TFLOP/s")
    return {"bytes_per_s": copy_gbs * 1e9, "flops_per_s": tflops * 1e12}


# --- (b) kernels ----------------------------------------------------------------------------------------------------
def compare(report: Report, ceilings: dict, section: str, name: str, shape: str, ours: Callable, reference: Callable,
            device: torch.device, budget_ms: int, bytes_moved: float, flops: float, tolerance: float,
            reference_label: str = "torch ref") -> dict:
    """Time `ours` and `reference` on the same inputs, check they agree, and place `ours` against the roofline."""
    start = time.perf_counter()
    out = ours()
    synchronize(device)
    check_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    ref = reference()
    synchronize(device)
    check_ref_ms = (time.perf_counter() - start) * 1000
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    err = max(rel_error(o, r) for o, r in zip(outs, refs) if o.is_floating_point())
    ok = err <= tolerance
    if device.type == "cuda":
        ours_ms, ref_ms = time_ms(ours, device, budget_ms), time_ms(reference, device, budget_ms)
    else:  # the CPU smoke run: the checking calls' wall clock is figure enough
        ours_ms, ref_ms = check_ms, check_ref_ms
    roofline_ms = max(bytes_moved / ceilings["bytes_per_s"], flops / ceilings["flops_per_s"]) * 1000
    pct = 100 * roofline_ms / ours_ms
    values = dict(ms=ours_ms, reference_ms=ref_ms, reference=reference_label, speedup=ref_ms / ours_ms,
                  roofline_ms=roofline_ms, roofline_pct=pct, bytes=bytes_moved, flops=flops, rel_error=err,
                  correct=ok)
    report.add(section, f"{name} {shape}", **values)
    report.row(name, shape, fmt_ms(ours_ms), fmt_ms(ref_ms), f"{ref_ms / ours_ms:.2f}x",
               f"{pct:.0f}% roofline, err {err:.1e} {'ok' if ok else 'FAIL'}")
    return values


def random_topk(tokens: int, shapes: Shapes, device: torch.device, gen: torch.Generator):
    """Distinct experts per token, uniformly spread (a balanced router), and softmaxed weights."""
    scores = torch.rand(tokens, shapes.experts, generator=gen, device=device)
    ids = scores.topk(shapes.top_k, dim=1).indices
    weights = torch.rand(tokens, shapes.top_k, generator=gen, device=device).softmax(dim=1)
    return ids, weights


def moe_experts(shapes: Shapes, device: torch.device, scheme: str):
    """Air-shaped stacked experts: bf16, or FP8 with channel / 128x128 block scales (quantised on the device)."""
    e, d, i = shapes.experts, shapes.hidden, shapes.width
    gate_up = torch.randn(e, 2 * i, d, device=device, dtype=torch.bfloat16) / d**0.5
    down = torch.randn(e, d, i, device=device, dtype=torch.bfloat16) / i**0.5
    if scheme == "bf16":
        return gate_up, down, {}
    block = None if scheme.startswith("fp8-channel") else (128, 128)
    quantize = (lambda w: fp8.quantize_weight_per_channel(w)) if block is None else (
        lambda w: fp8.quantize_weight_blockwise(w, block))
    # One expert at a time keeps the fp32 temporaries small; gate and up are quantised separately (as stored).
    gu_q, gu_s, dn_q, dn_s = [], [], [], []
    for expert in range(e):
        (gq, gs), (uq, us) = quantize(gate_up[expert, :i]), quantize(gate_up[expert, i:])
        gu_q.append(torch.cat((gq, uq)))
        gu_s.append(torch.cat((gs, us)))
        q, s = quantize(down[expert])
        dn_q.append(q)
        dn_s.append(s)
    del gate_up, down
    kwargs = dict(w_gate_up_scale=torch.stack(gu_s), w_down_scale=torch.stack(dn_s), block_size=block,
                  act_quant=scheme.endswith("w8a8"))
    return torch.stack(gu_q), torch.stack(dn_q), kwargs


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch SDPA on [T, H, Dh] tensors with its native grouped-query support (no repeated k/v)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


def bench_kernels(shapes: Shapes, device: torch.device, ceilings: dict, report: Report) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    budget = shapes.budget_ms
    d = shapes.hidden
    for tokens in shapes.token_counts:  # RMSNorm with the fused residual add
        x = torch.randn(tokens, d, device=device, dtype=bf16, generator=gen)
        res = torch.randn(tokens, d, device=device, dtype=bf16, generator=gen)
        w = torch.randn(d, device=device, dtype=bf16, generator=gen)
        compare(report, ceilings, "kernels", "rms_norm+residual", f"T={tokens} D={d}",
                partial(rms_norm.rms_norm_triton, x, w, 1e-5, res),
                partial(rms_norm.rms_norm_reference, x, w, 1e-5, res),
                device, budget, bytes_moved=4 * tokens * d * 2, flops=0, tolerance=1e-2)
    for tokens in shapes.token_counts:  # partial rotary on q and k
        q = torch.randn(tokens, shapes.q_heads, shapes.head_dim, device=device, dtype=bf16, generator=gen)
        k = torch.randn(tokens, shapes.kv_heads, shapes.head_dim, device=device, dtype=bf16, generator=gen)
        inv = 1.0 / (1e6 ** (torch.arange(0, shapes.rotary_dim, 2, device=device).float() / shapes.rotary_dim))
        cos, sin = rotary.rotary_cos_sin(torch.arange(tokens, device=device), inv, bf16)
        moved = 2 * tokens * (shapes.q_heads + shapes.kv_heads) * shapes.head_dim * 2
        compare(report, ceilings, "kernels", "rotary", f"T={tokens}", partial(rotary.rotary_triton, q, k, cos, sin),
                partial(rotary.rotary_reference, q, k, cos, sin), device, budget, bytes_moved=moved, flops=0,
                tolerance=1e-2)
    gate = torch.randn(shapes.experts, d, device=device, generator=gen) / d**0.5
    bias = 0.01 * torch.randn(shapes.experts, device=device, generator=gen)
    for tokens in shapes.token_counts:  # the router
        h = torch.randn(tokens, d, device=device, dtype=bf16, generator=gen)
        compare(report, ceilings, "kernels", "router", f"T={tokens} E={shapes.experts}",
                partial(router.route_triton, h, gate, bias, shapes.top_k),
                partial(router.route_reference, h, gate, bias, shapes.top_k), device, budget,
                bytes_moved=shapes.experts * d * 4 + tokens * d * 2, flops=2 * tokens * d * shapes.experts,
                tolerance=1e-4)

    for scheme in ("bf16", "fp8-channel-w8a16", "fp8-block-w8a16", "fp8-block-w8a8"):  # the fused MoE
        w_gate_up, w_down, kwargs = moe_experts(shapes, device, scheme)
        per_expert = sum(t[0].numel() * t.element_size() for t in (w_gate_up, w_down))
        per_expert += sum(t[0].numel() * t.element_size() for t in kwargs.values() if isinstance(t, torch.Tensor))
        for tokens in shapes.token_counts:
            x = torch.randn(tokens, d, device=device, dtype=bf16, generator=gen)
            ids, weights = random_topk(tokens, shapes, device, gen)
            used = int(torch.unique(ids).numel())
            pairs = tokens * shapes.top_k
            values = compare(
                report, ceilings, "fused_moe", scheme, f"T={tokens}",
                partial(fused_moe.fused_moe_triton, x, w_gate_up, w_down, ids, weights, **kwargs),
                partial(fused_moe.fused_moe_reference, x, w_gate_up, w_down, ids, weights, **kwargs), device,
                budget, bytes_moved=used * per_expert + 2 * tokens * d * 2,
                flops=2 * pairs * 3 * d * shapes.width, tolerance=0.08 if scheme.endswith("w8a8") else 2e-2)
            values.update(experts_used=used)
        w_gate_up = w_down = kwargs = None  # free before the next scheme's experts are made

    kv_bytes = 2 * shapes.kv_heads * shapes.head_dim * 2  # k and v, bf16, per cached token
    block_size = 16
    contexts = [(b, shapes.decode_context) for b in shapes.decode_batches] + [(1, shapes.long_context)]
    for batch, context in contexts:  # paged decode attention
        blocks_per_seq = -(-context // block_size)
        k_cache = torch.randn(batch * blocks_per_seq, block_size, shapes.kv_heads, shapes.head_dim, device=device,
                              dtype=bf16, generator=gen)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(batch * blocks_per_seq, device=device, generator=gen).view(batch, -1).int()
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, shapes.q_heads, shapes.head_dim, device=device, dtype=bf16, generator=gen)
        scale = shapes.head_dim**-0.5
        compare(report, ceilings, "attention", "decode_attention", f"B={batch} ctx={context}",
                partial(attention.decode_attention_triton, q, k_cache, v_cache, tables, lens, scale),
                partial(attention.decode_attention_reference, q, k_cache, v_cache, tables, lens, scale), device,
                budget, bytes_moved=batch * context * kv_bytes, flops=4 * batch * context * shapes.q_heads *
                shapes.head_dim, tolerance=1e-2)
        k_cache = v_cache = None
    for length in shapes.prefill_lengths:  # causal prefill: Triton flash vs SDPA (GQA expanded, and native)
        q = torch.randn(length, shapes.q_heads, shapes.head_dim, device=device, dtype=bf16, generator=gen)
        k = torch.randn(length, shapes.kv_heads, shapes.head_dim, device=device, dtype=bf16, generator=gen)
        v = torch.randn_like(k)
        scale = shapes.head_dim**-0.5
        flops = 2 * length * length * shapes.q_heads * shapes.head_dim  # causal: half of 4 * T^2 * H * Dh

        sdpa_native = partial(sdpa_gqa, q, k, v, scale)

        moved = 2 * length * (shapes.q_heads + shapes.kv_heads) * shapes.head_dim * 2
        compare(report, ceilings, "attention", "prefill_attention", f"T={length}",
                partial(attention.prefill_attention_triton, q, k, v, scale),
                partial(attention.prefill_attention_reference, q, k, v, scale), device, budget, bytes_moved=moved,
                flops=flops, tolerance=1e-2)
        compare(report, ceilings, "attention", "prefill vs SDPA(gqa)", f"T={length}",
                partial(attention.prefill_attention_triton, q, k, v, scale), sdpa_native, device, budget,
                bytes_moved=moved, flops=flops, tolerance=1e-2, reference_label="sdpa enable_gqa")

    n_out, k_in = shapes.linear_out, d
    weight = torch.randn(n_out, k_in, device=device, dtype=bf16, generator=gen) / k_in**0.5
    for block in (None, (128, 128)):  # FP8 dense linear (q_proj-shaped) vs the dequantising reference and cuBLAS
        wq, ws = fp8.quantize_weight_per_channel(weight) if block is None else fp8.quantize_weight_blockwise(
            weight, block)
        dense = fp8.dequantize_weight(wq, ws, block, bf16)
        for act_quant in (False, True):
            label = f"fp8_linear {'channel' if block is None else 'block'} {'w8a8' if act_quant else 'w8a16'}"
            for tokens in shapes.token_counts:
                x = torch.randn(tokens, k_in, device=device, dtype=bf16, generator=gen)
                moved = n_out * k_in + ws.numel() * 4 + tokens * (k_in + n_out) * 2
                values = compare(report, ceilings, "fp8_linear", label, f"T={tokens} {n_out}x{k_in}",
                                 partial(fp8.fp8_linear_triton, x, wq, ws, None, block, act_quant),
                                 partial(fp8.fp8_linear_reference, x, wq, ws, None, block, act_quant), device, budget,
                                 bytes_moved=moved, flops=2 * tokens * n_out * k_in,
                                 tolerance=0.08 if act_quant else 2e-2)
                cublas_ms = time_ms(partial(F.linear, x, dense), device, budget)
                values.update(cublas_bf16_ms=cublas_ms, vs_cublas_bf16=cublas_ms / values["ms"])


# --- (c) the model --------------------------------------------------------------------------------------------------
def build_fp8_model(config: GLMConfig, scheme, device: torch.device, dtype: torch.dtype):
    """The engine's model class, FP8 modules swapped in on `meta`, every tensor then made on `device` with random
    values: nothing is read from disk and no dense copy of the weights ever exists."""
    from workbench.engine.model import GLMForCausalLM
    from workbench.engine.quant import quantize_model

    with torch.device("meta"):
        model = GLMForCausalLM(config)
        quantize_model(model, scheme)
    gen = torch.Generator(device=device).manual_seed(0)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            if param.dtype == fp8.FP8_DTYPE and param.dim() == 3:  # stacked experts: one expert at a time
                data = torch.empty(param.shape, dtype=fp8.FP8_DTYPE, device=device)
                for i in range(param.shape[0]):
                    data[i] = torch.randn(param.shape[1:], device=device, generator=gen).to(fp8.FP8_DTYPE)
            elif param.dtype == fp8.FP8_DTYPE:
                data = torch.randn(param.shape, device=device, generator=gen).to(fp8.FP8_DTYPE)
            elif full.endswith("_scale"):
                data = torch.full(param.shape, 0.02, dtype=torch.float32, device=device)  # e4m3 N(0,1) x 0.02
            elif full.endswith("norm.weight"):
                data = torch.ones(param.shape, dtype=dtype, device=device)
            elif full.endswith("e_score_correction_bias"):
                data = torch.zeros(param.shape, dtype=torch.float32, device=device)
            else:
                keep_fp32 = full.endswith("mlp.gate.weight")
                data = 0.02 * torch.randn(param.shape, device=device, generator=gen)
                data = data if keep_fp32 else data.to(dtype)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.materialize_buffers(device)
    return model.eval()  # the engine sets its kernels (Triton) when it starts


def decode_step_graph(engine, batch: int, context: int):
    """The model's decode step for `batch` sequences at `context` cached tokens, as a callable: a CUDA graph on
    a GPU (what a serving loop replays; the engine's eager loop adds Python and launch overhead), else eager."""
    from workbench.engine.model import AttentionBatch

    model, cache, device = engine.model, engine.cache, engine.device
    blocks_per_seq = cache.blocks_for(context + 1)
    tables = torch.arange(batch * blocks_per_seq, device=device, dtype=torch.int32).view(batch, blocks_per_seq)
    positions = torch.full((batch,), context, device=device, dtype=torch.long)
    slots = tables[:, context // cache.block_size].long() * cache.block_size + context % cache.block_size
    attn = AttentionBatch(positions=positions, slot_mapping=slots, block_tables=tables,
                          seq_lens=torch.full((batch,), context + 1, device=device, dtype=torch.int32))
    for k, v in cache.layers:  # finite cache contents in the blocks the step reads
        k[: batch * blocks_per_seq].normal_(0, 0.5)
        v[: batch * blocks_per_seq].normal_(0, 0.5)
    input_ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)

    def step():
        return model.compute_logits(model.hidden_states(input_ids, attn, cache.layers)).argmax(-1)

    if device.type != "cuda":
        return step
    with torch.no_grad():
        step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm up (allocations, autotuned configs) off the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph.replay


def bench_model(shapes: Shapes, device: torch.device, report: Report) -> None:
    from workbench.engine import Engine
    from workbench.engine.quant import QuantScheme, model_bytes

    config = GLMConfig.preset(shapes.model_preset, **shapes.model_overrides)
    dtype = torch.bfloat16
    scheme = QuantScheme.channel()  # the Air FP8 checkpoint's format; w8a8 measured too, by flipping a flag
    start = time.perf_counter()
    model = build_fp8_model(config, scheme, device, dtype)
    synchronize(device)
    built_s = time.perf_counter() - start
    weight_gb = model_bytes(model) / 1e9
    active = config.num_parameters(active_only=True)
    graph_context = 1024 if device.type == "cuda" else 8  # cached tokens behind each decode-step query
    context_needed = max(max(shapes.model_prefill) + shapes.model_decode_tokens + 64,
                         shapes.model_batch * (graph_context + 64),
                         shapes.model_batch * (shapes.model_prompt + shapes.model_decode_tokens + 16))
    engine = Engine(model, None, device=device, dtype=dtype, kernels="triton", max_batch_size=shapes.model_batch,
                    cache_tokens=context_needed, block_size=16, name=f"{shapes.model_preset}-fp8-random")
    report.add("model", "build", preset=shapes.model_preset, layers=config.num_hidden_layers, scheme=scheme.name,
               weight_gb=weight_gb, active_params=active, build_s=built_s)
    report.row("model built on device", f"{config.num_hidden_layers} layers", f"{built_s:.1f} s", "", "",
               f"{weight_gb:.1f} GB of weights, {scheme.name}")
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(200, config.vocab_size, (n,), generator=gen).tolist()

    for mode in shapes.model_modes:
        for module in model.modules():
            if hasattr(module, "act_quant"):
                module.act_quant = mode == "w8a8"
        # Batch-1 decode through the engine's own loop (eager): time per token after the first.
        n = shapes.model_decode_tokens
        if device.type == "cuda":  # compile the kernels outside the timed run
            engine.generate(prompt(shapes.model_prompt), max_new_tokens=2, temperature=0.0, stop_token_ids=[])
        stream = engine.stream(prompt(shapes.model_prompt), max_new_tokens=n, temperature=0.0, stop_token_ids=[])
        stamps = []
        for _ in stream:
            synchronize(device)
            stamps.append(time.perf_counter())
        eager_tok_s = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        report.add("model", f"batch1_decode_engine {mode}", tok_s=eager_tok_s, tokens=len(stamps))
        report.row(f"decode b=1 engine loop {mode}", f"ctx {shapes.model_prompt}", f"{eager_tok_s:.1f} tok/s")
        # The model's decode step alone, as a serving loop would replay it.
        for batch in (1, shapes.model_batch):
            step = decode_step_graph(engine, batch, graph_context)
            ms = time_ms(step, device, max(shapes.budget_ms, 200))
            tok_s = batch / (ms / 1000)
            name = "batch1_decode_tok_s" if batch == 1 else f"batch{batch}_decode_tok_s"
            values = dict(tok_s=tok_s, step_ms=ms, graph=device.type == "cuda",
                          weight_bandwidth_gb_s=weight_gb / (ms / 1000) if batch == 1 else None)
            report.add("model", f"{name} {mode}", **values)
            target = TARGETS["batch1_decode_tok_s"] if batch == 1 else None
            report.row(f"decode b={batch} step {mode}", f"ctx {graph_context}", f"{tok_s:.1f} tok/s", "", "",
                       f"{fmt_ms(ms)}/step" + (f", target {target:.0f} tok/s: "
                                               f"{'met' if tok_s >= target else 'NOT met'}" if target else ""))
        for length in shapes.model_prefill:  # prefill through the engine (one step, max_new_tokens=1)
            ids = prompt(length)
            if length > 256:  # compile the prefill-sized kernel variants outside the timed run
                engine.generate(ids[:256], max_new_tokens=1, stop_token_ids=[])
            synchronize(device)
            start = time.perf_counter()
            engine.generate(ids, max_new_tokens=1, stop_token_ids=[])
            synchronize(device)
            seconds = time.perf_counter() - start
            report.add("model", f"prefill_{length} {mode}", tok_s=length / seconds, seconds=seconds)
            report.row(f"prefill {mode}", f"{length} tokens", f"{length / seconds:.0f} tok/s", "", "",
                       f"{seconds:.2f} s, {2 * active * length / seconds / 1e12:.0f} TFLOP/s on weights")
        # Batch-N decode through the engine: N requests, steady-state steps after the prefill.
        requests = [engine.add_request(prompt(shapes.model_prompt), _params(shapes.model_decode_tokens)) for _ in
                    range(shapes.model_batch)]
        engine.step()  # admits and prefills all of them
        synchronize(device)
        start, produced = time.perf_counter(), 0
        while engine.num_running or engine.num_waiting:
            produced += engine.step()
        synchronize(device)
        tok_s = produced / (time.perf_counter() - start)
        assert all(r.result().finish_reason == "length" for r in requests)
        report.add("model", f"batch{shapes.model_batch}_decode_engine {mode}", tok_s=tok_s, tokens=produced)
        report.row(f"decode b={shapes.model_batch} engine loop {mode}", f"ctx {shapes.model_prompt}",
                   f"{tok_s:.0f} tok/s")


def _params(max_new_tokens: int):
    from workbench.engine import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[])


# --- main -----------------------------------------------------------------------------------------------------------
@torch.no_grad()  # scoped, not torch.set_grad_enabled(False): a test runs main() inside the pytest process
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU under the Triton interpreter")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "gpu.json")
    parser.add_argument("--sections", default="ceilings,kernels,model",
                        help="comma-separated subset of ceilings,kernels,model")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke run")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else AIR
    report = Report()
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(f"device: {name}; torch {torch.__version__}; shapes: {'tiny' if args.tiny else 'GLM-4.5-Air'}", flush=True)
    report.figures["meta"] = dict(device=name, torch=torch.__version__, tiny=args.tiny, targets=TARGETS,
                                  interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    ceilings = {"bytes_per_s": 1e11, "flops_per_s": 1e12}  # placeholders when the section is skipped
    if "ceilings" in sections:
        ceilings = measure_ceilings(shapes, device, report)
    if "kernels" in sections:
        bench_kernels(shapes, device, ceilings, report)
        decode = report.figures.get("fused_moe", {}).get("fp8-channel-w8a16 T=1")
        if decode:
            met = decode["roofline_pct"] >= TARGETS["fused_moe_decode_roofline_pct"]
            report.row("target: fused MoE decode", "fp8 channel T=1", f"{decode['roofline_pct']:.0f}%", "", "",
                       f">= {TARGETS['fused_moe_decode_roofline_pct']:.0f}% of roofline: {'met' if met else 'NOT met'}")
    if "model" in sections:
        bench_model(shapes, device, report)
    report.figures["meta"]["seconds"] = time.perf_counter() - started
    print("\n" + report.table())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report.figures, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({report.figures['meta']['seconds']:.0f} s)")
    return report.figures


if __name__ == "__main__":
    main()
