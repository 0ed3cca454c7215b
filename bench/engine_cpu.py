"""CPU benchmark: our engine against transformers' generate, side by side in one run, on one ~10M checkpoint.

Prints batch-1 decode tok/s and 512-token prefill tok/s for both, ours with int8 and int4 weights (quantized as
they load), two ablations of our prefill (every prompt
row through the last layer; the torch CPU path instead of the compiled kernels), the aggregate decode tok/s of 8
sequences batched, our decode with the routing trace on, and the ratios.
Last line: `decode_vs_transformers=X.XX prefill_vs_transformers=Y.YY`.

    python bench/engine_cpu.py [--decode-tokens 64] [--repeats 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
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
    print(f"decode_vs_transformers={decode_ours / decode_theirs:.2f} "
          f"prefill_vs_transformers={prefill_ours / prefill_theirs:.2f}")


if __name__ == "__main__":
    main()
