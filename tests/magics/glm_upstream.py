"""Helpers of the `%%glm` tests: a scripted OpenAI-compatible GLM endpoint (the network boundary: what a
remote server would answer, known in advance) and small utilities. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import ThreadingHTTPServer

from fake_upstream import JSONHandler
from IPython.core.interactiveshell import InteractiveShell

from workbench.magics import GLMMagics

SCRIPTED_MODEL = "scripted-glm"
REASONING = ["The user ", "wants code. ", "I will ", "print it."]
USAGE = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}  # every answer's, as reported


def _code_for(prompt: str) -> str:
    first_line = prompt.strip().splitlines()[-1] if prompt.strip() else ""
    return f"print({first_line!r})"


def answer_parts(prompt: str) -> list[str]:
    return ["Here you go:\n\n", "```python\n", _code_for(prompt) + "\n", "```\n"]


def answer_for(prompt: str) -> str:
    """The whole answer the endpoint streams for a prompt (without NOCODE)."""
    return "".join(answer_parts(prompt))


class ScriptedUpstream:
    """An OpenAI-compatible endpoint whose answers are known in advance; it records every request body.

    - a prompt with NOCODE: a plain answer without a fenced block;
    - a prompt with SLOW: 100 words (to interrupt): 5, then nothing until the client goes, `release` is set or
      a minute has passed, then the other 95 (`holding` is set while it waits); `dropped` counts streams the
      client left;
    - FORGET-ME anywhere but the last message: 400 context_length_exceeded (memory too long);
    - otherwise: reasoning in four deltas, then a fenced python block printing the prompt's last line.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.dropped = 0
        self.release = threading.Event()
        self.holding = threading.Event()  # set while a SLOW stream holds its last 95 words
        upstream = self

        class Handler(JSONHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._json(200, {"object": "list", "data": [{"id": SCRIPTED_MODEL, "object": "model"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.requests.append(body)
                messages = body["messages"]
                if any("FORGET-ME" in str(m.get("content")) for m in messages[:-1]):
                    self._json(400, {"error": {"message": "This model's maximum context length is 100 tokens.",
                                               "type": "invalid_request_error", "param": "messages",
                                               "code": "context_length_exceeded"}})
                    return
                prompt = str(messages[-1]["content"])
                slow = "SLOW" in prompt
                if "NOCODE" in prompt:
                    reasoning, content = [], ["Just ", "words."]
                elif slow:
                    reasoning, content = [], ["word "] * 100
                else:
                    reasoning = REASONING
                    content = answer_parts(prompt)
                base = {"id": f"chatcmpl-{len(upstream.requests)}", "object": "chat.completion.chunk",
                        "created": int(time.time()), "model": SCRIPTED_MODEL}
                if not body.get("stream"):
                    message = {"role": "assistant", "content": "".join(content),
                               "reasoning_content": "".join(reasoning) or None}
                    self._json(200, base | {"object": "chat.completion", "choices": [
                        {"index": 0, "message": message, "finish_reason": "stop"}], "usage": USAGE})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                deltas = [{"role": "assistant"}] + [{"reasoning_content": r} for r in reasoning] + \
                    [{"content": c} for c in content]
                for sent, delta in enumerate(deltas):
                    if slow and sent == 6 and self._hold():  # the role and 5 words are out: hold the rest
                        upstream.dropped += 1
                        return
                    try:
                        self._event(base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    except (BrokenPipeError, ConnectionResetError):
                        upstream.dropped += 1
                        return
                self._event(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event(base | {"choices": [], "usage": USAGE})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _hold(self) -> bool:
                """Wait for the client to go (True), or for `release` or a minute (False)."""
                upstream.holding.set()
                deadline = time.monotonic() + 60
                while not upstream.release.is_set() and time.monotonic() < deadline:
                    # The client sends nothing more on this connection: readable means closed.
                    if select.select([self.connection], [], [], 0.05)[0]:
                        try:
                            return self.connection.recv(1, socket.MSG_PEEK) == b""
                        except ConnectionError:
                            return True
                return False

            def _event(self, payload: dict) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()


        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def magics_of(shell: InteractiveShell) -> GLMMagics:
    return shell.magics_manager.registry["GLMMagics"]
