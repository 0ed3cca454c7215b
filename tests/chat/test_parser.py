"""Output parsing: the fixture cases (tests/fixtures), streamed and whole, and generated outputs cut anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from workbench.chat import OutputParser, parse_completion
from workbench.chat.parser import ParsedCompletion, collect

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = json.loads((FIXTURES / "glm45_output_parsing.json").read_text())["cases"]
TOOLS = next(case["tools"] for case in CASES if case["tools"])


def as_expected(parsed: ParsedCompletion) -> dict:
    return {"reasoning_content": parsed.reasoning_content, "content": parsed.content,
            "tool_calls": [{"name": call.name, "arguments": call.arguments} for call in parsed.tool_calls],
            "finish_reason": parsed.finish_reason}


def stream_parse(text: str, cuts: list[int], tools, truncated: bool = False) -> ParsedCompletion:
    parser = OutputParser(tools)
    deltas = []
    previous = 0
    for cut in sorted(set(cuts)) + [len(text)]:
        deltas += parser.feed(text[previous:cut])
        previous = cut
    deltas += parser.finish(truncated=truncated)
    for delta in deltas:  # each delta carries exactly one thing
        assert sum(x is not None for x in (delta.reasoning_content, delta.content, delta.tool_call)) == 1
    return collect(deltas, parser.finish_reason)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_fixture_case_whole(case):
    assert as_expected(parse_completion(case["output"], case["tools"], case["truncated"])) == case["expected"]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_fixture_case_one_character_at_a_time(case):
    text = case["output"]
    parsed = stream_parse(text, list(range(1, len(text))), case["tools"], case["truncated"])
    assert as_expected(parsed) == case["expected"]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fixture_case_random_cuts(case, data):
    text = case["output"]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert as_expected(stream_parse(text, cuts, case["tools"], case["truncated"])) == case["expected"]


def test_partial_tags_are_never_streamed_as_content():
    parser = OutputParser(TOOLS)
    seen = []
    for piece in ["\n<th", "ink>why</th", "ink>\nHi <", "tool_", "call>now\n</tool_call>"]:
        seen += parser.feed(piece)
    seen += parser.finish()
    streamed_content = "".join(d.content for d in seen if d.content)
    assert "<" not in streamed_content and streamed_content == "Hi"
    assert [d.tool_call.name for d in seen if d.tool_call] == ["now"]


def test_tool_call_delta_is_whole_and_openai_shaped():
    parsed = parse_completion(CASES[3]["output"], TOOLS)
    call = parsed.tool_calls[0].to_openai()
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_feed_after_finish_is_an_error():
    parser = OutputParser()
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")


# ---------------------------------------------------------------------------------------- generated outputs
# A generator of well-formed and broken outputs that knows what each must parse to (an oracle independent of
# the parser), so the property checks both "streamed == whole" and "whole == what the output means".

TEXT_ALPHABET = st.sampled_from(list("ab <>/\n\t") + ["<think", "</thin", "<tool_ca", "</tool", "<arg_", "é", "你"])
text = st.lists(TEXT_ALPHABET, max_size=12).map("".join)
SCHEMAS = {"get_weather": {"city": "string", "days": "integer"}, "now": {}, "run_cell": {"code": "string"}}


def _clean(value: str, *forbidden: str) -> bool:
    return not any(tag in value for tag in forbidden)


@st.composite
def tool_call_segment(draw):
    """(raw text, the call it means or None when it must come out as content)."""
    name = draw(st.sampled_from([*SCHEMAS, "rm_rf"]))
    params = SCHEMAS.get(name, {"path": "string"})
    arguments = {}
    body = f"{name}\n"
    for key, kind in params.items():
        if not draw(st.booleans()):
            continue
        if kind == "integer":
            value = draw(st.integers(-1000, 1000))
            raw = json.dumps(value)
        else:
            value = raw = draw(text)
            assume(_clean(raw, "</arg_value>", "</tool_call>"))
        arguments[key] = value
        body += f"<arg_key>{key}</arg_key>\n<arg_value>{raw}</arg_value>\n"
    raw_call = f"<tool_call>{body}</tool_call>"
    return raw_call, ({"name": name, "arguments": arguments} if name in SCHEMAS else None)


@st.composite
def model_output(draw):
    """(output, expected dict) for an output with tools offered."""
    output, reasoning, content, calls = draw(st.sampled_from(["", "\n", " \n"])), None, "", []
    think = draw(st.sampled_from(["none", "closed", "unclosed"]))
    if think != "none":
        inner = draw(text)
        assume(_clean(inner, "</think>", "<tool_call>"))
        output += "<think>" + inner + ("</think>" if think == "closed" else "")
        reasoning = inner.strip() or None
    segments = draw(st.lists(st.one_of(text.map(lambda t: (t, None)), tool_call_segment()), max_size=4))
    if think == "unclosed":  # the reasoning only ends at a tool call (or the end of the output)
        segments = [draw(tool_call_segment()), *segments] if draw(st.booleans()) else []
    for raw, call in segments:
        if not raw.startswith("<tool_call>"):
            assume(_clean(raw, "<tool_call>"))
        output += raw
        if call is None:
            content += raw
        else:
            calls.append(call)
    if think == "none":
        assume(not output.lstrip().startswith("<think>"))
    # a text segment that completes a `<tool_call>` tag with its neighbour would change the meaning
    assume(output.count("<tool_call>") == sum(raw.startswith("<tool_call>") for raw, _ in segments))
    assume(output.count("</think>") == (think == "closed"))
    expected = {"reasoning_content": reasoning, "content": content.strip() or None, "tool_calls": calls,
                "finish_reason": "tool_calls" if calls else "stop"}
    return output, expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(example=model_output(), data=st.data())
def test_generated_outputs_streamed_at_random_cuts_equal_whole_and_oracle(example, data):
    output, expected = example
    whole = parse_completion(output, TOOLS)
    assert as_expected(whole) == expected
    cuts = data.draw(st.lists(st.integers(0, len(output)), max_size=len(output) + 1))
    assert as_expected(stream_parse(output, cuts, TOOLS)) == expected


@settings(max_examples=300, deadline=None)
@given(output=st.lists(st.sampled_from(list("ab <>/\n") + ["<think>", "</think>", "<tool_call>", "</tool_call>",
                                                            "now", "<arg_key>", "</arg_value>"]), max_size=30)
       .map("".join), data=st.data(), tools=st.sampled_from([None, TOOLS]), truncated=st.booleans())
def test_any_text_streams_like_whole(output, data, tools, truncated):
    """Arbitrary (often malformed) text: whatever it parses to, streaming at random cuts gives the same."""
    whole = parse_completion(output, tools, truncated)
    cuts = data.draw(st.lists(st.integers(0, len(output)), max_size=len(output) + 1))
    assert as_expected(stream_parse(output, cuts, tools, truncated)) == as_expected(whole)
    if not whole.tool_calls:
        assert whole.finish_reason == ("length" if truncated else "stop")


STRAY = "\n<think>The user asks</arg_value>\n<arg_key>width</arg_key>\n<arg_value>3</arg_value>\n</tool_call>" \
        "</think>\n<arg_value>related/y and extension.</arg_value>"


@pytest.mark.parametrize("cut_every", [0, 1, 3])
def test_stray_call_markup_is_dropped_from_reasoning_and_content_when_tools_are_offered(cut_every):
    # a small model's output (seen with the bundled one): pieces of a call with no <tool_call> before them
    cuts = list(range(cut_every, len(STRAY), cut_every)) if cut_every else []
    parsed = stream_parse(STRAY, cuts, TOOLS)
    assert parsed.reasoning_content == "The user asks\nwidth\n3"
    assert parsed.content == "related/y and extension."
    assert parsed.tool_calls == [] and parsed.finish_reason == "stop"


def test_stray_call_markup_stays_text_without_tools():
    parsed = parse_completion(STRAY, None)
    assert "<arg_key>width</arg_key>" in parsed.reasoning_content and parsed.content.startswith("<arg_value>")


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STRAY)), max_size=10))
def test_stray_call_markup_streamed_equals_whole(cuts):
    whole = as_expected(parse_completion(STRAY, TOOLS))
    assert as_expected(stream_parse(STRAY, cuts, TOOLS)) == whole
