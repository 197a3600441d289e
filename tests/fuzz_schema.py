"""The acceptance schema of the fuzz (fuzz_driver.py): the server's own OpenAPI schema, narrowed where a
body's validity is not something JSON Schema can say, so that every body generated from it must succeed.

Narrowed, and why:
- model names: valid ones are what the store lists at run time; the fuzzed store is empty, so they are
  the served model's name ("tiny"). Unknown names get 404 (test_server_model_names.py proves the rules).
- generation length: max_tokens / num_predict 0..4 (present), n ≤ 2, so answers stay short; min_tokens 0
  (it must be ≤ max_tokens, a rule between two fields).
- media (image parts, Ollama `images`) must decode as images: left out (test_server_vision.py).
- free-form JSON the server compiles or parses: response_format's JSON schema, Ollama `format`, tool-call
  arguments as text (must be JSON), tool_choice naming a tool: pinned to valid values.
- management names (pull, delete, copy): names, not paths; the store is empty, so not found (`excused`).
- static files: the files there are. A seed: in [0, 2**32] (a float near 2**64 rounds past the limit).
- keep_alive: a duration; not 0 (that unloads the model: a reload per case would eat the time budget).
- prompts as token ids: ids the tiny model's vocabulary has.
`excused` lists the refusals of schema-valid bodies that are right all the same (a rule no schema states).
"""
from __future__ import annotations

import copy
from typing import Any

from deltarun.server.app import STATIC_DIR

SERVED = "tiny"
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}$"  # a model name (a pattern, or paths and control characters come)
SEED = {"type": "integer", "minimum": 0, "maximum": 2**32}  # floats near 2**64 round past the limit
MAX_TOKENS = {"type": "integer", "minimum": 0, "maximum": 4}
TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "minItems": 1,
             "maxItems": 8}
SMALL_SCHEMAS = [{"type": "object"}, {"type": "object", "properties": {"a": {"type": "integer"}}},
                 {"type": "string"}]
TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
             "required": ["type", "text"]}


