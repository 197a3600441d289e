"""The test suite's network guard: no test may reach an address that is not loopback.

Installed in the pytest process by conftest.py and, because this folder is put on PYTHONPATH under the name
`sitecustomize`, in every Python process a test starts (servers, CLI runs). A connection, datagram or name
lookup for anything but 127.0.0.0/8, ::1, localhost or this host's own name is refused *before* it leaves
the process (PermissionError / socket.gaierror) and written to the file named by $DELTARUN_NETGUARD_LOG,
which conftest reads after every test: the test that made it fails, even if the code caught the error.
What is not here: Chromium (not Python) is started with its background networking switched off.
"""
from __future__ import annotations

import ipaddress
import os
import socket

LOG_ENV = "DELTARUN_NETGUARD_LOG"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# the calls the guard lets through (tests replace these with recorders to prove nothing is sent)
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo
violations: list[str] = []


def _ip(host) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` (str or bytes, maybe [bracketed] or with a %zone) as an address; None for a name."""
    text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def is_local_host(host) -> bool:
    """Whether `host` (an address or a name, str or bytes) is this machine: loopback, unspecified (which
    Linux routes to itself), localhost or the host's own name. Names are never resolved here."""
    if host is None:
        return True
    name = (host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)).lower()
    if name == "" or name in _LOCAL_NAMES or name == socket.gethostname().lower():
        return True
    ip = _ip(host)
    if ip is None:
        return False  # a name that is not ours: its lookup alone would ask a DNS server
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or ip.is_unspecified or bool(mapped and (mapped.is_loopback or mapped.is_unspecified))


def _allowed(sock: socket.socket, address) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return True  # AF_UNIX paths, netlink: never leave the machine
    return is_local_host(address[0])


def _refuse(what: str) -> str:
    msg = f"network guard: {what} refused (tests may only reach 127.0.0.0/8 and ::1)"
    violations.append(msg)
    path = os.environ.get(LOG_ENV)
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"[pid {os.getpid()}] {msg}\n")
        except OSError:
            pass
    return msg


def _connect(self, address):
    if not _allowed(self, address):
        raise PermissionError(_refuse(f"connect to {address!r}"))
    return _real_connect(self, address)


def _connect_ex(self, address):
    if not _allowed(self, address):
        raise PermissionError(_refuse(f"connect to {address!r}"))
    return _real_connect_ex(self, address)


def _sendto(self, data, *args):
    address = args[-1] if args else None
    if not _allowed(self, address):
        raise PermissionError(_refuse(f"datagram to {address!r}"))
    return _real_sendto(self, data, *args)


def _getaddrinfo(host, *args, **kwargs):
    if not (is_local_host(host) or _ip(host) is not None):  # a numeric address asks no resolver; connect checks it
        _refuse(f"name lookup of {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, f"network guard: lookup of {host!r} refused")
    return _real_getaddrinfo(host, *args, **kwargs)


def install() -> None:
    """Patch the socket module (idempotent)."""
    if getattr(socket.socket.connect, "__name__", "") == "_connect":
        return
    # module-level names the guard calls through are looked up at call time: tests may swap them
    socket.socket.connect = lambda self, a: _connect(self, a)
    socket.socket.connect.__name__ = "_connect"
    socket.socket.connect_ex = lambda self, a: _connect_ex(self, a)
    socket.socket.sendto = lambda self, data, *a: _sendto(self, data, *a)
    socket.getaddrinfo = lambda host, *a, **k: _getaddrinfo(host, *a, **k)


if os.environ.get(LOG_ENV):
    install()
