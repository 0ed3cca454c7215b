"""web_fetch (workbench.tools.web_fetch): the address policy as a unit on address values, refusals that never
reach the socket layer, the public-address path through a mock transport, and live fetches from a page server on
loopback (refused with the policy on; read, with title, Markdown, links and redirects, with it lifted).

Every test runs under a guard that fails it if anything connects to an address that is not loopback or asks the
system resolver for a name: no test here may send traffic off this machine, even by mistake."""

from __future__ import annotations

import ipaddress
import time

import httpx
import pytest
from web_pages import stub_resolver, wait_for

from workbench.tools.web_fetch import MAX_LINKS, WebFetcher, WebFetchError, parse_ip_literal, refusal_reason

# `guard` and `pages`: tests/web_pages.py (a plugin of tests/conftest.py)
pytestmark = pytest.mark.usefixtures("guard")


@pytest.fixture(autouse=True)
def _fresh_log(pages):
    pages.seen.clear()


def refused(fetcher: WebFetcher, url: str, code: str, status: int = 403) -> WebFetchError:
    with pytest.raises(WebFetchError) as info:
        fetcher.fetch(url)
    assert info.value.code == code and info.value.status == status, info.value.message
    return info.value


# --- the address check, on address values only --------------------------------------------------------------

NOT_PUBLIC = {
    "127.0.0.1": "loopback", "127.255.255.254": "loopback", "::1": "loopback",
    "10.0.0.1": "private", "10.255.255.255": "private", "172.16.0.1": "private", "172.31.255.254": "private",
    "192.168.1.1": "private", "100.64.0.1": "carrier-grade NAT", "100.127.255.254": "carrier-grade NAT",
    "169.254.169.254": "metadata", "169.254.0.1": "link-local", "fe80::1": "link-local",
    "fe80::1%2": "link-local", "0.0.0.0": "unspecified", "0.1.2.3": "unspecified", "::": "unspecified",
    "224.0.0.1": "multicast", "239.255.255.250": "multicast", "ff02::1": "multicast",
    "240.0.0.1": "reserved", "255.255.255.255": "reserved",
    "fc00::1": "unique-local", "fd12:3456::1": "unique-local", "fec0::1": "site-local",
    "192.0.2.1": "documentation", "2001:db8::1": "documentation", "198.18.0.1": "benchmarking",
    # IPv4 written as IPv6: mapped, compatible, NAT64 and 6to4 forms of the addresses above
    "::ffff:127.0.0.1": "loopback", "::ffff:7f00:1": "loopback", "::ffff:10.1.2.3": "private",
    "::ffff:169.254.169.254": "metadata", "::ffff:0.0.0.0": "unspecified",
    "::127.0.0.1": "IPv4-compatible", "::10.0.0.1": "IPv4-compatible",
    "64:ff9b::127.0.0.1": "loopback", "64:ff9b::a9fe:a9fe": "metadata", "64:ff9b:1::1": "NAT64",
    "2002:7f00:1::1": "loopback", "2002:a00:1::": "private", "2001::1": "Teredo",
}


@pytest.mark.parametrize(("address", "why"), NOT_PUBLIC.items())
def test_every_non_public_address_is_refused_with_its_reason(address, why, guard):
    reason = refusal_reason(address)
    assert reason is not None and why in reason, reason
    assert refusal_reason(ipaddress.ip_address(address)) == reason
    assert guard.calls == []


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "8.8.8.8", "2606:4700:4700::1111",
                                     "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1"])
def test_public_addresses_pass(address):
    assert refusal_reason(address) is None


