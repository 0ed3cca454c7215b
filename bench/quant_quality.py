"""Quality of the integer CPU weights (not a test): held-out loss and greedy agreement of int8 and int4 against fp32.

On the bundled model (or `--model`), scores the held-out documents the recipe never trained on (rebuilt here from
this machine's standard library with the recipe's split: whole packages, a tenth of the reference topics and tool
conversations) with the fp32 weights and with each quantized variant, and runs `--prompts` held-out "Write a
function that ..." chat prompts greedily through each:
- loss: nats per trained token on the held-out rows (as the model card's figures), and its change against fp32;
- teacher-forced agreement: the share of positions of fp32's greedy continuation at which the variant's argmax is
  fp32's token (each position given fp32's prefix, so one early difference does not count many times);
- identical: the share of prompts whose whole greedy continuation equals fp32's.
Variants: int8, int4 (lm_head int8, what `quantize="int4"` loads) and int4 with an int4 lm_head (the ablation that
decided int_quant.LM_HEAD_FORMAT). Targets (issue 14): int8 loss within +0.5%, int4 within +3%.
The last line reads `int8_loss_delta=+X.XX% int4_loss_delta=+Y.YY% int8_agreement=A.AAA int4_agreement=B.BBB`.

    python bench/quant_quality.py [--model PATH] [--rows 48] [--prompts 64] [--new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from workbench.chat.prompt import prompt_ids
from workbench.engine import Engine
from workbench.engine.int_quant import build_quantized_model, checkpoint_tensors
from workbench.models import default_model_path
from workbench.models.recipe.build import split_by_kind
from workbench.models.recipe.corpus import build_corpus, heldout_requests
from workbench.models.recipe.training import evaluate, tokenize_documents

VARIANTS = {"fp32": None, "int8": ("int8", None), "int4": ("int4", None), "int4 (int4 lm_head)": ("int4", "int4")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--rows", type=int, default=48, help="held-out rows of 512 tokens per document kind")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from glm_kernels import cpu_compiled

    cpu_compiled.load()  # the compiled integer kernels (their q8a reference gives the same numbers, slower)
    folder = args.model or default_model_path()
    started = time.perf_counter()
    base = Engine.from_pretrained(folder, dtype="float32", device="cpu", kernels="torch", cpu_kernels="torch")
    tokenizer, config = base.tokenizer, base.config
    models = {}
    for label, variant in VARIANTS.items():
        if variant is None:
            models[label] = base.model
        else:
            fmt, lm_head = variant
            models[label] = build_quantized_model(config, checkpoint_tensors(folder), fmt, dtype=torch.float32,
                                                  lm_head=lm_head).eval()
    print(f"model: {folder.name}, {config.num_parameters() / 1e6:.1f}M parameters; {platform.processor() or 'cpu'}, "
          f"{args.threads} torch threads")
    for label, model in models.items():
        if label != "fp32":
            print(f"  {label}: {_summary(model)}")

    corpus = build_corpus()
    by_kind = split_by_kind(tokenize_documents(corpus.heldout, tokenizer.encode))
    losses: dict[str, dict[str, tuple[float, int]]] = {label: {} for label in models}
    with torch.inference_mode():
        for kind, docs in sorted(by_kind.items()):
            for label, model in models.items():
                try:
                    ev = evaluate(model, docs, 512, max_rows=args.rows)
                except ValueError:
                    break  # fewer tokens than one row
                losses[label][kind] = (ev.loss, sum(ev.tokens_by_kind.values()))
    print("\nheld-out loss (nats per trained token) by kind:")
    kinds = sorted(losses["fp32"])
    print(f"  {'kind':<10}" + "".join(f"{label:>22}" for label in models) + f"{'tokens':>9}")
    totals = {}
    for label in models:
        tokens = sum(losses[label][k][1] for k in kinds)
        totals[label] = sum(losses[label][k][0] * losses[label][k][1] for k in kinds) / tokens
    for kind in [*kinds, "all"]:
        row = [losses[label][kind][0] if kind != "all" else totals[label] for label in models]
        tokens = losses["fp32"][kind][1] if kind != "all" else sum(losses["fp32"][k][1] for k in kinds)
        print(f"  {kind:<10}" + "".join(f"{v:>22.4f}" for v in row) + f"{tokens:>9}")
    deltas = {label: 100 * (totals[label] / totals["fp32"] - 1) for label in models}
    print("  change    " + "".join(f"{d:>+21.2f}%" for d in deltas.values()))

    requests = heldout_requests(corpus.heldout_functions, args.prompts)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": text}])[1] for _, text in requests]
    agreement, identical = _agreement(models, prompts, args.new_tokens)
    print(f"\ngreedy agreement with fp32 over {len(prompts)} held-out prompts, {args.new_tokens} new tokens each:")
    for label in models:
        if label != "fp32":
            print(f"  {label:<22} teacher-forced top-1 {agreement[label]:.3f}, identical continuations "
                  f"{identical[label]:.3f}")
    print(f"\n({time.perf_counter() - started:.0f} s) targets: int8 within +0.5%, int4 within +3%")
    print(f"int8_loss_delta={deltas['int8']:+.2f}% int4_loss_delta={deltas['int4']:+.2f}% "
          f"int8_agreement={agreement['int8']:.3f} int4_agreement={agreement['int4']:.3f}")


def _summary(model) -> str:
    from workbench.engine.int_quant import weight_summary

    s = weight_summary(model)
    return (f"{s['bits_per_weight']:.2f} bits per matrix weight, {s['weight_bytes'] / 2**20:.1f} MiB, "
            f"{s['bytes_per_token'] / 2**20:.2f} MiB read per token")


@torch.inference_mode()
def _agreement(models: dict, prompts: list[list[int]], new_tokens: int) -> tuple[dict, dict]:
    engines = {label: Engine(model, None, device=torch.device("cpu"), dtype=torch.float32, max_batch_size=8,
                             cpu_kernels="torch") for label, model in models.items()}

    def greedy(label: str) -> list[list[int]]:  # no stop tokens: every continuation is new_tokens long
        results = engines[label].generate_batch(prompts, max_new_tokens=new_tokens, temperature=0.0,
                                                stop_token_ids=[])
        return [r.token_ids for r in results]

    reference = greedy("fp32")
    agree, same = {}, {}
    for label, model in models.items():
        if label == "fp32":
            continue
        hits = 0
        for prompt, ref in zip(prompts, reference):
            predicted = model(torch.tensor([prompt + ref]))[0, len(prompt) - 1:-1].argmax(-1).tolist()
            hits += sum(p == r for p, r in zip(predicted, ref))
        agree[label] = hits / sum(len(r) for r in reference)
        same[label] = sum(a == b for a, b in zip(greedy(label), reference)) / len(prompts)
    return agree, same


if __name__ == "__main__":
    main()
