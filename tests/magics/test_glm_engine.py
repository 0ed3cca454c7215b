"""`%%glm` against the real engine: in-process (no Jupyter server), through a live Jupyter server named with
`%glm use server`, and from a kernel that the server started and that finds the server on its own."""

from __future__ import annotations

import glob
import re
import time

import httpx
import pytest
from glm_upstream import magics_of
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from workbench.magics import extract_code

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def run(shell, code: str):
    with capture_output() as captured:
        result = shell.run_cell(code, store_history=True)
    assert result.success, (result.error_in_exec, captured.stdout, captured.stderr)
    return captured


def last_turn(shell):
    return magics_of(shell).session.turns[-1]


def test_in_process_engine_with_trace(shell, tiny_checkpoint):
    run(shell, f"%glm config server=off model_path={tiny_checkpoint} dtype=float32")
    captured = run(shell, "%glm status")
    assert f"the local engine in this kernel ({tiny_checkpoint}, cpu)" in captured.stdout
    assert "backend local" in captured.stdout and "context 2048 tokens" in captured.stdout
    captured = run(shell, "%%glm --max-tokens 8 -t 0 --trace\nwrite a function")
    answer = last_turn(shell).assistant
    assert shell.rl_next_input == extract_code(answer) and shell.rl_next_input
    assert "cut off at 8 tokens" in captured.stdout
    # --trace displayed the routing view of this answer (prompt + generated tokens).
    widgets = [o for o in captured.outputs if WIDGET_MIME in o.data]
    assert len(widgets) == 1 and "RoutingView" in widgets[0].data["text/plain"]


def test_server_and_in_process_give_the_same_greedy_answer(shell, jupyter_server, tiny_checkpoint):
    """The same request through the server's API and through the in-process chat layer: same tokens."""
    prompt = "%%glm --max-tokens 10 -t 0 --no-think\nsort a list"
    run(shell, f"%glm use server {jupyter_server['url']} {jupyter_server['token']}")
    captured = run(shell, "%glm status")
    assert f"the Jupyter server at {jupyter_server['url']}" in captured.stdout and "backend local" in captured.stdout
    run(shell, prompt)
    through_server = last_turn(shell).assistant
    next_input = shell.rl_next_input
    run(shell, "%glm reset")
    run(shell, f"%glm config server=off model_path={tiny_checkpoint} dtype=float32")
    run(shell, "%glm use local")
    run(shell, prompt)
    assert last_turn(shell).assistant == through_server != ""
    assert shell.rl_next_input == next_input == extract_code(through_server)


def test_trace_through_the_server(shell, jupyter_server):
    run(shell, f"%glm use server {jupyter_server['url']} {jupyter_server['token']}")
    captured = run(shell, "%%glm --max-tokens 5 -t 0 --trace\nhello")
    widgets = [o for o in captured.outputs if WIDGET_MIME in o.data]
    assert len(widgets) == 1, [list(o.data) for o in captured.outputs]


def test_wrong_token_says_so(shell, jupyter_server):
    run(shell, f"%glm use server {jupyter_server['url']} not-the-token")
    with capture_output() as captured:
        result = shell.run_cell("%%glm\nhello")
    assert result.error_in_exec is not None
    assert "refused this kernel (403)" in captured.stderr and "%glm use server URL TOKEN" in captured.stderr


class KernelOfTheServer:
    """A kernel started through the server's REST API, driven over ZMQ with its connection file."""

    def __init__(self, server: dict) -> None:
        from jupyter_client import BlockingKernelClient

        self.server = server
        self.headers = {"Authorization": f"token {server['token']}"}
        reply = httpx.post(server["url"] + "api/kernels", headers=self.headers, json={"name": "python3"},
                           timeout=120)
        reply.raise_for_status()
        self.kernel_id = reply.json()["id"]
        connection_file = server["runtime"] / f"kernel-{self.kernel_id}.json"
        deadline = time.monotonic() + 60
        while not glob.glob(str(connection_file)) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.client = BlockingKernelClient(connection_file=str(connection_file))
        self.client.load_connection_file()
        self.client.start_channels(hb=False)  # a loaded CI machine misses heartbeats; the shell reply suffices
        # Until iopub's subscription is in place, what the kernel publishes is lost (ZMQ's slow joiner): an execute
        # sent right after a kernel_info reply could lose its idle status and wait for it for ever. wait_for_ready
        # repeats kernel_info until iopub too has answered.
        self.client.wait_for_ready(timeout=180)

    def execute(self, code: str, user_expressions: dict | None = None) -> tuple[list[tuple[str, dict]], dict]:
        msg_id = self.client.execute(code, user_expressions=user_expressions or {})
        messages = []
        while True:
            msg = self.client.get_iopub_msg(timeout=180)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            messages.append((msg["msg_type"], msg["content"]))
        while True:
            reply = self.client.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                return messages, reply["content"]

    def close(self) -> None:
        self.client.stop_channels()
        httpx.delete(self.server["url"] + f"api/kernels/{self.kernel_id}", headers=self.headers, timeout=60)


