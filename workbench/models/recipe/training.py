"""Training a GLM-4.5-architecture MoE on a CPU: packed batches, AdamW, auxiliary-loss-free load balancing.

Owns the training loop of the bundled model (and of notebook 4's tiny one): documents made of (text, trained)
segments are tokenized, packed into rows of `seq_len + 1` ids with a loss mask, and fed to the engine's own
`GLMForCausalLM` (the model the engine serves, so there is no second implementation to drift).

Load balancing follows GLM-4.5 / DeepSeek-V3's auxiliary-loss-free method: after each optimizer step every MoE
layer counts the tokens each expert received, and each expert's `e_score_correction_bias` moves by a fixed step
towards balance: down when the expert got more than its fair share (T * K / E), up when less. The bias only
changes which experts are selected, never the weights they are mixed with, so the language-model gradient is
untouched and no expert starves.

Checkpoints hold the model, the optimizer, the data position, the RNG state and the history, so a run stopped at
any point resumes to the same result as one that never stopped (up to floating-point reduction order).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.engine.config import GLMConfig
from workbench.engine.model import GLMForCausalLM
from workbench.engine.routing import RoutingRecorder

CHECKPOINT_NAME = "train_state.pt"


@dataclass
class TrainConfig:
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 900
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_update_rate: float = 1e-3  # the balancing step; 0 turns balancing off
    init_std: float = 0.02
    seed: int = 0
    source_fraction: float = 0.25  # share of the raw-source chunks mixed into each epoch with all chat documents
    checkpoint_every: int = 50
    threads: int | None = 1  # None: leave torch's thread count alone

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be at least 1")
        if not 0 <= self.source_fraction <= 1:
            raise ValueError(f"TrainConfig.source_fraction = {self.source_fraction}: must be in [0, 1]")
        if self.bias_update_rate < 0:
            raise ValueError("TrainConfig.bias_update_rate must be >= 0 (0 turns balancing off)")


# --------------------------------------------------------------------------------------------------------------
# Data: tokenized documents packed into rows
# --------------------------------------------------------------------------------------------------------------

@dataclass
class TokenizedDocument:
    ids: np.ndarray  # [N] int32
    mask: np.ndarray  # [N] bool: the loss is taken where the *target* token is trained
    kind: str


def tokenize_documents(documents: Iterable[Any], encode: Callable[[str], list[int]]) -> list[TokenizedDocument]:
    """Documents with `.segments` [(text, trained)] and `.kind` -> ids and masks, segment by segment.

    Segments meet at special tokens, so encoding them one by one gives the ids of the joined text."""
    out = []
    for doc in documents:
        ids: list[int] = []
        mask: list[bool] = []
        for text, trained in doc.segments:
            piece = encode(text)
            ids += piece
            mask += [trained] * len(piece)
        out.append(TokenizedDocument(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), doc.kind))
    return out


def _chunks(doc: TokenizedDocument, size: int) -> list[TokenizedDocument]:
    return [TokenizedDocument(doc.ids[i:i + size], doc.mask[i:i + size], doc.kind)
            for i in range(0, len(doc.ids), size)]


class PackedStream:
    """Epochs of shuffled documents packed into rows of seq_len + 1 ids (inputs are row[:-1], targets row[1:]).

    Every epoch holds all chat documents and a fresh random `source_fraction` of the raw-text chunks; the order
    and the sample depend only on (seed, epoch), so a position (epoch, row) is enough to resume."""

    LONG_TEXT_KINDS = ("source", "prose")

    def __init__(self, documents: Sequence[TokenizedDocument], seq_len: int, seed: int = 0,
                 source_fraction: float = 1.0) -> None:
        if not documents:
            raise ValueError("PackedStream needs at least one document")
        self.seq_len, self.seed, self.source_fraction = seq_len, seed, source_fraction
        self.fixed = [d for d in documents if d.kind not in self.LONG_TEXT_KINDS]
        self.sampled = [c for d in documents if d.kind in self.LONG_TEXT_KINDS for c in _chunks(d, seq_len)]
        self.epoch, self.row = 0, 0
        self._rows: tuple[np.ndarray, np.ndarray] | None = None

    def _epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        keep = rng.random(len(self.sampled)) < self.source_fraction
        docs = self.fixed + [c for c, k in zip(self.sampled, keep, strict=True) if k]
        if not docs:
            docs = self.sampled  # a corpus of raw text only
        order = rng.permutation(len(docs))
        ids = np.concatenate([docs[i].ids for i in order])
        mask = np.concatenate([docs[i].mask for i in order])
        width = self.seq_len + 1
        rows = len(ids) // width
        if rows == 0:
            raise ValueError(f"the corpus holds {len(ids)} tokens, fewer than one row of {width}")
        return ids[: rows * width].reshape(rows, width), mask[: rows * width].reshape(rows, width)

    def rows_per_epoch(self) -> int:
        return len(self._current()[0])

    def _current(self) -> tuple[np.ndarray, np.ndarray]:
        if self._rows is None:
            self._rows = self._epoch_rows(self.epoch)
        return self._rows

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, S+1] int64 and mask [B, S+1] bool; epochs roll over as they run out."""
        ids_out, mask_out = [], []
        while len(ids_out) < batch_size:
            ids, mask = self._current()
            if self.row >= len(ids):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
                continue
            ids_out.append(ids[self.row])
            mask_out.append(mask[self.row])
            self.row += 1
        return torch.from_numpy(np.stack(ids_out)).long(), torch.from_numpy(np.stack(mask_out))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.row, self._rows = int(state["epoch"]), int(state["row"]), None


