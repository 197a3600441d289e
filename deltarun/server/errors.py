"""The server's errors: `APIError` (raised by routes) and the error body of the API that was called
(OpenAI: `{"error": {"message", "type", "param", "code"}}`, Ollama: `{"error": "message"}`, Anthropic's
Messages routes: `{"type": "error", "error": {"type", "message"}}`), chosen by the request's path so that
the middleware's refusals (guard.py, the API key) come in the caller's shape too; also sent as a stream's
last event when it fails midway (streaming.with_error_event); and an internal error's message (a request
id; the details go to the server log)."""
from __future__ import annotations

import logging
import re
import uuid

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


def _is_anthropic(request: Request) -> bool:
    path = request.url.path
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Anthropic's error types by status (its docs' list; 408 and 415 are this server's own statuses)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                    413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
                    529: "overloaded_error", 503: "overloaded_error"}


def error_body(request: Request, status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """The error in the shape of the API that was called (also what a stream sends when it fails)."""
    METRICS.error()
    if _is_ollama(request):
        return {"error": message}
    if _is_anthropic(request):
        kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = {401: "authentication_error", 404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(request, status, message, param, code), status_code=status, headers=headers)


def internal_error(request: Request, exc: BaseException) -> str:
    """Log a bug with its traceback under a fresh request id; the client gets the id only (exception text
    can name server paths)."""
    rid = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", rid, request.method, request.url.path, exc_info=exc)
    return f"internal error (request id {rid}; details in the server log)"


# the names pydantic gives the members of a union in an error's location ("prompt.list[constrained-str]"):
# the client sent a field, not a type, so the location stops at the field
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|constrained-\w+|\w+(-\w+)*\[.*\])$")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    loc = [x for x in loc if not _UNION_MEMBER.match(x)]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(loc)
    return (f"{where}: {e.get('msg')}" if where else str(e.get("msg"))), (where or None)

