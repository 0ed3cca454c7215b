"""`%glm models`, `%glm use MODEL_ID`, `%%glm -m` and the session's cost against a live server with several
providers: its engine (`local`), the scripted endpoint priced (`hosted`) and free (`free`, which also serves the
same model name), and one whose key's variable is unset (`nokey`)."""

from __future__ import annotations

import pytest
from glm_upstream import SCRIPTED_MODEL, magics_of
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from workbench.server.launch import start_server

PRICES = {"input": 2.0, "output": 6.0, "currency": "USD"}  # the scripted answer: 1000 + 500 tokens -> $0.005


@pytest.fixture(scope="module")
def providers_server(tiny_checkpoint, upstream, tmp_path_factory):
    providers = [
        {"name": "local", "kind": "local", "model_path": str(tiny_checkpoint)},
        {"name": "hosted", "kind": "openai", "base_url": upstream.url,
         "models": [{"name": SCRIPTED_MODEL, "prices": PRICES, "context_length": 8192}]},
        {"name": "free", "kind": "openai", "dialect": "vllm", "base_url": upstream.url,
         "models": [{"name": SCRIPTED_MODEL, "prices": {"input": 0, "output": 0}}, "other-model"]},
        {"name": "nokey", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "models": ["m"],
         "api_key_env": "WB_TEST_MAGIC_UNSET"},
    ]
    server = start_server(tmp_path_factory.mktemp("providers-magic"), {
        "providers": providers, "presets": False, "dtype": "float32", "kernels": "torch"}, token="providers-token")
    yield server
    server.stop()


@pytest.fixture
def served(shell, providers_server):
    assert shell.run_cell(f"%glm use server {providers_server.url}/ {providers_server.token}").success
    return shell


def run(shell, code: str):
    with capture_output() as captured:
        result = shell.run_cell(code)
    return result, captured


def test_models_are_grouped_by_provider_with_capabilities_and_prices(served):
    result, captured = run(served, "%glm models")
    assert result.success, captured.stderr
    lines = captured.stdout.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == [
        "local (local)", "hosted (openai openai)", "free (openai vllm)", "nokey (openai openai)"]
    text = captured.stdout
    assert "local/tiny" in text and "thinking, tools, routing" in text and "this server's engine" in text
    hosted = next(line for line in lines if "hosted/scripted-glm" in line)
    assert "$2 in / $6 out per million tokens" in hosted and "context 8,192" in hosted
    assert "free" in next(line for line in lines if "free/scripted-glm" in line)
    assert "price unknown" in next(line for line in lines if "free/other-model" in line)
    assert "key missing" in next(line for line in lines if "nokey/m" in line)


def test_use_a_model_id_then_ask_and_see_the_session_cost(served, upstream):
    result, captured = run(served, "%glm use hosted/scripted-glm")
    assert result.success and "using hosted/scripted-glm" in captured.stdout
    assert magics_of(served).session.settings.model == "hosted/scripted-glm"
    assert "* hosted/scripted-glm" in run(served, "%glm models")[1].stdout
    assert run(served, "%%glm -f text\nhello")[0].success
    assert upstream.requests[-1]["model"] == SCRIPTED_MODEL  # the provider's own name went upstream
    assert run(served, "%%glm -f text --no-stream\nhello again")[0].success
    session = magics_of(served).session
    assert session.priced_answers == 2 and session.costs == {"USD": pytest.approx(0.01)}
    _, captured = run(served, "%glm status")
    assert "cost this session: $0.01 (2 priced answers)" in captured.stdout
    assert "model: hosted/scripted-glm" in captured.stdout
    assert "nokey key missing (set WB_TEST_MAGIC_UNSET)" in captured.stdout
    assert run(served, "%%glm -f text -m free/scripted-glm\nfree one")[0].success
    assert "cost this session: $0.01 (3 priced answers)" in run(served, "%glm status")[1].stdout


def test_a_local_model_by_id_and_free_answers(served):
    assert run(served, "%%glm -f text --max-tokens 4 -t 0 -m local/tiny\nhi")[0].success
    assert magics_of(served).session.priced_answers == 0  # an engine's answer has no cost
    assert "nothing priced yet" in run(served, "%glm status")[1].stdout
    assert run(served, "%%glm -f text -m free/scripted-glm\nhi")[0].success
    assert "cost this session: free (1 priced answer)" in run(served, "%glm status")[1].stdout


@pytest.mark.parametrize(("cell", "expected"), [
    ("%glm use nope/model", "no model 'nope/model'"),
    ("%%glm -m bogus\nhi", "no model 'bogus'"),
    ("%glm use scripted-glm", "'scripted-glm' is served by hosted/scripted-glm and free/scripted-glm: say which"),
])
def test_bad_model_ids_list_what_exists(served, cell, expected):
    with pytest.raises(UsageError) as caught:
        magics_of(served).glm(cell.split("\n")[0].removeprefix("%%glm").removeprefix("%glm").strip(),
                              cell.split("\n", 1)[1] if cell.startswith("%%") else None)
    message = str(caught.value)
    assert expected in message
    if "no model" in expected:
        assert "local/tiny, hosted/scripted-glm, free/scripted-glm, free/other-model, nokey/m" in message


def test_a_bare_name_that_names_one_model_is_taken(served):
    result, captured = run(served, "%glm use other-model")
    assert result.success and magics_of(served).session.settings.model == "free/other-model"
