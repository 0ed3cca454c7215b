"""`POST glm/api/tools/web_fetch` inside pytest-jupyter's server (no model needed): authentication as every glm/
endpoint, the body checks, a loopback page refused with the default settings, and read (title, Markdown, links,
final_url after a redirect) once `GLMWorkbench.web_fetch_allow_private` is on. Targets are on loopback only."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]
# The server runs in this process: its fetches, like the test's own requests, may go to loopback only (`guard`, and
# the `pages` server: tests/web_pages.py, a plugin of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("guard")


@pytest.fixture
def jp_server_config(tmp_path):
    return {"ServerApp": {"jpserver_extensions": {"workbench": True}},
            "GLMWorkbench": {"model_path": None, "conversations_dir": str(tmp_path / "conversations")}}


@pytest.fixture
def glm(jp_serverapp):
    return jp_serverapp.web_app.settings["glm_workbench"]


async def fetch(jp_fetch, body, **kwargs):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return await jp_fetch("glm", "api", "tools", "web_fetch", method="POST", body=data, raise_error=False, **kwargs)


def error_of(response, status: int, code: str) -> str:
    assert response.code == status, response.body
    error = json.loads(response.body)["error"]
    assert error["code"] == code, error
    return error["message"]


async def test_needs_the_token(jp_fetch, pages):
    response = await fetch(jp_fetch, {"url": pages.url()}, headers={"Authorization": "token wrong"})
    assert "token" in error_of(response, 403, "forbidden")
    assert pages.seen == []


async def test_loopback_is_refused_by_default(jp_fetch, glm, pages):
    assert glm.web_fetch_allow_private is False
    pages.seen.clear()
    for url in (pages.url("/page"), pages.url("/page", "2130706433"), pages.url("/page", "[::1]")):
        message = error_of(await fetch(jp_fetch, {"url": url}), 403, "web_fetch_refused_address")
        assert "loopback" in message and "GLMWorkbench.web_fetch_allow_private" in message
    assert pages.seen == []


@pytest.mark.parametrize(("body", "code", "words"), [
    ("not json", "invalid_json", "not JSON"),
    ([1], "invalid_request", "JSON object"),
    ({}, "invalid_request", "url is required"),
    ({"url": "https://example.org/", "headers": {}}, "invalid_request", "Unknown field"),
    ({"url": "https://example.org/", "max_chars": 0}, "invalid_request", "max_chars"),
    ({"url": "https://example.org/", "max_chars": "5"}, "invalid_request", "max_chars"),
    ({"url": "file:///etc/passwd"}, "web_fetch_bad_scheme", "http and https"),
    ({"url": "gopher://127.0.0.1/"}, "web_fetch_bad_scheme", "http and https"),
])
async def test_bad_bodies_are_400s_that_say_what_is_wrong(jp_fetch, glm, body, code, words):
    assert words in error_of(await fetch(jp_fetch, body), 400, code)


async def test_a_local_page_is_read_when_private_addresses_are_allowed(jp_fetch, glm, pages):
    glm.web_fetch_allow_private = True
    response = await fetch(jp_fetch, {"url": pages.url("/redirect"), "max_chars": 5000})
    assert response.code == 200, response.body
    page = json.loads(response.body)
    assert set(page) == {"url", "final_url", "title", "text", "links", "truncated", "content_type"}
    assert page["url"] == pages.url("/redirect") and page["final_url"] == pages.url("/page")
    assert page["title"] == "Quarterly Widgets & Gadgets"
    assert page["text"].startswith("# Widget report") and "**12%**" in page["text"]
    assert {"text": "the details", "url": pages.url("/details?q=1")} in page["links"]
    assert page["truncated"] is False
    message = error_of(await fetch(jp_fetch, {"url": pages.url("/pdf")}), 415, "web_fetch_unsupported_content")
    assert "PDF" in message


async def test_the_magics_read_pages_through_the_endpoint(jp_fetch, jp_serverapp, jp_http_port, jp_base_url, glm,
                                                          pages):
    """`%%glm --web` in a kernel of this server: ServerConnection.web_fetch posts to the endpoint, so the
    server's settings apply (refused by default, read once allowed), and a refusal is one GLMError line.
    (jp_fetch: the server listens on its port only while a test asks for it.)"""
    from workbench.magics.connection import GLMError, ServerConnection, ServerInfo

    connection = ServerConnection(ServerInfo(url=f"http://127.0.0.1:{jp_http_port}{jp_base_url}",
                                             token=jp_serverapp.identity_provider.token), timeout=60)
    try:
        with pytest.raises(GLMError) as refused:
            await asyncio.to_thread(connection.web_fetch, pages.url("/page"), 1000)
        assert refused.value.code == "web_fetch_refused_address"
        assert str(refused.value).startswith(f"cannot read {pages.url('/page')}: refused to fetch")
        glm.web_fetch_allow_private = True
        page = await asyncio.to_thread(connection.web_fetch, pages.url("/page"), 1000)
        assert page["title"] == "Quarterly Widgets & Gadgets" and page["text"].startswith("# Widget report")
    finally:
        connection.close()
