"""A live deltarun server on a free localhost port for the server tests (one per checkpoint and options)."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

_SERVERS: dict[Any, "Live"] = {}
_LLMS: dict[str, Any] = {}


@dataclass
class Live:
    url: str
    llm: Any
    server: Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_llm(ckpt) -> Any:
    from deltarun.async_llm import AsyncLLM

    key = str(ckpt)
    if key not in _LLMS:
        _LLMS[key] = AsyncLLM(key, dtype="float32", device="cpu")
    return _LLMS[key]


def live_server(ckpt, **app_kwargs) -> Live:
    """Start (once per session and options) uvicorn in a thread serving `ckpt` as model "tiny"."""
    import uvicorn

    from deltarun.server import create_app

    key = (str(ckpt), tuple(sorted((k, repr(v)) for k, v in app_kwargs.items())))
    if key not in _SERVERS:
        llm = shared_llm(ckpt)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(llm, "tiny", **app_kwargs), host="127.0.0.1",
                                               port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.time() + 30
        while not server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        _SERVERS[key] = Live(f"http://127.0.0.1:{port}", llm, server)
    return _SERVERS[key]


def wait_idle(llm, timeout: float = 10.0) -> bool:
    """True once the engine has no request left (aborts are asynchronous)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not llm.engine.has_unfinished():
            return True
        time.sleep(0.05)
    return False


def scripted(monkeypatch, pieces: list[str], finish: str = "stop") -> None:
    """Make the server's engine "generate" `pieces` (random weights never write a tool call): the
    HTTP, parsing and streaming layers run for real on crafted model output."""
    from deltarun.outputs import StreamDelta
    from deltarun.server import streaming

    async def fake_run_request(llm, req, deadline=None):
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            for tr in req.tracks:
                tr.token_ids.append(1)
                tr.text += piece
                tr.finish_reason = finish if last else None
            yield [StreamDelta(j, piece, [1], finish if last else None) for j in range(len(req.tracks))]

    monkeypatch.setattr(streaming, "run_request", fake_run_request)
