"""Every routing metric of workbench.analysis against a trace whose answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench import analysis
from workbench.engine.routing import RoutingTrace


def make_trace(ids, num_experts: int, token_ids=None, layer_ids=None) -> RoutingTrace:
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.int16)
    num_layers, num_tokens, top_k = ids.shape
    if token_ids is None:
        token_ids = torch.arange(num_tokens)
    return RoutingTrace(
        expert_ids=ids, weights=torch.full((num_layers, num_tokens, top_k), 1.0 / top_k, dtype=torch.float16),
        token_ids=torch.as_tensor(token_ids, dtype=torch.int64),
        layer_ids=list(layer_ids) if layer_ids is not None else list(range(1, num_layers + 1)),
        num_experts=num_experts, prompt_len=num_tokens,
    )


def round_robin(num_layers: int, num_tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """Token t picks experts t*K .. t*K+K-1 (mod E): perfectly balanced when E divides T*K."""
    t = np.arange(num_tokens)[:, None] * top_k + np.arange(top_k)[None, :]
    return np.broadcast_to(t % num_experts, (num_layers, num_tokens, top_k)).copy()


# --- load and imbalance -------------------------------------------------------------------------------

def test_uniform_routing_is_balanced():
    trace = make_trace(round_robin(3, 16, 8, 2), num_experts=8)
    np.testing.assert_allclose(analysis.load(trace), np.full((3, 8), 1 / 8))
    np.testing.assert_allclose(analysis.relative_load(trace), np.ones((3, 8)))
    imb = analysis.imbalance(trace)
    np.testing.assert_allclose(imb.cv, 0.0, atol=1e-12)
    np.testing.assert_allclose(imb.max_violation, 0.0, atol=1e-12)
    np.testing.assert_allclose(imb.entropy, 1.0)
    assert imb.num_dead.tolist() == [0, 0, 0]
    assert imb.layer_ids == [1, 2, 3]


def test_all_tokens_on_one_expert():
    experts = 8
    trace = make_trace(np.zeros((2, 10, 1)), num_experts=experts)
    shares = analysis.load(trace)
    assert shares[:, 0].tolist() == [1.0, 1.0] and shares[:, 1:].sum() == 0
    imb = analysis.imbalance(trace)
    # load = (1, 0, ..., 0): mean 1/E, population std sqrt(E-1)/E, so cv = sqrt(E-1).
    np.testing.assert_allclose(imb.cv, math.sqrt(experts - 1))
    np.testing.assert_allclose(imb.max_violation, experts - 1)
    np.testing.assert_allclose(imb.entropy, 0.0)
    assert [d.tolist() for d in imb.dead] == [list(range(1, experts))] * 2


def test_two_of_four_experts_used_equally():
    # Half the experts take all the load: relative load 2 on the used ones, entropy log 2 / log 4 = 1/2.
    ids = np.tile(np.array([[0, 1]]), (12, 1))[None]
    imb = analysis.imbalance(make_trace(ids, num_experts=4))
    np.testing.assert_allclose(analysis.relative_load(make_trace(ids, num_experts=4)), [[2, 2, 0, 0]])
    np.testing.assert_allclose(imb.cv, 1.0)
    np.testing.assert_allclose(imb.max_violation, 1.0)
    np.testing.assert_allclose(imb.entropy, 0.5)
    assert imb.dead[0].tolist() == [2, 3]


def test_random_routing_load_is_near_uniform():
    trace = analysis.random_trace(num_layers=2, num_tokens=20000, num_experts=16, top_k=4, seed=1)
    np.testing.assert_allclose(analysis.load(trace), 1 / 16, atol=0.004)
    imb = analysis.imbalance(trace)
    assert (imb.entropy > 0.999).all() and (imb.cv < 0.05).all() and imb.num_dead.sum() == 0


# --- locality -----------------------------------------------------------------------------------------

def test_locality_of_constant_routing_is_one():
    loc = analysis.locality(make_trace(np.tile([[3, 5]], (2, 7, 1)), num_experts=8))
    np.testing.assert_allclose(loc.r1, 1.0)
    np.testing.assert_allclose(loc.r_any, 1.0)
    np.testing.assert_allclose(loc.overlap, 1.0)


def test_locality_known_sequence():
    # Layer sets: {0,1} -> {1,2} -> {3,4} -> {3,4} (first choices 0, 1, 3, 3):
    # r1: only the last pair repeats its first choice = 1/3; r_any: pairs 1 and 3 intersect = 2/3;
    # overlap: |.| = 1, 0, 2 over K = 2 -> (0.5 + 0 + 1) / 3 = 0.5.
    ids = np.array([[[0, 1], [1, 2], [3, 4], [3, 4]]])
    loc = analysis.locality(make_trace(ids, num_experts=6))
    np.testing.assert_allclose(loc.r1, [1 / 3])
    np.testing.assert_allclose(loc.r_any, [2 / 3])
    np.testing.assert_allclose(loc.overlap, [0.5])


def test_locality_order_within_top_k_counts_only_for_r1():
    # Same set, swapped order: the sets intersect fully, the first choice differs.
    loc = analysis.locality(make_trace(np.array([[[0, 1], [1, 0]]]), num_experts=4))
    assert loc.r1.tolist() == [0.0] and loc.r_any.tolist() == [1.0] and loc.overlap.tolist() == [1.0]


@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4), (32, 1)])
def test_random_routing_matches_stated_baselines(experts, top_k):
    trace = analysis.random_trace(num_layers=3, num_tokens=20000, num_experts=experts, top_k=top_k, seed=7)
    loc = analysis.locality(trace)
    assert loc.r1_random == pytest.approx(1 / experts)
    disjoint = math.comb(experts - top_k, top_k) / math.comb(experts, top_k)
    assert loc.r_any_random == pytest.approx(1 - disjoint)
    assert loc.overlap_random == pytest.approx(top_k / experts)
    # 20k pairs: the binomial standard error is at most 0.0035; 0.015 is above four of them.
    np.testing.assert_allclose(loc.r1, loc.r1_random, atol=0.015)
    np.testing.assert_allclose(loc.r_any, loc.r_any_random, atol=0.015)
    np.testing.assert_allclose(loc.overlap, loc.overlap_random, atol=0.015)


def test_locality_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 token"):
        analysis.locality(make_trace(np.zeros((1, 1, 2)) + [[[0, 1]]], num_experts=4))


# --- co-activation ------------------------------------------------------------------------------------

def test_coactivation_hand_counted():
    # Tokens choose {0,1}, {0,1}, {0,2}, {3,1} of E = 4, K = 2.
    # N(0) = 3: with 1 twice, with 2 once. N(1) = 3: with 0 twice, with 3 once. N(2) = 1, N(3) = 1.
    ids = np.array([[[0, 1], [0, 1], [0, 2], [3, 1]]])
    co = analysis.coactivation(make_trace(ids, num_experts=4, layer_ids=[5]), layer=5)
    expected = np.array([
        [0, 2 / 3, 1 / 3, 0],
        [2 / 3, 0, 0, 1 / 3],
        [1, 0, 0, 0],
        [0, 1, 0, 0],
    ])
    np.testing.assert_allclose(co.conditional, expected)
    assert np.diag(co.counts).tolist() == [3, 3, 1, 1]
    # Independent uniform routing: (K-1)/(E-1) = 1/3.
    np.testing.assert_allclose(co.lift, expected * 3)
    assert co.layer == 5


def test_coactivation_of_unused_expert_is_nan_and_rows_sum_to_k_minus_1():
    ids = np.array([[[0, 1, 2], [1, 2, 0], [0, 2, 1], [0, 1, 2]]])  # expert 3 never used
    co = analysis.coactivation(make_trace(ids, num_experts=4), layer=1)
    assert np.isnan(co.conditional[3]).all()
    np.testing.assert_allclose(co.conditional[:3].sum(axis=1), 2.0)


def test_coactivation_of_random_routing_has_lift_one():
    trace = analysis.random_trace(num_layers=1, num_tokens=30000, num_experts=8, top_k=3, seed=3)
    co = analysis.coactivation(trace, layer=1)
    off_diagonal = co.lift[~np.eye(8, dtype=bool)]
    # Each cell counts ~3200 pairs: a relative standard error of ~1.5%; 0.08 is five of them.
    np.testing.assert_allclose(off_diagonal, 1.0, atol=0.08)
    assert abs(off_diagonal.mean() - 1.0) < 0.01


def test_coactivation_unknown_layer_names_the_valid_ones():
    trace = make_trace(round_robin(2, 4, 4, 2), num_experts=4, layer_ids=[1, 2])
    with pytest.raises(ValueError, match=r"layer 0 is not a MoE layer.*1\.\.2"):
        analysis.coactivation(trace, layer=0)


# --- token specialization -----------------------------------------------------------------------------

def test_fixed_token_to_expert_map_is_fully_specialized():
    rng = np.random.default_rng(0)
    experts, top_k = 8, 2
    tokens = rng.integers(0, 20, 2000)
    table = np.stack([rng.permutation(experts)[:top_k] for _ in range(20)])  # token -> its fixed experts
    ids = table[tokens][None].repeat(2, axis=0)
    trace = make_trace(ids, num_experts=experts, token_ids=tokens)
    spec = analysis.token_specialization(trace, min_count=10)
    np.testing.assert_allclose(spec.score, 1.0)
    assert spec.num_token_ids == 20 and spec.baseline == top_k / experts
    # The top tokens of each expert are exactly the token ids mapped to it, with their counts.
    for expert in range(experts):
        mapped = {x for x in range(20) if expert in table[x]}
        listed = dict(spec.top_tokens[0][expert])
        assert set(listed) <= mapped
        assert len(listed) == min(len(mapped), 10)
        for x, count in listed.items():
            assert count == int((tokens == x).sum())


def test_random_routing_specialization_is_low():
    trace = analysis.random_trace(num_layers=1, num_tokens=40000, num_experts=16, top_k=2, seed=5,
                                  vocab_size=50)
    spec = analysis.token_specialization(trace, min_count=10)
    # Each token id is seen ~800 times; a share of K/E = 0.125 plus noise of the max over 16 experts.
    assert spec.baseline == 0.125
    assert 0.125 < spec.score[0] < 0.16


def test_specialization_min_count_and_explicit_token_ids():
    ids = np.array([[[0], [1], [0], [2]]])
    trace = make_trace(ids, num_experts=3, token_ids=[9, 9, 9, 4])
    # Token 9 went to 0, 1, 0 -> 2/3; token 4 seen once, below min_count=2.
    spec = analysis.token_specialization(trace, min_count=2)
    np.testing.assert_allclose(spec.score, [2 / 3])
    assert spec.num_token_ids == 1
    spec = analysis.token_specialization(trace, token_ids=[1, 2, 3, 4], min_count=2)
    assert np.isnan(spec.score[0]) and spec.num_token_ids == 0
    with pytest.raises(ValueError, match="one token id per column"):
        analysis.token_specialization(trace, token_ids=[1, 2])


# --- agreement ----------------------------------------------------------------------------------------

def test_agreement_known_values():
    a = make_trace(np.array([[[0, 1], [2, 3]], [[0, 1], [2, 3]]]), num_experts=4)
    b = make_trace(np.array([[[1, 0], [2, 0]], [[2, 3], [0, 1]]]), num_experts=4)
    # Layer 1: {0,1} vs {1,0} -> 2, {2,3} vs {2,0} -> 1: (1 + 0.5) / 2. Layer 2: disjoint both times.
    np.testing.assert_allclose(analysis.agreement(a, b), [0.75, 0.0])
    np.testing.assert_allclose(analysis.agreement(a, a), [1.0, 1.0])


def test_agreement_of_independent_random_traces_is_k_over_e():
    a = analysis.random_trace(2, 20000, num_experts=16, top_k=4, seed=1)
    b = analysis.random_trace(2, 20000, num_experts=16, top_k=4, seed=2)
    np.testing.assert_allclose(analysis.agreement(a, b), 4 / 16, atol=0.01)


def test_agreement_rejects_mismatched_traces():
    a = analysis.random_trace(2, 10, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="slice_tokens"):
        analysis.agreement(a, a.slice_tokens(0, 5))
    with pytest.raises(ValueError, match="same model"):
        analysis.agreement(a, analysis.random_trace(2, 10, num_experts=9, top_k=2))


# --- input checks and invariants ----------------------------------------------------------------------

def test_ids_out_of_range_are_a_clear_error():
    trace = make_trace(np.array([[[0, 9]]]), num_experts=4)
    with pytest.raises(ValueError, match=r"num_experts=4"):
        analysis.load(trace)


def test_not_a_trace_is_a_clear_error():
    with pytest.raises(TypeError, match="RoutingTrace"):
        analysis.load({"expert_ids": [[[0]]]})


def test_empty_trace_is_a_clear_error():
    trace = make_trace(np.zeros((2, 0, 2)), num_experts=4)
    with pytest.raises(ValueError, match="at least 1 token"):
        analysis.imbalance(trace)


def test_metrics_survive_a_json_round_trip():
    trace = analysis.random_trace(2, 50, num_experts=8, top_k=2, seed=4)
    again = RoutingTrace.from_dict(trace.to_dict())
    np.testing.assert_array_equal(analysis.load(trace), analysis.load(again))
    np.testing.assert_array_equal(analysis.agreement(trace, again), [1.0, 1.0])


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 3), tokens=st.integers(2, 40), experts=st.integers(2, 12), data=st.data())
def test_invariants_hold_for_any_routing(layers, tokens, experts, data):
    top_k = data.draw(st.integers(1, experts))
    trace = analysis.random_trace(layers, tokens, experts, top_k, seed=data.draw(st.integers(0, 2**16)))
    np.testing.assert_allclose(analysis.load(trace).sum(axis=1), 1.0)
    imb = analysis.imbalance(trace)
    assert ((imb.entropy >= -1e-12) & (imb.entropy <= 1 + 1e-12)).all()
    assert (imb.max_violation >= -1e-12).all()
    loc = analysis.locality(trace)
    for values in (loc.r1, loc.r_any, loc.overlap):
        assert ((values >= 0) & (values <= 1)).all()
    assert (loc.r1 <= loc.r_any).all() and (loc.overlap <= loc.r_any).all()
    co = analysis.coactivation(trace, layer=trace.layer_ids[0])
    used = ~np.isnan(co.conditional[:, 0])
    np.testing.assert_allclose(co.conditional[used].sum(axis=1), top_k - 1)
