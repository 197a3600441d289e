"""Fetching an image or video by http(s) URL, never from this machine's or its network's private addresses.

A server that fetches URLs for its clients can be made to read what only it can reach (its loopback, the
LAN, a cloud metadata service): server-side request forgery. So, unless private addresses are allowed
(`serve --allow-private-media`), every address the URL's host resolves to must be a public one. The check
runs where the connection is made, on the very addresses it then connects to (one resolution: a name that
answers a public address to a first lookup and a private one to a second, DNS rebinding, gains nothing),
and so again for every redirect. Loopback, private, link-local (169.254.0.0/16: cloud metadata), shared,
reserved, multicast and unspecified addresses are refused. In that mode no proxy is used: a proxy would
resolve the name itself, out of reach of the check.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

_resolve = socket.getaddrinfo  # tests stub this: they never send traffic to another address


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return addr.is_global and not addr.is_multicast


class RefusedAddress(OSError):
    """The host resolves to an address media may not be fetched from."""


def _checked(host: str, port: int | None) -> list[tuple[Any, ...]]:
    """`getaddrinfo` results for host:port, all public, else RefusedAddress naming the first that is not."""
    try:
        infos = _resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise RefusedAddress(f"cannot resolve {host} ({e})") from None
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not _public(addr):
            raise RefusedAddress(f"{host} is a private address ({addr}): start the server with "
                                 "--allow-private-media to allow it")
    return list(infos)


def private_reason(url: str) -> str | None:
    """Why `url` may not be fetched (its host is or resolves to a non-public address), or None."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return "the URL names no host"
    try:
        _checked(host, None)
    except RefusedAddress as e:
        return str(e)
    return None


def _connect_public(address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore
                    source_address: Any = None, **_: Any) -> socket.socket:
    """`socket.create_connection` that connects only to the public addresses it checked itself."""
    error: OSError | None = None
    for family, kind, proto, _name, sockaddr in _checked(*address):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"no address to connect to for {address[0]}")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an http(s) URL that passes the same check (urllib would follow ftp too)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        why = private_reason(newurl)
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            why = "only http and https URLs are fetched"
        if why is not None:
            raise urllib.error.URLError(f"redirected to a refused address: {why}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _PublicHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._create_connection = _connect_public


class _PublicHTTPSConnection(http.client.HTTPSConnection):  # TLS and its name check still use the host name
    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._create_connection = _connect_public


class _PublicHTTP(urllib.request.HTTPHandler):
    def http_open(self, req: Any) -> Any:
        return self.do_open(_PublicHTTPConnection, req)


class _PublicHTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req: Any) -> Any:
        return self.do_open(_PublicHTTPSConnection, req, context=self._context)  # type: ignore[attr-defined]


def fetch(url: str, max_bytes: int, kind: str, allow_private: bool = False) -> bytes:
    """The body at `url` (at most max_bytes, else ValueError); ValueError for a refused or failed fetch."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"cannot fetch {kind} from {url}: only http and https URLs are fetched")
    if not allow_private and (why := private_reason(url)) is not None:  # the clear message, before any socket
        raise ValueError(f"cannot fetch {kind} from {url}: {why}")
    handlers = [] if allow_private else [urllib.request.ProxyHandler({}), _CheckedRedirects(), _PublicHTTP(),
                                         _PublicHTTPS()]
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=30) as r:
            data = r.read(max_bytes + 1)
    except OSError as e:  # URLError is one; so is RefusedAddress (a redirect or a second answer of the name)
        reason = getattr(e, "reason", e)
        raise ValueError(f"cannot fetch {kind} from {url}: {reason}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{kind} at {url} is larger than {max_bytes} bytes")
    return data
