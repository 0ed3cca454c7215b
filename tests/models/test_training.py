"""The training loop: packing and masks, the balancing rule, learning, exact resume, and a CI smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.engine.config import GLMConfig
from workbench.engine.routing import RoutingRecorder
from workbench.models.recipe.corpus import Document
from workbench.models.recipe.training import (
    PackedStream,
    TokenizedDocument,
    TrainConfig,
    balance_biases,
    build_model,
    evaluate,
    expert_counts,
    lr_at,
    masked_loss,
    max_violation,
    moe_routers,
    tokenize_documents,
    train,
    unigram_loss,
)

TINY = GLMConfig.preset("tiny", vocab_size=64)


def docs(n: int = 40, seed: int = 0) -> list[TokenizedDocument]:
    """Learnable toy documents: counting sequences (kind 'chat', prompt half untrained) and random 'source'."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        start = int(rng.integers(0, 40))
        ids = np.arange(start, start + 20, dtype=np.int32) % 64
        mask = np.arange(20) >= 8
        out.append(TokenizedDocument(ids, mask, "chat"))
        if i % 4 == 0:
            out.append(TokenizedDocument(rng.integers(0, 64, 50).astype(np.int32), np.ones(50, bool), "source"))
    return out


def small_config(**changes) -> TrainConfig:
    base = dict(seq_len=16, batch_size=4, steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=2, bias_update_rate=1e-2,
                checkpoint_every=4, threads=1, source_fraction=0.5)
    return TrainConfig(**{**base, **changes})


def test_tokenize_documents_masks_follow_segments():
    doc = Document("chat", "m", [("ab", False), ("cde", True)])
    [tokenized] = tokenize_documents([doc], lambda text: [ord(c) for c in text])
    assert tokenized.ids.tolist() == [97, 98, 99, 100, 101]
    assert tokenized.mask.tolist() == [False, False, True, True, True]


def test_packed_stream_is_deterministic_and_resumes_at_its_position():
    data = docs()
    a, b = PackedStream(data, 16, seed=1, source_fraction=0.5), PackedStream(data, 16, seed=1, source_fraction=0.5)
    first = [a.next_batch(3) for _ in range(5)]
    second = [b.next_batch(3) for _ in range(5)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, second, strict=True))
    state = a.state()
    c = PackedStream(data, 16, seed=1, source_fraction=0.5)
    c.load_state(state)
    assert torch.equal(a.next_batch(3)[0], c.next_batch(3)[0])
    # epochs roll over: many more rows than one epoch holds still come out, each of seq_len + 1 ids
    for _ in range(3 * a.rows_per_epoch()):
        ids, mask = a.next_batch(1)
        assert ids.shape == mask.shape == (1, 17)
    assert a.epoch >= 2


def test_masked_loss_ignores_untrained_targets():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = 10.0  # position 0 predicts its target confidently; the others are uniform
    targets = torch.tensor([[1, 2, 3]])
    only_first = masked_loss(logits, targets, torch.tensor([[True, False, False]]))
    assert only_first.item() == pytest.approx(np.log1p(4 * np.exp(-10.0)), rel=1e-3)
    assert masked_loss(logits, targets, torch.tensor([[False, True, True]])).item() == pytest.approx(np.log(5))


def test_balancing_moves_biases_down_for_busy_experts_and_up_for_idle_ones():
    model = build_model(TINY)
    layers = len(moe_routers(model))
    counts = torch.tensor([[10.0, 0, 5, 5, 5, 5, 5, 5]] * layers)  # mean 5: expert 0 over, expert 1 under
    balance_biases(model, counts, rate=0.01)
    bias = moe_routers(model)[0].e_score_correction_bias
    assert bias[0].item() == pytest.approx(-0.01) and bias[1].item() == pytest.approx(0.01)
    assert torch.all(bias[2:] == 0)  # at its fair share: unchanged
    assert max_violation(counts)[0].item() == pytest.approx(1.0)
    balance_biases(model, counts, rate=0.0)  # rate 0 switches balancing off
    assert bias[0].item() == pytest.approx(-0.01)


def test_expert_counts_come_from_the_recorded_router_choices():
    recorder = RoutingRecorder()
    recorder.record(torch.tensor([[0, 1], [0, 2]]), torch.ones(2, 2), torch.zeros(2, 3))
    assert expert_counts(recorder, 3).tolist() == [[2.0, 1.0, 1.0]]


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = small_config(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_training_smoke_learns_and_balances(tmp_path):
    """The CI smoke test of the training recipe: a few steps on the tiny config, well under a minute."""
    data = docs()
    model = build_model(TINY, seed=0)
    before = evaluate(model, data, seq_len=16)
    seen = []
    history = train(model, PackedStream(data, 16, seed=0, source_fraction=0.5), small_config(steps=30),
                    checkpoint_dir=tmp_path, on_step=seen.append, progress=False)
    after = evaluate(model, data, seq_len=16)
    assert len(history) == len(seen) == 30 and seen[-1].counts.shape == (2, 8)
    assert after.loss < before.loss - 0.5  # it learned the counting documents
    assert after.loss_by_kind["chat"] < after.loss_by_kind["source"]  # structure beats noise
    assert after.loss < unigram_loss(data, data, 64, 16)
    biases = torch.stack([r.e_score_correction_bias for r in moe_routers(model)])
    assert biases.abs().sum() > 0 and not biases.requires_grad
    assert (tmp_path / "train_state.pt").is_file()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = docs()
    cfg = small_config(steps=8)
    straight = build_model(TINY, seed=0)
    train(straight, PackedStream(data, 16, seed=0, source_fraction=0.5), cfg, checkpoint_dir=tmp_path / "a",
          progress=False)

    for stopped_at in (1, 2, 3):  # out of time after every step: each call checkpoints and the next resumes
        # the first call starts from the same init; later ones get another and must take it from the checkpoint
        init_seed = 0 if stopped_at == 1 else stopped_at
        partial = train(build_model(TINY, seed=init_seed), PackedStream(data, 16, seed=0, source_fraction=0.5),
                        cfg, checkpoint_dir=tmp_path / "b", progress=False, max_seconds=0)
        assert partial[-1]["step"] == stopped_at
    resumed = build_model(TINY, seed=123)  # different init: everything must come from the checkpoint
    history = train(resumed, PackedStream(data, 16, seed=0, source_fraction=0.5), cfg, checkpoint_dir=tmp_path / "b",
                    progress=False)
    assert [h["step"] for h in history] == list(range(1, 9))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    data = docs()
    train(build_model(TINY), PackedStream(data, 16), small_config(steps=2), checkpoint_dir=tmp_path, progress=False)
    other = build_model(TINY.replace(hidden_size=32, intermediate_size=64, moe_intermediate_size=16))
    with pytest.raises(ValueError, match="different model config"):
        train(other, PackedStream(data, 16), small_config(steps=4), checkpoint_dir=tmp_path, progress=False)


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="source_fraction"):
        TrainConfig(source_fraction=2.0)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
