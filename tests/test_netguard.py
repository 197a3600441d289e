"""The suite's network guard (netguard/sitecustomize.py): refusals happen before anything is sent (the real
connect and resolver are replaced by recorders here, so even a broken guard sends nothing), loopback still
works, and Python subprocesses the tests start carry the guard."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import sitecustomize as netguard

pytestmark = pytest.mark.netguard_expected  # these tests trip the guard on purpose

OUTSIDE = ("192.0.2.1", 9)  # TEST-NET-1 (RFC 5737): never routed; and never reached, see the recorders


@pytest.fixture
def recorders(monkeypatch):
    """The guard's pass-through calls replaced: what would really have gone out is recorded, not sent."""
    sent: list = []

    def fake(*args, **kwargs):
        sent.append(args)
        raise AssertionError("the guard let a non-loopback call through")
    for name in ("_real_connect", "_real_connect_ex", "_real_sendto", "_real_getaddrinfo"):
        monkeypatch.setattr(netguard, name, fake)
    return sent


@pytest.mark.parametrize("address", [OUTSIDE, ("2001:db8::1", 9), ("::ffff:192.0.2.1", 9), ("10.0.0.1", 80)])
def test_connections_outside_loopback_are_refused(recorders, address):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    before = len(netguard.violations)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        with pytest.raises(PermissionError, match="network guard"):
            s.connect(address)
        with pytest.raises(PermissionError, match="network guard"):
            s.connect_ex(address)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        with pytest.raises(PermissionError, match="network guard"):
            s.sendto(b"x", address)
    assert recorders == [] and len(netguard.violations) == before + 3


def test_name_lookups_outside_are_refused_without_asking_a_resolver(recorders):
    for name in ("example.com", b"huggingface.co", "localhost.example.com"):
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(name, 443)
    with pytest.raises(OSError):  # httpx / urllib go through create_connection → getaddrinfo
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert recorders == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "::ffff:127.0.0.1", "", "0.0.0.0"])
def test_local_addresses_are_allowed(host):
    assert netguard.is_local_host(host)


@pytest.mark.parametrize("host", ["192.0.2.1", "8.8.8.8", "::ffff:8.8.8.8", "2001:db8::1", "example.com",
                                  "127.0.0.1.example.com"])
def test_other_addresses_are_not(host):
    assert not netguard.is_local_host(host)


def test_loopback_traffic_still_flows():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(server.accept()[0].recv(5)))
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"hello")
        t.join(5)
    assert got == [b"hello"]


def test_subprocesses_carry_the_guard_and_report_to_the_suite(tmp_path):
    """A child Python sees the guard (sitecustomize on PYTHONPATH) and logs what it refused to the file
    conftest checks after each test; its real connect is replaced first, so nothing leaves either way."""
    code = ("import socket, sitecustomize as g\n"
            "def fake(*a): raise SystemExit('the guard let a non-loopback connect through')\n"
            "g._real_connect = fake\n"
            "try:\n"
            f"    socket.create_connection({OUTSIDE!r}, timeout=1)\n"
            "except PermissionError as e:\n"
            "    print('refused:', e)\n")
    log = tmp_path / "log"
    env = {**os.environ, netguard.LOG_ENV: str(log)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "refused: network guard" in out.stdout
    assert "192.0.2.1" in log.read_text()


def test_a_test_that_swallows_the_refusal_still_fails(tmp_path):
    """conftest's check after each test: the refusal was caught by the code under test, the test fails anyway."""
    (tmp_path / "test_leak.py").write_text(
        "import socket, sitecustomize as g\n"
        "def test_leak():\n"
        "    def fake(*a): raise AssertionError('sent')\n"
        "    g._real_connect = fake\n"
        "    try:\n"
        f"        socket.create_connection({OUTSIDE!r}, timeout=1)\n"
        "    except OSError:\n"
        "        pass\n")
    here = os.path.dirname(__file__)
    env = {**os.environ, netguard.LOG_ENV: str(tmp_path / "log"),
           "PYTHONPATH": os.pathsep.join([here, os.path.join(here, "netguard")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_leak.py")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "network access outside loopback" in out.stdout and "192.0.2.1" in out.stdout
