"""Tune the fused MoE tile configs on this GPU and write them where `glm_kernels.moe_config` finds them.

For each weight format and token count, every config of the search space runs the whole fused MoE (alignment,
both grouped GEMMs, the top-k sum) on random Air-shaped inputs; the fastest correct one is kept. Output:
`kernels/glm_kernels/configs/E={E},N={I},device_name={GPU},dtype={dtype}.json` (or --out-dir), one file per
weight format, keyed by token count.

    python bench/tune_moe.py [--dtypes fp8_w8a16,fp8_w8a16_block128x128,bf16] [--tokens 1,8,64,512,4096]
                             [--experts 128 --width 1408 --hidden 4096 --top-k 8] [--quick] [--out-dir DIR]

`--tiny` runs the same loop at small shapes with two configs on the CPU under Triton's interpreter (to check
the script, not to tune anything).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

if "--tiny" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before glm_kernels defines its kernels

from glm_kernels import fp8, moe_config  # noqa: E402
from glm_kernels.fused_moe import fused_moe_reference, fused_moe_triton  # noqa: E402

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("bf16", "fp8_w8a16", "fp8_w8a8", "fp8_w8a16_block128x128", "fp8_w8a8_block128x128")


def search_space(tokens: int, top_k: int, experts: int, dtype: str, quick: bool) -> list[dict]:
    """Candidate configs, pruned by what can help at this size and what fits a Hopper SM's shared memory."""
    rows_per_expert = tokens * top_k / experts
    block_m = [16] if rows_per_expert <= 2 else [16, 32, 64] if rows_per_expert <= 64 else [32, 64, 128]
    block_n = [32, 64, 128] if quick else [32, 64, 128, 256]
    block_k = [64, 128] if quick else [64, 128, 256]
    warps = [4, 8]
    stages = [3, 4] if quick else [2, 3, 4, 5]
    weight_bytes = 1 if dtype.startswith("fp8") else 2
    act_bytes = 1 if "w8a8" in dtype else 2
    configs = []
    for m, n, k, w, s in itertools.product(block_m, block_n, block_k, warps, stages):
        if "block" in dtype and k > 128:
            continue  # a k-tile must stay inside one 128-wide scale block
        if 2 * m * n > 128 * 32 * w:
            continue  # two fp32 accumulators (gate and up) within ~128 registers a thread of w warps
        if s * (m * k * act_bytes + 2 * k * n * weight_bytes) > 220 * 1024:
            continue  # pipelined tiles must fit shared memory
        configs.append(dict(BLOCK_SIZE_M=m, BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, num_warps=w, num_stages=s))
    return configs


def make_inputs(dtype: str, tokens: int, shapes: argparse.Namespace, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(tokens)
    e, d, i = shapes.experts, shapes.hidden, shapes.width
    x = torch.randn(tokens, d, device=device, generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(e, 2 * i, d, device=device, generator=gen) / d**0.5).to(torch.bfloat16)
    down = (torch.randn(e, d, i, device=device, generator=gen) / i**0.5).to(torch.bfloat16)
    ids = torch.rand(tokens, e, device=device, generator=gen).topk(shapes.top_k, dim=1).indices
    weights = torch.rand(tokens, shapes.top_k, device=device, generator=gen).softmax(-1)
    if dtype == "bf16":
        return (x, gate_up, down, ids, weights), {}
    block = (128, 128) if "block" in dtype else None
    quantize = fp8.quantize_weight_per_channel if block is None else (
        lambda w: fp8.quantize_weight_blockwise(w, block))
    (gq, gs), (uq, us), (dq, ds) = quantize(gate_up[:, :i]), quantize(gate_up[:, i:]), quantize(down)
    kwargs = dict(w_gate_up_scale=torch.cat((gs, us), 1), w_down_scale=ds, block_size=block,
                  act_quant="w8a8" in dtype)
    return (x, torch.cat((gq, uq), 1), dq, ids, weights), kwargs


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def tune(dtype: str, token_counts: list[int], shapes: argparse.Namespace, device: torch.device,
         quick: bool, tiny: bool) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for tokens in token_counts:
        args, kwargs = make_inputs(dtype, tokens, shapes, device)
        reference = fused_moe_reference(*args, **kwargs).float()
        tolerance = 0.08 if "w8a8" in dtype else 2e-2
        space = search_space(tokens, shapes.top_k, shapes.experts, dtype, quick)
        if tiny:
            space = space[:2]
        results = []
        for config in space:
            try:
                out = fused_moe_triton(*args, **kwargs, config=config)
                err = float((out.float() - reference).norm() / reference.norm())
                if err > tolerance:
                    print(f"  {dtype} T={tokens} {config}: wrong result (rel err {err:.2e}), skipped", flush=True)
                    continue
                results.append((time_ms(partial(fused_moe_triton, *args, **kwargs, config=config), device), config))
            except Exception as exc:  # noqa: BLE001 - configs that do not compile (out of resources) are skipped
                print(f"  {dtype} T={tokens} {config}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        if not results:
            raise RuntimeError(f"no config of {len(space)} worked for {dtype} at {tokens} tokens")
        ms, config = min(results, key=lambda r: r[0])
        default_ms = time_ms(partial(fused_moe_triton, *args, **kwargs), device)
        print(f"{dtype} T={tokens}: best {ms * 1000:.1f} us ({config}) vs default {default_ms * 1000:.1f} us, "
              f"{len(results)}/{len(space)} configs ran", flush=True)
        best[str(tokens)] = config
    return best


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp8_w8a16,fp8_w8a8,fp8_w8a16_block128x128,bf16")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--width", type=int, default=1408)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a smaller search space (about a quarter)")
    parser.add_argument("--out-dir", type=Path, default=moe_config.CONFIG_DIR)
    parser.add_argument("--tiny", action="store_true", help="check the script on the CPU (interpreter)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.experts, args.width, args.hidden, args.top_k, args.tokens = 8, 32, 64, 2, "1"
    elif not torch.cuda.is_available():
        parser.error("tuning needs a CUDA device (or --tiny to check the script on the CPU)")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = moe_config.device_name(device)
    token_counts = [int(t) for t in args.tokens.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dtype in dtypes:
        best = tune(dtype, token_counts, args, device, args.quick, args.tiny)
        path = args.out_dir / moe_config.config_file_name(args.experts, args.width, device_name, dtype)
        path.write_text(json.dumps(best, indent=2, sort_keys=False) + "\n")
        print(f"wrote {path}", flush=True)
        written.append(path)
    moe_config.clear_cache()
    return written


if __name__ == "__main__":
    main()
