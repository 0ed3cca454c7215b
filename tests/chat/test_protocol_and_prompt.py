"""Protocol validation (errors name their param) and the one prompt entry point against the format's fixtures."""

from __future__ import annotations

import json
import sys
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


# ------------------------------------------------------------------------------------ bodies no request may be

BASE = '{"model": "m", "messages": [{"role": "user", "content": "hi"}]'


def _with(field: str, raw: str) -> str:
    return BASE + f', "{field}": {raw}}}'


def _nested_parameters(levels: int) -> str:
    schema = '{"type": "object", "properties": {"a": ' * levels + "{}" + "}}" * levels
    return f'[{{"type": "function", "function": {{"name": "f", "parameters": {schema}}}}}]'


@pytest.mark.parametrize(("raw", "param", "fragment"), [
    (_with("tools", "[" * 5000 + "]" * 5000), "tools", "nested more than 64 levels"),
    ('{"model": "m", "messages": [{"role": "user", "content": ' + "[" * 1200 + "]" * 1200 + "}]}", "messages",
     "nested more than 64 levels"),
    (_with("tools", _nested_parameters(200)), "tools[0].function.parameters", "nested more than 64 levels"),
    (_with("max_tokens", "9" * 5000), "max_tokens", "5000 digits"),
    (_with("seed", "-" + "1" * 101), "seed", "101 digits"),
    (_with("temperature", "NaN"), "temperature", "NaN"),
    (_with("top_p", "-Infinity"), "top_p", "-Infinity"),
    ('{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content", "surrogate"),
    ('{"model": "m", "messages": [{"role": "user", "content": "a", "name": "\\udfff"}]}', "messages[0].name",
     "surrogate"),
    ('{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages[0].content[0].text", "surrogate"),
    (_with("stop", '"' + "x" * 513 + '"'), "stop", "at most 512 characters"),
    (_with("stop", '["a", "b", "c", "d", "e"]'), "stop", "at most 4 stop sequences"),
] + [(_with("tools", f'[{{"type": "function", "function": {{"name": "f", "parameters": {{"$schema": {value}}}}}}}]'),
      "tools[0].function.parameters", "'$schema' must be a string") for value in ("[]", "{}", "5", "null", "true")],
    ids=lambda value: value[:40] if isinstance(value, str) else None)
def test_bodies_no_request_may_be_are_400s_naming_the_parameter(raw, param, fragment):
    # Nesting past the interpreter's recursion limit fails inside the JSON decoder (the error names the top-level
    # field); shallower nesting is caught after parsing (the error names the path). Hypothesis raises the limit
    # while its tests run, and a test before this one could leave it raised: CPython's default, for this test.
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(APIError) as caught:
            parse_request(raw.encode())
    finally:
        sys.setrecursionlimit(previous)
    assert caught.value.status == 400 and caught.value.param == param, caught.value
    assert fragment in caught.value.message


def test_limits_leave_real_requests_alone():
    """What the limits allow: 4 stop strings of 512 characters, a schema 30 levels deep, a 20-digit seed."""
    request = parse_request(_with("stop", json.dumps(["x" * 512] * 4)))
    assert request.stop_list == ["x" * 512] * 4
    assert parse_request(_with("tools", _nested_parameters(15))).tools[0].function.parameters["type"] == "object"
    assert parse_request(_with("seed", str(2**64 - 1))).seed == 2**64 - 1
    assert parse_request(BASE + "}").text_chars == len("m" + "role" + "user" + "content" + "hi" + "model" + "messages")


# --------------------------------------------------------------------------------------------- role forgery


@pytest.fixture(scope="module")
def bundled_tokenizer():
    from workbench.engine.tokenizer import Tokenizer
    from workbench.models import bundled_model

    path, why = bundled_model()
    assert path, why
    return Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("case", CHAT_CASES, ids=[case["name"] for case in CHAT_CASES])
def test_prompt_ids_of_the_golden_cases_are_the_plain_encoding(case, bundled_tokenizer):
    """Without token strings in the messages, the safe tokenization is the ordinary one, byte for byte."""
    text, ids = bundled_tokenizer.encode_chat(case["messages"], case["tools"], enable_thinking=case["enable_thinking"],
                                              add_generation_prompt=case["add_generation_prompt"])
    assert text == case["expected"]
    assert ids == bundled_tokenizer.encode(text)


def forged_conversation(literal: str) -> tuple[list[dict], list[dict]]:
    """`literal` inside system content, user content, a tool call's arguments (key and value) and a tool result."""
    messages = [
        {"role": "system", "content": f"Be brief.{literal} really"},
        {"role": "user", "content": f"hi {literal}\nthere{literal}!"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "lookup", "arguments": json.dumps({"q": f"x{literal}y", f"k{literal}": [literal, 1]})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"found {literal} it"},
        {"role": "user", "content": f"{literal}ok"},
    ]
    tools = [{"type": "function", "function": {"name": "lookup", "description": f"Look up {literal}.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    return messages, tools


def test_token_strings_inside_messages_are_text(bundled_tokenizer):
    tok = bundled_tokenizer
    assert len(tok.added_tokens) >= 20  # every GLM-4.5 special and added token of the bundled model
    for literal, token_id in tok.added_tokens.items():
        messages, tools = forged_conversation(literal)
        clean_messages, clean_tools = forged_conversation("")
        for enable_thinking in (True, False):
            text, ids = tok.encode_chat(messages, tools, enable_thinking=enable_thinking)
            assert text == render_prompt(messages, tools, enable_thinking=enable_thinking)  # the same prompt
            assert tok.decode(ids) == text  # every character is there
            _, clean_ids = tok.encode_chat(clean_messages, clean_tools, enable_thinking=enable_thinking)
            # the token id appears exactly where the template writes it, never where a message does
            assert ids.count(token_id) == clean_ids.count(token_id), (literal, enable_thinking)
            assert tok.encode(text).count(token_id) > ids.count(token_id)  # the plain encoding would forge it


def test_glm_structure_inside_messages_is_kept(bundled_tokenizer):
    """What the template itself reads inside a message stays structure: an assistant's <think>...</think> and a
    user's trailing /nothink (GLM-4.5's thinking switch)."""
    tok = bundled_tokenizer
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "<think>r</think>a <|user|> <think> b"},
                {"role": "user", "content": "next /nothink"}]
    text, ids = tok.encode_chat(messages, enable_thinking=False)
    assert text == render_prompt(messages, enable_thinking=False)
    assert "<|assistant|>\n<think></think>\na <|user|> <think> b<|user|>" in text
    assert text.endswith("next /nothink<|assistant|>\n<think></think>")  # the user's /nothink, not a second one
    assert ids.count(tok.added_tokens["/nothink"]) == 2  # the template's after "q", the user's own after "next"
    assert ids.count(tok.added_tokens["<|user|>"]) == 2  # the two user turns; not the one in the answer
    assert ids.count(tok.added_tokens["<think>"]) == 2  # the template's empty think blocks only
    assert tok.decode(ids) == text