# --------------------------------------------------------------------------------------------------------------
# Model pieces: initialisation, loss, balancing
# --------------------------------------------------------------------------------------------------------------

def init_weights(model: GLMForCausalLM, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, std) matrices; output projections scaled by 1/sqrt(2 * layers) (GPT-2), so the residual stream
    does not grow with depth; zero biases and correction biases; unit norms."""
    generator = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):  # attention biases and e_score_correction_bias
                param.zero_()
            else:
                scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else std
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def build_model(config: GLMConfig, std: float = 0.02, seed: int = 0) -> GLMForCausalLM:
    model = GLMForCausalLM(config)
    init_weights(model, std, seed)
    for name, param in model.named_parameters():
        # The engine loads weights frozen; here everything trains except the balancing bias (set by rule).
        param.requires_grad_(not name.endswith("e_score_correction_bias"))
    return model


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the trained target positions."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    weights = mask.reshape(-1).float()
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def expert_counts(recorder: RoutingRecorder, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[L, E] how many tokens each expert received in each MoE layer during one forward pass."""
    counts = []
    for ids in recorder.ids:
        chosen = ids if token_mask is None else ids[token_mask.reshape(-1)]
        counts.append(torch.bincount(chosen.reshape(-1), minlength=num_experts))
    return torch.stack(counts).float()


def moe_routers(model: GLMForCausalLM) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.layers if hasattr(layer.mlp, "gate")]


