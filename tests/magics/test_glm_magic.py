"""`%%glm` and `%glm` in an in-process IPython shell, talking through the chat layer's remote backend to a
scripted OpenAI-compatible endpoint whose answers are known, so every option can be checked on the request
that left the kernel and on what came back into the notebook."""

from __future__ import annotations

import pytest
from glm_upstream import REASONING, SCRIPTED_MODEL, answer_for, magics_of
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from workbench.magics import SYSTEM_PROMPTS, extract_code, interpolate
from workbench.server.launch import free_port


@pytest.fixture
def remote(shell, upstream):
    """The shell pointed at the scripted endpoint (no API key needed), its request log emptied."""
    assert shell.run_cell("%glm config api_key_env=").success
    with capture_output():
        assert shell.run_cell(f"%glm use remote {upstream.url} {SCRIPTED_MODEL}").success
    upstream.requests.clear()
    return shell


def run(shell, code: str):
    with capture_output() as captured:
        result = shell.run_cell(code, store_history=True)
    return result, captured


def usage_error(shell, code: str) -> str:
    """Run a cell that must fail with one UsageError line; return that line."""
    result, captured = run(shell, code)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    lines = [line for line in captured.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), captured.stderr
    assert "Traceback" not in captured.stdout + captured.stderr
    follow_up = shell.run_cell("1 + 1")  # the kernel keeps working
    assert follow_up.success and follow_up.result == 2
    return lines[0]


# --- the answer: streamed thinking, code into the next cell -------------------------------------------

def test_code_answer_goes_into_the_next_cell(remote, upstream):
    result, captured = run(remote, "%%glm\nwrite hello world")
    assert result.success, result.error_in_exec
    assert remote.rl_next_input == "print('write hello world')"
    # Text display: the thinking streamed, its summary, the answer, then one line about the new cell.
    out = captured.stdout
    assert out.startswith("[thinking] " + "".join(REASONING))
    assert "[thought for " in out and "4 tokens]" in out
    assert "```python\nprint('write hello world')\n```" in out
    assert out.rstrip().endswith("↳ 1 line of code put into a new cell below")
    (request,) = upstream.requests
    assert request["model"] == SCRIPTED_MODEL and request["stream"] is True
    assert request["messages"] == [{"role": "system", "content": SYSTEM_PROMPTS["code"]},
                                   {"role": "user", "content": "write hello world"}]
    assert "chat_template_kwargs" not in request and "temperature" not in request  # the model decides


def test_options_reach_the_request(remote, upstream):
    result, _ = run(remote, "%%glm --no-think -t 0.3 --max-tokens 77 -m scripted-glm\nhi")
    assert result.success
    request = upstream.requests[-1]
    assert request["chat_template_kwargs"] == {"enable_thinking": False}  # vLLM/SGLang dialect for this host
    assert request["temperature"] == 0.3 and request["max_tokens"] == 77
    run(remote, "%%glm --think\nhi")
    assert upstream.requests[-1]["chat_template_kwargs"] == {"enable_thinking": True}


def test_markdown_and_text_formats_render_and_do_not_touch_cells(remote, upstream):
    result, captured = run(remote, "%%glm -f markdown\nexplain NOCODE")
    assert result.success and remote.rl_next_input is None
    assert "Just words." in captured.stdout and "cell" not in captured.stdout
    assert upstream.requests[-1]["messages"][0]["content"] == SYSTEM_PROMPTS["markdown"]
    run(remote, "%%glm --format text\nexplain NOCODE")
    assert upstream.requests[-1]["messages"][0]["content"] == SYSTEM_PROMPTS["text"]


def test_answer_without_a_fence_goes_in_whole(remote):
    result, captured = run(remote, "%%glm\nNOCODE please")
    assert result.success
    assert remote.rl_next_input == "Just words."


def test_replace_and_run(remote, monkeypatch):
    placed = []
    monkeypatch.setattr(remote, "set_next_input", lambda text, replace=False: placed.append((text, replace)))
    result, captured = run(remote, "%%glm --replace --run\nran by glm")
    assert result.success
    assert placed == [("print('ran by glm')", True)]
    assert "put into this cell, replacing the prompt and run here:" in captured.stdout
    assert captured.stdout.rstrip().endswith("ran by glm")  # the generated code's own output


def test_no_stream(remote, upstream):
    result, captured = run(remote, "%%glm --no-stream\nwhole answer")
    assert result.success
    assert upstream.requests[-1]["stream"] is False
    assert remote.rl_next_input == "print('whole answer')"
    assert "".join(REASONING) in captured.stdout


