"""`%%glm --web URL` (pages read and put into the prompt, with a note of what was read) and `%%glm -f html` (the
answer's page in a new cell that shows it in a sandboxed iframe): the request that left the kernel, the cell's
source, and what that source displays when run, down to the escaping of quotes, `</script>` and `&`.

Pages come from a page server on loopback; the kernel's fetcher is given a resolver stub that lets one made-up
name through to it. A guard fails any test that would connect elsewhere than loopback."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from glm_upstream import SCRIPTED_MODEL, magics_of
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from web_pages import LoopbackOnly, stub_resolver

from workbench.magics import SYSTEM_PROMPTS
from workbench.magics.connection import Connection, InProcessConnection
from workbench.magics.web import html_cell, html_page, python_literal
from workbench.tools.web_fetch import WebFetcher


@pytest.fixture
def remote(shell, upstream, monkeypatch):
    """The shell on the scripted endpoint; the kernel's web fetcher reaches docs.example (the page server)."""
    assert shell.run_cell("%glm config api_key_env=").success
    with capture_output():
        assert shell.run_cell(f"%glm use remote {upstream.url} {SCRIPTED_MODEL}").success
    upstream.requests.clear()
    monkeypatch.setattr(InProcessConnection, "web_fetcher", lambda self: WebFetcher(
        resolver=stub_resolver({"docs.example": ["127.0.0.1"]}), allow_hosts=["docs.example"]))
    LoopbackOnly(monkeypatch)
    return shell


def run(shell, code: str):
    with capture_output() as captured:
        result = shell.run_cell(code, store_history=True)
    return result, captured


# --- --web --------------------------------------------------------------------------------------------

def test_web_pages_go_into_the_prompt_with_a_note_of_what_was_read(remote, upstream, pages):
    page, text = pages.url("/redirect", "docs.example"), pages.url("/text", "docs.example")
    result, captured = run(remote, f"%%glm -f markdown --web {page} --web {text}\nsummarise these NOCODE")
    assert result.success, result.error_in_exec
    (request,) = upstream.requests
    prompt = request["messages"][-1]["content"]
    assert prompt.startswith("Web pages I fetched for this question")
    assert f"## Quarterly Widgets & Gadgets\nURL: {pages.url('/page', 'docs.example')}\n\n# Widget report" in prompt
    assert "Widgets grew by **12%** this quarter" in prompt and "plain words, ünïcode" in prompt
    assert prompt.endswith("---\n\nsummarise these NOCODE")
    assert "SCRIPT-TEXT" not in prompt
    out = captured.stdout
    assert f"read {pages.url('/page', 'docs.example')} (from {page}): 'Quarterly Widgets & Gadgets'" in out
    assert f"read {text}:" in out


def test_a_page_that_cannot_be_read_stops_the_cell_before_the_model_is_asked(remote, upstream, pages):
    for url, why in ((pages.url("/page"), "loopback"), ("gopher://docs.example/", "http and https"),
                     (pages.url("/pdf", "docs.example"), "a PDF")):
        result, captured = run(remote, f"%%glm --web {url}\nwhat does it say")
        assert isinstance(result.error_in_exec, UsageError)
        assert f"%%glm: cannot read {url}" in captured.stderr and why in captured.stderr, captured.stderr
        assert "Traceback" not in captured.stderr
    assert upstream.requests == []


def test_the_kernels_own_fetcher_is_safe_by_default():
    fetcher = Connection.web_fetcher(None)  # type: ignore[arg-type]
    assert fetcher.allow_private is False and fetcher.allow_hosts == frozenset()


# --- -f html -------------------------------------------------------------------------------------------

TRICKY = """<!DOCTYPE html>
<html><head><title>It's "quoted" & <b>bold</b></title></head>
<body><p id='x'>Tom &amp; Jerry's "show" &lt;3 ''' \"\"\" \\ \\n</p>
<script>
  const s = "</script>".length + '\\'' + `${1}`;
  document.getElementById("x").dataset.ran = "yes";
</script>
</body></html>"""


