"""Engine behaviour on a tiny random checkpoint: generation, streaming, batching, cancellation, routing, limits."""

from __future__ import annotations

import threading

import pytest
import torch

import workbench.chat  # noqa: F401  (gives the engine's Tokenizer apply_chat_template)
from workbench.engine import Engine, SamplingParams


def prompt(engine: Engine, text: str = "Write fizzbuzz") -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], enable_thinking=False)


def test_chat_template_renders_fixture_cases_through_tokenizer(tiny_engine, check_chat_fixtures):
    check_chat_fixtures(tiny_engine.tokenizer)


def test_special_tokens_are_single_ids(tiny_engine):
    tok = tiny_engine.tokenizer
    for special in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<think>", "</think>", "<tool_call>", "/nothink"):
        assert len(tok.encode(special)) == 1, special
    assert tok.stop_token_ids == [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]


def test_stream_yields_the_same_tokens_and_text_as_generate(tiny_engine):
    ids = prompt(tiny_engine)
    result = tiny_engine.generate(ids, max_new_tokens=24, temperature=0.0, stop_token_ids=[])
    stream = tiny_engine.stream(ids, max_new_tokens=24, temperature=0.0, stop_token_ids=[])
    pieces = list(stream)
    by_index = {p.index: p.token_id for p in pieces}  # a final flush may repeat the last index with more text
    assert [by_index[i] for i in sorted(by_index)] == result.token_ids
    assert "".join(p.text for p in pieces) == result.text == tiny_engine.tokenizer.decode(result.token_ids)
    assert stream.result.token_ids == result.token_ids


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_engine):
    ids = prompt(tiny_engine)
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, stop_token_ids=[])
    a = tiny_engine.generate(ids, seed=1, **kwargs).token_ids
    b = tiny_engine.generate(ids, seed=1, **kwargs).token_ids
    c = tiny_engine.generate(ids, seed=2, **kwargs).token_ids
    assert a == b
    assert a != c


def test_top_k_one_equals_greedy(tiny_engine):
    ids = prompt(tiny_engine)
    greedy = tiny_engine.generate(ids, max_new_tokens=12, temperature=0.0, stop_token_ids=[]).token_ids
    top1 = tiny_engine.generate(ids, max_new_tokens=12, temperature=0.8, top_k=1, seed=3, stop_token_ids=[]).token_ids
    assert top1 == greedy


def test_batched_generation_matches_one_at_a_time(tiny_engine):
    prompts = [prompt(tiny_engine, t) for t in ("a", "fizzbuzz please", "the quick brown fox jumps")]
    alone = [tiny_engine.generate(p, max_new_tokens=10, temperature=0.0, stop_token_ids=[]).token_ids for p in prompts]
    together = tiny_engine.generate_batch(prompts, max_new_tokens=10, temperature=0.0, stop_token_ids=[])
    assert [r.token_ids for r in together] == alone
    assert tiny_engine.num_running == 0 and tiny_engine.cache.num_free_blocks == tiny_engine.cache.num_blocks


def test_stop_token_ends_generation_without_emitting_it(tiny_engine):
    ids = prompt(tiny_engine)
    free_run = tiny_engine.generate(ids, max_new_tokens=10, temperature=0.0, stop_token_ids=[]).token_ids
    stop_at = free_run[4]
    result = tiny_engine.generate(ids, max_new_tokens=10, temperature=0.0, stop_token_ids=[stop_at])
    assert result.finish_reason == "stop" and result.stop_token_id == stop_at
    assert result.token_ids == free_run[: free_run.index(stop_at)]


def test_stop_string_cuts_text_and_is_never_streamed(tiny_engine):
    ids = prompt(tiny_engine)
    text = tiny_engine.generate(ids, max_new_tokens=30, temperature=0.0, stop_token_ids=[]).text
    needle = text[10:13]
    assert len(needle) == 3
    stream = tiny_engine.stream(ids, max_new_tokens=30, temperature=0.0, stop_token_ids=[], stop_strings=[needle])
    streamed = "".join(p.text for p in stream)
    result = stream.result
    assert result.finish_reason == "stop"
    assert result.text == text[: text.index(needle)] == streamed


def test_cancel_from_another_thread_stops_within_a_step_and_frees_cache(tiny_engine):
    ids = prompt(tiny_engine)
    stream = tiny_engine.stream(ids, max_new_tokens=500, temperature=0.0, stop_token_ids=[])
    seen = []
    for piece in stream:
        seen.append(piece)
        if len(seen) == 3:
            threading.Thread(target=stream.cancel).start()
        if len(seen) > 50:
            break
    result = stream.result
    assert result.finish_reason == "cancelled"
    assert len(result.token_ids) < 10
    assert tiny_engine.num_running == 0 and tiny_engine.cache.num_free_blocks == tiny_engine.cache.num_blocks


