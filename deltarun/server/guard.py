"""What every request passes before any route sees it: the Host and Origin rules, the body's type and size.

The server is reachable by every web page its user opens, so (as Ollama does):
- Host: bound to a loopback address, only loopback names (localhost, 127.0.0.1, [::1]) and this machine's
  own name are accepted; bound to another address, also that address, any IP literal when bound to all
  interfaces (0.0.0.0 / ::), and the names of `--allowed-hosts` / $DELTARUN_ALLOWED_HOSTS ("*" = any).
  A page that rebinds its own domain name to 127.0.0.1 (DNS rebinding) sends its domain as Host: 403.
- Origin: a browser's request other than GET/HEAD/OPTIONS is refused (403) unless it comes from the
  server's own page (Origin = this Host) or a `--cors` origin. Clients that are not browsers send none.
- Body type: a JSON body is accepted with no Content-Type, application/json, text/plain or
  application/x-www-form-urlencoded (what `curl -d` sends, as in Ollama's docs); multipart → 415. Those
  types make a cross-site POST a CORS "simple request" with no preflight: the Origin rule covers them.
- Body size: at most `max_body` bytes, checked against Content-Length and while a chunked body streams
  in: 413 without reading the rest.
Refusals use the error body of the API that was called (errors.py).
"""
from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
JSON_ALIASES = {"", "text/plain", "application/x-www-form-urlencoded"}  # read as JSON


def host_name(value: str) -> str:
    """The name in a Host header or an authority, without port or IPv6 brackets, lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(name: str) -> bool:
    """Whether a host name (as `host_name` gives it) is this machine's loopback."""
    return name in LOOPBACK_NAMES or (_is_ip(name) and ipaddress.ip_address(name).is_loopback)


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> Callable[[str], bool]:
    """The Host rule for a server bound to `bind`: name → accepted."""
    own = {n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n}
    own |= {f"{n}.local" for n in own if "." not in n}
    names = {host_name(h) for h in extra if h.strip()}
    names |= {host_name(h) for h in os.environ.get("DELTARUN_ALLOWED_HOSTS", "").split(",") if h.strip()}
    bind = host_name(bind)
    everywhere = bind in ("0.0.0.0", "::", "")

    def ok(name: str) -> bool:
        if "*" in names or is_loopback(name) or name in own or name in names:
            return True
        if is_loopback(bind):
            return False
        return name == bind or (everywhere and _is_ip(name))
    return ok


class Guard:
    """ASGI middleware applying the rules above to every HTTP request."""

    def __init__(self, app: ASGIApp, *, host_ok: Callable[[str], bool] | None, cors: Iterable[str] = (),
                 max_body: int):
        self.app, self.host_ok, self.max_body = app, host_ok, max_body
        self.cors = {o.rstrip("/").lower() for o in cors}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await error_response(Request(scope), *refusal)(scope, receive, send)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE") and ctype in JSON_ALIASES:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        if "content-length" in headers or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # no length given (chunked): read up to the cap first, refuse beyond it without reading the rest
        held: list[Message] = []
        size = 0
        while True:
            msg = await receive()
            held.append(msg)
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > self.max_body:
                return await error_response(Request(scope), 413,
                                            f"request body larger than {self.max_body} bytes")(scope, receive, send)
            if not msg.get("more_body", False):
                break

        async def replay() -> Message:
            return held.pop(0) if held else await receive()
        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        if self.host_ok is not None and not self.host_ok(host_name(headers.get("host", ""))):
            return 403, "this server does not answer to that Host name (see --allowed-hosts)"
        origin = headers.get("origin")
        if origin is not None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            own = {f"{s}://{headers.get('host', '').lower()}" for s in ("http", "https")}
            if origin.rstrip("/").lower() not in own | self.cors:
                return 403, "cross-site request refused: this origin is not allowed (see --cors)"
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("multipart/"):
            return 415, "multipart bodies are not accepted: send JSON"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"request body larger than {self.max_body} bytes"
        return None

