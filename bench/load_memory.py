"""Peak resident-memory growth while loading a checkpoint, against the weights' size in the target dtype.

Writes a random checkpoint (default about 400 MB in bf16), then loads it in a fresh process per case and reads
that process's peak RSS (ru_maxrss) before and after `Engine.from_pretrained`. Target: growth <= 1.3x. With
`--quantize int8,int4` the cases are the quantize-at-load ones, and the target is against the quantized size.

With `--gguf q8_0,q4_k` the cases are GGUF files of the same shape (random blocks, workbench.engine.testing's
write_synthetic_gguf) loaded the way the engine does on the CPU: the first load repacks into a cache and maps it,
the second maps the cache, and "in memory" copies the weights (WORKBENCH_GGUF_CACHE=off); each row gives the
file's size, the load's seconds, its peak RSS growth and the peak after a 4-token prompt and 4 decoded tokens.

    python bench/load_memory.py [--hidden 1024] [--layers 6] [--experts 32] [--quantize int8,int4]
    python bench/load_memory.py --gguf q8_0,q4_k [--hidden 1024] [--layers 6] [--experts 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--shard-mb", type=int, default=0, help="write sharded files of this size (0: one file)")
    parser.add_argument("--quantize", default="", help="comma-separated quantize options (int8, int4) to load with")
    parser.add_argument("--model", default=None, help="an existing checkpoint folder instead of a random one")
    parser.add_argument("--gguf", default="", help="comma-separated GGUF types (q8_0, q4_k, q6_k): GGUF rows instead")
    args = parser.parse_args()
    if args.gguf:
        gguf_rows(args)
        return

    import torch

    from workbench.engine import GLMConfig
    from workbench.engine.testing import measure_load_memory, write_tiny_checkpoint

    config = GLMConfig.preset("tiny", vocab_size=8192, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                              head_dim=args.hidden // 8, n_routed_experts=args.experts, num_experts_per_tok=4,
                              moe_intermediate_size=args.hidden // 2)
    if args.model:
        folder = Path(args.model)
        print(f"checkpoint: {folder}")
    else:
        folder = Path(tempfile.mkdtemp(prefix="glm-mem-")) / "ckpt"
        shard = args.shard_mb * 2**20 or None
        write_tiny_checkpoint(folder, config, dtype=torch.bfloat16, max_shard_bytes=shard)
        print(f"checkpoint: {config.num_parameters() / 1e6:.0f}M parameters, bf16 on disk"
              f"{f', shards of {args.shard_mb} MB' if shard else ', one file'}")
    cases = [("float32", q) for q in args.quantize.split(",") if q] or [("bfloat16", None), ("float32", None)]
    # What any load costs whatever its size (allocator arenas, tokenizer, modules), from a ~1 MB checkpoint: on a
    # small model it dwarfs the weights, so the ratio is also given without it.
    tiny = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="glm-mem-")) / "tiny", "tiny")
    worst = 0.0
    for dtype, quantize in cases:
        figures = measure_load_memory(folder, dtype, quantize)
        fixed = measure_load_memory(tiny, dtype, quantize)
        ratio = figures["growth"] / figures["weights"]
        net = (figures["growth"] - fixed["growth"]) / (figures["weights"] - fixed["weights"])
        worst = max(worst, net)
        print(f"load as {quantize or dtype:9}: weights {figures['weights'] / 2**20:7.1f} MiB, peak RSS growth "
              f"{figures['growth'] / 2**20:7.1f} MiB, ratio {ratio:.2f}; less a tiny model's load "
              f"({fixed['growth'] / 2**20:.0f} MiB): {net:.2f}")
    print(f"peak_rss_growth_vs_weights={worst:.2f}  (less the fixed cost of a load)")


def gguf_rows(args) -> None:
    import shutil

    from workbench.engine import GLMConfig
    from workbench.engine.testing import measure_gguf_load, write_synthetic_gguf

    config = GLMConfig.preset("tiny", vocab_size=8192, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                              head_dim=args.hidden // 8, n_routed_experts=args.experts, num_experts_per_tok=4,
                              moe_intermediate_size=args.hidden, first_k_dense_replace=1)
    folder = Path(tempfile.mkdtemp(prefix="glm-mem-gguf-"))
    try:
        for qtype in args.gguf.split(","):
            path = write_synthetic_gguf(folder / f"model-{qtype}.gguf", config, qtype)
            size = path.stat().st_size
            cache = folder / "cache"
            rows = [("first load (repack + map)", measure_gguf_load(path, cache, 4)),
                    ("second load (map)", measure_gguf_load(path, cache, 4)),
                    ("in memory (cache off)", measure_gguf_load(path, "off", 4))]
            print(f"GGUF {qtype}: file {size / 2**20:.0f} MiB, {config.num_hidden_layers - 1} MoE layers x "
                  f"{args.experts} experts, top-4")
            for label, figures in rows:
                print(f"  {label:26}: {figures['seconds']:6.1f} s ({size / 1e9 / figures['seconds']:5.2f} GB/s), "
                      f"peak RSS growth {figures['growth'] / 2**20:7.1f} MiB ({figures['growth'] / size:.2f}x the "
                      f"file); with 8 tokens {figures['decode_growth'] / 2**20:7.1f} MiB")
            shutil.rmtree(cache, ignore_errors=True)
            path.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