@pytest.fixture
def kernel(jupyter_server):
    kernel = KernelOfTheServer(jupyter_server)
    yield kernel
    kernel.close()


def stdout_of(messages) -> str:
    return "".join(c["text"] for kind, c in messages if kind == "stream" and c["name"] == "stdout")


def test_a_kernel_finds_its_server_and_puts_code_in_the_next_cell(kernel, jupyter_server):
    _, reply = kernel.execute("%load_ext workbench")
    assert reply["status"] == "ok"
    messages, reply = kernel.execute("%glm status")
    runtime_file = jupyter_server["runtime"] / f"jpserver-{jupyter_server['pid']}.json"
    assert f"found through {runtime_file}" in stdout_of(messages)

    messages, reply = kernel.execute(
        "%%glm --max-tokens 6 -t 0 --replace\nwrite hello",
        user_expressions={"answer": "get_ipython().magics_manager.registry['GLMMagics'].session.turns[-1].assistant"})
    assert reply["status"] == "ok"
    answer = eval(reply["user_expressions"]["answer"]["data"]["text/plain"])  # the repr of a str
    (payload,) = reply["payload"]
    assert payload == {"source": "set_next_input", "text": extract_code(answer), "replace": True}
    # In a kernel the answer is shown as rich output: Markdown, updated in place while it streams.
    kinds = [kind for kind, _ in messages]
    assert "display_data" in kinds
    shown = [c for kind, c in messages if kind in ("display_data", "update_display_data")]
    assert shown[-1]["data"]["text/markdown"] == answer
    assert "put into this cell, replacing the prompt" in stdout_of(messages)


def test_a_kernel_reports_errors_in_one_line(kernel):
    kernel.execute("%load_ext workbench")
    messages, reply = kernel.execute("%%glm --run -f text\nhello")
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    stderr = "".join(c["text"] for kind, c in messages if kind == "stream" and c["name"] == "stderr")
    assert stderr.strip().count("\n") == 0 and "--run runs code" in stderr
    assert not [kind for kind, _ in messages if kind == "error"]  # no traceback message
    _, reply = kernel.execute("40 + 2")
    assert reply["status"] == "ok"


def test_use_local_path_quantizes_the_model_in_this_kernel(shell, tiny_checkpoint):
    captured = run(shell, f"%glm use local {tiny_checkpoint} --quantize int4")
    assert f"the local engine in this kernel ({tiny_checkpoint}, cpu, int4 weights)" in captured.stdout
    status = run(shell, "%glm status").stdout
    assert re.search(r"weights int4 \([\d.]+ bits, [\d.]+ MiB read per token\)", status), status
    run(shell, "%%glm --max-tokens 4 -t 0\nwrite a function")
    assert last_turn(shell).assistant is not None
    run(shell, "%glm config quantize=int8")  # the setting behind the option; the next request reloads
    assert "weights int8" in run(shell, "%glm status").stdout


@pytest.mark.parametrize("line, says", [
    ("%glm use local {ckpt} --quantize int3", "--quantize 'int3': choose int8 or int4"),
    ("%glm use local --quantize int4", "no checkpoint folder given"),
    ("%glm use local {ckpt} extra", "unexpected 'extra'"),
    ("%glm config quantize=fp4", "choose one of , int8, int4"),
])
def test_use_local_quantize_mistakes(shell, tiny_checkpoint, line, says):
    with capture_output() as captured:
        result = shell.run_cell(line.format(ckpt=tiny_checkpoint))
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert says in captured.stderr, captured.stderr
