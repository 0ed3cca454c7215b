"""The bundled model's data: functions from source, honest requests and reasoning, exact prompt segments."""

from __future__ import annotations

import ast
import random
import textwrap

import pytest

from workbench.chat.template import render_chat
from workbench.models.recipe import corpus
from workbench.models.recipe.corpus import (
    END_OF_TURN,
    TOOLS,
    build_corpus,
    chat_document,
    describe,
    extract_functions,
    is_heldout,
    iter_stdlib_files,
    reasoning_for,
    render_segments,
    request_for,
    tool_document,
)

SOURCE = textwrap.dedent('''
    import os

    def gcd(a, b):
        """Return the greatest common divisor of a and b."""
        while b:
            a, b = b, a % b
        return a

    def _no_doc(x):
        return x

    def walk_items(tree, *, depth=3, **options):
        """Yields every item of the tree, breadth first."""
        if depth < 0:
            raise ValueError("depth must be >= 0")
        for item in tree:
            yield item

    class Box:
        """A box."""

        def __repr__(self):
            """Dunder methods are too trivial to teach anything."""
            return "Box()"

        def size(self, unit="cm"):
            """Compute the size of the box in a unit."""
            return 1

        def __init__(self):
            pass

    def tiny(x):
        """Short."""
        return x
''')


def test_extract_functions_keeps_documented_functions_and_methods_only():
    found = {f.qualname: f for f in extract_functions("demo", SOURCE)}
    # no docstring, dunder, and a summary under 12 characters are all left out
    assert set(found) == {"gcd", "walk_items", "Box.size"}
    gcd = found["gcd"]
    assert gcd.signature == "gcd(a, b)" and gcd.params == ["a", "b"] and gcd.returns_value
    assert not gcd.is_method and not gcd.is_generator
    walk = found["walk_items"]
    assert walk.params == ["tree", "depth", "**options"] and walk.defaults == {"depth": "3"}
    assert walk.is_generator and walk.raises == ["ValueError"]
    size = found["Box.size"]
    assert size.is_method and size.source.startswith("def size(self")  # dedented out of the class
    ast.parse(size.source)


@pytest.mark.parametrize("summary, expected", [
    ("Return the greatest common divisor of a and b.", "returns the greatest common divisor of a and b"),
    ("Copy data files into build directory", "copies data files into build directory"),
    ("Push an item.", "pushes an item"),
    ("Yields every item.", "yields every item"),  # already third person
    ("Apply the patch.", "applies the patch"),
    ("The size of a box.", None),  # not imperative: quoted as a description instead
    ("return lower-case first word is not a docstring opening", None),
])
def test_describe_turns_imperative_docstrings_into_requests(summary, expected):
    assert describe(summary) == expected


def test_request_and_reasoning_say_only_what_signature_docstring_and_body_show():
    fn = {f.qualname: f for f in extract_functions("demo", SOURCE)}["walk_items"]
    rng = random.Random(0)
    assert request_for(fn, rng, "plain") == "Write a function that yields every item of the tree, breadth first."
    reasoning = reasoning_for(fn, named_in_request=False)
    assert "`demo.walk_items`" in reasoning  # where it comes from, since the request did not name it
    assert "depth (default 3)" in reasoning and "**options" in reasoning
    assert "generator" in reasoning and "ValueError" in reasoning
    gcd = {f.qualname: f for f in extract_functions("demo", SOURCE)}["gcd"]
    gcd_reasoning = reasoning_for(gcd, named_in_request=True)
    assert "generator" not in gcd_reasoning and "raise" not in gcd_reasoning and "returns a value" in gcd_reasoning


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_document_segments_rebuild_the_template_rendering(thinking):
    fn = {f.qualname: f for f in extract_functions("demo", SOURCE)}["gcd"]
    doc = chat_document(fn, random.Random(1), thinking=thinking, style="named")
    prompt, answer = doc.segments
    assert not prompt[1] and answer[1]
    messages = [{"role": "user", "content": "Write a Python function `gcd` that returns the greatest common divisor "
                                            "of a and b."}]
    assert prompt[0] == render_chat(messages, enable_thinking=thinking, add_generation_prompt=True)
    assert answer[0].endswith("```" + END_OF_TURN)  # the model learns to hand the turn back
    assert ("<think>The function returns" in answer[0]) is thinking
    if not thinking:
        assert prompt[0].endswith("/nothink<|assistant|>\n<think></think>")


def test_tool_conversation_calls_the_right_tool_with_the_real_result():
    rng = random.Random(3)
    for _ in range(20):
        doc = tool_document(rng, thinking=True)
        trained = [text for text, t in doc.segments if t]
        assert len(trained) == 2
        call, final = trained
        assert call.endswith("</tool_call><|observation|>") and final.endswith(END_OF_TURN)
        name = call.split("<tool_call>")[1].split("\n")[0]
        spec = next(t for t in TOOLS if t.name == name)
        # the offered tools (in the system prompt) include the one called
        assert f'"name": "{name}"' in doc.segments[0][0]
        observation = doc.segments[2][0]
        assert observation.startswith("\n<tool_response>\n")
        assert name in {t.name for t in TOOLS} and spec.description


def test_render_segments_rejects_a_conversation_it_cannot_train():
    with pytest.raises(ValueError, match="assistant turn followed by"):
        render_segments([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "assistant", "content": "c"}])


def test_heldout_split_is_by_top_level_package_and_stable():
    assert is_heldout("json") == is_heldout("json.decoder") == is_heldout("json.tool")
    # crc32 is the same on every machine: these two are fixed facts of the recipe
    assert is_heldout("json") and not is_heldout("collections")


def test_stdlib_files_leave_out_tests_and_generated_tables():
    files = dict(iter_stdlib_files())
    assert "os" in files and "json.decoder" in files and "collections" in files
    assert not any(m.startswith("test.") or ".test." in m or ".tests." in m or "idle_test" in m for m in files)
    assert not any(m.rsplit(".", 1)[-1].startswith("test_") for m in files)


def test_small_corpus_has_every_kind_and_no_heldout_module_in_training(monkeypatch):
    monkeypatch.setattr(corpus, "HELDOUT_PERCENT", 30)  # enough held-out modules among 30 files
    c = build_corpus(max_files=30, tool_examples=20)
    assert {d.kind for d in c.train} >= {"source", "chat", "tool"}
    assert c.heldout and c.heldout_functions
    assert not {d.module.split(".")[0] for d in c.train if d.kind != "tool"} & set(c.heldout_modules)
    assert all(f.module.split(".")[0] in c.heldout_modules for f in c.heldout_functions)