def test_trace_on_a_remote_endpoint_says_why_not(remote, upstream):
    result, captured = run(remote, "%%glm --trace\nhi")
    assert result.success
    assert "--trace shows routing only for the local engine" in captured.stdout
    assert "routing" not in upstream.requests[-1]


# --- interpolation and notebook context ---------------------------------------------------------------

def test_interpolation_of_variables_history_and_braces(remote, upstream):
    run(remote, "topic = 'sorting'")
    run(remote, "ratio = 0.4567")
    result, _ = run(remote, "41 + 1")
    number = result.execution_count
    result, _ = run(remote, "%%glm\nabout {topic} at {ratio:.2f}, cell {In[" + str(number) + "]} gave {Out["
                    + str(number) + "]}, as a dict {{'k': 1}}")
    assert result.success, result.error_in_exec
    prompt = upstream.requests[-1]["messages"][-1]["content"]
    assert prompt == "about sorting at 0.46, cell 41 + 1 gave 42, as a dict {'k': 1}"


def test_cells_sends_the_last_cells_with_their_output(remote, upstream):
    run(remote, "base = 21")
    first, _ = run(remote, "base * 2")
    result, _ = run(remote, "%%glm --cells 2\nexplain these")
    assert result.success
    prompt = upstream.requests[-1]["messages"][-1]["content"]
    assert f"In [{first.execution_count - 1}]:\n```python\nbase = 21\n```" in prompt
    assert f"In [{first.execution_count}]:\n```python\nbase * 2\n```\nOut[{first.execution_count}]:\n```\n42\n```" \
        in prompt
    assert prompt.endswith("explain these")
    assert "%%glm" not in prompt  # only earlier cells, not this one


def test_cells_sends_what_the_cells_printed_and_the_errors_they_raised(remote, upstream):
    printed, _ = run(remote, "print('hello from the cell'); import sys; print('to stderr', file=sys.stderr)")
    failed, _ = run(remote, "1 / 0")
    result, captured = run(remote, "%%glm --cells 2\nwhy does it fail")
    assert result.success, result.error_in_exec
    prompt = upstream.requests[-1]["messages"][-1]["content"]
    assert "printed:\n```\nhello from the cell\nto stderr\n```" in prompt
    # (an in-process shell also prints the traceback, which is kept as printed text, without its colours)
    failed_block = prompt.split(f"In [{failed.execution_count}]:\n```python\n1 / 0\n```", 1)[1]
    assert failed_block.rstrip().endswith("error: ZeroDivisionError: division by zero\n\nwhy does it fail")
    assert "\x1b[" not in prompt
    assert printed.execution_count == failed.execution_count - 1
    # The cells' own output still reached the notebook, and the streams are the kernel's again afterwards.
    import sys

    assert type(sys.stdout).__name__ != "_Tee" and type(sys.stderr).__name__ != "_Tee"


def test_printed_output_is_bounded_per_cell(remote, upstream):
    from workbench.magics import CELL_OUTPUT_CHARS

    run(remote, "for i in range(3000): print('line', i)")
    run(remote, "%%glm --cells 1\nsummarise")
    prompt = upstream.requests[-1]["messages"][-1]["content"]
    printed = prompt.split("printed:\n```\n", 1)[1].split("\n```", 1)[0]
    assert len(printed) <= CELL_OUTPUT_CHARS and printed.endswith("line 2999")  # the tail: the latest lines


def test_interpolate_unit():
    namespace = {"x": 3, "In": ["", "a = 1"], "Out": {1: 5}}
    assert interpolate("{x} {In[1]} {Out[1]} {{x}}", namespace) == "3 a = 1 5 {x}"


# --- conversation memory ------------------------------------------------------------------------------

