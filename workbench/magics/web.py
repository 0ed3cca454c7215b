"""The web in `%%glm`: `--web URL` (pages read by the web_fetch tool, put into the prompt as context) and
`-f html` (the answer's page, put into the next cell as code that shows it in a sandboxed iframe).

The sandbox is `allow-scripts` without `allow-same-origin`: the page's scripts run, in an opaque origin of their
own, so they can read no Jupyter cookie, token or XSRF value, call no `glm/` or Jupyter API as the user, and
touch no notebook. The page travels in the iframe's `srcdoc` attribute, HTML-escaped, and the cell keeps it as a
Python string literal that evaluates to exactly the answer's text (checked, with repr() when a raw string cannot).
"""

from __future__ import annotations

import ast
import re

from workbench.magics.cells import FENCE
from workbench.magics.connection import Connection, GLMError

WEB_CONTEXT_CHARS = 24_000  # of page text in one prompt, shared by the pages of one cell
MAX_PAGES = 8  # --web options in one cell
IFRAME_HEIGHT = 480  # px; the person can change it in the cell


# --- %%glm --web ---------------------------------------------------------------------------------------

def web_context(connection: Connection, urls: list[str], max_chars: int | None = None) -> str:
    """The pages at `urls` as a Markdown block for the prompt; prints one line per page saying what was read.
    A page that cannot be read stops the cell (GLMError, from the connection) before the model is asked.
    The pages share `max_chars` (default: WEB_CONTEXT_CHARS, or about half the model's context if that is less)."""
    if len(urls) > MAX_PAGES:
        raise GLMError(f"--web was given {len(urls)} times; at most {MAX_PAGES} pages go into one prompt")
    if max_chars is None:
        context = connection.context_limit()
        # ~3 characters a token (Connection.count_tokens' estimate): the pages take at most half the context
        max_chars = min(WEB_CONTEXT_CHARS, context * 3 // 2) if context else WEB_CONTEXT_CHARS
    share = max(500, max_chars // len(urls))
    parts = []
    for url in urls:
        page = connection.web_fetch(url, share)
        title = page.get("title") or page.get("final_url") or url
        moved = f" (from {url})" if page.get("final_url") and page["final_url"] != url else ""
        cut = f", cut at {share:,} characters" if page.get("truncated") else ""
        print(f"read {page.get('final_url') or url}{moved}: {title!r}, {len(page.get('text', '')):,} "
              f"characters{cut}")
        block = f"## {title}\nURL: {page.get('final_url') or url}\n\n{page.get('text', '').strip()}"
        if page.get("truncated"):
            block += "\n\n[the page goes on; the rest was cut]"
        parts.append(block)
    return ("Web pages I fetched for this question (their text, as Markdown):\n\n" + "\n\n---\n\n".join(parts)
            + "\n\n---\n\n")


# --- %%glm -f html -------------------------------------------------------------------------------------

HTML_LANGS = ("html", "htm", "xhtml", "html5")
CSS_LANGS = ("css",)
JS_LANGS = ("js", "javascript", "jsx", "mjs")


def html_page(answer: str) -> str:
    """The page of an answer: its ```html block(s), with any ```css and ```js blocks put inside; an answer
    without fences that is HTML itself; or "" when there is no HTML."""
    blocks = [(lang.lower(), body.rstrip("\n")) for _, lang, body in FENCE.findall(answer)]
    html = [body for lang, body in blocks if lang in HTML_LANGS]
    html = html or [body for lang, body in blocks if not lang and body.lstrip().startswith("<")]
    if not blocks and answer.lstrip().startswith("<"):
        html = [answer.strip("\n")]
    if not html:
        return ""
    page = "\n".join(html)
    css = "\n".join(body for lang, body in blocks if lang in CSS_LANGS)
    js = "\n".join(body for lang, body in blocks if lang in JS_LANGS)
    if css:
        page = _insert(page, f"<style>\n{css}\n</style>\n", before=r"</head\s*>", at_start=True)
    if js:
        page = _insert(page, f"<script>\n{js}\n</script>\n", before=r"</body\s*>", at_start=False)
    return page


def _insert(page: str, piece: str, before: str, at_start: bool) -> str:
    match = re.search(before, page, re.I)
    if match is not None:
        return page[: match.start()] + piece + page[match.start():]
    return piece + page if at_start else page + "\n" + piece


def python_literal(text: str) -> str:
    """A Python string literal whose value is exactly `text`: a raw triple-quoted string (readable, editable)
    when one can hold it, else repr()."""
    for quote in ("'''", '"""'):
        candidate = f"r{quote}{text}{quote}"
        try:
            if ast.literal_eval(candidate) == text:
                return candidate
        except (SyntaxError, ValueError):
            pass
    return repr(text)


def html_cell(page: str, height: int = IFRAME_HEIGHT) -> str:
    """The source of a cell that shows `page` in a sandboxed iframe (scripts run; no same-origin)."""
    return (
        "# %%glm -f html: the answer's page in a sandboxed frame. Its scripts run, but in an origin of their own:\n"
        "# it cannot read this notebook, its cookies or the Jupyter token. Edit glm_page and run again.\n"
        "from html import escape as _escape\n"
        "\n"
        "from IPython.display import HTML, display\n"
        "\n"
        f"glm_page = {python_literal(page)}\n"
        "display(HTML(f'<div><iframe sandbox=\"allow-scripts\" srcdoc=\"{_escape(glm_page, quote=True)}\" '\n"
        f"             'style=\"width: 100%; height: {int(height)}px; border: 1px solid #8888\"></iframe></div>'))\n"
    )
