"""The HTTP plumbing of the fake OpenAI-compatible endpoints that tests stand up on loopback (the network
boundary: what a remote server would answer, known in advance): quiet logs and one way to answer JSON.

(tests/ui/scripted_upstream.py, which the browser tests run as a script of its own, keeps its own copy.)
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler whose `_json` answers a JSON body with its length; subclasses add `do_GET`/`do_POST`."""

    def log_message(self, *args) -> None:  # quiet: the test output is the test's
        pass

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
