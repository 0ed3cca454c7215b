"""Routing analysis: pure functions on a `RoutingTrace` that say how a MoE model used its experts.

Owns the metrics only; it draws nothing (views are `workbench.widgets`) and runs no model. Every function
takes a trace (and plain arguments), returns numpy arrays or small frozen dataclasses of them, and leaves
the trace untouched. Layers are named by the model's own layer index (`trace.layer_ids`, e.g. 1..45 for
GLM-4.5-Air, whose layer 0 is dense); results indexed per layer follow the trace's row order.

Shape legend: L = MoE layers in the trace, T = tokens, K = experts per token (top_k), E = routed experts.
With idx[l, t, k] the chosen expert ids and S_t the set {idx[l, t, k] for k < K}:

- load[l, e]        share of the T*K assignments that went to expert e (each row sums to 1);
                    relative load = E * load (1 = balanced).
- imbalance         cv = population std / mean of load; max_violation = max(E * load) - 1;
                    entropy = -sum(load * log load) / log E; dead = experts with zero load.
- locality          r1 = share of consecutive tokens with the same first choice (random: 1/E);
                    r_any = share of consecutive tokens whose S_t intersect (random: 1 - C(E-K, K)/C(E, K));
                    overlap = mean |S_t n S_t+1| / K (random: K/E).
- coactivation      C[i, j] = N(i, j) / N(i) over unordered pairs within one token's S_t;
                    lift = C / ((K-1)/(E-1)), the ratio to independent uniform routing.
- specialization    mean over tokens seen >= min_count times of max_e N(x, e) / n_x (1 = each token id always
                    goes to the same expert; K/E = spread evenly).
- agreement         mean_t |S_a n S_b| / K between two traces of the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from workbench.engine.routing import RoutingTrace

__all__ = [
    "Coactivation",
    "Imbalance",
    "Locality",
    "TokenSpecialization",
    "agreement",
    "coactivation",
    "imbalance",
    "layer_row",
    "load",
    "locality",
    "locality_baselines",
    "random_trace",
    "relative_load",
    "token_specialization",
]


# --- input checks -------------------------------------------------------------------------------------

def _expert_ids(trace: RoutingTrace) -> np.ndarray:
    """The [L, T, K] expert ids as int64 numpy, checked against the trace's own E."""
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"expected a workbench RoutingTrace, got {type(trace).__name__}; generate with "
                        "routing=True (or RoutingTrace.from_dict on the server's api/routing answer)")
    ids = trace.expert_ids
    ids = ids.numpy() if hasattr(ids, "numpy") else np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"trace.expert_ids must be [layers, tokens, top_k], got shape {tuple(ids.shape)}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= trace.num_experts):
        raise ValueError(f"trace.expert_ids hold values in [{ids.min()}, {ids.max()}] but the trace says "
                         f"num_experts={trace.num_experts}: the ids must lie in [0, num_experts)")
    return ids


def _require_tokens(ids: np.ndarray, what: str, minimum: int = 1) -> None:
    if ids.shape[1] < minimum:
        raise ValueError(f"{what} needs a trace with at least {minimum} token(s); this one has "
                         f"{ids.shape[1]}")


def layer_row(trace: RoutingTrace, layer: int) -> int:
    """The row of `trace` that holds model layer `layer` (a value of `trace.layer_ids`)."""
    try:
        return list(trace.layer_ids).index(int(layer))
    except ValueError:
        ids = list(trace.layer_ids)
        span = f"{ids[0]}..{ids[-1]}" if ids else "none"
        raise ValueError(f"layer {layer} is not a MoE layer of this trace; its MoE layers are {span} "
                         "(dense layers have no routing)") from None


def _intersection_sizes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|S_a n S_b| per position for [..., K] id arrays whose K ids per position are distinct."""
    return (a[..., :, None] == b[..., None, :]).sum(axis=(-1, -2))


# --- load and imbalance -------------------------------------------------------------------------------

def load(trace: RoutingTrace) -> np.ndarray:
    """[L, E] float64: share of the T*K expert assignments that went to each expert; rows sum to 1."""
    ids = _expert_ids(trace)
    _require_tokens(ids, "load")
    num_layers, num_tokens, top_k = ids.shape
    experts = trace.num_experts
    # One bincount over all layers: offset each layer's ids into its own block of E bins.
    flat = (ids + (np.arange(num_layers) * experts)[:, None, None]).ravel()
    counts = np.bincount(flat, minlength=num_layers * experts).reshape(num_layers, experts)
    return counts / float(num_tokens * top_k)


def relative_load(trace: RoutingTrace) -> np.ndarray:
    """[L, E]: E * load, so 1 is an expert's fair share, 2 twice it, 0 a dead expert."""
    return trace.num_experts * load(trace)