def test_concurrent_streams_from_threads_share_steps(tiny_engine):
    prompts = [prompt(tiny_engine, t) for t in ("one", "two two", "three three three", "four")]
    expected = [tiny_engine.generate(p, max_new_tokens=12, temperature=0.0, stop_token_ids=[]).token_ids
                for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = tiny_engine.generate(prompts[i], max_new_tokens=12, temperature=0.0, stop_token_ids=[]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


def test_routing_trace_covers_every_prompt_and_generated_token(tiny_engine):
    ids = prompt(tiny_engine)
    result = tiny_engine.generate(ids, max_new_tokens=9, temperature=0.0, stop_token_ids=[], routing=True,
                                  routing_scores=True)
    trace = result.routing
    config = tiny_engine.config
    layers = len(config.moe_layer_ids)
    tokens = len(ids) + len(result.token_ids)
    assert trace.expert_ids.shape == (layers, tokens, config.num_experts_per_tok)
    assert trace.expert_ids.dtype == torch.int16 and trace.weights.dtype == torch.float16
    assert trace.scores.shape == (layers, tokens, config.n_routed_experts)
    assert trace.token_ids.tolist() == ids + result.token_ids and trace.prompt_len == len(ids)
    assert int(trace.expert_ids.min()) >= 0 and int(trace.expert_ids.max()) < config.n_routed_experts
    # the weights are the normalised sigmoid scores of the chosen experts (norm_topk_prob, scaling 1)
    assert torch.allclose(trace.weights.float().sum(-1), torch.ones(layers, tokens), atol=2e-3)
    chosen = trace.scores.float().gather(-1, trace.expert_ids.long())
    assert torch.allclose(chosen / chosen.sum(-1, keepdim=True), trace.weights.float(), atol=2e-3)
    # decode-time routing agrees with a full forward over the same tokens
    from workbench.engine.routing import RoutingRecorder

    recorder = RoutingRecorder()
    with torch.no_grad():
        tiny_engine.model(torch.tensor([trace.token_ids.tolist()]), recorder=recorder)
    full = torch.stack(recorder.ids)  # [L, T, K]: the forward flattens its one sequence
    assert torch.equal(full.sort(-1).values, trace.expert_ids.long().sort(-1).values)


def test_routing_is_off_by_default(tiny_engine):
    assert tiny_engine.generate(prompt(tiny_engine), max_new_tokens=3, temperature=0.0).routing is None


def test_cached_decode_logits_match_full_forward(tiny_engine):
    ids = prompt(tiny_engine)
    result = tiny_engine.generate(ids, max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    full = tiny_engine.logits(ids + result.token_ids)
    greedy_from_full = full[len(ids) - 1: -1].argmax(-1).tolist()
    assert greedy_from_full == result.token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_sampling_values_are_clear_errors(tiny_engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_engine.generate(prompt(tiny_engine), **kwargs)
    assert tiny_engine.num_waiting == 0


def test_empty_and_overlong_prompts_fail_before_any_work(tiny_engine):
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.generate([])
    too_long = [5] * (tiny_engine.max_context - 3)
    with pytest.raises(ValueError, match="context limit"):
        tiny_engine.generate(too_long, max_new_tokens=10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_engine.generate([tiny_engine.config.vocab_size + 1])
    assert tiny_engine.num_waiting == 0 and tiny_engine.num_running == 0


def test_sampling_params_are_validated_on_construction():
    with pytest.raises(ValueError, match="stop_strings"):
        SamplingParams(stop_strings=[""])


def test_a_thinking_budget_closes_the_reasoning_after_that_many_tokens(tiny_engine):
    """The tiny model never writes <think> by itself, so the test names its first greedy token as the opening tag
    and an unlikely token as the closing one: the output then equals the free run for the opening tag and `budget`
    tokens, then the closing tag, which the free run never samples there."""
    ids = prompt(tiny_engine)
    free = tiny_engine.generate(ids, max_new_tokens=12, temperature=0.0, stop_token_ids=[]).token_ids
    close = next(t for t in range(tiny_engine.tokenizer.vocab_size) if t not in free)
    assert free[0] not in free[1:4], "the premise: the stand-in opening tag is not sampled again within the budget"
    for budget in (1, 3):
        out = tiny_engine.generate(ids, max_new_tokens=12, temperature=0.0, stop_token_ids=[],
                                   thinking_budget=budget, think_open_id=free[0], think_close_id=close).token_ids
        assert out[:budget + 1] == free[:budget + 1] and out[budget + 1] == close, (budget, out, free)
    # no opening tag in the output: nothing to cap
    unopened = tiny_engine.generate(ids, max_new_tokens=12, temperature=0.0, stop_token_ids=[], thinking_budget=1,
                                    think_open_id=close, think_close_id=close + 1).token_ids
    assert unopened == free


def test_a_thinking_budget_is_checked():
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(thinking_budget=0, think_open_id=1, think_close_id=2)
    with pytest.raises(ValueError, match="no(ne)?"):
        SamplingParams(thinking_budget=5)
