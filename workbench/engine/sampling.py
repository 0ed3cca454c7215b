"""Sampling settings and next-token selection from logits: greedy, temperature, top-k, top-p, seeded.

Owns `SamplingParams` (validated on construction: a bad value is a clear error before any work) and `sample`.

Numerically safe for every value the settings accept: a temperature or top_p too small to compute with (below
SAMPLING_EPS; 1e-300 would underflow float32 to 0 and divide by it) means greedy, the most likely token always
survives top-p, and logits are shifted by their maximum before scaling so nothing overflows. A row whose
probabilities still come out non-finite (NaN logits from the model) is an error of that row alone: `sample`
returns it in that row's place, and the caller fails that sequence and no other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this a temperature (or top_p) leaves one token standing in float32: such settings are greedy (vLLM uses
# the same threshold).
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None = the tokenizer's stop ids; [] = never stop on a token
    stop_strings: list[str] = field(default_factory=list)
    # Most tokens of reasoning: once the model has thought this long after opening `<think>` (think_open_id), the
    # next token is `</think>` (think_close_id) whatever it would have sampled, and the answer follows. None: no cap.
    thinking_budget: int | None = None
    think_open_id: int | None = None
    think_close_id: int | None = None

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
        if self.thinking_budget is not None:
            if not isinstance(self.thinking_budget, int) or isinstance(self.thinking_budget, bool) \
                    or self.thinking_budget < 1:
                bad("thinking_budget", "must be an integer >= 1 (or None for no cap)")
            if self.think_open_id is None or self.think_close_id is None:
                bad("thinking_budget", "needs the model's <think> and </think> token ids (think_open_id, "
                                       "think_close_id): this tokenizer has none")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS or self.top_k == 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | SamplingError]:
    """logits [B, V] fp32 -> one token id per row, each row with its own settings; a row that cannot be sampled
    gets a SamplingError in its place (the other rows are unaffected)."""
    greedy_ids = logits.argmax(dim=-1)
    out: list[int | SamplingError] = greedy_ids.tolist()
    if all(p.greedy for p in params):
        return out
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        try:
            out[row] = _sample_row(logits[row], p, generator)
        except (RuntimeError, ValueError) as exc:
            out[row] = SamplingError(f"sampling failed ({exc})")
    return out


def close_thinking_at_budget(params: SamplingParams, thinking_since: int | None, generated: int, token: int) -> int:
    """The token to emit as output number `generated`: `</think>` in place of the sampled one once the reasoning
    opened at output position `thinking_since` (None: not thinking) has used `params.thinking_budget` tokens;
    else the sampled token."""
    if params.thinking_budget is None or thinking_since is None:
        return token
    return params.think_close_id if generated - thinking_since - 1 >= params.thinking_budget else token


class SamplingError(RuntimeError):
    """A row's next token could not be sampled (its logits were not finite)."""


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits.float()
    if not torch.isfinite(logits).any():
        raise SamplingError("the model produced no finite logit for this sequence")
    # Shifting by the maximum first keeps every scaled value <= 0: no overflow however small the temperature.
    scaled = (logits - logits.max()) / p.temperature
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = scaled.softmax(-1)
    if not torch.isfinite(probs).all():
        raise SamplingError("the sequence's probabilities are not finite (NaN logits from the model)")
    return int(torch.multinomial(probs, 1, generator=generator))