@dataclass(frozen=True)
class Imbalance:
    """Per-layer balance of expert load; each array has one value per trace row (layer)."""

    layer_ids: list[int]
    cv: np.ndarray  # [L] population std / mean of the load
    max_violation: np.ndarray  # [L] max(E * load) - 1: how far the busiest expert is over its fair share
    entropy: np.ndarray  # [L] load entropy / log E, 1 = perfectly balanced
    dead: list[np.ndarray]  # per layer, the ids of experts that received no token

    @property
    def num_dead(self) -> np.ndarray:
        return np.array([len(d) for d in self.dead], dtype=np.int64)


def imbalance(trace: RoutingTrace) -> Imbalance:
    """The load-balance metrics of each layer (see the module docstring)."""
    shares = load(trace)
    experts = trace.num_experts
    mean = shares.mean(axis=1)  # = 1/E for every row, kept general for clarity
    cv = shares.std(axis=1) / mean
    max_violation = experts * shares.max(axis=1) - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(shares > 0, shares * np.log(shares), 0.0)
    # With a single expert there is nothing to balance: call it perfectly balanced rather than 0/0.
    entropy = -plogp.sum(axis=1) / math.log(experts) if experts > 1 else np.ones(len(shares))
    dead = [np.flatnonzero(row == 0) for row in shares]
    return Imbalance(layer_ids=list(trace.layer_ids), cv=cv, max_violation=max_violation, entropy=entropy,
                     dead=dead)


# --- locality -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Locality:
    """How often consecutive tokens reuse experts, per layer, with what independent uniform routing gives."""

    layer_ids: list[int]
    r1: np.ndarray  # [L] same first-choice expert as the previous token
    r_any: np.ndarray  # [L] top-K sets intersect
    overlap: np.ndarray  # [L] mean |S_t n S_t+1| / K
    r1_random: float  # 1/E
    r_any_random: float  # 1 - C(E-K, K)/C(E, K)
    overlap_random: float  # K/E


def locality_baselines(num_experts: int, top_k: int) -> tuple[float, float, float]:
    """(r1, r_any, overlap) of independent uniform top-K routing over `num_experts` experts."""
    r1 = 1.0 / num_experts
    r_any = 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    overlap = top_k / num_experts
    return r1, r_any, overlap


def locality(trace: RoutingTrace) -> Locality:
    """Consecutive-token expert reuse per layer; needs at least two tokens."""
    ids = _expert_ids(trace)
    _require_tokens(ids, "locality", minimum=2)
    top_k = ids.shape[2]
    previous, current = ids[:, :-1], ids[:, 1:]
    shared = _intersection_sizes(previous, current)  # [L, T-1]
    r1_random, r_any_random, overlap_random = locality_baselines(trace.num_experts, top_k)
    return Locality(
        layer_ids=list(trace.layer_ids),
        r1=(previous[..., 0] == current[..., 0]).mean(axis=1),
        r_any=(shared > 0).mean(axis=1),
        overlap=shared.mean(axis=1) / top_k,
        r1_random=r1_random, r_any_random=r_any_random, overlap_random=overlap_random,
    )


# --- co-activation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Coactivation:
    """Which experts one layer picks together for the same token."""

    layer: int  # model layer index
    counts: np.ndarray  # [E, E] N(i, j): tokens whose top-K holds both i and j; diagonal N(i)
    conditional: np.ndarray  # [E, E] C[i, j] = N(i, j) / N(i); diagonal 0; rows of unused experts NaN
    lift: np.ndarray  # [E, E] C / ((K-1)/(E-1)); 1 = as often as independent uniform routing would


def coactivation(trace: RoutingTrace, layer: int) -> Coactivation:
    """Co-activation of experts within one token's top-K at model layer `layer` (one of trace.layer_ids)."""
    ids = _expert_ids(trace)
    _require_tokens(ids, "coactivation")
    row = ids[layer_row(trace, layer)]  # [T, K]
    num_tokens, top_k = row.shape
    experts = trace.num_experts
    chosen = np.zeros((num_tokens, experts), dtype=np.int64)
    np.put_along_axis(chosen, row, 1, axis=1)
    counts = chosen.T @ chosen  # [E, E]; diagonal = N(i), tokens that chose expert i
    per_expert = np.diag(counts).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        conditional = counts / per_expert[:, None]
    np.fill_diagonal(conditional, 0.0)
    conditional[per_expert == 0] = np.nan
    # With K = 1 no token holds a pair: co-activation, and so its lift, is undefined.
    lift = conditional / ((top_k - 1) / (experts - 1)) if top_k > 1 else np.full_like(conditional, np.nan)
    return Coactivation(layer=int(layer), counts=counts, conditional=conditional, lift=lift)