def _props(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return spec["components"]["schemas"][name]["properties"]


def _require(spec: dict[str, Any], name: str, *fields: str) -> None:
    s = spec["components"]["schemas"][name]
    s["required"] = sorted(set(s.get("required", [])) | set(fields))


def _turns(message: str, min_items: int) -> dict[str, Any]:
    """A conversation as the chat template takes it: a user turn first (a system message may come only
    first; the template also wants a user query), then any turns but system ones."""
    ref = {"$ref": f"#/components/schemas/{message}"}
    turn = lambda roles: {"allOf": [ref, {"properties": {"role": {"enum": roles}}}]}  # noqa: E731
    return {"type": "array", "minItems": min_items, "maxItems": 3, "prefixItems": [turn(["user"])],
            "items": turn(["user", "assistant", "tool"])}


def acceptance_schema(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` (the served /openapi.json) narrowed as the module docstring says."""
    spec = copy.deepcopy(raw)
    model = {"type": "string", "enum": [SERVED]}
    for name in ("ChatCompletionRequest", "CompletionRequest", "OllamaChatRequest", "OllamaGenerateRequest"):
        _props(spec, name)["model"] = model
    show = _props(spec, "OllamaShowRequest")
    show["model"], show["name"] = model, {"type": "null"}
    _require(spec, "OllamaShowRequest", "model")
    for name in ("PullRequest", "DeleteRequest"):
        _props(spec, name)["model"] = {"type": "string", "pattern": NAME}
    copy_ = _props(spec, "CopyRequest")
    copy_["source"] = copy_["destination"] = {"type": "string", "pattern": NAME}
    statics = sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())
    for path, ops in spec["paths"].items():
        for op in ops.values():
            for p in op.get("parameters", []):
                if p["name"] == "model_id":
                    p["schema"] = model
                elif path.startswith("/static/"):
                    p["schema"] = {"type": "string", "enum": statics}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        p = _props(spec, name)
        p["max_tokens"], p["n"], p["min_tokens"] = MAX_TOKENS, {"type": "integer", "enum": [1, 2]}, {"enum": [0]}
        p["seed"] = SEED
        p["response_format"] = {"anyOf": [{"type": "null"}, {
            "type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"], "properties": {
                "type": {"const": "json_schema"},
                "json_schema": {"type": "object", "required": ["name", "schema"], "properties": {
                    "name": {"type": "string"}, "schema": {"enum": SMALL_SCHEMAS}}}}}]}
        p.pop("best_of", None), p.pop("suffix", None)  # refused unless equal to n / empty: not supported
        _require(spec, name, "max_tokens")
    chat = _props(spec, "ChatCompletionRequest")
    chat.pop("max_completion_tokens")  # overrides max_tokens
    chat["messages"] = _turns("ChatMessage", 1)
    chat["tool_choice"] = {"enum": ["auto", "none", None]}  # "required"/a name need tools (a rule)
    chat["top_logprobs"] = {"type": "null"}  # needs logprobs: true (a rule)
    msg = _props(spec, "ChatMessage")
    msg["content"] = {"anyOf": [{"type": "string"}, {"type": "null"},
                                {"type": "array", "items": TEXT_PART, "maxItems": 3}]}
    _props(spec, "FunctionCall")["arguments"] = {"type": "object"}
    _props(spec, "FunctionDef")["parameters"] = {"anyOf": [{"type": "null"}, {"enum": SMALL_SCHEMAS}]}
    _props(spec, "CompletionRequest")["prompt"] = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2},
        TOKEN_IDS, {"type": "array", "items": TOKEN_IDS, "minItems": 1, "maxItems": 2}]}
    opts = _props(spec, "OllamaOptions")
    opts["num_predict"], opts["seed"] = MAX_TOKENS, SEED
    _require(spec, "OllamaOptions", "num_predict")
    for name in ("OllamaChatRequest", "OllamaGenerateRequest"):
        p = _props(spec, name)
        p["options"] = {"$ref": "#/components/schemas/OllamaOptions"}
        p["keep_alive"] = {"enum": ["5m", "1h", 300, -1, "-1m", None]}
        p["format"] = {"anyOf": [{"enum": ["json", "", None]}, {"enum": SMALL_SCHEMAS}]}
        _require(spec, name, "options")
    _props(spec, "OllamaMessage")["images"] = {"type": "null"}
    _props(spec, "OllamaToolFunction")["arguments"] = {"type": "object"}
    _props(spec, "OllamaChatRequest")["messages"] = _turns("OllamaMessage", 0)
    gen = _props(spec, "OllamaGenerateRequest")
    gen["images"], gen["suffix"] = {"type": "null"}, {"enum": ["", None]}  # suffix: no fill-in-the-middle
    gen["context"] = {"anyOf": [{"type": "null"}, TOKEN_IDS]}
    _anthropic(spec)
    _responses(spec)
    return spec


def _responses(spec: dict[str, Any]) -> None:
    """The Responses API's bodies: input as text or user/assistant message items (other items need ids of
    earlier calls), function tools with small schemas and a tool_choice that needs none, no stored response
    to continue (the store is empty), no conversation or background mode (not served: 400)."""
    item = {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user"]}, "content": {"type": "string"}}}
    tool = {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"const": "function"}, "name": {"type": "string", "pattern": "^[a-z_]{1,12}$"},
        "parameters": {"enum": SMALL_SCHEMAS}}}
    fmt = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}},
                     {"type": "object", "required": ["type", "name", "schema"], "properties": {
                         "type": {"const": "json_schema"}, "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                         "schema": {"enum": SMALL_SCHEMAS}}}]}
    for name in ("InputTokensRequest", "ResponsesRequest"):
        p = _props(spec, name)
        p["model"] = {"type": "string", "enum": [SERVED]}
        p["input"] = {"anyOf": [{"type": "string", "minLength": 1},
                                {"type": "array", "minItems": 1, "maxItems": 3, "items": item}]}
        p["tools"] = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 2, "items": tool}]}
        p["tool_choice"] = {"enum": ["auto", "none", None]}
        p["previous_response_id"] = p["conversation"] = {"type": "null"}
        p["text"] = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"format": fmt}}]}
        _require(spec, name, "input")
    r = _props(spec, "ResponsesRequest")
    r["max_output_tokens"], r["seed"] = {"type": "integer", "minimum": 1, "maximum": 4}, SEED
    r["background"] = {"enum": [False, None]}
    r["include"] = {"type": "null"}
    _require(spec, "ResponsesRequest", "max_output_tokens")

def _anthropic(spec: dict[str, Any]) -> None:
    """The Messages API's bodies: text turns starting with a user one (blocks other than text need real
    media or tool ids), tool_choice that needs no tools, a thinking config with its budget, small schemas."""
    block = {"type": "array", "minItems": 1, "maxItems": 3, "items": TEXT_PART}
    turn = lambda roles: {"type": "object", "required": ["role", "content"], "properties": {  # noqa: E731
        "role": {"enum": roles}, "content": {"anyOf": [{"type": "string"}, block]}}}
    for name in ("CountTokensRequest", "MessagesRequest"):
        p = _props(spec, name)
        p["model"] = {"type": "string", "enum": [SERVED]}
        p["messages"] = {"type": "array", "minItems": 1, "maxItems": 3, "prefixItems": [turn(["user"])],
                         "items": turn(["user", "assistant"])}
        p["system"] = {"anyOf": [{"type": "null"}, {"type": "string"}, block]}
        p["tool_choice"] = {"anyOf": [{"type": "null"}, {"type": "object", "required": ["type"],
                                                         "properties": {"type": {"enum": ["auto", "none"]}}}]}
        p["thinking"] = {"anyOf": [{"type": "null"}, {"enum": [
            {"type": "disabled"}, {"type": "adaptive"}, {"type": "enabled", "budget_tokens": 2}]}]}
        fmt = {"anyOf": [{"type": "null"}, {"type": "object", "required": ["type", "schema"], "properties": {
            "type": {"const": "json_schema"}, "schema": {"enum": SMALL_SCHEMAS}}}]}
        p["output_format"] = fmt
        p["output_config"] = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "format": fmt, "effort": {"enum": ["low", "medium", "high", None]}}}]}
    _props(spec, "AnthropicTool")["input_schema"] = {"anyOf": [{"type": "null"}, {"enum": SMALL_SCHEMAS}]}
    msg = _props(spec, "MessagesRequest")
    msg["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 4}
    msg["keep_alive"] = {"enum": ["5m", 300, -1, None]}


def designed_5xx(route: str, status: int, text: str) -> bool:
    """A 5xx the server answers by design: a pull on an offline server (test_server_manage.py: a clear 503)."""
    return route == "POST /api/pull" and status == 503 and "needs the network" in text


def excused(route: str, status: int, body: Any) -> bool:
    """Whether refusing a body the acceptance schema calls valid is right: (route, status, reason)."""
    err = body.get("error") if isinstance(body, dict) else None
    text = err if isinstance(err, str) else (err or {}).get("message", "") if isinstance(err, dict) else ""
    # the management routes act on the store, which is empty: a name there is not found, pull is offline
    if route in ("DELETE /api/delete", "POST /api/copy") and status == 404:
        return True
    if route == "POST /api/pull" and status in (404, 503):
        return True
    # a stored response by id: the store starts empty, so any id is not found
    if route.startswith(("GET /v1/responses/{", "DELETE /v1/responses/{")) and status == 404:
        return True
    # a prompt longer than the context (a rule between the prompt and max_tokens; tokens are not characters)
    if "context length" in text:
        return True
    return False
