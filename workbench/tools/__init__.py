"""Tools the assistant runs on the server's side (and `%%glm` in a kernel): `web_fetch`, a web page as readable
text. Knows no HTTP server, chat layer or notebook: the server's handlers and the magics call it."""

from workbench.tools.web_fetch import WebFetcher, WebFetchError, WebPage, refusal_reason

__all__ = ["WebFetchError", "WebFetcher", "WebPage", "refusal_reason"]
