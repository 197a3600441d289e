"""The FastAPI application: OpenAI (`/v1/...`), Anthropic (`/v1/messages`) and Ollama (`/api/...`) routes
over the models of a `ModelManager` (model_manager.py: loaded on request, kept for keep_alive).

Cross-cutting concerns live here: the Host/Origin rules and the body's type and size (guard.py), the
optional API key (every route), CORS (off unless origins are given), `/health`, `/metrics`, the OpenAPI
schema at `/openapi.json` (openapi.py: every request body declared; no /docs or /redoc pages: they load
scripts from a CDN), the chat page's static files, and turning every error into the error body of the API
that was called (errors.py), so the server keeps serving whatever a client sends; a 500 says only "internal
error" and a request id (the details go to the server log). Routers import errors.py and state.py, never
this module, and reach a model only through the `EngineClient` protocol (deltarun/client.py).
"""
from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic, manage, ollama, openai, openai_completions, openapi, responses
from .errors import APIError, error_response, internal_error, validation_message
from .guard import Guard, allowed_hosts
from .metrics import METRICS
from .model_manager import ModelManager
from .state import LeaseMiddleware, ServerState

if TYPE_CHECKING:
    from ..client import EngineClient

MAX_BODY_BYTES = 16 * 1024 * 1024
STATIC_DIR = Path(__file__).parent / "static"  # the chat page: plain HTML/CSS/JS, no build step, no CDN
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".woff2": "font/woff2"}


def create_app(llm: "EngineClient | ModelManager | None" = None, model_name: str | None = None, *,
               api_key: str | None = None, cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, default_thinking: bool | None = None,
               host: str | None = "127.0.0.1", extra_hosts: list[str] | None = None,
               max_queued_requests: int | None = 256, request_timeout: float | None = None) -> FastAPI:
    """`llm`: one loaded model (served as `model_name`, kept loaded), a `ModelManager` (models loaded on
    request), or None (an empty manager with the defaults). `host`: the address the server is bound to
    (its Host rule, guard.py; None: no Host rule, for an app mounted inside another); `extra_hosts`:
    `--allowed-hosts`; `max_queued_requests`: per model, requests waiting beyond that get 429 (None: no cap);
    `request_timeout`: seconds a generation may run, queue wait included (None: no limit)."""
    from contextlib import asynccontextmanager

    if isinstance(llm, ModelManager):
        models = llm
    else:
        models = ModelManager()
        if llm is not None:
            models.adopt(llm, model_name or Path(str(llm.path)).name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models.start()
        try:
            yield
        finally:
            await models.close()

    app = FastAPI(title="deltarun", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"the request timeout must be a positive number of seconds, not {request_timeout}")
    app.state.server = ServerState(models, default_thinking, max_queued=max_queued_requests,
                                   timeout=request_timeout)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        public = request.method in ("GET", "HEAD") and (request.url.path == "/"
                                                        or request.url.path.startswith("/static/"))
        if api_key and request.method != "OPTIONS" and not public:  # the page loads, then asks for the key
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):  # constant time
                return error_response(request, 401, "missing or wrong API key (Authorization: Bearer ... or "
                                      "x-api-key)", code="invalid_api_key")
        return await call_next(request)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        try:
            json.loads(await request.body())
        except ValueError:
            message, param = "the request body is not valid JSON", None
        return error_response(request, 400, message, param)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):
        return error_response(request, 400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(request, 500, internal_error(request, exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        engines = {e.name: e.llm.stats() for e in models.entries() if e.llm is not None}
        return PlainTextResponse(METRICS.render(engines, models), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def root(request: Request):
        if "text/html" in request.headers.get("accept", ""):  # a browser: the chat page
            return FileResponse(STATIC_DIR / "index.html", media_type=STATIC_TYPES[".html"],
                                headers={"Cache-Control": "no-cache"})
        return PlainTextResponse("deltarun is running")  # what Ollama answers; some clients probe it

    @app.get("/static/{name:path}")
    async def static(name: str):
        parts = name.split("/")  # vendor/katex/fonts/x.woff2 is fine; "..", "", hidden names and "\\" are not
        path = STATIC_DIR.joinpath(*parts)
        if (any(not p or p.startswith(".") or "\\" in p for p in parts) or path.suffix not in STATIC_TYPES
                or not path.resolve().is_relative_to(STATIC_DIR.resolve()) or not path.is_file()):
            raise APIError(404, f"no static file {name!r}")
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})

    app.include_router(openai.router)
    app.include_router(openai_completions.router)
    app.include_router(responses.router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)
    app.include_router(manage.router)
    app.openapi = lambda: openapi.schema(app)  # type: ignore[method-assign]  # the real error answers
    app.add_middleware(LeaseMiddleware, manager=models)  # it sees the whole response go out
    app.add_middleware(Guard, host_ok=allowed_hosts(host, extra_hosts or ()) if host is not None else None,
                       cors=cors_origins or (), max_body=max_body_bytes)  # outermost: refusals reach nothing
    return app
