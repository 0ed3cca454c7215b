"""The bundled model's card (README.md in its folder), written from what the build and the demo bench measured.

Owns the card's text. Every figure in it comes from `training_summary.json` (written by `build.py`) or
`demo_figures.json` (written by `bench/demo_model.py --write-card`), and the architecture table from
`config.json`, so the card cannot drift from the checkpoint beside it.

    python -m workbench.models.recipe.card [FOLDER]     # re-render README.md from the JSON files in FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SUMMARY_FILE = "training_summary.json"
DEMO_FILE = "demo_figures.json"
KINDS = ("chat", "explain", "tool", "source", "prose", "all")
KIND_NAMES = {"chat": "chat pairs (request -> reasoning + function)", "explain": "\"what does f do\" pairs",
              "tool": "tool conversations", "source": "standard-library source", "prose": "language-reference prose",
              "all": "**all**"}


def write_card(folder: Path) -> Path:
    """Render README.md in `folder` from its config, training summary and (if present) demo figures."""
    config = json.loads((folder / "config.json").read_text())
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    demo_path = folder / DEMO_FILE
    demo = json.loads(demo_path.read_text()) if demo_path.is_file() else None
    size_mb = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix != ".md") / 2**20
    path = folder / "README.md"
    path.write_text(render_card(config, summary, demo, size_mb))
    return path


def _loss_table(figures: dict[str, Any]) -> str:
    rows = ["| documents | held-out loss | unigram baseline | train loss | unigram baseline | held-out tokens |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind in KINDS:
        held, train = figures["heldout"].get(kind), figures["train"].get(kind)
        if held is None or train is None:
            continue
        rows.append(f"| {KIND_NAMES[kind]} | {held['loss']:.2f} | {held['unigram_loss']:.2f} | {train['loss']:.2f} "
                    f"| {train['unigram_loss']:.2f} | {held['tokens']:,} |")
    return "\n".join(rows)


def _balance_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| MoE layer | max violation | cv | load entropy | dead experts | relative load, min..max |",
             "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        loads = row["relative_load"]
        lines.append(f"| {row['layer']} | {row['max_violation']:.2f} | {row['cv']:.3f} | {row['entropy']:.4f} "
                     f"| {row['dead']} | {min(loads):.2f}..{max(loads):.2f} |")
    return "\n".join(lines)


def _dead_text(rows: list[dict[str, Any]]) -> str:
    dead = sum(row["dead"] for row in rows)
    return "no dead expert in any layer" if dead == 0 else f"{dead} experts take no held-out token"


def _demo_paragraph(demo: dict[str, Any] | None) -> str:
    if demo is None:
        return ("`python bench/demo_model.py --write-card` measures generation on held-out requests and adds its "
                "figures here (not yet run for this checkpoint).")
    greedy = demo.get("parse_rate_greedy")
    greedy_text = "" if greedy is None else f"; decoded greedily instead: {greedy:.0%}"
    return (
        f"`python bench/demo_model.py --write-card` ({demo['machine']}, {demo['seconds']:.0f} s) scores the same "
        f"held-out loss ({demo['heldout_loss']:.2f} against a unigram {demo['unigram_loss']:.2f}) and asks for "
        f"{demo['prompts']} functions from the held-out packages (\"Write a function that ...\", thinking on, at most "
        f"{demo['max_new_tokens']} new tokens, sampled at temperature {demo['temperature']} with seed "
        f"{demo['seed']}). The answer's code parses with `ast.parse` and defines a function in "
        f"**{demo['parse_rate']:.0%}** of them (the target was 80%){greedy_text}; {demo['reasoned']} answers "
        f"reasoned in `<think>` first and {demo['stopped']} ended their turn by themselves. Its last line: "
        f"`{demo['last_line']}`."
    )


def render_card(config: dict[str, Any], summary: dict[str, Any], demo: dict[str, Any] | None,
                size_mb: float) -> str:
    figures = summary["figures"]
    corpus = summary["corpus"]
    train_counts = ", ".join(f"{n:,} {kind}" for kind, n in corpus["train"].items())
    held = figures["heldout"]["all"]
    layers = config["num_hidden_layers"]
    dense = config["first_k_dense_replace"]
    layer_text = (f"{layers}: layer{'s' if dense > 1 else ''} 0{f'-{dense - 1}' if dense > 1 else ''} dense, "
                  f"layers {dense}-{layers - 1} MoE")
    train_cfg = summary["train_config"]
    minutes = summary["train_seconds_total"] / 60
    return f"""# {summary['model']}: the workbench's bundled model

