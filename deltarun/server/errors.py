"""The server's errors: `APIError` (raised by routes) and the error body of the API that was called
(OpenAI: `{"error": {"message", "type", "param", "code"}}`, Ollama: `{"error": "message"}`); an internal
error's message (a request id; the details go to the server log); and `guard_stream`, which ends a stream
that fails midway with an error event in its API's shape (after the 200 went out, no status can)."""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .metrics import METRICS

log = logging.getLogger("deltarun.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers  # e.g. Retry-After on a 429


def _is_ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    METRICS.error()
    if _is_ollama(request):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(loc)
    return (f"{where}: {e.get('msg')}" if where else str(e.get("msg"))), (where or None)


def internal_error(exc: BaseException, where: str) -> str:
    """Log `exc` (with its traceback) under a new request id; the client gets only the id, as exception
    text can name server paths."""
    rid = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s", rid, where, exc_info=exc)
    return f"internal error (request id {rid}; details in the server log)"


def openai_stream_error(message: str) -> str:
    """An OpenAI SSE error event (the official clients raise it), then the end of the stream."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


def ollama_stream_error(message: str) -> str:
    """An Ollama NDJSON error line (Ollama's own clients raise it)."""
    return json.dumps({"error": message}) + "\n"


async def guard_stream(request: Request, body: AsyncIterator[str],
                       render: Callable[[str], str]) -> AsyncIterator[str]:
    """`body`'s chunks; if it raises midway, one last chunk `render(message)` saying "internal error" with a
    request id. A client going away (cancellation) is not an error and passes through."""
    try:
        async with aclosing(body) as chunks:  # type: ignore[type-var]  # routes type their generators loosely
            async for chunk in chunks:
                yield chunk
    except Exception as exc:
        METRICS.error()
        yield render(internal_error(exc, f"{request.method} {request.url.path} (streaming)"))
