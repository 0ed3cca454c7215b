"""Protocol validation (errors name their param) and the one prompt entry point against the format's fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.chat import APIError, parse_request, render_prompt

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHAT_CASES = json.loads((FIXTURES / "glm45_chat_format.json").read_text())["cases"]


@pytest.mark.parametrize("case", CHAT_CASES, ids=[case["name"] for case in CHAT_CASES])
def test_render_prompt_matches_the_official_template(case):
    assert render_prompt(case["messages"], case["tools"], enable_thinking=case["enable_thinking"],
                         add_generation_prompt=case["add_generation_prompt"]) == case["expected"]


@pytest.mark.parametrize("case", [c for c in CHAT_CASES if c["add_generation_prompt"]],
                         ids=[c["name"] for c in CHAT_CASES if c["add_generation_prompt"]])
def test_validated_request_renders_the_same_prompt(case):
    """Messages that went through the protocol types render exactly like the raw dicts."""
    messages = case["messages"]
    if messages[-1]["role"] == "assistant":
        pytest.skip("a request cannot end with an assistant message")
    request = parse_request({"model": "m", "messages": messages, "tools": case["tools"],
                             "thinking": {"type": "enabled" if case["enable_thinking"] else "disabled"}})
    assert render_prompt(request.messages, request.tools, enable_thinking=request.enable_thinking) == case["expected"]


def test_thinking_switches():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(base).enable_thinking is True  # absent: the model decides
    assert parse_request({**base, "thinking": {"type": "disabled"}}).enable_thinking is False
    assert parse_request({**base, "chat_template_kwargs": {"enable_thinking": False}}).enable_thinking is False
    assert parse_request({**base, "do_sample": False}).greedy and parse_request({**base, "temperature": 0}).greedy


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n", "only n=1"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature",
     "greater than or equal to 0"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format.type", "text"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": 1}, "frequency_penalty",
     "Unrecognized"),
])
def test_errors_name_the_parameter(body, param, fragment):
    with pytest.raises(APIError) as caught:
        parse_request(body)
    assert caught.value.status == 400 and caught.value.param == param
    assert fragment in caught.value.message
    assert set(caught.value.to_dict()["error"]) == {"message", "type", "param", "code"}


def test_render_errors_are_400s():
    with pytest.raises(APIError) as caught:
        render_prompt([{"role": "narrator", "content": "x"}])
    assert caught.value.status == 400 and caught.value.param == "messages"