A {summary['parameters'] / 1e6:.1f}M-parameter Mixture-of-Experts model with the architecture of GLM-4.5-Air, trained by
this project on a CPU from the Python standard library. It is the default model of the engine, the server and
`%%glm` when no other model is configured (`workbench.models.default_model_path()`), so the workbench runs anywhere
(a laptop, CI, Binder) with a model that answers in the real GLM-4.5 format and has trained, balanced experts to
look at.

It is **not** GLM-4.5 or a distillation of it: no weights, text or outputs of any GLM model went into it. It is a
toy that shares GLM-4.5-Air's structure and chat format; read "What it can and cannot do" before relying on
anything it writes.

## Architecture

`config.json` is a Hugging Face `glm4_moe` config (`Glm4MoeForCausalLM`); `transformers` loads this folder as it
is, and a test checks that its logits and the workbench engine's agree.

| | this model | GLM-4.5-Air |
| --- | --- | --- |
| layers | {layer_text} | 46: layer 0 dense, 1-45 MoE |
| hidden size | {config['hidden_size']} | 4096 |
| attention | {config['num_attention_heads']} query heads, {config['num_key_value_heads']} key/value heads (GQA), head dim {config['head_dim']}, bias on q/k/v | 96 / 8, head dim 128, bias on q/k/v |
| rotary embedding | first {config['partial_rotary_factor']:g} of each head, theta {config['rope_theta']:g} | 0.5, theta 10^6 |
| dense MLP | SwiGLU, width {config['intermediate_size']} | SwiGLU, width 10944 |
| routed experts | {config['n_routed_experts']} per MoE layer, top-{config['num_experts_per_tok']}, SwiGLU width {config['moe_intermediate_size']} | 128, top-8, width 1408 |
| router | sigmoid scores, `e_score_correction_bias` for selection only, top-k weights normalised | same |
| shared expert | {config['n_shared_experts']}, width {config['moe_intermediate_size']} | 1, width 1408 |
| vocabulary | {config['vocab_size']:,} (byte-level BPE) | 151,552 |
| context | trained on {train_cfg['seq_len']}-token windows; `max_position_embeddings` {config['max_position_embeddings']} | 131,072 |
| parameters | {summary['parameters']:,} in all, {summary['active_parameters']:,} active per token | about 106B, 12B active |

The weights are stored in bfloat16 (this folder: {size_mb:.1f} MB), the router weights and correction biases in
float32, as GLM checkpoints keep them. GLM-4.5's multi-token-prediction layer is left out
(`num_nextn_predict_layers` 0).

## Tokenizer

A byte-level BPE trained with `tokenizers` on the training text: every byte can be encoded, so Chinese, Russian or
emoji work, a byte or two per token, although the model has hardly seen them. Every token of GLM-4.5's format is
one id: `<|endoftext|>`, `[MASK]`, `[gMASK]`, `[sMASK]`, `<sop>`, `<eop>`, `<|system|>`, `<|user|>`,
`<|assistant|>`, `<|observation|>` (special), and `<think>`, `</think>`, `<tool_call>`, `</tool_call>`,
`<tool_response>`, `</tool_response>`, `<arg_key>`, `</arg_key>`, `<arg_value>`, `</arg_value>`, `/nothink`
(added, not special, so a decode that skips special tokens still shows reasoning and tool calls to the output
parsers). The ids differ from GLM-4.5's vocabulary: read them from `tokenizer.json`. `tokenizer_config.json`
carries the GLM-4.5 chat template (it renders every shared chat-format fixture byte for byte);
`generation_config.json` stops on `<|endoftext|>`, `<|user|>` and `<|observation|>`.

## Data

Everything comes from the standard library of the Python that builds it (here Python {summary['python']}), so any
machine can rebuild it; `workbench/models/recipe/corpus.py` is the recipe.

- **Source**: the text of the standard-library modules, without tests, generated codec tables and sysconfig
  data; plus the language-reference prose of `pydoc_data.topics` as plain text.
- **Chat pairs** from functions and methods whose docstring reads as a task (short functions, so that a pair fits
  a training row and the model learns to finish). The user asks for what the docstring describes; the assistant
  reasons briefly inside `<think>...</think>`, only from what the signature, docstring and body show (what it does,
  its parameters and defaults, whether it returns, yields or raises, where the standard library keeps it), then
  gives the function in a fenced block. A quarter of the pairs have thinking disabled (`/nothink`), some open with
  a system prompt (among them the one `%%glm` sends) or follow an earlier exchange, and some functions also get a
  "What does `module.function` do?" pair answered from the docstring.
