"""The engine under serving pressure: KV blocks on demand and preemption, sampling that cannot fail on valid
settings, failures kept to their own sequence, and stop strings whose cost does not grow with their length."""

from __future__ import annotations

import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.engine import Engine, SamplingParams
from workbench.engine.sampling import SamplingError, sample
from workbench.engine.stop_strings import StopMatcher

GREEDY = dict(temperature=0.0, stop_token_ids=[])


def prompts(count: int, length: int = 10) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 400) for _ in range(length + i)] for i in range(count)]


@pytest.fixture(scope="module", params=["torch", "compiled"])
def small_pool_engine(request, tiny_checkpoint):
    """An engine whose pool holds 64 tokens in blocks of 4: four sequences of ~50 tokens must take turns."""
    return Engine.from_pretrained(tiny_checkpoint, dtype="float32", kernels="torch", cpu_kernels=request.param,
                                  block_size=4, cache_tokens=64, max_context=64)


# --- KV memory on demand -------------------------------------------------------------------------------------------

def test_admission_takes_blocks_for_the_prompt_only(small_pool_engine):
    engine = small_pool_engine
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=40, **GREEDY)) for p in prompts(3, 8)]
    engine.step()  # admit and prefill: reserving 48 tokens each (the old rule) would have admitted one
    assert engine.num_running == 3
    assert all(len(r.blocks) == engine.cache.blocks_for(len(r.prompt_ids)) for r in requests)
    for r in requests:
        r.cancel()
    engine.step()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_preempted_sequences_resume_and_equal_their_generation_alone(small_pool_engine, tiny_checkpoint):
    engine = small_pool_engine
    alone_engine = Engine.from_pretrained(tiny_checkpoint, dtype="float32", kernels="torch", cpu_kernels="torch")
    batch = prompts(4)
    alone = [alone_engine.generate(p, max_new_tokens=40, routing=True, **GREEDY) for p in batch]
    before = engine.preemptions
    streams = [engine.stream(p, max_new_tokens=40, routing=True, **GREEDY) for p in batch]
    pieces: list[list] = [[] for _ in streams]
    while not all(s.request.finished for s in streams):
        engine.step()
        for i, s in enumerate(streams):  # drain as a server does, step by step
            while not s.request.events.empty():
                event = s.request.events.get_nowait()
                if event is not None:
                    pieces[i].append(event)
    assert engine.preemptions > before, "the pool was large enough: the test no longer forces preemption"
    assert any(s.request.preemptions for s in streams)
    for stream, streamed, expected in zip(streams, pieces, alone, strict=True):
        result = stream.request.result()
        assert result.finish_reason == "length"
        assert result.token_ids == expected.token_ids
        # the stream went on where it stopped: every token once, in order, and the text is the whole text
        assert [p.index for p in streamed] == list(range(len(result.token_ids)))
        assert [p.token_id for p in streamed] == result.token_ids
        assert "".join(p.text for p in streamed) == result.text == expected.text
        # a preempted request's routing trace still covers each of its tokens once
        assert result.routing.token_ids.tolist() == expected.routing.token_ids.tolist()
        assert torch.equal(result.routing.expert_ids.sort(-1).values, expected.routing.expert_ids.sort(-1).values)
    assert engine.num_running == 0 and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_sequences_that_each_fill_the_pool_run_one_after_another_without_error(small_pool_engine):
    engine = small_pool_engine
    results = engine.generate_batch(prompts(3, 20), max_new_tokens=64 - 22, **GREEDY)
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_cancelling_a_preempted_request_ends_it(small_pool_engine):
    engine = small_pool_engine
    streams = [engine.stream(p, max_new_tokens=40, **GREEDY) for p in prompts(4)]
    while not engine.num_preempted:
        engine.step()
    waiting = next(s for s in streams if s.request.preemptions and not s.request.blocks)
    waiting.cancel()
    while engine.has_unfinished():
        engine.step()
    assert waiting.request.result().finish_reason == "cancelled"
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


# --- sampling that cannot fail --------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings_", [dict(temperature=1e-300), dict(temperature=5e-324), dict(temperature=1e-45),
                                       dict(temperature=1e-40), dict(top_p=1e-300), dict(temperature=1e-300,
                                                                                          top_p=1e-300)],
                         ids=["temperature_1e-300", "temperature_denormal_min", "temperature_1e-45",
                              "temperature_1e-40", "top_p_1e-300", "both"])
def test_vanishing_temperature_or_top_p_is_greedy(tiny_engine, settings_):
    ids = prompts(1)[0]
    greedy = tiny_engine.generate(ids, max_new_tokens=8, temperature=0.0, stop_token_ids=[]).token_ids
    kwargs = {"temperature": 1.0, **settings_}
    assert tiny_engine.generate(ids, max_new_tokens=8, stop_token_ids=[], seed=1, **kwargs).token_ids == greedy


