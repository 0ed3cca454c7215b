"""A scripted OpenAI-compatible GLM endpoint for the browser tests: the "remote GLM server" they point the
workbench's remote backend at, so that what the model says (thinking, code, tool calls, a long answer) is
known in advance and streams at a known pace.

It stands at the network boundary only: the browser talks to the real JupyterLab and the real workbench
server extension, which talks to this endpoint as it would to Z.ai or vLLM. The script is chosen by a
keyword in the last user message:

- ``think``: reasoning streamed over about 1.5 s, then an answer with a Python code block;
- ``ponder``: a very long reasoning trace streamed fast, then a one-line answer;
- ``long``:  an answer that streams for up to a minute, for the stop button;
- ``tool``:  a call to ``insert_cell``; after the tool result comes back, a short confirmation;
- ``cut``:   a short answer that ends at its token limit (``finish_reason: length``), for the cut-off note;
- ``wide``:  an answer with a code block much wider than the sidebar;
- ``agent fix``: an agent loop, one step per request: insert a cell with a typo, run it, read its error,
  edit it and run it again, then answer (AGENT_FIX_STEPS);
- ``agent sleep``: insert a cell that sleeps for a minute and run it, for Stop in the middle of a loop;
- ``html page``: an answer with an ```html block whose script writes into its own page and probes the parent
  (cookies, the parent's ``glm/api/status``, ``window.parent.document``) for the preview test;
- ``fetch <url>``: a call to ``web_fetch`` with that URL; after its result, a line naming the page's title;
- a request whose system prompt is the sidebar's inline-completion prompt: ``return a + b`` in pieces;
- anything else: a one-line answer.

Run: ``python tests/ui/scripted_upstream.py --port 8911`` (prints ``READY <port>`` when listening).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_ID = "scripted-glm"
INSERTED_SOURCE = "print('inserted by the tool')"
CODE_ANSWER = "Here is the function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds two numbers."

Delta = dict  # one `choices[0].delta` of the stream

# The agent loops: each step is (reasoning, tool, arguments); "{index}" is the inserted cell's index, read from
# the insert_cell result. The answer after the last step ends the loop.
AGENT_BROKEN_SOURCE = "values = [3, 4, 5]\nprint(sum(values) / len(value))"
AGENT_FIXED_SOURCE = "values = [3, 4, 5]\nprint(sum(values) / len(values))"
AGENT_FIX_STEPS = [
    ("I need a cell that prints the mean of the values. I will insert it below.",
     "insert_cell", {"source": AGENT_BROKEN_SOURCE}),
    ("The cell is in. Now run it.", "run_cell", {"index": "{index}"}),
    ("It ran with an error; read its output to see which.", "read_output", {"index": "{index}"}),
    ("NameError: `value` is a typo for `values`. Fix the cell.", "edit_cell",
     {"index": "{index}", "source": AGENT_FIXED_SOURCE}),
    ("Run the fixed cell again.", "run_cell", {"index": "{index}"}),
]
AGENT_FIX_ANSWER = "Fixed: `value` was a typo for `values`; the cell now prints 4.0."
AGENT_SLEEP_STEPS = [
    ("Insert a cell that waits.", "insert_cell", {"source": "import time\ntime.sleep(60)\nprint('woke up')"}),
    ("Run it.", "run_cell", {"index": "{index}"}),
]
AGENT_SLEEP_ANSWER = "The cell finished sleeping."


def _agent_step(messages: list[dict], steps: list[tuple[str, str, dict]],
                answer: str) -> tuple[list[Delta], float, str]:
    """The next step of an agent loop: as many steps are done as there are tool results since the user spoke."""
    last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    results = [str(m.get("content") or "") for m in messages[last_user + 1:] if m.get("role") == "tool"]
    if len(results) >= len(steps):
        return [{"content": w} for w in _words(answer)], 0.02, "stop"
    inserted = next((re.search(r"at index (\d+)", r) for r in results if re.search(r"at index (\d+)", r)), None)
    index = int(inserted.group(1)) if inserted else 0
    reasoning, name, args = steps[len(results)]
    args = {k: index if v == "{index}" else v for k, v in args.items()}
    call = {"index": 0, "id": f"call_agent_{len(results) + 1}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    return [{"reasoning_content": w} for w in _words(reasoning)] + [{"tool_calls": [call]}], 0.02, "tool_calls"

# The page of the HTML preview test: its script runs in the sandboxed frame, writes what it could reach into its
# own DOM (#probe, read by the test through the frame) and counts clicks (#count).
HTML_PAGE = """<!DOCTYPE html>
<html>
<head>
<style>
  body { font-family: sans-serif; margin: 0; padding: 16px; background: #f4f6fb; color: #1d2433; }
  .card { background: white; border-radius: 8px; padding: 12px 16px; box-shadow: 0 1px 4px rgba(0,0,0,.15); }
  button { background: #3a6ff7; color: white; border: 0; border-radius: 4px; padding: 6px 12px; }
  pre { font-size: 11px; white-space: pre-wrap; }
</style>
</head>
<body>
<div class="card">
  <h2 id="status">Waiting for the script</h2>
  <button id="add">Add one</button> <span>Count: <b id="count">0</b></span>
  <pre id="probe"></pre>
</div>
<script>
  document.getElementById('status').textContent = 'The script ran';
  document.getElementById('add').onclick = () => {
    const c = document.getElementById('count'); c.textContent = String(Number(c.textContent) + 1);
  };
  const probe = {cookie: null, parentDocument: null, storage: null, fetch: 'pending'};
  try { probe.cookie = document.cookie; } catch (e) { probe.cookie = 'threw ' + e.name; }
  try { probe.parentDocument = String(window.parent.document.title); }
  catch (e) { probe.parentDocument = 'threw ' + e.name; }
  try { probe.storage = String(window.localStorage.length); } catch (e) { probe.storage = 'threw ' + e.name; }
  const show = () => { document.getElementById('probe').textContent = JSON.stringify(probe); };
  show();
  fetch(new URL('/glm/api/status', document.baseURI).href, {credentials: 'include'})
    .then(r => r.text().then(t => { probe.fetch = 'answered ' + r.status + ' ' + t.slice(0, 40); }))
    .catch(e => { probe.fetch = 'failed ' + e.name; })
    .finally(show);
</script>
</body>
</html>"""
HTML_ANSWER = f"A page with a counter:\n\n```html\n{HTML_PAGE}\n```\n\nOpen the preview to try it."

# The sidebar's inline completion asks with this system prompt (labextension/src/inlineCompletion.ts).
COMPLETION_PROMPT_MARK = "You are a code completion engine inside a Jupyter notebook."
COMPLETION = ["return", " a", " +", " b"]


def _words(text: str) -> list[str]:
    out, word = [], ""
    for ch in text:
        word += ch
        if ch in " \n":
            out.append(word)
            word = ""
    return out + ([word] if word else [])


def script_for(messages: list[dict]) -> tuple[list[Delta], float, str]:
    """The deltas to stream, the pause between them (s) and the finish reason."""
    last = messages[-1] if messages else {}
    first = messages[0] if messages else {}
    if first.get("role") == "system" and COMPLETION_PROMPT_MARK in str(first.get("content") or ""):
        return [{"content": piece} for piece in COMPLETION], 0.15, "stop"
    asked = next((str(m.get("content") or "").lower() for m in reversed(messages) if m.get("role") == "user"), "")
    if "agent fix" in asked:
        return _agent_step(messages, AGENT_FIX_STEPS, AGENT_FIX_ANSWER)
    if "agent sleep" in asked:
        return _agent_step(messages, AGENT_SLEEP_STEPS, AGENT_SLEEP_ANSWER)
    if last.get("role") == "tool":
        result = str(last.get("content") or "")
        title = re.match(r"Title: (.*)\n", result)
        if title:
            return [{"content": w} for w in _words(f"I read the page titled {title.group(1)}.")], 0.02, "stop"
        return [{"content": w} for w in _words("Done: the new cell is in the notebook.")], 0.02, "stop"
    text = str(last.get("content") or "").lower()
    fetch = re.search(r"fetch (https?://\S+)", str(last.get("content") or ""))
    if fetch:
        call = {"index": 0, "id": "call_fetch_1", "type": "function",
                "function": {"name": "web_fetch", "arguments": json.dumps({"url": fetch.group(1)})}}
        return [{"tool_calls": [call]}], 0.02, "tool_calls"
    if "html page" in text:
        return [{"content": HTML_ANSWER}], 0.02, "stop"
    if "ponder" in text:
        # a very long trace (about 60 000 characters), streamed fast: the viewer must stay responsive
        reasoning = [{"reasoning_content": f"step {i}: still pondering. "} for i in range(2500)]
        return reasoning + [{"content": "Done pondering."}], 0.002, "stop"
    if "think" in text:
        reasoning = [{"reasoning_content": w} for w in _words(
            "The user wants a function that adds two numbers. A plain def with two parameters is enough, "
            "and a short docstring is not needed for something this small. I will answer with the code.")]
        return reasoning + [{"content": w} for w in _words(CODE_ANSWER)], 0.05, "stop"
    if "long" in text:
        return [{"content": f"word{i} "} for i in range(600)], 0.1, "length"
    if "cut" in text:
        return [{"content": w} for w in _words("The first half of a long answer, and then")], 0.02, "length"
    if "wide" in text:
        line = "result = " + " + ".join(f"value_{i}" for i in range(40))
        return [{"content": f"A wide line:\n\n```python\n{line}\nprint(result)\n```\n\nThat is all."}], 0.02, "stop"
    if "tool" in text:
        call = {"index": 0, "id": "call_insert_1", "type": "function",
                "function": {"name": "insert_cell", "arguments": json.dumps({"source": INSERTED_SOURCE})}}
        return [{"tool_calls": [call]}], 0.02, "tool_calls"
    return [{"content": w} for w in _words("Hello from the scripted model.")], 0.02, "stop"


def chunks(completion_id: str, deltas: list[Delta], pause: float, finish: str) -> Iterator[dict]:
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL_ID}
    yield base | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    for delta in deltas:
        time.sleep(pause)
        yield base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    yield base | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    yield base | {"choices": [], "usage": usage(len(deltas))}


def usage(completion_tokens: int) -> dict:
    """Counts, and the timings the workbench's engine sends (scripted: 21 tokens in 2 s of decode is 10 tok/s)."""
    return {"prompt_tokens": 12, "completion_tokens": completion_tokens, "total_tokens": 12 + completion_tokens,
            "prompt_seconds": 0.25, "decode_seconds": DECODE_SECONDS_PER_TOKEN * max(completion_tokens - 1, 0)}


DECODE_SECONDS_PER_TOKEN = 0.1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet: the test output is the browser's
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "test"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        deltas, pause, finish = script_for(request.get("messages") or [])
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        if not request.get("stream"):
            message: dict = {"role": "assistant", "content": "".join(d.get("content", "") for d in deltas) or None}
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
            if reasoning:
                message["reasoning_content"] = reasoning
            calls = [c for d in deltas for c in d.get("tool_calls", [])]
            if calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            self._json(200, {"id": completion_id, "object": "chat.completion", "model": MODEL_ID,
                             "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                             "usage": usage(len(deltas))})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in chunks(completion_id, deltas, pause, finish):
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped the answer: that is what the stop test wants
        self.close_connection = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"READY {server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