@pytest.mark.parametrize(("host", "address"), [
    ("2130706433", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0X7F.0.0.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("10.1", "10.0.0.1"), ("3232235777", "192.168.1.1"), ("0", "0.0.0.0"), ("[::1]", "::1"),
    ("::ffff:127.0.0.1", "::ffff:7f00:1"), ("example.org", None), ("1e100.net", None), ("cafe.de", None),
])
def test_host_literals_are_read_as_the_c_library_reads_them(host, address):
    literal = parse_ip_literal(host)
    assert (str(literal) if literal is not None else None) == address
    if address is not None:
        assert refusal_reason(literal) is not None  # every literal here is a loopback, private or unspecified one


# --- refusals that never reach the socket layer -------------------------------------------------------

@pytest.mark.parametrize(("url", "table"), [
    ("http://10.0.0.1/", {}),
    ("http://169.254.169.254/latest/meta-data/", {}),
    ("http://[fd00::1]/", {}),
    ("http://[::ffff:10.0.0.1]/", {}),
    ("http://[::ffff:169.254.169.254]/", {}),
    ("http://[64:ff9b::a9fe:a9fe]/", {}),
    ("http://0xa9.0xfe.0xa9.0xfe/", {}),  # 169.254.169.254, spelt in hex
    ("http://2852039166/", {}),  # 169.254.169.254 as one number
    ("http://metadata.example/computeMetadata/v1/", {"metadata.example": ["169.254.169.254"]}),
    ("http://intranet.example/", {"intranet.example": ["192.168.0.10"]}),
    # one public and one private answer: the name is refused, not fetched from the public one
    ("https://mixed.example/", {"mixed.example": ["93.184.216.34", "10.1.2.3"]}),
    ("http://v6.example/", {"v6.example": ["2606:4700:4700::1111", "fe80::1%3"]}),
])
def test_non_public_targets_are_refused_before_any_socket(url, table, guard):
    resolver = stub_resolver(table)
    error = refused(WebFetcher(resolver=resolver), url, "web_fetch_refused_address")
    assert "web_fetch_allow_private" in error.message
    assert guard.calls == [], "the refusal must come before any connect"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:70/1", "ftp://example.org/x",
                                 "javascript:alert(1)", "data:text/html,<p>x</p>", "//example.org/x", "example.org"])
def test_only_http_and_https(url, guard):
    error = refused(WebFetcher(resolver=stub_resolver({})), url, "web_fetch_bad_scheme", 400)
    assert "http and https" in error.message
    assert guard.calls == []


