"""Helpers of the web_fetch tests: a page server on loopback (the web a fetch sees, known in advance), a resolver
stub (names mapped to addresses without DNS), and a guard that fails a test whose code tries to connect anywhere
but loopback (this machine's network rules forbid it: no test may send traffic to any other address).

Registered as a pytest plugin by tests/conftest.py, so its fixtures are there for every test module: `pages` (the
page server, one per module) and `guard` (the loopback guard). `guard` is not autouse: a module whose every test
must run under it says so with `pytestmark = pytest.mark.usefixtures("guard")`."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Quarterly Widgets &amp; Gadgets</title>
<style>body { color: red }</style><script>var secret = "SCRIPT-TEXT";</script></head>
<body>
<header><a href="/">Home</a> SITE-HEADER</header>
<nav><a href="/nav-only">Navigation link</a></nav>
<main>
<h1>Widget report</h1>
<p>Widgets grew by <strong>12%</strong> this quarter; see <a href="/details?q=1">the details</a>.</p>
<ul><li>First point</li><li>Second point</li></ul>
<pre><code>print("hello")</code></pre>
<a href="javascript:alert(1)">not a link</a> <a href="https://example.org/elsewhere">Elsewhere</a>
</main>
<footer>SITE-FOOTER <a href="/about">About</a></footer>
</body></html>
"""


class PageHandler(BaseHTTPRequestHandler):
    """GET routes: /page (HTML), /redirect (302 to /page), /text, /json, /pdf, /big (Content-Length over any
    cap), /forever (streams until the client goes), /slow (answers after the server's `slow_seconds`),
    /location?to=URL (302 to URL), /loop (redirects to itself)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str | None, **headers: str) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up (a timeout test): nothing to tell it
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server: PageServer = self.server  # type: ignore[assignment]
        server.seen.append((self.path, self.headers.get("Host", "")))
        path, _, query = self.path.partition("?")
        if path == "/page":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/redirect":
            self._send(302, b"", "text/plain", Location="/page")
        elif path == "/location":
            self._send(302, b"", "text/plain", Location=query.removeprefix("to="))
        elif path == "/loop":
            self._send(302, b"", "text/plain", Location="/loop")
        elif path == "/text":
            self._send(200, "plain words, ünïcode & <not html>\n".encode(), "text/plain; charset=utf-8")
        elif path == "/untyped":
            self._send(200, b"<!doctype html><title>Untyped</title><p>sniffed</p>", None)
        elif path == "/json":
            self._send(200, b'{"a": [1, 2]}', "application/json")
        elif path == "/pdf":
            self._send(200, b"%PDF-1.7\n%binary", "application/pdf")
        elif path == "/png":
            self._send(200, b"\x89PNG\r\n\x1a\n", "image/png")
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(10 * 2**30))
            self.end_headers()
        elif path == "/forever":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"<p>" + b"x" * 4000 + b"</p>\n"
            try:
                while not server.closing.is_set():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    server.streamed += len(chunk)
            except OSError:  # the client went away: what the size cap should make it do
                pass
        elif path == "/slow":
            server.closing.wait(server.slow_seconds)
            self._send(200, b"<p>late</p>", "text/html")
        elif path == "/trickle":  # a byte now and then: each read is quick, the whole never ends
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while not server.closing.wait(0.05):
                    self.wfile.write(b"1\r\nx\r\n")
                    self.wfile.flush()
            except OSError:
                pass
        elif path == "/missing":
            self._send(404, b"no such page", "text/plain")
        else:
            self._send(200, f"<title>{path}</title><p>page {path}</p>".encode(), "text/html")


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), PageHandler)
        self.seen: list[tuple[str, str]] = []
        self.streamed = 0
        self.slow_seconds = 30.0
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "/page", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()


def stub_resolver(table: dict[str, list[str]]):
    """A resolver that answers from `table` and never asks DNS; it records the names asked for."""
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the test's resolver table")
        return table[host]

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


class LoopbackOnly:
    """Installed by `guard()`: every socket connect must go to loopback; anything else fails the test before a
    packet leaves. `calls` lists every connect attempted (so a test can also require that none happened)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[object] = []
        self.refused: list[object] = []
        original_connect = socket.socket.connect
        original_connect_ex = socket.socket.connect_ex
        guard = self

        def check(address) -> None:
            guard.calls.append(address)
            host = address[0] if isinstance(address, tuple) else None
            if host is None:  # a Unix socket: not the network
                return
            try:
                ok = ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
            except ValueError:
                ok = host == "localhost"
            if not ok:
                guard.refused.append(address)
                raise AssertionError(f"a test tried to connect to {address}: only loopback is allowed here")

        def connect(sock, address):
            check(address)
            return original_connect(sock, address)

        def connect_ex(sock, address):
            check(address)
            return original_connect_ex(sock, address)

        original_getaddrinfo = socket.getaddrinfo

        def no_dns(host, *args, **kwargs):
            if host not in (None, "localhost"):  # a server binding to localhost looks it up: /etc/hosts answers
                try:  # an address literal (as socket.create_connection passes one) needs no DNS
                    ipaddress.ip_address(str(host).split("%", 1)[0])
                except ValueError:
                    raise AssertionError(f"a test asked the system resolver for {host!r}: use a stub "
                                         "resolver") from None
            return original_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", no_dns)


@pytest.fixture
def guard(monkeypatch) -> LoopbackOnly:
    """Fails the test if its code (or a server running in its process) connects anywhere but loopback or asks the
    system resolver for a name."""
    return LoopbackOnly(monkeypatch)


@pytest.fixture(scope="module")
def pages() -> Iterator[PageServer]:
    """The page server on loopback, one per test module (`pages.seen` lists the requests it answered)."""
    server = PageServer()
    yield server
    server.close()


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def self_signed(name: str, folder) -> tuple[str, str]:
    """A certificate (and its key) for `name`, made with the openssl command for one test: (cert, key) paths."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = str(folder / f"{name}.pem"), str(folder / f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True)
    return cert, key


class TLSPageServer(PageServer):
    """The page server over TLS, with a certificate for one name."""

    def __init__(self, cert: str, key: str) -> None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._tls = context
        super().__init__()

    def get_request(self):
        sock, address = super().get_request()
        return self._tls.wrap_socket(sock, server_side=True), address
