"""Microbenchmark of the compiled quantized kernels at GLM-4.5-Air's shapes: achieved GB/s of weights read against
the machine's measured memory bandwidth, at 1 and 2 threads, int8 / int4 against bf16.

Rows (each: ms per call or tok/s, GB/s of weights read, % of the measured copy bandwidth):
- `decode step`: the compiled decode step (DecodeModel) of an Air-width slice, one MoE layer (attention with 96
  heads, 8 of 32 routed experts, the shared expert) and the lm_head, every linear in the format: tok/s;
- `experts`: one MoE layer's decode: 8 routed experts of gate_up [2816, 4096] and down [4096, 1408], one token
  (`quantized_fused_moe`; bf16: `fused_moe_cpu`, the engine's torch path for one token);
- `lm_head`: the output projection [151552, 4096], one token (`quantized_linear`; bf16: F.linear);
- `prefill`: gate_up of one expert [2816, 4096] on 64 rows (the integer GEMM; bf16: F.linear), in GFLOP/s.
The weights are random bytes in the formats (quantizing 600M values would take longer than the benchmark); the
experts are drawn from 32 so that a repeat does not find them in the cache. Bandwidth: `torch.Tensor.copy_` of
256 MB (bytes read + written per second) and a sum over the same (bytes read per second).

    python bench/quant_gemv.py [--repeats 5] [--threads 1 2] [--isa avx2] [--only-decode]
Last line: `int4_decode_tok_s=X int8_decode_tok_s=Y bf16_decode_tok_s=Z int4_two_thread_scaling=W` (decode step
rows, the last thread count; scaling: last over first). Peak memory ~3 GB (the bf16 slice).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from glm_kernels import cpu_compiled
from glm_kernels.blockquant import Int4Weight, Int8Weight
from glm_kernels.fused_moe import fused_moe_cpu
from glm_kernels.quant_linear import isa, quantized_fused_moe, quantized_linear, set_isa

HIDDEN, WIDTH, EXPERTS, TOP_K, VOCAB = 4096, 1408, 32, 8, 151552


def random_int8(*shape: int, group: int = 32) -> Int8Weight:
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    return Int8Weight(q, torch.rand(*shape[:-1], shape[-1] // group) * 0.01, group)


def random_int4(*shape: int) -> Int4Weight:
    lead, k = shape[:-1], shape[-1]
    supers = -(-k // 256)
    return Int4Weight(torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8), torch.rand(*lead, supers) * 0.01,
                      torch.rand(*lead, supers) * 0.01, torch.randint(0, 64, (*lead, k // 32), dtype=torch.uint8),
                      torch.randint(0, 64, (*lead, k // 32), dtype=torch.uint8))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(repeats: int) -> tuple[float, float]:
    src = torch.empty(64 * 2**20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), repeats)
    read = timed(lambda: src.sum(), repeats)
    return 2 * src.nbytes / copy / 1e9, src.nbytes / read / 1e9


def air_slice_step(fmt: str, experts: int, generator: torch.Generator):
    """A compiled decode step (DecodeModel) of one GLM-4.5-Air MoE layer at full width (96 heads, 8 kv heads, head
    dim 128, `experts` routed experts top-8 of width 1408, a shared expert) and its lm_head [151552, 4096], with
    random weights: `fmt` "bf16" or a quantized format for every linear (norms, router, embeddings in bf16 / fp32).
    Returns the step and the bytes of weights one token reads."""
    from glm_kernels.quant_linear import decode_step_weight

    dtype = torch.bfloat16
    q_width, kv_width = 96 * 128, 8 * 128

    def weight(*shape: int) -> dict[str, torch.Tensor] | torch.Tensor:
        if fmt == "bf16":
            return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)
        return random_int8(*shape) if fmt == "int8" else random_int4(*shape)

    def nbytes(w) -> int:
        return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes

    linears = {"qkv_weight": weight(q_width + 2 * kv_width, HIDDEN), "o_weight": weight(HIDDEN, q_width),
               "experts_gate_up": weight(experts, 2 * WIDTH, HIDDEN), "experts_down": weight(experts, HIDDEN, WIDTH),
               "mlp_gate_up": weight(2 * WIDTH, HIDDEN), "mlp_down": weight(HIDDEN, WIDTH)}
    head = weight(VOCAB, HIDDEN)
    per_token = sum(nbytes(w) for key, w in linears.items() if not key.startswith("experts")) + nbytes(head)
    per_token += TOP_K * (nbytes(linears["experts_gate_up"]) + nbytes(linears["experts_down"])) // experts
    layer: dict[str, torch.Tensor] = {
        "input_norm": torch.ones(HIDDEN, dtype=dtype), "post_norm": torch.ones(HIDDEN, dtype=dtype),
        "router_weight": torch.randn(experts, HIDDEN, generator=generator) * 0.02,
        "router_bias": torch.zeros(experts),
        "k_cache": torch.zeros(64, 16, 8, 128, dtype=dtype), "v_cache": torch.zeros(64, 16, 8, 128, dtype=dtype)}
    for key, w in linears.items():
        layer |= {key: w} if fmt == "bf16" else decode_step_weight(key, w)
    config = {"num_heads": 96, "num_kv_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "top_k": TOP_K,
              "n_group": 1, "topk_group": 1, "norm_topk_prob": 1.0, "routed_scaling_factor": 1.0, "block_size": 16}
    embed = torch.randn(4096, HIDDEN, generator=generator).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    module = cpu_compiled.load()
    step = module.DecodeModel([layer], embed, torch.ones(HIDDEN, dtype=dtype), head if fmt == "bf16" else None,
                              inv_freq, config, quantized={} if fmt == "bf16" else decode_step_weight("lm_head", head))
    return step, per_token


def decode_rates(args, copy_gbps: dict[int, float]) -> dict[tuple[str, int], float]:
    """tok/s of the Air-width decode step per format and thread count (interleaved: each format's step is built
    once and timed at every thread count)."""
    generator = torch.Generator().manual_seed(1)
    rates = {}
    for fmt in ("int4", "int8", "bf16"):
        step, per_token = air_slice_step(fmt, EXPERTS, generator)
        tables = torch.arange(64, dtype=torch.int32)[None]
        for threads in args.threads:
            torch.set_num_threads(threads)
            position = 0

            def one(step=step, tables=tables):
                nonlocal position
                step.step(torch.tensor([position % 4096]), torch.tensor([position]), tables, False, False)
                position += 1

            seconds = timed(one, args.decode_tokens)
            rates[(fmt, threads)] = 1 / seconds
            gbps = per_token / seconds / 1e9
            print(f"decode step {fmt} threads={threads}: {1 / seconds:6.2f} tok/s  {per_token / 1e9:.2f} GB/token  "
                  f"{gbps:5.1f} GB/s  {100 * gbps / copy_gbps[threads]:5.1f}% of copy")
        del step
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--isa", default=None, help="scalar | avx2 | avx512vnni (default: the best compiled)")
    parser.add_argument("--skip-lm-head", action="store_true", help="leave out the 151552-row lm_head rows")
    parser.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed per format and threads")
    parser.add_argument("--only-decode", action="store_true", help="only the whole decode step rows")
    args = parser.parse_args()
    assert cpu_compiled.load() is not None, cpu_compiled.build_error()
    set_isa(args.isa)
    print(f"isa={isa()}")
    generator = torch.Generator().manual_seed(0)

    formats = {
        "int8": (lambda *s: random_int8(*s)),
        "int4": random_int4,
        "bf16": (lambda *s: (torch.randn(*s, generator=generator) * 0.02).to(torch.bfloat16)),
    }
    x = torch.randn(1, HIDDEN, generator=generator)
    x64 = torch.randn(64, HIDDEN, generator=generator)
    results: dict[tuple[str, str, int], float] = {}
    copies = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        copies[threads], read_gbps = bandwidth(args.repeats)
        print(f"threads={threads} memory: copy {copies[threads]:.1f} GB/s (read + write), read {read_gbps:.1f} GB/s")
    rates = decode_rates(args, copies)
    for threads in args.threads:
        if args.only_decode:
            break
        torch.set_num_threads(threads)
        copy_gbps = copies[threads]
        for name, make in formats.items():
            gate_up, down = make(EXPERTS, 2 * WIDTH, HIDDEN), make(EXPERTS, HIDDEN, WIDTH)
            per_expert = (gate_up.nbytes + down.nbytes) / EXPERTS if name != "bf16" else \
                (gate_up[0].nbytes + down[0].nbytes)
            calls = iter(range(10**9))

            def experts(gate_up=gate_up, down=down, calls=calls, name=name):
                first = (next(calls) * TOP_K) % EXPERTS
                ids = (torch.arange(TOP_K) + first).remainder(EXPERTS).view(1, TOP_K)
                weights = torch.full((1, TOP_K), 1.0 / TOP_K)
                if name == "bf16":
                    return fused_moe_cpu(x.to(torch.bfloat16), gate_up, down, ids, weights)
                return quantized_fused_moe(x, gate_up, down, ids, weights)

            seconds = timed(experts, args.repeats * 4)
            gbps = TOP_K * per_expert / seconds / 1e9
            results[("experts", name, threads)] = gbps
            print(f"  experts {name}: {seconds * 1e3:7.2f} ms  {gbps:6.1f} GB/s  "
                  f"{100 * gbps / copy_gbps:5.1f}% of copy")
            one = gate_up[0]
            rows = x64.to(torch.bfloat16) if name == "bf16" else x64
            fn = (lambda one=one, rows=rows: F.linear(rows, one)) if name == "bf16" else \
                (lambda one=one, rows=rows: quantized_linear(rows, one))
            seconds = timed(fn, args.repeats)
            print(f"  prefill {name} (64 x 4096 -> 2816): {seconds * 1e3:7.2f} ms "
                  f"{2 * 64 * HIDDEN * 2 * WIDTH / seconds / 1e9:6.1f} GFLOP/s")
            del gate_up, down
            if not args.skip_lm_head:
                head = make(VOCAB, HIDDEN)
                fn = (lambda head=head: F.linear(x.to(torch.bfloat16), head)) if name == "bf16" else \
                    (lambda head=head: quantized_linear(x, head))
                seconds = timed(fn, args.repeats)
                gbps = head.nbytes / seconds / 1e9
                print(f"  lm_head {name}: {seconds * 1e3:7.2f} ms  {gbps:6.1f} GB/s  "
                      f"{100 * gbps / copy_gbps:5.1f}% of copy")
                del head
    one, two = args.threads[0], args.threads[-1]
    print(f"int4_decode_tok_s={rates[('int4', two)]:.2f} int8_decode_tok_s={rates[('int8', two)]:.2f} "
          f"bf16_decode_tok_s={rates[('bf16', two)]:.2f} "
          f"int4_two_thread_scaling={rates[('int4', two)] / rates[('int4', one)]:.2f}")


if __name__ == "__main__":
    main()