# --- token specialization -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenSpecialization:
    """How consistently each token id goes to the same expert, per layer, and each expert's usual tokens."""

    layer_ids: list[int]
    score: np.ndarray  # [L] mean over qualifying token ids of max_e N(x, e) / n_x; NaN when none qualifies
    num_token_ids: int  # how many distinct token ids were seen at least min_count times
    min_count: int
    baseline: float  # K/E: the score of a token spread evenly over all experts
    top_tokens: list[list[list[tuple[int, int]]]]  # [L][E] -> [(token id, times routed there)], most first


def token_specialization(trace: RoutingTrace, token_ids=None, min_count: int = 10,
                         top_n: int = 10) -> TokenSpecialization:
    """Per-layer token -> expert consistency. `token_ids` defaults to `trace.token_ids` (one per column).

    N(x, e) counts the occurrences of token id x whose top-K holds expert e, n_x the occurrences of x.
    `top_tokens[l][e]` lists the `top_n` token ids most often routed to expert e at row l (all tokens count
    there, not only those seen min_count times).
    """
    ids = _expert_ids(trace)
    _require_tokens(ids, "token_specialization")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    tokens = trace.token_ids if token_ids is None else token_ids
    tokens = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
    tokens = tokens.astype(np.int64, copy=False).ravel()
    num_layers, num_tokens, top_k = ids.shape
    if tokens.shape[0] != num_tokens:
        raise ValueError(f"token_ids has {tokens.shape[0]} entries but the trace has {num_tokens} token "
                         "columns: pass one token id per column")
    experts = trace.num_experts
    vocab, inverse, occurrences = np.unique(tokens, return_inverse=True, return_counts=True)
    qualifying = occurrences >= min_count
    scores = np.full(num_layers, np.nan)
    top_tokens: list[list[list[tuple[int, int]]]] = []
    for row in range(num_layers):
        # counts[x, e] = N(x, e), accumulated over every (token, k) assignment of this layer.
        counts = np.zeros((len(vocab), experts), dtype=np.int64)
        np.add.at(counts, (np.repeat(inverse, top_k), ids[row].ravel()), 1)
        if qualifying.any():
            scores[row] = (counts[qualifying].max(axis=1) / occurrences[qualifying]).mean()
        per_expert = []
        for expert in range(experts):
            column = counts[:, expert]
            order = np.argsort(-column, kind="stable")[:top_n]
            per_expert.append([(int(vocab[i]), int(column[i])) for i in order if column[i] > 0])
        top_tokens.append(per_expert)
    return TokenSpecialization(layer_ids=list(trace.layer_ids), score=scores,
                               num_token_ids=int(qualifying.sum()), min_count=min_count,
                               baseline=top_k / experts, top_tokens=top_tokens)


# --- agreement between two traces ---------------------------------------------------------------------

def agreement(trace_a: RoutingTrace, trace_b: RoutingTrace) -> np.ndarray:
    """[L] mean over tokens of |S_a n S_b| / K: 1 = both traces picked the same experts for every token.

    For traces of the same tokens: prefill against decode, two dtypes, two kernels, a prompt run twice.
    """
    ids_a, ids_b = _expert_ids(trace_a), _expert_ids(trace_b)
    if ids_a.shape != ids_b.shape:
        raise ValueError(f"traces differ in shape [layers, tokens, top_k]: {tuple(ids_a.shape)} vs "
                         f"{tuple(ids_b.shape)}; compare traces of the same model and tokens (use "
                         "slice_tokens to align them)")
    if trace_a.num_experts != trace_b.num_experts or list(trace_a.layer_ids) != list(trace_b.layer_ids):
        raise ValueError("traces come from models with different experts or MoE layers; agreement compares "
                         "two traces of the same model")
    _require_tokens(ids_a, "agreement")
    return _intersection_sizes(ids_a, ids_b).mean(axis=1) / ids_a.shape[2]


# --- the null model -----------------------------------------------------------------------------------

def random_trace(num_layers: int, num_tokens: int, num_experts: int, top_k: int, seed: int = 0,
                 vocab_size: int = 1000) -> RoutingTrace:
    """A trace of independent uniform top-K routing: the null model every random baseline above describes.

    Each token draws K distinct experts uniformly in every layer; weights are random and sum to 1 per token.
    Use it to see how far a real trace is from chance at the same T, E and K.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    rng = np.random.default_rng(seed)
    ids = rng.random((num_layers, num_tokens, num_experts)).argsort(axis=-1)[..., :top_k]
    weights = rng.random((num_layers, num_tokens, top_k)) + 1e-3
    weights /= weights.sum(axis=-1, keepdims=True)
    return RoutingTrace(
        expert_ids=torch.from_numpy(ids.astype(np.int16)),
        weights=torch.from_numpy(weights.astype(np.float16)),
        token_ids=torch.from_numpy(rng.integers(0, vocab_size, num_tokens)),
        layer_ids=list(range(1, num_layers + 1)), num_experts=num_experts, prompt_len=num_tokens,
        meta={"source": "random_trace", "seed": seed},
    )
