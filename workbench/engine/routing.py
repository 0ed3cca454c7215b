"""The routing trace: which experts each token went to, in every MoE layer.

Owns the record's shape and its (de)serialisation: data only, the engine never draws. The model fills it only
when asked; analysis and views (`workbench.analysis`, `workbench.widgets`, which also gives traces a `.show()`)
read it. Compact by design: expert ids are int16 (E <= 32767), weights float16, and the full sigmoid scores are
kept only on request.

Shape legend: L = MoE layers, T = tokens (prompt then generated), K = experts per token, E = experts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch


@dataclass
class RoutingTrace:
    expert_ids: torch.Tensor  # [L, T, K] int16, ordered by descending (biased) router score
    weights: torch.Tensor  # [L, T, K] float16, the combine weights the model used
    token_ids: torch.Tensor  # [T] int64, the token each column belongs to
    layer_ids: list[int]  # the model layer index of each of the L rows (dense layers have no routing)
    num_experts: int
    prompt_len: int  # columns [0, prompt_len) are the prompt, the rest were generated
    scores: torch.Tensor | None = None  # [L, T, E] float16 sigmoid scores, when requested
    meta: dict = field(default_factory=dict)  # free-form: model name, dtype, ...
    token_texts: list[str] | None = None  # [T] each column's text, where whoever made the trace had a tokenizer

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def __repr__(self) -> str:
        return (f"RoutingTrace(layers={self.num_layers}, tokens={self.num_tokens} (prompt {self.prompt_len}), "
                f"top_k={self.top_k}, experts={self.num_experts}, scores={'yes' if self.scores is not None else 'no'})")

    def slice_tokens(self, start: int, stop: int | None = None) -> RoutingTrace:
        """The trace restricted to token columns [start, stop)."""
        stop = self.num_tokens if stop is None else stop
        return RoutingTrace(
            expert_ids=self.expert_ids[:, start:stop], weights=self.weights[:, start:stop],
            token_ids=self.token_ids[start:stop], layer_ids=list(self.layer_ids), num_experts=self.num_experts,
            prompt_len=max(0, min(self.prompt_len, stop) - start),
            scores=None if self.scores is None else self.scores[:, start:stop], meta=dict(self.meta),
            token_texts=None if self.token_texts is None else self.token_texts[start:stop],
        )

    def to_dict(self) -> dict:
        """JSON-ready form (lists), as the server's `api/routing/{id}` returns it (the token texts as `tokens`)."""
        data = {
            "expert_ids": self.expert_ids.tolist(),
            "weights": [[[round(float(w), 4) for w in row] for row in layer] for layer in self.weights.float()],
            "token_ids": self.token_ids.tolist(),
            "layer_ids": list(self.layer_ids),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "prompt_len": self.prompt_len,
            "meta": dict(self.meta),
        }
        if self.token_texts is not None:
            data["tokens"] = list(self.token_texts)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RoutingTrace:
        return cls(
            expert_ids=torch.tensor(data["expert_ids"], dtype=torch.int16),
            weights=torch.tensor(data["weights"], dtype=torch.float16),
            token_ids=torch.tensor(data["token_ids"], dtype=torch.int64),
            layer_ids=list(data["layer_ids"]),
            num_experts=int(data["num_experts"]),
            prompt_len=int(data["prompt_len"]),
            meta=dict(data.get("meta", {})),
            token_texts=[str(t) for t in data["tokens"]] if isinstance(data.get("tokens"), list) else None,
        )

    def save(self, path_or_buffer: str | io.BytesIO) -> None:
        torch.save(self.__dict__, path_or_buffer)

    @classmethod
    def load(cls, path_or_buffer: str | io.BytesIO) -> RoutingTrace:
        return cls(**torch.load(path_or_buffer, weights_only=True))


class RoutingRecorder:
    """Collects the per-layer router choices of one forward pass; the model calls `record` in each MoE layer."""

    def __init__(self, keep_scores: bool = False) -> None:
        self.keep_scores = keep_scores
        self.ids: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []

    def record(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, scores: torch.Tensor) -> None:
        self.ids.append(topk_ids)
        self.weights.append(topk_weights)
        if self.keep_scores:
            self.scores.append(scores)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[L, T, K] ids (int16) and weights (float16), [L, T, E] scores or None; moved to the CPU once."""
        ids = torch.stack(self.ids).to("cpu", torch.int16)
        weights = torch.stack(self.weights).to("cpu", torch.float16)
        scores = torch.stack(self.scores).to("cpu", torch.float16) if self.keep_scores else None
        return ids, weights, scores