def test_small_but_usable_settings_still_sample_without_nan():
    logits = torch.tensor([[10.0, 9.9, -3.0, 80.0, 79.5]])
    generator = torch.Generator().manual_seed(0)
    for p in (SamplingParams(temperature=2e-5), SamplingParams(top_p=2e-5), SamplingParams(temperature=1e4)):
        (token,) = sample(logits, [p], [generator])
        assert isinstance(token, int) and 0 <= token < 5


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan")] * 3, [2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.7, seed=1)] * 3
    out = sample(logits, params, [torch.Generator().manual_seed(1) for _ in range(3)])
    assert isinstance(out[1], SamplingError) and "finite" in str(out[1])
    assert isinstance(out[0], int) and isinstance(out[2], int)


# --- failures stay with their owner ---------------------------------------------------------------------------------

class _BrokenMatcher:
    def push(self, text):
        raise RuntimeError("this sequence's stop check broke")


def test_a_sequence_failure_ends_that_sequence_alone(tiny_engine):
    victim_prompt, bystander_prompt = prompts(2)
    expected = tiny_engine.generate(bystander_prompt, max_new_tokens=20, **GREEDY).token_ids
    victim = tiny_engine.add_request(victim_prompt, SamplingParams(max_new_tokens=20, **GREEDY))
    victim.stop_matcher = _BrokenMatcher()
    bystander = tiny_engine.add_request(bystander_prompt, SamplingParams(max_new_tokens=20, **GREEDY))
    while not (victim.finished and bystander.finished):
        tiny_engine.step()
    assert victim.finish_reason == "error" and "broke" in str(victim.error)
    assert bystander.error is None and bystander.result().token_ids == expected
    assert tiny_engine.cache.num_free_blocks == tiny_engine.cache.num_blocks


def test_a_forward_failure_ends_its_step_and_the_engine_serves_the_next_request(tiny_checkpoint, monkeypatch):
    engine = Engine.from_pretrained(tiny_checkpoint, dtype="float32", kernels="torch", cpu_kernels="torch",
                                    max_batch_size=1)
    ids = prompts(1)[0]
    expected = engine.generate(ids, max_new_tokens=6, **GREEDY).token_ids
    running = engine.add_request(ids, SamplingParams(max_new_tokens=6, **GREEDY))
    waiting = engine.add_request(ids, SamplingParams(max_new_tokens=6, **GREEDY))  # batch of one: it waits
    original = engine.model.hidden_states

    def broken(*args, **kwargs):
        raise RuntimeError("injected forward failure")

    monkeypatch.setattr(engine.model, "hidden_states", broken)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    monkeypatch.setattr(engine.model, "hidden_states", original)
    assert running.finish_reason == "error" and not waiting.finished
    while not waiting.finished:
        engine.step()
    assert waiting.result().token_ids == expected
    assert engine.generate(ids, max_new_tokens=6, **GREEDY).token_ids == expected
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


# --- stop strings ----------------------------------------------------------------------------------------------------

def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Generation ends as soon as a stop string has appeared (the earliest to end; of those ending together, the
    longest), and the text is cut where it begins."""
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not ends:
        return text, False, None
    end, negative_length, stop = min(ends)
    return text[: end + negative_length], True, stop


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text("ab", min_size=1, max_size=5), min_size=1, max_size=4),
       text=st.text("abc", max_size=20), cuts=st.lists(st.integers(1, 4), max_size=20))
def test_stop_matcher_agrees_with_a_plain_search(stops, text, cuts):
    matcher, emitted, position, hit = StopMatcher(stops), "", 0, False
    pieces = []
    for size in [*cuts, len(text)]:
        pieces.append(text[position:position + size])
        position += size
    for piece in pieces:
        out, hit = matcher.push(piece)
        emitted += out
        if hit:
            break
    if not hit:
        emitted += matcher.flush()
    assert (emitted, hit, matcher.matched) == _reference_cut(text, stops)


def test_a_megabyte_stop_string_costs_per_token_what_the_new_text_costs():
    # The old search tried every prefix length of every stop string at every token: for this stop string and
    # 8 tokens, minutes of a scheduler thread every request shares. Now: the time to build its automaton once.
    matcher = StopMatcher(["x" * 1_000_000, "\x01" * 300_000])
    start = time.perf_counter()
    for _ in range(2_000):
        out, hit = matcher.push("xx")
        assert not hit and out == ""
    assert time.perf_counter() - start < 30  # generous: the old search would not finish 8 tokens in this time
    out, hit = matcher.push("y")
    assert not hit and out == "x" * 4_000 + "y"


def test_engine_stop_strings_still_cut_the_text(tiny_engine):
    ids = prompts(1)[0]
    text = tiny_engine.generate(ids, max_new_tokens=30, **GREEDY).text
    needle = text[8:12]
    result = tiny_engine.generate(ids, max_new_tokens=30, stop_strings=["x" * 100_000, needle], **GREEDY)
    assert result.finish_reason == "stop" and result.text == text[: text.index(needle)]
    assert result.stop_string == needle  # named, for the API's stop_reason (and Anthropic's stop_sequence)