- **Tool calls**: conversations in the GLM-4.5 tool format around 14 small tools (gcd, factorial, mean, leap
  years, word count, Unicode names, path parts, a stand-in weather service, ...): the user asks, the assistant calls
  the right tool with arguments copied from the question, the tool's real result comes back in an
  `<|observation|>` turn, and the assistant answers from it.

Loss is taken on the assistant turns (and the token that ends them) and on the raw text, not on the prompts.
**Held out**: whole top-level packages picked by a hash of their name ({', '.join(summary['heldout_modules'])}),
one in ten language-reference topics and one in ten tool conversations. Training documents: {train_counts}
({corpus['train_chars']:,} characters).

## Training

`python -m workbench.models.recipe.build` (resumable: stop it and run it again). Seeded; AdamW (betas 0.9/0.95, weight
decay {train_cfg['weight_decay']} on matrices), learning rate {train_cfg['lr']:g} after {train_cfg['warmup_steps']}
warmup steps, cosine to {train_cfg['min_lr']:g}, gradient clipping at {train_cfg['grad_clip']}; {summary['steps']:,}
steps of {train_cfg['batch_size']} rows x {train_cfg['seq_len']} tokens = {summary['tokens_seen']:,} tokens; every
epoch holds all chat and tool documents and a fresh {train_cfg['source_fraction']:.0%} sample of the raw-text
chunks. Auxiliary-loss-free load balancing as in GLM-4.5: after each step, each expert's correction bias moves by
{train_cfg['bias_update_rate']:g} towards balance (down when it took more than its fair share of the step's tokens,
up when less), so no expert dies.

It trained on {train_cfg['threads']} thread of a 2-core machine shared with other work: {minutes:.0f} minutes of
training steps ({summary['mean_tokens_per_s']:.0f} tokens/s on average).

## Results

Measured by the build on the exported bfloat16 weights (`{SUMMARY_FILE}` holds every figure, the loss curve and
the balance curve). Loss in nats per token on the trained tokens only (answers, not prompts); the unigram baseline
is a unigram model of the training tokens scored on exactly the same tokens. Held-out loss
**{held['loss']:.2f}** against **{held['unigram_loss']:.2f}** for the unigram baseline.

{_loss_table(figures)}

Expert load on the held-out text, per MoE layer (relative load 1.0 = an expert's fair share; max violation = the
busiest expert's relative load minus one; cv = coefficient of variation of the loads; entropy of the load,
normalised so that 1 is perfectly even):

{_balance_table(figures['balance_heldout'])}

{_demo_paragraph(demo)}

## What it can and cannot do

It can:

- speak the GLM-4.5 chat format: think in `<think>...</think>` when thinking is on, skip it when off, answer with a
  fenced Python block and end its turn with `<|user|>`;
- call the tools it was trained on in GLM-4.5's format (the right tool, well-formed arguments) and answer from the
  tool's result (notebook 3);
- write Python that looks like the standard library's: signatures, docstrings, methods, standard-library idioms;
- show real routing: its experts are trained and balanced ({_dead_text(figures['balance_heldout'])}), and code,
  English prose and scripts it never learned are routed differently (notebook 2).

It cannot:

- write *correct* code for a request beyond its name and docstring: it reuses the shapes of functions it saw;
- copy values from the question into a tool call reliably: asked for the weather in Paris it calls `get_weather`,
  often with a city it made up;
- answer general questions, chat in English beyond its templates, or say anything reliable about the world; it
  knows Chinese, Russian and other scripts only as bytes;
- decode well greedily: at temperature 0 it falls into repetition loops; sample at a low temperature (0.3, with a
  seed for reproducible answers), as the notebooks do;
- use long contexts: it was trained on {train_cfg['seq_len']}-token windows.

Use a real GLM-4.5-Air (notebook 5, or `Engine.from_pretrained` on its checkpoint) for anything that matters.

## License and provenance

The training text is the Python standard library (Python Software Foundation License); the model was trained from
random initialisation by this project's own code; no external model or dataset was used.
"""


if __name__ == "__main__":
    from workbench.models import default_model_path

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_path(check=False)
    print(write_card(target))
