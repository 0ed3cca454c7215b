"""CPU benchmark: our engine against transformers' generate, side by side in one run, on one ~10M checkpoint.

Prints batch-1 decode tok/s and 512-token prefill tok/s for both, ours with int8 and int4 weights (quantized as
they load), two ablations of our prefill (every prompt
row through the last layer; the torch CPU path instead of the compiled kernels), the aggregate decode tok/s of 8
sequences batched, our decode with the routing trace on, and the ratios. Beside them: our engine with int8 and
int4 weights (`quantize=`), and, when `llama-cpp-python` is installed (the `bench` extra; its first build takes
~15 minutes), llama.cpp on the same checkpoint exported to GGUF F32, F16, Q8_0 and Q4_K (`export-gguf`).
Last line: `decode_vs_transformers=X.XX prefill_vs_transformers=Y.YY`.

    python bench/engine_cpu.py [--decode-tokens 64] [--repeats 9] [--threads 1] [--no-quantized] [--no-llamacpp]

At real width (where these ratios change) see bench/air_slice.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from workbench.engine import Engine, GLMConfig
from workbench.engine.testing import write_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations, the same on both sides")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two threads spin against each other)")
    parser.add_argument("--no-quantized", action="store_true", help="skip our int8 / int4 rows")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Glm4MoeForCausalLM

    config = GLMConfig.preset("bench-10m")
    folder = Path(tempfile.mkdtemp(prefix="glm-bench-")) / "bench-10m"
    write_tiny_checkpoint(folder, config, seed=0)
    ours = Engine.from_pretrained(folder, dtype=args.dtype, kernels="torch")
    # Two ablations of our prefill: every prompt row through the last layer (a saving worth 1/num_layers, so large
    # on this 4-layer model and ~2% on GLM-4.5-Air's 46), and the torch CPU path instead of the compiled kernels.
    ours_all_rows = Engine.from_pretrained(folder, dtype=args.dtype, kernels="torch")
    ours_all_rows.prefill_last_rows_only = False
    ours_torch_path = Engine.from_pretrained(folder, dtype=args.dtype, kernels="torch", cpu_kernels="torch")
    # Our integer weights, quantized as they load (int8: 9 bits per weight, int4: 4.75 and an int8 lm_head).
    quantized = {fmt: Engine.from_pretrained(folder, dtype=args.dtype, kernels="torch", quantize=fmt)
                 for fmt in ("int8", "int4")}
    theirs = Glm4MoeForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    print(f"model: {config.num_parameters() / 1e6:.1f}M parameters ({config.num_hidden_layers} layers, "
          f"{config.n_routed_experts} experts top-{config.num_experts_per_tok}, hidden {config.hidden_size}), "
          f"{args.dtype}, {torch.get_num_threads()} threads")

    generator = torch.Generator().manual_seed(0)
    short = torch.randint(100, config.vocab_size, (16,), generator=generator).tolist()
    long = torch.randint(100, config.vocab_size, (args.prefill_tokens,), generator=generator).tolist()
    n = args.decode_tokens

    class TokenClock:
        """A transformers streamer that notes when each generated token arrives (put() first gets the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    # Decode tok/s on both sides: generated tokens after the first, over the time from the first to the last,
    # so prefill never enters the figure (the same clock our engine keeps in GenerationResult.decode_seconds).
    def ours_decode_rate(routing: bool = False, engine=ours) -> float:
        result = engine.generate(short, max_new_tokens=n, temperature=0.0, stop_token_ids=[], routing=routing)
        assert len(result.token_ids) == n
        return result.decode_tokens_per_second

    def theirs_decode_rate() -> float:
        clock = TokenClock()
        with torch.no_grad():
            theirs.generate(torch.tensor([short]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0, streamer=clock)
        generated = clock.times[1:]  # the first put() is the prompt
        return (len(generated) - 1) / (generated[-1] - generated[0])

    def interleaved(contenders: dict) -> dict[str, float]:
        """Median rate of each contender over `repeats` rounds; every round runs each contender once in turn
        (after a warm-up round), so a change in the shared machine's load hits all of them alike."""
        for measure in contenders.values():
            measure()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, measure in contenders.items():
                samples[name].append(measure())
        return {name: statistics.median(values) for name, values in samples.items()}

    def rate(tokens: int, run) -> float:
        start = time.perf_counter()
        run()
        return tokens / (time.perf_counter() - start)

    def ours_prefill(engine=ours):
        engine.generate(long, max_new_tokens=1, temperature=0.0, stop_token_ids=[])

    def theirs_prefill():
        with torch.no_grad():
            theirs.generate(torch.tensor([long]), max_new_tokens=1, do_sample=False, eos_token_id=None,
                            pad_token_id=0)

    decode = interleaved({"ours": ours_decode_rate, "theirs": theirs_decode_rate,
                          "routed": lambda: ours_decode_rate(routing=True),
                          **{fmt: (lambda e=e: ours_decode_rate(engine=e)) for fmt, e in quantized.items()}})
    decode_ours, decode_theirs, decode_routed = decode["ours"], decode["theirs"], decode["routed"]
    prefill = interleaved({"ours": lambda: rate(len(long), ours_prefill),
                           "theirs": lambda: rate(len(long), theirs_prefill),
                           "all_rows": lambda: rate(len(long), lambda: ours_prefill(ours_all_rows)),
                           "torch_path": lambda: rate(len(long), lambda: ours_prefill(ours_torch_path)),
                           **{fmt: (lambda e=e: rate(len(long), lambda: ours_prefill(e)))
                              for fmt, e in quantized.items()}})
    prefill_ours, prefill_theirs = prefill["ours"], prefill["theirs"]

    batch_prompts = [torch.randint(100, config.vocab_size, (16,), generator=generator).tolist() for _ in range(8)]
    batched_tps = interleaved({"batched": lambda: rate(8 * n, lambda: ours.generate_batch(
        batch_prompts, max_new_tokens=n, temperature=0.0, stop_token_ids=[]))})["batched"]

    print(f"{'':24}{'ours':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'decode tok/s (batch 1)':24}{decode_ours:12.1f}{decode_theirs:14.1f}{decode_ours / decode_theirs:8.2f}")
    print(f"{'prefill tok/s (' + str(len(long)) + ')':24}{prefill_ours:12.1f}{prefill_theirs:14.1f}"
          f"{prefill_ours / prefill_theirs:8.2f}")
    for name, label in (("all_rows", "  every row, last layer"), ("torch_path", "  torch CPU path")):
        print(f"{label:24}{prefill[name]:12.1f}{'':14}{prefill[name] / prefill_theirs:8.2f}  (ablation of ours)")
    for fmt, engine in quantized.items():
        weights = engine.weights
        print(f"{'  ' + fmt + ' weights':24}{decode[fmt]:12.1f}{'':14}{decode[fmt] / decode_theirs:8.2f}  decode; "
              f"prefill {prefill[fmt]:.1f} tok/s ({prefill[fmt] / prefill_theirs:.2f}); "
              f"{weights['bits_per_weight']:.2f} bits, {weights['bytes_per_token'] / 2**20:.1f} MiB per token")
    print(f"{'decode tok/s, 8 batched':24}{batched_tps:12.1f}")
    print(f"{'decode tok/s, routing on':24}{decode_routed:12.1f}{'':14}{decode_routed / decode_ours:8.2f}"
          "  (routing trace recorded: slowdown = 1 - ratio)")

    others = {}  # name -> (decode tok/s, prefill tok/s), or a str saying why there is no row
    if not args.no_quantized:
        others.update(quantized_rows(folder, args.dtype, short, long, n, interleaved, rate))
    if not args.no_llamacpp:
        others.update(llamacpp_rows(folder, folder.parent, args.threads, short, long, n, interleaved, rate))
    if others:
        print(f"{'':24}{'decode tok/s':>12}{'prefill tok/s':>14}{'/ transformers (decode, prefill)':>34}")
    for name, row in others.items():
        if isinstance(row, str):
            print(f"{name:24}  not measured: {row}")
            continue
        print(f"{name:24}{row[0]:12.1f}{row[1]:14.1f}{row[0] / decode_theirs:17.2f}{row[1] / prefill_theirs:17.2f}")
    print(f"decode_vs_transformers={decode_ours / decode_theirs:.2f} "
          f"prefill_vs_transformers={prefill_ours / prefill_theirs:.2f}")


def quantized_rows(folder: Path, dtype: str, short: list[int], long: list[int], n: int, interleaved, rate) -> dict:
    """Our engine with int8 and int4 weights: (decode tok/s, prefill tok/s) each, measured in interleaved rounds."""
    engines, rows = {}, {}
    for fmt in ("int8", "int4"):
        try:
            engines[f"ours {fmt}"] = Engine.from_pretrained(folder, dtype=dtype, quantize=fmt)
        except Exception as exc:  # an engine without these formats: the row says why
            rows[f"ours {fmt}"] = f"{type(exc).__name__}: {exc}"
    if not engines:
        return rows

    def decode(engine) -> float:
        return engine.generate(short, max_new_tokens=n, temperature=0.0, stop_token_ids=[]).decode_tokens_per_second

    def prefill(engine) -> float:
        return rate(len(long), lambda: engine.generate(long, max_new_tokens=1, temperature=0.0, stop_token_ids=[]))

    decoded = interleaved({name: lambda e=engine: decode(e) for name, engine in engines.items()})
    prefilled = interleaved({name: lambda e=engine: prefill(e) for name, engine in engines.items()})
    return {**rows, **{name: (decoded[name], prefilled[name]) for name in engines}}


def llamacpp_rows(folder: Path, workdir: Path, threads: int, short: list[int], long: list[int], n: int,
                  interleaved, rate) -> dict:
    """llama.cpp on the checkpoint exported to GGUF F32, F16, Q8_0 and Q4_K, when `llama_cpp` is installed."""
    names = {"llama.cpp F32": "f32", "llama.cpp F16": "f16", "llama.cpp Q8_0": "q8_0", "llama.cpp Q4_K": "q4_k"}
    if importlib.util.find_spec("llama_cpp") is None:
        return dict.fromkeys(names, "llama_cpp is not installed (pip install -e '.[bench]')")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from air_slice import LlamaCpp, export_gguf

    models, rows = {}, {}
    for name, gguf_type in names.items():
        out = workdir / f"bench-10m-{gguf_type}.gguf"
        why = export_gguf(folder, out, gguf_type)
        if why:
            rows[name] = why
            continue
        models[name] = LlamaCpp(out, threads, n_ctx=len(long) + n + 64, n_batch=len(long))
    if not models:
        return rows
    decoded = interleaved({name: lambda m=model: m.greedy(short, n)[1] for name, model in models.items()})
    prefilled = interleaved({name: lambda m=model: m.prefill(long) for name, model in models.items()})
    for model in models.values():
        model.close()
    return {**rows, **{name: (decoded[name], prefilled[name]) for name in models}}


if __name__ == "__main__":
    main()
