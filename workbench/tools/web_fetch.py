"""`web_fetch`: an http(s) URL in, the page's readable text out (title, main text as Markdown, links).

Owns the address policy and the fetch. Safe by default: only http and https, and no request to an address that is
not public (loopback, private, CGNAT, link-local with the cloud metadata address, unspecified, multicast,
reserved, documentation ranges, IPv6 unique-local and site-local, and the IPv4-mapped, IPv4-compatible, NAT64 and
6to4 forms of any of those). The check runs on the addresses a name RESOLVES to, again on every redirect
(redirects are followed here, at most `max_redirects`), and the connection goes to the very address that was
checked: the request is sent to the vetted IP with the Host header and TLS SNI set to the name, so a DNS answer
that changes between the check and the connect (rebinding) changes nothing. Host literals are read the way the
C library reads them (`2130706433`, `127.1`, `0x7f.1`, `017700000001` are all 127.0.0.1) and checked without DNS.

Resolution (`resolver`) and the HTTP transport are parameters, so tests can map names to loopback servers and
prove that refused or public addresses never reach the socket layer. The body is read as a stream and stops at
`max_bytes`; the whole fetch, redirects included, has one deadline (`timeout`). HTML goes through BeautifulSoup
(main content: `<main>`, `<article>`, else the body without navigation, headers, footers and scripts) and
markdownify; plain text, JSON and XML pass through; PDFs, images and other binaries are refused with a clear error.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Iterable[str]]

DEFAULT_TIMEOUT = 20.0  # seconds for the whole fetch, redirects included
DEFAULT_MAX_BYTES = 5 * 2**20  # of body, after decompression
DEFAULT_MAX_CHARS = 20_000  # of text handed back
MAX_CHARS_LIMIT = 200_000  # the most a caller may ask for
MAX_REDIRECTS = 5
MAX_LINKS = 100
LINK_TEXT_CHARS = 200
USER_AGENT = "GLM-Workbench-web_fetch/1 (reads one page for a notebook assistant)"

# --- the address policy ---------------------------------------------------------------------------------

_V4 = ipaddress.ip_network
_V4_REFUSED: list[tuple[ipaddress.IPv4Network, str]] = [
    (_V4("0.0.0.0/8"), "an unspecified ('this network') address"),
    (_V4("127.0.0.0/8"), "a loopback address (this machine)"),
    (_V4("10.0.0.0/8"), "a private address (10/8)"),
    (_V4("172.16.0.0/12"), "a private address (172.16/12)"),
    (_V4("192.168.0.0/16"), "a private address (192.168/16)"),
    (_V4("100.64.0.0/10"), "a carrier-grade NAT address (100.64/10)"),
    (_V4("169.254.0.0/16"), "a link-local address (169.254/16, where cloud metadata services such as "
                            "169.254.169.254 live)"),
    (_V4("192.0.0.0/24"), "an IETF protocol assignment (192.0.0/24)"),
    (_V4("192.0.2.0/24"), "a documentation address (192.0.2/24)"),
    (_V4("198.51.100.0/24"), "a documentation address (198.51.100/24)"),
    (_V4("203.0.113.0/24"), "a documentation address (203.0.113/24)"),
    (_V4("198.18.0.0/15"), "a benchmarking address (198.18/15)"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("240.0.0.0/4"), "a reserved address (240/4, broadcast included)"),
]
_V6_REFUSED: list[tuple[ipaddress.IPv6Network, str]] = [
    (ipaddress.ip_network("::/128"), "the unspecified address (::)"),
    (ipaddress.ip_network("::1/128"), "the IPv6 loopback address (this machine)"),
    (ipaddress.ip_network("::/96"), "a deprecated IPv4-compatible IPv6 address (::a.b.c.d)"),
    (ipaddress.ip_network("64:ff9b:1::/48"), "a local-use NAT64 address (64:ff9b:1::/48)"),
    (ipaddress.ip_network("100::/64"), "a discard-only address (100::/64)"),
    (ipaddress.ip_network("2001::/32"), "a Teredo tunnel address (2001::/32)"),
    (ipaddress.ip_network("2001:db8::/32"), "a documentation address (2001:db8::/32)"),
    (ipaddress.ip_network("fc00::/7"), "a unique-local address (fc00::/7, IPv6's private range)"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address (fe80::/10)"),
    (ipaddress.ip_network("fec0::/10"), "a site-local address (fec0::/10)"),
    (ipaddress.ip_network("ff00::/8"), "a multicast address"),
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal_reason(address: IPAddress | str) -> str | None:
    """Why `address` is not a public address a fetch may go to, or None when it is. No network involved."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip if ip.scope_id is None else ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:  # the IPv4 address these forms reach is what counts
            why = refusal_reason(embedded)
            return None if why is None else f"{why}, written as the IPv6 address {ip}"
        table: list = _V6_REFUSED
    else:
        table = _V4_REFUSED
    for network, why in table:
        if ip in network:
            return why
    if not ip.is_global:  # whatever else the standard library knows as not globally reachable
        return "not a public address"
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL's host names by itself, read as the C library reads it (so `2130706433`, `127.1`,
    `0x7f.1` and `017700000001` are 127.0.0.1), or None for a name that needs DNS."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):  # inet_aton's forms: decimal, octal, hex, 1 to 4 parts
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for `host` (the default; tests pass their own)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# --- results and errors ----------------------------------------------------------------------------------

