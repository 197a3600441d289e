"""The OpenAI Batch file format, and running one line through the server's own routes.

Input lines: `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}`. Output lines: `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}` for every request the API answered (a 400 included, as OpenAI writes it), and
`{"id", "custom_id", "response": null, "error": {"code", "message"}}` for a line that is not a request
(bad JSON, wrong url or method, `body.model` naming another model): a bad line becomes an error line, never a
lost one. A line without a custom_id gets `line-<hash of its text>`, the same in every run and mode.

`LineRunner` answers a line with the very FastAPI app of `deltarun serve` (server/app.py) called in-process
(httpx's ASGI transport: no socket), so batch bodies mean exactly what they mean to the server.
`done_ids` reads what an earlier run already wrote (resuming), cutting a last line left half written.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class BatchLine:
    custom_id: str
    url: str
    body: dict[str, Any]


def line_id(raw: str) -> str:
    return "line-" + hashlib.sha1(raw.strip().encode()).hexdigest()[:16]


def parse_line(raw: str, model: str) -> BatchLine | dict[str, Any]:
    """A request to run, or the error line that answers it. `model`: the served name (body.model may be it,
    or be absent)."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return error_line(line_id(raw), "invalid_json", f"the line is not JSON: {e}")
    if not isinstance(obj, dict):
        return error_line(line_id(raw), "invalid_request", "the line is not a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return error_line(line_id(raw), "missing_custom_id", "custom_id (a non-empty string) is required")
    if str(obj.get("method", "POST")).upper() != "POST":
        return error_line(cid, "invalid_method", f"method must be POST, not {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        return error_line(cid, "invalid_url", f"url must be one of {', '.join(URLS)}, not {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return error_line(cid, "invalid_body", "body must be a JSON object")
    if body.get("model") not in (None, model):
        return error_line(cid, "model_mismatch", f"body.model is {body.get('model')!r} but this batch runs {model!r}")
    return BatchLine(cid, url, {**body, "model": model, "stream": False})


def error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def response_line(custom_id: str, status: int, body: Any) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def generated_tokens(line: dict[str, Any]) -> int:
    """completion_tokens of an output line (0 for errors): what the progress bar counts."""
    body = (line.get("response") or {}).get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    return int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0


def done_ids(out: Path) -> set[str]:
    """custom_ids already answered in `out` (created empty if missing); a half-written last line (the run was
    killed mid-write) is cut off, so it runs again."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with out.open("r+b") as f:
            f.truncate(end)
    ids = set()
    for raw in data[:end].splitlines():
        try:
            ids.add(json.loads(raw)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def input_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of the input, read as they are needed."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for raw in f:
            if raw.strip():
                yield raw


class LineRunner:
    """Runs batch lines through `deltarun serve`'s app over one loaded model, in this process."""

    def __init__(self, llm: Any, name: str, default_thinking: bool | None = None):
        import httpx

        from ..server import create_app

        # no Host rule (no socket), no 429s (the caller bounds the lines in flight); --think/--no-think as serve's
        self.app = create_app(llm, name, host=None, max_queued_requests=None, default_thinking=default_thinking)
        self.llm, self.name = llm, name
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://deltarun",
                                      timeout=None)

    async def run(self, raw: str) -> dict[str, Any]:
        line = parse_line(raw, self.name)
        if isinstance(line, dict):
            return line
        r = await self.http.post(line.url, json=line.body)
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text}}
        return response_line(line.custom_id, r.status_code, body)

    async def close(self) -> None:
        await self.http.aclose()