def test_memory_carries_earlier_turns_and_reset_forgets(remote, upstream):
    run(remote, "%%glm\nfirst question")
    run(remote, "%%glm\nsecond question")
    messages = upstream.requests[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "first question"
    assert messages[2]["content"].startswith("Here you go:") and "print('first question')" in messages[2]["content"]
    _, captured = run(remote, "%glm history")
    assert "[1] you: first question" in captured.stdout and "[2] you: second question" in captured.stdout
    _, captured = run(remote, "%glm reset")
    assert "2 turns forgotten" in captured.stdout
    run(remote, "%%glm\nthird question")
    assert [m["role"] for m in upstream.requests[-1]["messages"]] == ["system", "user"]


def test_memory_is_bounded_by_the_context_oldest_dropped_first(remote, upstream):
    padding = "x" * 300
    for number in range(3):
        run(remote, f"%%glm\nturn {number} {padding}")
    # Budget: the answer reserve + system + the new prompt + room for about one remembered turn.
    estimate = lambda text: len(text) // 3 + 1  # the magic's estimate when the tokenizer is remote
    one_turn = estimate(f"turn 2 {padding}") + estimate(answer_for(f"turn 2 {padding}")) + 8
    limit = 100 + estimate(SYSTEM_PROMPTS["code"]) + estimate("now") + one_turn + 20
    run(remote, f"%glm config context_limit={limit} max_tokens=100")
    run(remote, "%%glm\nnow")
    users = [m["content"] for m in upstream.requests[-1]["messages"] if m["role"] == "user"]
    assert users == [f"turn 2 {padding}", "now"]
    run(remote, "%glm config context_limit=0 memory=off")
    run(remote, "%%glm\nagain")
    assert len(upstream.requests[-1]["messages"]) == 2


def test_context_overflow_at_the_server_drops_the_oldest_turn_and_retries(remote, upstream):
    run(remote, "%%glm\nFORGET-ME early question")
    run(remote, "%%glm\nlater question")
    result, _ = run(remote, "%%glm\nfinal question")
    assert result.success
    rejected, accepted = upstream.requests[-2], upstream.requests[-1]
    assert any("FORGET-ME" in m["content"] for m in rejected["messages"])
    assert [m["content"] for m in accepted["messages"] if m["role"] == "user"] == ["later question",
                                                                                 "final question"]
    assert remote.rl_next_input == "print('final question')"


# --- %glm subcommands ---------------------------------------------------------------------------------

def test_status_models_config_and_help(remote, upstream):
    _, captured = run(remote, "%glm status")
    assert f"the remote endpoint {upstream.url} (model {SCRIPTED_MODEL})" in captured.stdout
    assert "backend remote" in captured.stdout and "memory: 0 turns (on)" in captured.stdout
    _, captured = run(remote, "%glm models")
    assert captured.stdout.strip() == SCRIPTED_MODEL
    _, captured = run(remote, "%glm config")
    assert "temperature = None" in captured.stdout and "server = 'auto'" in captured.stdout
    _, captured = run(remote, "%glm config temperature=0.2")
    assert magics_of(remote).session.settings.temperature == 0.2
    run(remote, "%%glm\nhi")
    assert upstream.requests[-1]["temperature"] == 0.2
    _, captured = run(remote, "%glm")
    assert "%glm use remote URL MODEL" in captured.stdout


# --- mistakes: one line, no traceback, the kernel goes on ---------------------------------------------

@pytest.mark.parametrize("cell,expected", [
    ("%%glm --bogus\nhi", "unrecognized arguments: --bogus"),
    ("%%glm\n   \n", "the prompt is empty"),
    ("%%glm\nuse {undefined_thing}", "unknown name {undefined_thing}"),
    ("%%glm\nan { unmatched", "unmatched brace"),
    ("%%glm\nempty {} here", "names no variable"),
    ("%%glm\n{In[999]}", "could not fill in the prompt"),
    ("%%glm -f markdown --run\nhi", "--run runs code, but --format is markdown"),
    ("%%glm --think --no-think\nhi", "contradict"),
    ("%%glm -t warm\nhi", "argument -t/--temperature: invalid float value"),
    ("%%glm --cells -1\nhi", "--cells -1"),
    ("%glm frobnicate", "unknown subcommand 'frobnicate'"),
    ("%glm use remote only-one-arg", "usage: %glm use"),
    ("%glm config nonsense=1", "unknown setting 'nonsense'"),
    ("%glm config memory=maybe", "setting memory='maybe'"),
    ("%glm config server=sometimes", "choose one of auto, off"),
])
def test_bad_input_is_one_line(remote, upstream, cell, expected):
    line = usage_error(remote, cell)
    assert expected in line, line
    assert upstream.requests == []  # nothing was sent


def test_bad_values_reported_by_the_backend(remote):
    line = usage_error(remote, "%%glm -t 7\nhi")
    assert line.startswith("UsageError: %%glm: ") and "temperature" in line


def test_unknown_model(remote):
    line = usage_error(remote, "%%glm -m no-such-model\nhi")
    assert "no-such-model" in line and SCRIPTED_MODEL in line


def test_server_that_is_down(shell):
    with capture_output():
        shell.run_cell(f"%glm use server http://127.0.0.1:{free_port()}/ some-token")
    line = usage_error(shell, "%%glm\nhello")
    assert "cannot reach the Jupyter server at http://127.0.0.1:" in line and "still running" in line


def test_remote_endpoint_that_is_down(shell):
    shell.run_cell("%glm config api_key_env=")
    with capture_output():
        shell.run_cell(f"%glm use remote http://127.0.0.1:{free_port()}/v1 glm-4.5-air")
    line = usage_error(shell, "%%glm\nhello")
    assert "could not be reached" in line


def test_missing_api_key_names_the_variable(shell, upstream, monkeypatch):
    monkeypatch.delenv("GLM_TEST_KEY_THAT_IS_NOT_SET", raising=False)
    shell.run_cell("%glm config api_key_env=GLM_TEST_KEY_THAT_IS_NOT_SET")
    with capture_output():
        shell.run_cell(f"%glm use remote {upstream.url} {SCRIPTED_MODEL}")
    line = usage_error(shell, "%%glm\nhello")
    assert "GLM_TEST_KEY_THAT_IS_NOT_SET" in line


def test_no_model_in_process_says_what_to_do(shell, tmp_path):
    shell.run_cell(f"%glm config server=off model_path={tmp_path / 'nowhere'}")
    line = usage_error(shell, "%%glm\nhello")
    assert "model_path" in line and "checkpoint" in line


# --- code extraction ----------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,code", [
    ("Sure:\n```python\nx = 1\n```\nDone.", "x = 1"),
    ("```\nplain fence\n```", "plain fence"),
    ("```bash\npip install x\n```\n```python\nimport x\n```\n```py\nx.run()\n```", "import x\n\nx.run()"),
    ("```bash\nls\n```", "ls"),
    ("no fence at all\n", "no fence at all"),
    ("```python\ncut off at max tokens", "cut off at max tokens"),
    ("````python\ns = '```'\n````", "s = '```'"),
])
def test_extract_code(answer, code):
    assert extract_code(answer) == code