class WebFetchError(Exception):
    """A fetch that was refused or failed: an HTTP status for the API, a code, and a message a person can act on."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class WebPage:
    url: str  # as asked for
    final_url: str  # after redirects
    title: str
    text: str  # the main text as Markdown (HTML), or the body as it is (plain text, JSON, XML)
    links: list[dict[str, str]] = field(default_factory=list)  # [{"text", "url"}], absolute, at most MAX_LINKS
    truncated: bool = False  # text cut at max_chars, or the body at max_bytes
    content_type: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the fetcher ----------------------------------------------------------------------------------------

HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "application/x-javascript",
              "application/ecmascript", "application/x-ndjson", "application/yaml", "application/x-yaml",
              "application/toml", "application/x-sh")


@dataclass
class _Target:
    url: httpx.URL  # what was asked for (the name)
    host: str  # the name as resolved (IDNA ASCII) or the literal
    port: int
    addresses: list[IPAddress]


class WebFetcher:
    """Fetches one page per `fetch()`. `allow_private` lifts the address policy (GLMWorkbench's
    `web_fetch_allow_private`); `allow_hosts` lifts it for the named hosts only (tests; an intranet host)."""

    def __init__(self, *, allow_private: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_redirects: int = MAX_REDIRECTS,
                 resolver: Resolver = system_resolver, transport: httpx.BaseTransport | None = None,
                 allow_hosts: Iterable[str] = ()) -> None:
        if timeout <= 0 or max_bytes <= 0 or max_redirects < 0:
            raise ValueError("web_fetch needs a positive timeout and max_bytes and max_redirects >= 0")
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.resolver = resolver
        self.transport = transport
        self.allow_hosts = frozenset(host.lower().rstrip(".") for host in allow_hosts)

    # -- public --
    def fetch(self, url: str, max_chars: int = DEFAULT_MAX_CHARS) -> WebPage:
        if not isinstance(max_chars, int) or isinstance(max_chars, bool) or not 1 <= max_chars <= MAX_CHARS_LIMIT:
            raise WebFetchError(400, f"max_chars must be a whole number from 1 to {MAX_CHARS_LIMIT:,}, got "
                                     f"{max_chars!r}", "web_fetch_bad_request")
        deadline = time.monotonic() + self.timeout
        current = self._parse(url)
        for _ in range(self.max_redirects + 1):
            target = self._vet(current, deadline)
            # A client per hop: a connection (and its TLS session, checked for one name) is never reused for
            # another name that happens to share the address, and no cookie follows a redirect.
            with self._client() as client:
                response = self._send(client, target, deadline)
                try:
                    location = response.headers.get("location")
                    if response.is_redirect and location:
                        try:
                            current = self._parse(str(current.join(location.strip())), redirected_from=current)
                        except httpx.InvalidURL as exc:
                            raise WebFetchError(502, f"{current} redirects to an unreadable address "
                                                     f"{location!r} ({exc})", "web_fetch_bad_redirect") from None
                        continue
                    if response.status_code >= 400:
                        raise WebFetchError(502, f"{current} answered {response.status_code} "
                                                 f"{response.reason_phrase}", "web_fetch_http_error")
                    kind, content_type = self._kind(response, current)
                    body, cut = self._read(response, current, deadline)
                finally:
                    response.close()
            if kind is None:  # no Content-Type: decide by the bytes
                kind = _sniff(body, current)
            return _page(url, str(current), content_type, kind, body, response.charset_encoding, cut, max_chars)
        raise WebFetchError(502, f"{url} redirected more than {self.max_redirects} times (last to {current}); "
                                 "open the final address directly", "web_fetch_too_many_redirects")

    # -- steps --
    def _client(self) -> httpx.Client:
        # trust_env=False: no proxy from the environment (it would resolve names itself, past the check)
        return httpx.Client(transport=self.transport, trust_env=False, follow_redirects=False,
                            headers={"User-Agent": USER_AGENT, "Accept": "text/html,application/xhtml+xml,"
                                     "text/plain;q=0.9,application/json;q=0.8,*/*;q=0.5"})

    def _parse(self, url: str, redirected_from: httpx.URL | None = None) -> httpx.URL:
        where = f" (a redirect from {redirected_from})" if redirected_from is not None else ""
        if not isinstance(url, str) or not url.strip():
            raise WebFetchError(400, "url must be a non-empty string such as https://example.org/page",
                                "web_fetch_bad_url")
        try:
            parsed = httpx.URL(url.strip())
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise WebFetchError(400, f"{url!r}{where} is not a URL ({exc})", "web_fetch_bad_url") from None
        if parsed.scheme not in ("http", "https"):
            scheme = parsed.scheme or "no scheme"
            raise WebFetchError(400, f"{url!r}{where}: web_fetch reads http and https URLs only, not {scheme}",
                                "web_fetch_bad_scheme")
        if not parsed.host:
            raise WebFetchError(400, f"{url!r}{where} names no host", "web_fetch_bad_url")
        return parsed.copy_with(fragment=None)

    def _vet(self, url: httpx.URL, deadline: float) -> _Target:
        """The addresses `url` may be fetched from: resolved once, every one checked."""
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        literal = parse_ip_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            # The system resolver has no timeout of its own: it runs in a thread the deadline can walk away from.
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web_fetch-resolve")
            try:
                found = list(pool.submit(self.resolver, host, port).result(max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                raise self._timeout(url) from None
            except (OSError, UnicodeError) as exc:
                raise WebFetchError(502, f"cannot resolve {host} ({exc}): check the address",
                                    "web_fetch_unresolved") from None
            finally:
                pool.shutdown(wait=False)
            try:
                addresses = list(dict.fromkeys(ipaddress.ip_address(str(a).split("%", 1)[0]) for a in found))
            except ValueError as exc:
                raise WebFetchError(502, f"the resolver gave no address for {host} ({exc})",
                                    "web_fetch_unresolved") from None
            if not addresses:
                raise WebFetchError(502, f"{host} resolves to no address", "web_fetch_unresolved")
        if not (self.allow_private or host.lower().rstrip(".") in self.allow_hosts):
            for address in addresses:  # one refused address refuses the name: no picking around it
                why = refusal_reason(address)
                if why is not None:
                    named = f"{host} resolves to {address}, " if literal is None else f"{address} is "
                    raise WebFetchError(403, f"refused to fetch {url}: {named}{why}. web_fetch reads public "
                                             "addresses only; a server administrator can allow private ones "
                                             "with GLMWorkbench.web_fetch_allow_private = True",
                                        "web_fetch_refused_address")
        return _Target(url=url, host=host, port=port, addresses=addresses)

    def _send(self, client: httpx.Client, target: _Target, deadline: float) -> httpx.Response:
        """GET the target from its vetted addresses (in order, the next one if a connect fails)."""
        url = target.url
        host_header = f"[{target.host}]" if ":" in target.host else target.host
        if url.port is not None:
            host_header += f":{url.port}"
        last_error: Exception | None = None
        for address in target.addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            request = client.build_request(
                "GET", url.copy_with(host=str(address)), headers={"Host": host_header},
                timeout=httpx.Timeout(remaining),
                # TLS: the certificate is checked against the name, not the address the request goes to
                extensions={"sni_hostname": target.host} if url.scheme == "https" else None)
            try:
                return client.send(request, stream=True)
            except httpx.TimeoutException:
                raise self._timeout(url) from None
            except httpx.ConnectError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "SSL" in str(exc):  # the same at every address
                    raise WebFetchError(502, f"{url}: the server's TLS certificate could not be verified for "
                                             f"{target.host} ({exc})", "web_fetch_tls_error") from None
                last_error = exc
            except httpx.HTTPError as exc:
                raise WebFetchError(502, f"fetching {url} failed ({type(exc).__name__}: {exc})",
                                    "web_fetch_failed") from None
        if last_error is None:
            raise self._timeout(url)
        raise WebFetchError(502, f"cannot connect to {url} ({last_error})", "web_fetch_unreachable")

    def _timeout(self, url: httpx.URL) -> WebFetchError:
        return WebFetchError(504, f"fetching {url} took longer than {self.timeout:g} s (the web_fetch timeout, "
                                  "GLMWorkbench.web_fetch_timeout)", "web_fetch_timeout")

    def _kind(self, response: httpx.Response, url: httpx.URL) -> tuple[str | None, str]:
        """"html", "text", or None (no Content-Type: sniffed later); anything else is refused here, unread."""
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not content_type:
            return None, ""
        if content_type in HTML_TYPES:
            return "html", content_type
        if (content_type.startswith("text/") or content_type in TEXT_TYPES
                or content_type.endswith(("+json", "+xml"))):
            return "text", content_type
        what = {"application/pdf": "a PDF"}.get(content_type) or (
            f"{content_type.split('/')[0]} ({content_type})" if content_type.startswith(("image/", "audio/",
                                                                                          "video/", "font/"))
            else f"binary content ({content_type})")
        raise WebFetchError(415, f"{url} is {what}: web_fetch reads HTML and text pages only. Download it in a "
                                 "notebook cell to work with it.", "web_fetch_unsupported_content")

    def _read(self, response: httpx.Response, url: httpx.URL, deadline: float) -> tuple[bytes, bool]:
        """The body, at most max_bytes of it (decompressed), and whether it was cut there."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes and "content-encoding" not in response.headers:
            raise WebFetchError(502, f"{url} is {int(declared):,} bytes, more than web_fetch reads "
                                     f"({self.max_bytes:,} bytes, GLMWorkbench.web_fetch_max_bytes)",
                                "web_fetch_too_large")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= self.max_bytes:
                    return b"".join(chunks)[: self.max_bytes], True
                if time.monotonic() > deadline:
                    raise self._timeout(url)
        except httpx.TimeoutException:
            raise self._timeout(url) from None
        except httpx.HTTPError as exc:
            raise WebFetchError(502, f"reading {url} failed ({type(exc).__name__}: {exc})",
                                "web_fetch_failed") from None
        return b"".join(chunks), False


