"""The OpenAPI schema served at /openapi.json: FastAPI's, with the errors this server really answers.

FastAPI declares a 422 with its own `HTTPValidationError` body on every route that takes a body; this
server answers an invalid body with a 400, and every error (a 4xx or 5xx) in the shape of the API that
was called (errors.py): OpenAI's `{"error": {"message", "type", "param", "code"}}` on /v1 and the other
routes, Ollama's `{"error": "..."}` on /api. Tools that check responses against the schema (schemathesis)
then hold the server to what it does.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def _error(schema_name: str) -> dict[str, Any]:
    return {"description": "an error (4xx, 5xx) in the API's shape",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}


def schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema (built once), its 422s replaced by the real error answers."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["OpenAIError"], components["OllamaError"] = OPENAI_ERROR, OLLAMA_ERROR
    for path, item in spec.get("paths", {}).items():
        error = _error("OllamaError" if path.startswith("/api/") else "OpenAIError")
        for op in item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if "requestBody" in op or op.get("parameters"):
                responses["400"] = {**error, "description": "an invalid request"}
            responses["default"] = error
    app.openapi_schema = spec
    return spec
