"""Sampling settings and next-token selection from logits: greedy, temperature, top-k, top-p, seeded.

Owns `SamplingParams` (validated on construction: a bad value is a clear error before any work) and `sample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None = the tokenizer's stop ids; [] = never stop on a token
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        temperature = self.temperature
        if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
            bad("temperature", "must be a number >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop_strings", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] fp32 -> one token id per row, each row with its own settings."""
    greedy_ids = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_ids.tolist()
    out = greedy_ids.tolist()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        out[row] = _sample_row(logits[row], p, generator)
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    scaled = logits / p.temperature
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= p.top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = scaled.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