# --- turning the body into text -------------------------------------------------------------------------

# Not content: dropped before the main text is looked for (links are collected before this).
_NOT_CONTENT = ("head", "title", "script", "style", "noscript", "template", "svg", "canvas", "iframe", "object",
                "embed", "form", "button", "select", "input", "textarea", "nav", "aside", "dialog")


def _sniff(body: bytes, url: httpx.URL) -> str:
    head = body[:2048].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<body" in head or b"<head" in head:
        return "html"
    if b"\x00" not in body[:8192]:
        try:
            body[:8192].decode("utf-8")
            return "text"
        except UnicodeDecodeError as exc:
            if exc.start > 8188:  # a character cut at the sample's end
                return "text"
    raise WebFetchError(415, f"{url} has no Content-Type and is not text: web_fetch reads HTML and text pages "
                             "only", "web_fetch_unsupported_content")


def _page(url: str, final_url: str, content_type: str, kind: str, body: bytes, charset: str | None, cut: bool,
          max_chars: int) -> WebPage:
    pruned = False
    if kind == "html":
        title, text, links, pruned = html_to_markdown(body, final_url, charset, max_chars)
    else:
        title, text, links = "", _decode(body, charset), []
    text, shortened = _shorten(text, max_chars)
    return WebPage(url=url, final_url=final_url, title=title, text=text, links=links,
                   truncated=cut or pruned or shortened, content_type=content_type or kind)


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def _shorten(text: str, max_chars: int) -> tuple[str, bool]:
    if len(text) <= max_chars:
        return text, False
    cut = text[:max_chars]
    newline = cut.rfind("\n")
    if newline > max_chars * 0.8:  # end on a whole line when one ends near the limit
        cut = cut[:newline]
    return cut.rstrip(), True