class SandboxedFrames(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "iframe":
            self.frames.append(dict(attrs))


def displayed_html(source: str) -> list[str]:
    """Run a generated cell's source in an IPython shell, display captured: the HTML it displayed."""
    InteractiveShell.instance()  # display() goes to the shell's display publisher, as in a kernel
    with capture_output() as captured:
        exec(compile(source, "<cell>", "exec"), {})
    return [output.data["text/html"] for output in captured.outputs]


def shown_frames(source: str) -> list[dict]:
    """The iframes of what a generated cell displays."""
    frames = SandboxedFrames()
    for html in displayed_html(source):
        frames.feed(html)
    return frames.frames


@pytest.mark.parametrize("page", [
    TRICKY, "<p>simple</p>", "<p>ends with a quote'", '<p>ends with a double quote"', "<p>ends with a backslash\\",
    "<p>both ''' and \"\"\"</p>", "<p>\r\nwindows\r\n</p>", "<p>nul \x00 byte</p>", "<p>tab\tand ünïcode ✓</p>",
])
def test_the_html_cell_shows_exactly_the_page_in_a_sandbox(page):
    source = html_cell(page)
    (frame,) = shown_frames(source)
    assert frame["sandbox"] == "allow-scripts"  # scripts run; no allow-same-origin, so no cookie, token, notebook
    assert frame["srcdoc"] == page
    assert "</script>" not in source.split("srcdoc")[1]  # the page sits in a Python literal, not in the markup


def test_a_page_stays_readable_in_the_cell():
    page = "<p>it'''s</p>\n<script>x = '\\n'</script>"
    assert 'glm_page = r"""' + page + '"""\n' in html_cell(page)  # ''' inside: """ it is, and \n stays \n
    assert "glm_page = '<!DOCTYPE" in html_cell(TRICKY)  # both kinds of triple quote inside: repr()
    assert python_literal("<p>x</p>") == "r'''<p>x</p>'''"
    assert python_literal("a'''b\"\"\"c") == repr("a'''b\"\"\"c")


def test_html_blocks_css_and_js_make_one_page():
    answer = ("Here it is:\n```html\n<html><head><title>T</title></head><body><p>hi</p></body></html>\n```\n"
              "```css\np { color: red; }\n```\n```javascript\nconsole.log(1);\n```\n")
    page = html_page(answer)
    assert page.index("<style>\np { color: red; }\n</style>") < page.index("</head>")
    assert page.index("<script>\nconsole.log(1);\n</script>") < page.index("</body>")
    assert html_page("<div>unfenced page</div>") == "<div>unfenced page</div>"
    assert html_page("```\n<p>unlabelled</p>\n```") == "<p>unlabelled</p>"
    assert html_page("No page here.\n```python\nprint(1)\n```") == ""


class ScriptedConnection(Connection):
    """A connection whose answer is given (the model's side of an -f html turn); it records each request."""

    def __init__(self, answer: str) -> None:
        self.answer, self.requests = answer, []

    def describe(self) -> str:
        return "a scripted connection"

    def models(self) -> list[str]:
        return ["scripted"]

    def status(self) -> dict:
        return {}

    def chat(self, body):
        self.requests.append(body)
        yield {"id": "c1", "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer},
                                        "finish_reason": "stop"}]}


@pytest.mark.parametrize("flags", ["", "--run", "--replace"])
def test_an_html_answer_goes_into_a_cell_that_shows_it(shell, flags):
    connection = ScriptedConnection(f"A page:\n\n```html\n{TRICKY}\n```\n")
    magics_of(shell).session._connection = connection
    result, captured = run(shell, f"%%glm -f html --no-stream {flags}\na page with a script")
    assert result.success, result.error_in_exec
    assert connection.requests[0]["messages"][0] == {"role": "system", "content": SYSTEM_PROMPTS["html"]}
    source = shell.rl_next_input
    assert source == html_cell(TRICKY)
    (frame,) = shown_frames(source)
    assert frame == {"sandbox": "allow-scripts", "srcdoc": TRICKY, "style": frame["style"]}
    where = "this cell" if flags == "--replace" else "a new cell below"
    assert f"the page ({len(TRICKY):,} characters) put into {where}" in captured.stdout
    if flags == "--run":  # the cell ran here too: its frame was displayed
        shown = [output.data["text/html"] for output in captured.outputs if "text/html" in output.data]
        assert len(shown) == 1 and 'sandbox="allow-scripts"' in shown[0]


def test_an_answer_without_html_puts_nothing_in_a_cell(shell):
    magics_of(shell).session._connection = ScriptedConnection("Sorry, no page.")
    result, captured = run(shell, "%%glm -f html --no-stream\na page")
    assert result.success and shell.rl_next_input is None
    assert "the model gave no HTML: nothing was put into a cell" in captured.stdout


def test_help_names_the_new_options(shell):
    _, captured = run(shell, "%glm --help")
    assert "--web URL" in captured.stdout and "code|markdown|text|html" in captured.stdout
    assert "sandboxed" in captured.stdout


# --- the cell's frame in a real browser -----------------------------------------------------------------

PROBE = """<!DOCTYPE html><html><body><p>probe "page" &amp; </script> text</p><script>
const seen = {ran: true, origin: location.origin};
try { seen.parentCookie = parent.document.cookie; } catch (e) { seen.parentCookie = "blocked: " + e.name; }
try { seen.ownCookie = document.cookie; } catch (e) { seen.ownCookie = "blocked: " + e.name; }
fetch(PARENT + "/glm/api/status").then(r => r.status).catch(e => "failed: " + e.name).then(status => {
  seen.glmApi = status; parent.postMessage(JSON.stringify(seen), "*"); });
</script></body></html>"""


