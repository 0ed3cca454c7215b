"""Evidence for the bundled model (not a test): held-out loss against a unigram baseline, the share of held-out
"write a function that ..." prompts whose generated code parses, and the expert load balance per layer.

    python bench/demo_model.py [--model PATH] [--prompts 50] [--max-new-tokens 384] [--threads 2]

Everything is measured here, in this run: the held-out set is rebuilt from this machine's standard library with
the recipe that trained the model (whole packages the model never saw), the prompts come from those packages'
functions, and generation runs through the engine the workbench serves with: sampled at a low temperature with a
fixed seed (the parse rate of the last line), and greedy for comparison (a model this small falls into repetition
loops when greedy, and a loop cut off at the token limit does not parse). The last line reads
`heldout_loss=X.XX unigram_loss=Y.YY parse_rate=Z.ZZ`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from workbench import analysis
from workbench.chat.parser import parse_completion
from workbench.chat.prompt import prompt_ids
from workbench.engine import Engine
from workbench.engine.routing import RoutingTrace
from workbench.models import default_model_path
from workbench.models.recipe.build import balance_metrics, measure
from workbench.models.recipe.card import DEMO_FILE, write_card
from workbench.models.recipe.corpus import build_corpus, defines_function, extract_code, heldout_requests
from workbench.models.recipe.training import tokenize_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--temperature", type=float, default=0.3,
                        help="sampling temperature of the parse-rate run (seeded); greedy is reported beside it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy comparison run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show", type=int, default=3, help="print this many generated answers")
    parser.add_argument("--write-card", action="store_true",
                        help=f"save the figures as {DEMO_FILE} in the model folder and re-render its README.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or default_model_path()

    started = time.perf_counter()
    engine = Engine.from_pretrained(folder, dtype="float32", device="cpu", kernels="torch")
    tokenizer = engine.tokenizer
    config = engine.config
    print(f"model: {folder.name}, {config.num_parameters() / 1e6:.1f}M parameters "
          f"({config.num_parameters(active_only=True) / 1e6:.1f}M active), {config.n_routed_experts} experts "
          f"top-{config.num_experts_per_tok}, layers {config.num_hidden_layers} (MoE {config.moe_layer_ids})")

    # 1. Loss on held-out packages, and a unigram model of the training tokens on exactly the same tokens.
    corpus = build_corpus()
    print(f"held-out packages ({len(corpus.heldout_modules)}): {', '.join(corpus.heldout_modules)}")
    train_docs = tokenize_documents(corpus.train, tokenizer.encode)
    heldout_docs = tokenize_documents(corpus.heldout, tokenizer.encode)
    seq_len = 512
    figures = measure(engine.model, train_docs, heldout_docs, config.vocab_size, seq_len, splits=("heldout",))
    print("\nheld-out loss by kind (nats/token; trained tokens only, i.e. answers in chats):")
    print(f"  {'kind':<10}{'model':>8}{'unigram':>9}{'tokens':>9}")
    for kind, row in figures["heldout"].items():
        print(f"  {kind:<10}{row['loss']:>8.3f}{row['unigram_loss']:>9.3f}{row['tokens']:>9}")
    print("\nexpert load on the held-out text (relative load 1.0 = fair share):")
    for row in figures["balance_heldout"]:
        print(f"  layer {row['layer']}: cv={row['cv']:.3f} max_violation={row['max_violation']:.3f} "
              f"entropy={row['entropy']:.3f} dead={row['dead']}")

    # 2. Held-out "write a function that ..." prompts: does the generated code parse and define a function?
    requests = heldout_requests(corpus.heldout_functions, args.prompts)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": text}])[1] for _, text in requests]
    runs = [("sampled", dict(temperature=args.temperature, seed=args.seed))]
    if not args.no_greedy:
        runs.append(("greedy", dict(temperature=0.0)))
    outcomes: dict[str, dict] = {}  # per run: its results, parse rate and counts
    for label, sampling in runs:
        t0 = time.perf_counter()
        results = engine.generate_batch(prompts, routing=True, max_new_tokens=args.max_new_tokens, **sampling)
        gen_seconds = time.perf_counter() - t0
        ok, thought, stopped = [], 0, 0
        for result in results:
            parsed = parse_completion(result.text, truncated=result.finish_reason == "length")
            ok.append(defines_function(extract_code(parsed.content or "")))
            thought += bool(parsed.reasoning_content)
            stopped += result.finish_reason == "stop"
        outcomes[label] = dict(results=results, parse_rate=float(np.mean(ok)), reasoned=thought, stopped=stopped)
        generated = sum(len(r.token_ids) for r in results)
        print(f"\n{len(requests)} held-out prompts, {label} {sampling}, max {args.max_new_tokens} new tokens: "
              f"{generated} tokens in {gen_seconds:.0f}s ({generated / gen_seconds:.0f} tok/s batched)")
        print(f"  code parses and defines a function: {sum(ok)}/{len(ok)}; reasoned in <think>: {thought}; "
              f"stopped by itself: {stopped}")
        for (fn, text), result, good in list(zip(requests, results, ok, strict=True))[:args.show]:
            print(f"\n--- {fn.module}.{fn.qualname} ({'parses' if good else 'does not parse'})\nuser: {text}\n"
                  f"model: {result.text[:700]}")
    sampled = outcomes["sampled"]
    parse_rate, results = sampled["parse_rate"], sampled["results"]

    # 3. Expert load while generating (prompt and generated tokens of all the answers together).
    traces = [r.routing for r in results if r.routing is not None]
    ids = torch.cat([t.expert_ids for t in traces], dim=1)
    print("\nexpert load while answering the prompts:")
    for row in balance_metrics(ids, traces[0].layer_ids, config.n_routed_experts):
        print(f"  layer {row['layer']}: cv={row['cv']:.3f} max_violation={row['max_violation']:.3f} "
              f"entropy={row['entropy']:.3f} dead={row['dead']}")
    spec = analysis.token_specialization(RoutingTrace(
        expert_ids=ids, weights=torch.cat([t.weights for t in traces], dim=1),
        token_ids=torch.cat([t.token_ids for t in traces]), layer_ids=traces[0].layer_ids,
        num_experts=config.n_routed_experts, prompt_len=0), min_count=10)
    print(f"  token specialization per layer (1 = a token id always goes to one expert; {spec.baseline:.3f} = "
          f"spread evenly; {spec.num_token_ids} token ids seen >= 10 times): "
          + " ".join(f"L{layer}={score:.3f}" for layer, score in zip(spec.layer_ids, spec.score, strict=True)))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    heldout = figures["heldout"]["all"]
    greedy_rate = outcomes["greedy"]["parse_rate"] if "greedy" in outcomes else None
    if greedy_rate is not None:
        print(f"parse rate: sampled (temperature {args.temperature}, seed {args.seed}) {parse_rate:.2f}, "
              f"greedy {greedy_rate:.2f}")
    last_line = (f"heldout_loss={heldout['loss']:.2f} unigram_loss={heldout['unigram_loss']:.2f} "
                 f"parse_rate={parse_rate:.2f}")
    if args.write_card:
        demo = dict(heldout_loss=heldout["loss"], unigram_loss=heldout["unigram_loss"], parse_rate=parse_rate,
                    parse_rate_greedy=greedy_rate, prompts=len(requests), max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed, reasoned=sampled["reasoned"],
                    stopped=sampled["stopped"], seconds=time.perf_counter() - started, last_line=last_line,
                    machine=f"{platform.machine()} CPU, {args.threads} torch threads, "
                            f"Python {platform.python_version()}")
        (folder / DEMO_FILE).write_text(json.dumps(demo, indent=1) + "\n")
        print(f"wrote {folder / DEMO_FILE} and {write_card(folder)}")
    print(last_line)


if __name__ == "__main__":
    main()
