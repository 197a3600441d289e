"""Fetching an image or video by http(s) URL, never from this machine's or its network's private addresses.

A server that fetches URLs for its clients can be made to read what only it can reach (its loopback, the
LAN, a cloud metadata service): server-side request forgery. So, unless private addresses are allowed
(`serve --allow-private-media`), every address the URL's host resolves to must be a public one — checked
before connecting and again for every redirect. Loopback, private, link-local (169.254.0.0/16: cloud
metadata), shared, reserved, multicast and unspecified addresses are refused.
"""
from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

_resolve = socket.getaddrinfo  # tests stub this: they never send traffic to another address


def private_reason(url: str) -> str | None:
    """Why `url` may not be fetched (its host is or resolves to a non-public address), or None."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return "the URL names no host"
    try:
        infos = _resolve(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        return f"cannot resolve {host} ({e})"
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not addr.is_global or addr.is_multicast:
            return f"{host} is a private address ({addr}): start the server with --allow-private-media to allow it"
    return None


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that passes the same check."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        why = private_reason(newurl)
        if why is not None:
            raise urllib.error.URLError(f"redirected to a refused address: {why}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, max_bytes: int, kind: str, allow_private: bool = False) -> bytes:
    """The body at `url` (at most max_bytes, else ValueError); ValueError for a refused or failed fetch."""
    if not allow_private and (why := private_reason(url)) is not None:
        raise ValueError(f"cannot fetch {kind} from {url}: {why}")
    handlers = [] if allow_private else [_CheckedRedirects()]
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=30) as r:
            data = r.read(max_bytes + 1)
    except OSError as e:  # URLError is one
        raise ValueError(f"cannot fetch {kind} from {url}: {e}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{kind} at {url} is larger than {max_bytes} bytes")
    return data