def test_the_html_cell_runs_its_script_but_reaches_nothing_of_the_parent_in_chromium(tmp_path):
    """What the cell displays, in Debian's chromium, inside a page that holds a cookie (as JupyterLab's does):
    the page's script runs, in the opaque origin "null"; reading the parent's document or any cookie throws, and
    a request to the parent's glm/ API leaves without the cookie and its answer stays unreadable."""
    import json
    import os
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        if os.environ.get("GLM_UI_REQUIRED") == "1":
            pytest.fail(f"Debian's chromium is not at {chromium}: apt-get install -y chromium")
        pytest.skip(f"Debian's chromium is not at {chromium}")
    glm_requests: list[dict] = []
    holder: dict[str, str] = {}

    class Parent(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/glm/"):
                glm_requests.append({"cookie": self.headers.get("Cookie"), "origin": self.headers.get("Origin")})
                body, kind = b'{"secret": "status"}', "application/json"
            else:
                body, kind = holder["page"].encode(), "text/html; charset=utf-8"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            if not self.path.startswith("/glm/"):
                self.send_header("Set-Cookie", "_xsrf=SECRET-XSRF; Path=/")
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Parent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    source = html_cell(PROBE.replace("PARENT", json.dumps(origin)))
    (frame,) = shown_frames(source)
    (shown,) = displayed_html(source)
    holder["page"] = ("<html><body><pre id='seen'>nothing yet</pre><script>addEventListener('message', "
                      "e => { document.getElementById('seen').textContent = e.data; });</script>"
                      + shown + "</body></html>")
    try:
        # --dump-dom snapshots the page when its virtual time runs out; on a loaded machine the frame's real fetch
        # can still be in flight then ("nothing yet"), so a snapshot taken too early is retaken with more time
        for attempt, budget in enumerate((5000, 15000, 30000)):
            result = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--virtual-time-budget={budget}",
                 f"--user-data-dir={tmp_path / f'profile{attempt}'}", "--dump-dom", origin + "/"],
                capture_output=True, text=True, timeout=120)
            if "nothing yet" not in result.stdout:
                break
    finally:
        server.shutdown()
        server.server_close()
    dom = result.stdout
    assert "<pre id=\"seen\">" in dom, result.stderr[-2000:]
    seen = json.loads(dom.split("<pre id=\"seen\">", 1)[1].split("</pre>", 1)[0].replace("&quot;", '"')
                      .replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert seen["ran"] is True and seen["origin"] == "null"
    assert seen["parentCookie"].startswith("blocked: SecurityError")
    assert seen["ownCookie"].startswith("blocked: SecurityError")
    assert seen["glmApi"] == "failed: TypeError"  # CORS: the answer cannot be read from the opaque origin
    assert all(request["cookie"] is None and request["origin"] == "null" for request in glm_requests)
    assert frame["sandbox"] == "allow-scripts"


def test_the_pages_share_a_budget_that_fits_the_models_context(shell, pages, monkeypatch):
    """Two pages on a model with a 2,000-token context: together at most ~half of it (3,000 characters), each
    cut at its share with a note; more than MAX_PAGES --web options are refused before anything is read."""
    connection = ScriptedConnection("noted")
    monkeypatch.setattr(ScriptedConnection, "context_limit", lambda self: 2000, raising=False)
    monkeypatch.setattr(ScriptedConnection, "web_fetcher", lambda self: WebFetcher(
        resolver=stub_resolver({"docs.example": ["127.0.0.1"]}), allow_hosts=["docs.example"]))
    LoopbackOnly(monkeypatch)
    magics_of(shell).session._connection = connection
    book = pages.url("/forever", "docs.example")  # endless: cut at the byte cap, then at the share
    result, captured = run(shell, f"%%glm -f text --no-stream --web {book} --web {pages.url('/page', 'docs.example')}"
                                  "\nsummarise")
    assert result.success, result.error_in_exec
    prompt = connection.requests[0]["messages"][-1]["content"]
    assert len(prompt) < 3000 + 500 and prompt.endswith("summarise")
    assert "cut at 1,500 characters" in captured.stdout and "[the page goes on; the rest was cut]" in prompt
    too_many = " ".join(f"--web http://docs.example/{i}" for i in range(9))
    result, captured = run(shell, f"%%glm {too_many}\nhi")
    assert isinstance(result.error_in_exec, UsageError) and "at most 8 pages" in captured.stderr
    assert len(connection.requests) == 1