def mock_web(pages: dict[str, httpx.Response], sent: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return pages[request.url.path]
    return httpx.MockTransport(handle)


def test_a_public_address_is_fetched_from_the_vetted_ip_without_touching_a_socket(guard):
    """The public path, end to end but through a mock transport: the request goes to the address the check
    passed, with the name in the Host header and in TLS SNI; nothing reaches a socket or the system resolver."""
    sent: list[httpx.Request] = []
    transport = mock_web({"/doc": httpx.Response(200, html="<title>Doc</title><main><p>Public words</p></main>")},
                         sent)
    resolver = stub_resolver({"public.example": ["93.184.216.34"]})
    page = WebFetcher(resolver=resolver, transport=transport).fetch("https://public.example/doc?x=1#part")
    assert page.title == "Doc" and page.text == "Public words" and page.final_url == "https://public.example/doc?x=1"
    (request,) = sent
    assert str(request.url) == "https://93.184.216.34/doc?x=1"
    assert request.headers["host"] == "public.example"
    assert request.extensions["sni_hostname"] == "public.example"
    assert resolver.asked == ["public.example"]
    assert guard.calls == []


def test_dns_rebinding_cannot_move_the_connection(guard):
    """A resolver whose answer changes (public when checked, loopback later) is asked once per hop: the
    request goes to the address that was checked."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    asked: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    sent: list[httpx.Request] = []
    transport = mock_web({"/": httpx.Response(200, text="ok")}, sent)
    page = WebFetcher(resolver=rebinding, transport=transport).fetch("http://rebind.example/")
    assert page.text == "ok" and asked == ["rebind.example"]
    assert [request.url.host for request in sent] == ["93.184.216.34"]
    assert guard.calls == []


@pytest.mark.parametrize(("location", "code", "status"), [
    ("http://10.0.0.1/admin", "web_fetch_refused_address", 403),
    ("http://169.254.169.254/latest/meta-data/", "web_fetch_refused_address", 403),
    ("http://internal.example/", "web_fetch_refused_address", 403),
    ("file:///etc/passwd", "web_fetch_bad_scheme", 400),
    ("gopher://internal.example/", "web_fetch_bad_scheme", 400),
])
def test_a_redirect_from_a_public_page_is_checked_again(location, code, status, guard):
    sent: list[httpx.Request] = []
    transport = mock_web({"/go": httpx.Response(302, headers={"Location": location})}, sent)
    resolver = stub_resolver({"public.example": ["93.184.216.34"], "internal.example": ["10.9.8.7"]})
    error = refused(WebFetcher(resolver=resolver, transport=transport), "http://public.example/go", code, status)
    assert "redirect" in error.message or code == "web_fetch_refused_address"
    assert [request.url.path for request in sent] == ["/go"]  # the target was never asked for
    assert guard.calls == []


def test_bad_arguments_are_clear(guard):
    fetcher = WebFetcher(resolver=stub_resolver({}))
    for max_chars in (0, -5, 10**9, True, "100"):
        with pytest.raises(WebFetchError, match="max_chars"):
            fetcher.fetch("http://x.example/", max_chars=max_chars)  # type: ignore[arg-type]
    refused(fetcher, "", "web_fetch_bad_url", 400)
    refused(fetcher, "http://[::1/", "web_fetch_bad_url", 400)
    assert "cannot resolve" in refused(fetcher, "http://unknown.example/", "web_fetch_unresolved", 502).message
    assert guard.calls == []


# --- live refusals, with loopback targets only -------------------------------------------------------------

def test_a_loopback_url_is_refused_with_the_setting_off(pages, guard):
    fetcher = WebFetcher(resolver=stub_resolver({}))
    for host in ("127.0.0.1", "2130706433", "127.1", "0x7f.1", "017700000001", "[::1]", "[::ffff:127.0.0.1]"):
        error = refused(fetcher, pages.url("/page", host), "web_fetch_refused_address")
        assert "loopback" in error.message
    assert pages.seen == [] and guard.calls == []


def test_a_public_looking_name_that_resolves_to_loopback_is_refused(pages, guard):
    resolver = stub_resolver({"docs.example": ["127.0.0.1"], "localhost": ["127.0.0.1", "::1"]})
    fetcher = WebFetcher(resolver=resolver)
    error = refused(fetcher, pages.url("/page", "docs.example"), "web_fetch_refused_address")
    assert "docs.example resolves to 127.0.0.1" in error.message
    refused(fetcher, pages.url("/page", "localhost"), "web_fetch_refused_address")
    assert pages.seen == [] and guard.calls == []


def test_a_redirect_to_loopback_from_an_allowed_page_is_refused(pages, guard):
    """docs.example is let through for this test only (it maps to the page server); the page it serves
    redirects to 127.0.0.1, which the check refuses: the page server sees the first request and no other."""
    fetcher = WebFetcher(resolver=stub_resolver({"docs.example": ["127.0.0.1"]}), allow_hosts=["docs.example"])
    for target in (pages.url("/page"), pages.url("/page", "0x7f.1"), pages.url("/page", "[::1]")):
        pages.seen.clear()
        error = refused(fetcher, pages.url(f"/location?to={target}", "docs.example"), "web_fetch_refused_address")
        assert "loopback" in error.message
        assert [path for path, _ in pages.seen] == [f"/location?to={target}"]
        assert pages.seen[0][1] == f"docs.example:{pages.port}"  # sent to the vetted IP, named by its Host
    assert all(ipaddress.ip_address(address[0]).is_loopback for address in guard.calls)


def test_size_cap_stops_an_endless_body(pages):
    fetcher = WebFetcher(allow_private=True, max_bytes=64 * 1024)
    page = fetcher.fetch(pages.url("/forever"), max_chars=200_000)
    assert page.truncated
    assert 0 < len(page.text) <= 64 * 1024
    # the stream was abandoned: the server's writes start failing and its count stops far from "forever"
    streamed = pages.streamed
    assert wait_for(lambda: pages.streamed == streamed, 5)
    error = refused(fetcher, pages.url("/big"), "web_fetch_too_large", 502)
    assert "web_fetch_max_bytes" in error.message


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_timeout_ends_a_slow_page(pages, path):
    fetcher = WebFetcher(allow_private=True, timeout=0.5)
    started = time.monotonic()
    error = refused(fetcher, pages.url(path), "web_fetch_timeout", 504)
    assert "web_fetch_timeout" in error.message
    assert time.monotonic() - started < 20  # the page would take 30 s or forever: generous, still catches it


# --- live fetches with the setting on ------------------------------------------------------------------

def test_a_page_is_read_as_title_markdown_and_links_after_a_redirect(pages):
    page = WebFetcher(allow_private=True).fetch(pages.url("/redirect"))
    base = pages.url("")
    assert page.url == pages.url("/redirect") and page.final_url == pages.url("/page")
    assert page.title == "Quarterly Widgets & Gadgets" and page.content_type == "text/html"
    assert page.text.startswith("# Widget report")
    assert "Widgets grew by **12%** this quarter; see [the details](" + base + "/details?q=1)." in page.text
    assert "- First point\n- Second point" in page.text
    assert 'print("hello")' in page.text and "[Elsewhere](https://example.org/elsewhere)" in page.text
    for not_content in ("SCRIPT-TEXT", "color: red", "SITE-HEADER", "SITE-FOOTER", "Navigation link"):
        assert not_content not in page.text
    assert "not a link" in page.text and "javascript:" not in page.text
    assert page.links == [{"text": "Home", "url": base + "/"},
                          {"text": "Navigation link", "url": base + "/nav-only"},
                          {"text": "the details", "url": base + "/details?q=1"},
                          {"text": "Elsewhere", "url": "https://example.org/elsewhere"},
                          {"text": "About", "url": base + "/about"}]
    assert not page.truncated
    assert [path for path, _ in pages.seen] == ["/redirect", "/page"]


def test_max_chars_cuts_the_text_and_says_so(pages):
    page = WebFetcher(allow_private=True).fetch(pages.url("/page"), max_chars=40)
    assert page.truncated and 0 < len(page.text) <= 40


def test_text_json_and_untyped_pages_pass_through(pages):
    fetcher = WebFetcher(allow_private=True)
    text = fetcher.fetch(pages.url("/text"))
    assert text.text == "plain words, ünïcode & <not html>\n" and text.title == "" and text.links == []
    assert fetcher.fetch(pages.url("/json")).text == '{"a": [1, 2]}'
    untyped = fetcher.fetch(pages.url("/untyped"))
    assert untyped.title == "Untyped" and untyped.text == "sniffed"


@pytest.mark.parametrize(("path", "what"), [("/pdf", "a PDF"), ("/png", "image (image/png)")])
def test_pdfs_and_binaries_are_refused_clearly(pages, path, what):
    error = refused(WebFetcher(allow_private=True), pages.url(path), "web_fetch_unsupported_content", 415)
    assert f"is {what}: web_fetch reads HTML and text pages only" in error.message


def test_http_errors_and_redirect_loops(pages):
    fetcher = WebFetcher(allow_private=True, max_redirects=3)
    assert "404" in refused(fetcher, pages.url("/missing"), "web_fetch_http_error", 502).message
    assert "more than 3 times" in refused(fetcher, pages.url("/loop"), "web_fetch_too_many_redirects", 502).message
    assert len(pages.seen) == 1 + 4


def test_links_are_capped():
    sent: list[httpx.Request] = []
    html = "".join(f'<a href="/p{i}">p{i}</a>' for i in range(MAX_LINKS + 50))
    transport = mock_web({"/": httpx.Response(200, html=html)}, sent)
    page = WebFetcher(resolver=stub_resolver({"many.example": ["93.184.216.34"]}),
                      transport=transport).fetch("http://many.example/")
    assert len(page.links) == MAX_LINKS and page.links[-1]["url"] == f"http://many.example/p{MAX_LINKS - 1}"


def test_a_long_page_is_converted_only_as_far_as_it_is_handed_back():
    """A book-length page: the text past what max_chars can hold is dropped before the Markdown conversion, and
    the answer says it was cut even when the kept part alone would fit."""
    from workbench.tools.web_fetch import html_to_markdown

    body = "<main>" + "".join(f"<h2>Part {i}</h2><p>{'word ' * 200}</p>" for i in range(500)) + "</main>"
    title, text, _, pruned = html_to_markdown(body, "http://book.example/", max_chars=5000)
    assert pruned and title == "" and text.startswith("## Part 0")
    assert 5000 < len(text) < 5 * 5000 and "Part 499" not in text
    assert html_to_markdown(body, "http://book.example/")[3] is False  # no limit: all of it


def test_https_goes_to_the_vetted_address_and_checks_the_certificate_for_the_name(tmp_path, guard):
    """Over TLS the request goes to the checked IP, and the certificate is verified for the name in the URL
    (sent as SNI): a name the certificate does not cover fails even though the address is the same."""
    import ssl

    from web_pages import TLSPageServer, self_signed

    cert, key = self_signed("docs.example", tmp_path)
    server = TLSPageServer(cert, key)
    try:
        trust = ssl.create_default_context(cafile=cert)
        resolver = stub_resolver({"docs.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
        fetcher = WebFetcher(resolver=resolver, allow_hosts=["docs.example", "other.example"],
                             transport=httpx.HTTPTransport(verify=trust))
        page = fetcher.fetch(f"https://docs.example:{server.port}/page")
        assert page.title == "Quarterly Widgets & Gadgets"
        assert page.final_url == f"https://docs.example:{server.port}/page"
        assert server.seen == [("/page", f"docs.example:{server.port}")]
        error = refused(fetcher, f"https://other.example:{server.port}/page", "web_fetch_tls_error", 502)
        assert "certificate could not be verified for other.example" in error.message
        assert all(address[0] == "127.0.0.1" for address in guard.calls)
    finally:
        server.close()


def test_a_resolver_that_hangs_is_a_timeout(guard):
    import threading

    release = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        release.wait(30)
        return ["93.184.216.34"]

    started = time.monotonic()
    try:
        refused(WebFetcher(resolver=hanging, timeout=0.3), "http://slow-dns.example/", "web_fetch_timeout", 504)
    finally:
        release.set()
    assert time.monotonic() - started < 20 and guard.calls == []