# --- rich display in a notebook: the thinking block and the answer, updated in place -------------------

def test_rich_display_streams_a_collapsible_thinking_block(remote, upstream):
    run(remote, "%glm config display=rich")
    result, captured = run(remote, "%%glm\nrich please")
    assert result.success
    shown = [o.transient.get("display_id") for o in captured.outputs]
    thinking_id, answer_id = shown[0], shown[-1]
    assert thinking_id and answer_id and thinking_id != answer_id
    thinking = [o for o in captured.outputs if o.transient["display_id"] == thinking_id]
    answer = [o for o in captured.outputs if o.transient["display_id"] == answer_id]
    first, last = thinking[0].data["text/html"], thinking[-1].data["text/html"]
    assert first.startswith("<details open") and "Thinking… " in first  # open while the model thinks
    assert last.startswith("<details class") and "Thought for " in last and "· 4 tokens" in last  # folded
    assert "".join(REASONING) in last
    assert not thinking[0].update and all(o.update for o in thinking[1:])  # one block, updated in place
    assert answer[-1].data["text/markdown"] == answer_for("rich please")
    assert remote.rl_next_input == "print('rich please')"


def test_interrupt_cancels_the_generation_and_keeps_nothing(remote, upstream):
    """The kernel's interrupt button (SIGINT to the kernel's main thread) mid-answer: the generation stops, what
    had come stays on screen, nothing is remembered, the endpoint sees the client go. The endpoint holds its last
    95 words until the client goes (a minute at most), so the check does not depend on the machine's
    speed: an interrupt that did not cancel shows all 100 words."""
    import signal
    import sys
    import threading
    import time

    def interrupt_once_streaming() -> None:
        # Once the endpoint holds, all 5 words are out; interrupt when the cell has printed a few of them. The cell's
        # stdout is the capture's StringIO behind the extension's tee: read it through `getvalue` whatever wraps it.
        upstream.holding.wait(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "word word" not in getattr(sys.stdout, "getvalue", str)():
            time.sleep(0.02)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    upstream.release.clear()
    upstream.holding.clear()
    dropped = upstream.dropped
    # A kernel runs cells with Python's own SIGINT handler (one raising KeyboardInterrupt), whatever an earlier
    # test in this process left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=interrupt_once_streaming)
    try:
        timer.start()
        result, captured = run(remote, "%%glm\nSLOW answer please")
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
        upstream.release.set()  # an endpoint still holding (the client never left) goes on
    assert 2 <= captured.stdout.count("word") <= 5, captured.stdout  # what had come is still shown, and no more
    assert "interrupted: the generation was cancelled" in captured.stdout
    assert magics_of(remote).session.turns == [] and remote.rl_next_input is None
    deadline = time.monotonic() + 30
    while upstream.dropped == dropped and time.monotonic() < deadline:  # the endpoint sees the client go
        time.sleep(0.1)
    assert upstream.dropped == dropped + 1
    assert remote.run_cell("1 + 1").result == 2
