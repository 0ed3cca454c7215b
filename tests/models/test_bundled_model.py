"""The bundled checkpoint: its shape, size and files, its tokenizer, agreement with transformers, what it does."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.engine import Engine, GLMConfig
from workbench.models import REQUIRED_FILES, default_model_path
from workbench.models.recipe.corpus import defines_function, extract_code
from workbench.models.recipe.tokenizer_build import ALL_ADDED_TOKENS

FOLDER = default_model_path(check=False)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    return Engine.from_pretrained(default_model_path(), dtype="float32", device="cpu", kernels="torch")


def test_files_are_there_and_fit_the_size_budget():
    assert all((FOLDER / name).is_file() for name in REQUIRED_FILES)
    total = sum(f.stat().st_size for f in FOLDER.iterdir() if f.is_file())
    assert total <= 30 * 1024 * 1024, f"the bundled model takes {total / 2**20:.1f} MiB, more than 30"


def test_it_is_glm45_air_in_miniature():
    config = GLMConfig.from_json(FOLDER)
    assert config.model_type == "glm4_moe"
    assert 8e6 <= config.num_parameters() <= 20e6
    assert 16 <= config.n_routed_experts <= 32 and 2 <= config.num_experts_per_tok <= 4
    assert config.first_k_dense_replace == 1 and config.n_shared_experts == 1 and config.norm_topk_prob
    assert config.attention_bias and config.num_key_value_heads < config.num_attention_heads
    assert config.partial_rotary_factor == 0.5
    header = json.loads((FOLDER / "config.json").read_text())
    assert header["architectures"] == ["Glm4MoeForCausalLM"]


def test_tokenizer_has_every_glm_token_and_the_glm_stop_ids(engine, check_chat_fixtures):
    tok = engine.tokenizer
    for token in ALL_ADDED_TOKENS:
        assert len(tok.encode(token)) == 1, token
    stops = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert sorted(tok.stop_token_ids) == sorted(stops)
    check_chat_fixtures(tok)


def test_transformers_and_the_engine_agree(engine):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(FOLDER), dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(FOLDER))
    text = "[gMASK]<sop><|user|>\nWrite a function that returns the sum of a list.<|assistant|>\n<think>"
    ids = engine.tokenizer.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(engine.logits(ids), expected, rtol=1e-4, atol=1e-4)


def test_it_answers_requests_with_reasoning_and_mostly_code_that_parses(engine):
    # Sampled at a low temperature with seeds (as the notebooks do): greedy decoding loops on a model this small.
    # bench/demo_model.py measures the parse rate on 50 held-out requests (60% for this checkpoint); here a
    # dozen answers must show the format every time and working code in at least a third (random weights: none).
    from workbench.chat import parse_completion

    requests = ("Write a function that returns the sum of a list of numbers.",
                "Write a function that returns the larger of two numbers.", "Write a function that reverses a string.")
    answers = []
    for request in requests:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": request}])
        for seed in range(4):
            result = engine.generate(prompt, max_new_tokens=200, temperature=0.3, seed=seed)
            answers.append((result, parse_completion(result.text, truncated=result.finish_reason == "length")))
    texts = [result.text for result, _ in answers]
    assert all(parsed.reasoning_content for _, parsed in answers), texts
    assert sum(result.finish_reason == "stop" for result, _ in answers) >= 8, texts
    assert sum(defines_function(extract_code(parsed.content or "")) for _, parsed in answers) >= 4, texts


def test_server_magics_and_cli_default_to_it():
    from workbench import cli, magics
    from workbench.models import bundled_model
    from workbench.server import app

    assert bundled_model() == (str(default_model_path()), "")
    assert app.bundled_model is bundled_model and magics.bundled_model is bundled_model
    assert cli._default_model() == default_model_path()


def test_model_card_is_rendered_from_the_figures_beside_it(tmp_path):
    # The committed card is what card.py writes from this folder's config and JSON files: it cannot drift.
    import shutil

    from workbench.models.recipe.card import write_card

    for f in FOLDER.iterdir():
        if f.suffix in (".json", ".md") or f.name == "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    assert write_card(tmp_path).read_text() == (FOLDER / "README.md").read_text()


def test_model_card_quotes_the_measured_figures():
    card = (FOLDER / "README.md").read_text()
    summary = json.loads((FOLDER / "training_summary.json").read_text())
    heldout = summary["figures"]["heldout"]["all"]
    assert f"{heldout['loss']:.2f}" in card and f"{heldout['unigram_loss']:.2f}" in card
    for row in summary["figures"]["balance_heldout"]:
        assert f"{row['max_violation']:.2f}" in card


def test_a_missing_bundled_model_is_reported_not_raised(monkeypatch):
    from workbench import models

    monkeypatch.setattr(models, "MODEL_NAME", "no-such-model")
    path, why_not = models.bundled_model()
    assert path is None and "lacks config.json" in why_not and "reinstall glm-workbench" in why_not
