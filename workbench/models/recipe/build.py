"""Build the bundled model from nothing but the standard library: data, tokenizer, training, export, figures.

    python -m workbench.models.recipe.build                      # everything, resuming where a previous run stopped
    python -m workbench.models.recipe.build --steps 20 --preset smoke --work /tmp/smoke --out /tmp/smoke/model

Owns the recipe: the model's shape (`MODEL_CONFIG`), the training settings (`TRAIN_CONFIG`) and the order of the
stages. The work folder keeps the tokenizer and the resumable training state; the output folder receives the
checkpoint in the Hugging Face `glm4_moe` layout (config.json, model.safetensors in bf16, tokenizer files) and
`training_summary.json` with the figures the model card quotes, measured on the exported weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from workbench.engine.config import GLMConfig
from workbench.engine.routing import RoutingTrace
from workbench.engine.weights import save_checkpoint
from workbench.models import MODEL_NAME  # one name, kept with default_model_path
from workbench.models.recipe.card import DEMO_FILE, SUMMARY_FILE, write_card
from workbench.models.recipe.corpus import Corpus, build_corpus
from workbench.models.recipe.tokenizer_build import save_tokenizer, train_tokenizer
from workbench.models.recipe.training import (
    PackedStream,
    TokenizedDocument,
    TrainConfig,
    build_model,
    evaluate,
    tokenize_documents,
    train,
    train_state_step,
    unigram_loss,
)

# GLM-4.5-Air in miniature: a dense first layer, then MoE layers with a sigmoid router, correction bias and one
# shared expert; grouped-query attention with q/k/v bias; rotary embedding on half of each head.
MODEL_CONFIG: dict[str, Any] = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5,
    rope_theta=10000.0, rms_norm_eps=1e-5, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=2,
    moe_intermediate_size=128, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=1.0, max_position_embeddings=1024, tie_word_embeddings=False,
    num_nextn_predict_layers=0,
)
TRAIN_CONFIG = TrainConfig(seq_len=512, batch_size=4, steps=2000, lr=2e-3, min_lr=2e-4, warmup_steps=50,
                           weight_decay=0.1, grad_clip=1.0, bias_update_rate=1e-2, seed=0, source_fraction=0.15,
                           checkpoint_every=25, threads=1)

# A seconds-long recipe for CI and for trying the pipeline: same code path, tiny everything.
SMOKE_MODEL_CONFIG: dict[str, Any] = dict(MODEL_CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, n_routed_experts=8, moe_intermediate_size=32)
SMOKE_TRAIN_CONFIG = TrainConfig(seq_len=64, batch_size=4, steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=4,
                                 bias_update_rate=1e-2, source_fraction=0.2, checkpoint_every=5, threads=1)
SMOKE_CORPUS = dict(max_files=25, tool_examples=40)

EVAL_ROWS_PER_KIND = 48  # held-out rows of seq_len tokens scored per document kind


def default_work_dir() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "glm-workbench")) / f"{MODEL_NAME}-train"


def prepare(work: Path, vocab_size: int, corpus_kwargs: dict[str, Any]) -> tuple[Corpus, Any]:
    """The corpus and the tokenizer (trained once, then read back from the work folder)."""
    corpus = build_corpus(**corpus_kwargs)
    from tokenizers import Tokenizer

    path = work / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
        if tokenizer.get_vocab_size() != vocab_size:
            raise ValueError(f"{path} has {tokenizer.get_vocab_size()} ids but the model wants {vocab_size}; "
                             "delete the work folder to start over")
    else:
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer((d.text for d in corpus.train), vocab_size)
        tokenizer.save(str(path))
    return corpus, tokenizer


def split_by_kind(docs: list[TokenizedDocument]) -> dict[str, list[TokenizedDocument]]:
    out: dict[str, list[TokenizedDocument]] = {}
    for d in docs:
        out.setdefault(d.kind, []).append(d)
    return out


def balance_metrics(expert_ids: torch.Tensor, layer_ids: list[int], num_experts: int) -> list[dict[str, Any]]:
    """Per-layer imbalance of a routing record, with `workbench.analysis` (the numbers the views show)."""
    from workbench import analysis

    layers, tokens, top_k = expert_ids.shape
    trace = RoutingTrace(expert_ids=expert_ids, weights=torch.full((layers, tokens, top_k), 1 / top_k).half(),
                         token_ids=torch.zeros(tokens, dtype=torch.int64), layer_ids=layer_ids,
                         num_experts=num_experts, prompt_len=tokens)
    result = analysis.imbalance(trace)
    relative = analysis.relative_load(trace)
    return [{"layer": layer, "cv": round(float(result.cv[i]), 4),
             "max_violation": round(float(result.max_violation[i]), 4),
             "entropy": round(float(result.entropy[i]), 4), "dead": int(result.num_dead[i]),
             "relative_load": [round(float(x), 3) for x in relative[i]]}
            for i, layer in enumerate(layer_ids)]


def measure(model, train_docs, heldout_docs, vocab_size: int, seq_len: int,
            splits: tuple[str, ...] = ("heldout", "train")) -> dict[str, Any]:
    """Held-out and train loss by document kind, the unigram baseline on the same tokens, routing balance."""
    figures: dict[str, Any] = {split: {} for split in splits}
    by_split = {"heldout": split_by_kind(heldout_docs), "train": split_by_kind(train_docs)}
    routing = []
    for split in splits:
        by_kind = by_split[split]
        for kind, docs in sorted(by_kind.items()):
            if sum(len(d.ids) for d in docs) <= seq_len + 1:
                continue
            ev = evaluate(model, docs, seq_len, max_rows=EVAL_ROWS_PER_KIND, keep_routing=split == "heldout")
            base = unigram_loss(train_docs, docs, vocab_size, seq_len, max_rows=EVAL_ROWS_PER_KIND)
            figures[split][kind] = {"loss": round(ev.loss, 4), "unigram_loss": round(base, 4),
                                    "tokens": sum(ev.tokens_by_kind.values())}
            if ev.expert_ids is not None:
                routing.append(ev.expert_ids)
    for split in splits:
        parts = list(figures[split].values())
        total = sum(p["tokens"] for p in parts)
        figures[split]["all"] = {
            "loss": round(sum(p["loss"] * p["tokens"] for p in parts) / max(total, 1), 4),
            "unigram_loss": round(sum(p["unigram_loss"] * p["tokens"] for p in parts) / max(total, 1), 4),
            "tokens": total}
    if routing:
        config = model.config
        figures["balance_heldout"] = balance_metrics(torch.cat(routing, dim=1), config.moe_layer_ids,
                                                     config.n_routed_experts)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / MODEL_NAME,
                        help="checkpoint folder to write (default: the bundled model's folder)")
    parser.add_argument("--work", type=Path, default=None, help="tokenizer and training state (resumable)")
    parser.add_argument("--preset", choices=("full", "smoke"), default="full")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop (with a checkpoint) after this much training; run again to resume")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    full = args.preset == "full"
    model_config = GLMConfig(**(MODEL_CONFIG if full else SMOKE_MODEL_CONFIG))
    train_config = TRAIN_CONFIG if full else SMOKE_TRAIN_CONFIG
    if args.steps is not None:
        train_config = TrainConfig(**{**asdict(train_config), "steps": args.steps})
    corpus_kwargs = {} if full else SMOKE_CORPUS
    work = args.work or default_work_dir()
    os.environ.setdefault("RAYON_NUM_THREADS", str(train_config.threads or 1))  # tokenizers' trainer threads
    if train_config.threads is not None:
        torch.set_num_threads(train_config.threads)

    started = time.monotonic()
    corpus, tokenizer = prepare(work, model_config.vocab_size, corpus_kwargs)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    train_docs = tokenize_documents(corpus.train, encode)
    heldout_docs = tokenize_documents(corpus.heldout, encode)
    print(f"corpus: {corpus.stats()}; {sum(len(d.ids) for d in train_docs)} training tokens", flush=True)

    model = build_model(model_config, train_config.init_std, train_config.seed)
    stream = PackedStream(train_docs, train_config.seq_len, train_config.seed, train_config.source_fraction)
    resumed_from = train_state_step(work)
    train_started = time.monotonic()
    history = train(model, stream, train_config, checkpoint_dir=work, progress=not args.no_progress,
                    max_seconds=None if args.max_minutes is None else args.max_minutes * 60)
    train_seconds = time.monotonic() - train_started
    if history[-1]["step"] < train_config.steps:
        print(f"stopped at step {history[-1]['step']} of {train_config.steps}; run again to resume", flush=True)
        return 0

    # Export, then measure the exported (bf16) weights as the engine will load them.
    save_checkpoint(model, args.out, dtype=torch.bfloat16)
    save_tokenizer(tokenizer, args.out, model_config.max_position_embeddings)
    from workbench.engine.model import GLMForCausalLM
    from workbench.engine.weights import load_weights

    with torch.device("meta"):
        exported = GLMForCausalLM(model_config)
    load_weights(exported, model_config, args.out, torch.float32, torch.device("cpu"))
    exported.materialize_buffers(torch.device("cpu"))
    figures = measure(exported, train_docs, heldout_docs, model_config.vocab_size, train_config.seq_len)
    summary = {
        "model": MODEL_NAME,
        "parameters": model_config.num_parameters(),
        "active_parameters": model_config.num_parameters(active_only=True),
        "train_config": asdict(train_config),
        "corpus": corpus.stats(),
        "heldout_modules": corpus.heldout_modules,
        "python": platform.python_version(),
        "steps": history[-1]["step"],
        "tokens_seen": history[-1]["step"] * train_config.batch_size * train_config.seq_len,
        "final_train_loss_last50": round(sum(h["loss"] for h in history[-50:]) / len(history[-50:]), 4),
        "train_seconds_this_run": round(train_seconds, 1),
        # Summed step times over every run that built this history (checkpoint writes excluded).
        "train_seconds_total": round(sum(train_config.batch_size * train_config.seq_len / h["tokens_per_s"]
                                         for h in history), 1),
        "resumed_from_step": resumed_from,
        "mean_tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1),
        "figures": figures,
        "loss_curve": [(h["step"], h["loss"]) for h in history[::10]],
        "max_violation_curve": [(h["step"], h["max_violation"]) for h in history[::10]],
        "total_seconds_this_run": round(time.monotonic() - started, 1),
    }
    (args.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / DEMO_FILE).unlink(missing_ok=True)  # measured on the previous weights
    write_card(args.out)
    all_h = figures["heldout"]["all"]
    print(f"heldout_loss={all_h['loss']:.2f} unigram_loss={all_h['unigram_loss']:.2f} -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