def balance_biases(model: GLMForCausalLM, counts: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing: bias_e += rate * sign(fair share - load_e), layer by layer."""
    if rate <= 0:
        return
    with torch.no_grad():
        for router, layer_counts in zip(moe_routers(model), counts, strict=True):
            fair = layer_counts.mean()
            router.e_score_correction_bias.add_(rate * torch.sign(fair - layer_counts))


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """[L] max load / mean load - 1 per layer (0 = perfectly balanced)."""
    return counts.max(dim=-1).values / counts.mean(dim=-1).clamp_min(1e-9) - 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: GLMForCausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "norm" not in name else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------

@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    tokens_per_s: float
    max_violation: list[float]  # per MoE layer, this step's batch
    counts: torch.Tensor | None = field(default=None, repr=False)  # [L, E], for live views


def train(model: GLMForCausalLM, stream: PackedStream, cfg: TrainConfig, checkpoint_dir: str | Path | None = None,
          on_step: Callable[[StepMetrics], None] | None = None, progress: bool = True,
          max_seconds: float | None = None) -> list[dict[str, Any]]:
    """Train `model` for cfg.steps steps (resuming from checkpoint_dir when it holds a checkpoint).

    Returns the history: one dict per step (loss, lr, tok/s, per-layer max violation). `max_seconds` stops early
    (with a checkpoint) when the wall-clock budget is spent; calling again resumes."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    history: list[dict[str, Any]] = []
    start = 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if path is not None and path.is_file():
        state = torch.load(path, weights_only=False)
        if state["model_config"] != model.config.to_dict():
            raise ValueError(f"{path} was written for a different model config; use another checkpoint_dir or "
                             "delete it to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state(state["stream"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["step"]
    num_experts = model.config.n_routed_experts
    has_moe = bool(moe_routers(model))
    model.train()
    began = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    step = start
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, mask = stream.next_batch(cfg.batch_size)
        recorder = RoutingRecorder() if has_moe else None
        logits = model(ids[:, :-1], recorder=recorder)
        loss = masked_loss(logits, ids[:, 1:], mask[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        counts = expert_counts(recorder, num_experts) if has_moe else torch.zeros(0, num_experts)
        balance_biases(model, counts, cfg.bias_update_rate)
        elapsed = time.perf_counter() - t0
        violation = max_violation(counts).tolist() if has_moe else []
        metrics = StepMetrics(step + 1, loss.item(), lr, ids[:, :-1].numel() / elapsed, violation, counts)
        history.append({"step": metrics.step, "loss": round(metrics.loss, 4), "lr": lr,
                        "tokens_per_s": round(metrics.tokens_per_s, 1),
                        "max_violation": [round(v, 3) for v in violation]})
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.loss:.3f}", tok_s=f"{metrics.tokens_per_s:.0f}", lr=f"{lr:.1e}",
                        maxvio=f"{np.mean(violation) if violation else 0:.2f}")
        if on_step is not None:
            on_step(metrics)
        done = step + 1
        out_of_time = max_seconds is not None and time.monotonic() - began > max_seconds
        if path is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps or out_of_time):
            save_train_state(path, model, optimizer, stream, history, done, cfg)
        if out_of_time:
            break
    bar.close()
    model.eval()
    return history


def save_train_state(path: Path, model: GLMForCausalLM, optimizer: torch.optim.Optimizer, stream: PackedStream,
                     history: list[dict[str, Any]], step: int, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stream": stream.state(),
                "torch_rng": torch.get_rng_state(), "history": history, "step": step,
                "model_config": model.config.to_dict(), "train_config": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, path)  # atomic: a run killed mid-write leaves the previous checkpoint intact


def train_state_step(checkpoint_dir: str | Path) -> int:
    """The step a checkpoint directory would resume from (0 when it holds none)."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    return int(torch.load(path, weights_only=False)["step"]) if path.is_file() else 0


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    loss: float  # mean over all trained target tokens
    loss_by_kind: dict[str, float]
    tokens_by_kind: dict[str, int]
    counts: torch.Tensor  # [L, E] expert loads over the evaluated tokens
    expert_ids: torch.Tensor | None = None  # [L, T, K] for analysis, when kept


@torch.no_grad()
def evaluate(model: GLMForCausalLM, documents: Sequence[TokenizedDocument], seq_len: int, batch_size: int = 8,
             max_rows: int | None = None, keep_routing: bool = False) -> Evaluation:
    """Masked next-token loss over `documents` packed in order (no shuffle), by document kind."""
    kinds = sorted({d.kind for d in documents})
    kind_index = {k: i for i, k in enumerate(kinds)}
    ids = np.concatenate([d.ids for d in documents])
    mask = np.concatenate([d.mask for d in documents])
    kind_of = np.concatenate([np.full(len(d.ids), kind_index[d.kind], dtype=np.int64) for d in documents])
    width = seq_len + 1
    rows = len(ids) // width
    if max_rows is not None:
        rows = min(rows, max_rows)
    if rows == 0:
        raise ValueError(f"the evaluation documents hold {len(ids)} tokens, fewer than one row of {width}")
    shape = (rows, width)
    ids_t = torch.from_numpy(ids[: rows * width].reshape(shape)).long()
    mask_t = torch.from_numpy(mask[: rows * width].reshape(shape))
    kind_t = torch.from_numpy(kind_of[: rows * width].reshape(shape))
    loss_sum = torch.zeros(len(kinds), dtype=torch.float64)
    token_sum = torch.zeros(len(kinds), dtype=torch.float64)
    num_experts = model.config.n_routed_experts
    has_moe = bool(moe_routers(model))
    counts = torch.zeros(len(moe_routers(model)), num_experts)
    kept_ids = []
    was_training = model.training
    model.eval()
    for start in range(0, rows, batch_size):
        batch = ids_t[start:start + batch_size]
        recorder = RoutingRecorder() if has_moe else None
        logits = model(batch[:, :-1], recorder=recorder)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        weights = mask_t[start:start + batch_size, 1:].reshape(-1).double()
        kinds_flat = kind_t[start:start + batch_size, 1:].reshape(-1)
        loss_sum.index_add_(0, kinds_flat, losses.double() * weights)
        token_sum.index_add_(0, kinds_flat, weights)
        if has_moe:
            counts += expert_counts(recorder, num_experts)
            if keep_routing:
                kept_ids.append(torch.stack(recorder.ids).to(torch.int16))
    model.train(was_training)
    by_kind = {k: float(loss_sum[i] / token_sum[i]) for k, i in kind_index.items() if token_sum[i] > 0}
    return Evaluation(loss=float(loss_sum.sum() / token_sum.sum().clamp_min(1)), loss_by_kind=by_kind,
                      tokens_by_kind={k: int(token_sum[i]) for k, i in kind_index.items()}, counts=counts,
                      expert_ids=torch.cat(kept_ids, dim=1) if kept_ids else None)


def unigram_loss(train_docs: Sequence[TokenizedDocument], eval_docs: Sequence[TokenizedDocument],
                 vocab_size: int, seq_len: int, max_rows: int | None = None) -> float:
    """Cross-entropy of an add-one-smoothed unigram model of the training targets, on exactly the target tokens
    `evaluate` scores (same packing, same mask): the baseline a language model has to beat."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for d in train_docs:
        np.add.at(counts, d.ids[d.mask], 1)
    logp = np.log(counts / counts.sum())
    ids = np.concatenate([d.ids for d in eval_docs])
    mask = np.concatenate([d.mask for d in eval_docs])
    width = seq_len + 1
    rows = len(ids) // width
    if max_rows is not None:
        rows = min(rows, max_rows)
    ids, mask = ids[: rows * width].reshape(rows, width)[:, 1:], mask[: rows * width].reshape(rows, width)[:, 1:]
    return float(-logp[ids[mask]].mean())