def html_to_markdown(body: bytes | str, base_url: str, charset: str | None = None, max_chars: int | None = None
                     ) -> tuple[str, str, list[dict[str, str]], bool]:
    """(title, main text as Markdown, links, whether text past `max_chars` was dropped) of an HTML document."""
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(body, "html.parser", from_encoding=charset if isinstance(body, bytes) else None)
    base = soup.find("base", href=True)
    base_url = urljoin(base_url, base["href"]) if base is not None else base_url
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if title_tag is not None else ""

    links: list[dict[str, str]] = []
    seen: set[str] = set()
    for anchor in soup.find_all("a", href=True):
        href = urljoin(base_url, anchor["href"].strip())
        if not href.startswith(("http://", "https://")):
            del anchor["href"]  # javascript:, mailto:, ... stay text
            continue
        anchor["href"] = href
        if "#" in href and href.split("#", 1)[0] == base_url.split("#", 1)[0]:
            continue  # a jump within this page
        if href not in seen and len(links) < MAX_LINKS:
            seen.add(href)
            links.append({"text": " ".join(anchor.get_text().split())[:LINK_TEXT_CHARS], "url": href})

    for tag in soup.find_all(_NOT_CONTENT):
        tag.decompose()
    root = soup.find("main") or soup.find(attrs={"role": "main"}) or soup.find("article") or soup.body or soup
    if root is soup.body or root is soup:  # the whole body: the site's header and footer are not the page
        for tag in root.find_all(["header", "footer"]):
            tag.decompose()
    if not title:
        heading = root.find("h1")
        title = " ".join(heading.get_text().split()) if heading is not None else ""
    # Only what can be handed back is converted: a long page's tail is dropped first (converting a whole book
    # to Markdown takes seconds; its first max_chars need a fraction of that).
    pruned = max_chars is not None and _prune(root, 2 * max_chars + 1000)
    text = MarkdownConverter(heading_style="ATX", bullets="-", strip=["img"]).convert_soup(root)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return title, text, links, pruned


def _prune(root: Any, budget: int) -> bool:
    """Drop everything after the text node where `root`'s text passes `budget` characters; True if any was."""
    from bs4 import NavigableString

    seen = 0
    for node in root.descendants:
        if isinstance(node, NavigableString):
            seen += len(node)
            if seen > budget:
                break
    else:
        return False
    dropped = False
    while node is not None and node is not root:  # the later siblings of the node and of each of its parents
        for later in list(node.next_siblings):
            later.extract()
            dropped = True
        node = node.parent
    return dropped

