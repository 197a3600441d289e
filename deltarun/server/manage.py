"""Ollama's model management routes over store/ (the same logic as the CLI):
`POST /api/pull` (NDJSON progress in Ollama's format), `DELETE /api/delete`, `POST /api/copy`, and the
store half of `POST /api/show` (details of any local model, loaded or not).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..store import names
from ..store.aliases import aliases, forget_aliases_of, remove_alias
from ..store.info import chat_template, license_of, parameter_counts
from ..store.listing import alias_models, find_local, list_models
from ..store.operations import add_alias, delete, deletion_refusal
from ..store.progress import ProgressBars
from ..store.records import LocalModel, read_json
from .errors import APIError
from .protocol import one_of_names

router = APIRouter()


class PullRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra=one_of_names("model", "name"))
    model: str | None = None
    name: str | None = None  # older clients
    insecure: bool = False
    stream: bool = True


class DeleteRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra=one_of_names("model", "name"))
    model: str | None = None
    name: str | None = None


class CopyRequest(BaseModel):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1, description="a name (not a path): letters, digits, '._:-/'")


def _refuse_path(name: str) -> None:
    """A client's model name that is a path (store/names.py `looks_like_path`): one 404 whether it exists or not."""
    if names.looks_like_path(name):
        raise APIError(404, f"{name!r}: models are named (see /api/tags), never given by path", param="model",
                       code="model_not_found")


def _find(name: str, trusted: bool = False) -> LocalModel:
    """The listed model a client named (never a path); `trusted`: a folder given on the server's command line."""
    if not trusted:
        _refuse_path(name)
    try:
        return find_local(name, by_path=trusted)
    except names.ModelNotFound as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None


# -------------------------------------------------------------------------------------------------- pull

class _QueueBars(ProgressBars):
    """snapshot_download's progress bars turned into Ollama progress lines on a queue."""

    sink: "queue.Queue[dict | None]"  # set per pull on a subclass, with the repo
    repo = ""

    def report(self) -> None:
        # huggingface_hub 2.x's snapshot_download only drives aggregate bars: "Fetching N files" (files),
        # "Reconstructing ..." and "Downloading bytes" (all files' bytes); the last one is reported
        if self.unit == "B" and self.desc.startswith("Downloading") and self.total:
            self.sink.put({"status": f"downloading {self.repo}", "digest": self.repo,
                           "total": int(self.total), "completed": int(min(self.n, self.total))})


def _pull_thread(repo: str, sink: "queue.Queue[dict | None]") -> None:
    from huggingface_hub import constants, errors

    from ..store.pull import pull, pull_error

    bars = type("Bars", (_QueueBars,), {"sink": sink, "repo": repo})
    try:
        path = pull(repo, tqdm_class=bars)
        sink.put({"status": "verifying sha256 digest"})
        sink.put({"status": "writing manifest", "path": str(path)})
        sink.put({"status": "success"})
    except Exception as e:  # every failure becomes {"error": ...}
        status = 404 if isinstance(e, errors.RepositoryNotFoundError) else 502
        sink.put({"error": pull_error(repo, None, e, constants.ENDPOINT), "_status": status})
    finally:
        sink.put(None)


def _refuse_unmanaged(request: Request) -> None:
    """Under `serve --ray` models are placed on the nodes beforehand: the store is not the server's to change."""
    if not request.app.state.server.models.store_managed:
        raise APIError(400, "this server runs on Ray (--ray): models are placed on the nodes beforehand, not "
                       "pulled, copied or deleted through it (see docs/scale-out.md)")


@router.post("/api/pull")
async def pull_model(body: PullRequest, request: Request):
    from ..store.pull import resolve_repo

    _refuse_unmanaged(request)
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required")
    _refuse_path(name)  # resolve_repo looks at the disk: its answer would tell whether a path exists
    try:
        repo = resolve_repo(name)
    except names.ModelNotFound as e:
        raise APIError(503 if "needs the network" in str(e) else 404, str(e), param="model") from None
    sink: "queue.Queue[dict | None]" = queue.Queue()
    threading.Thread(target=_pull_thread, args=(repo, sink), daemon=True, name=f"pull {repo}").start()

    async def events():
        yield {"status": "pulling manifest"}
        while (item := await asyncio.to_thread(sink.get)) is not None:
            yield item

    if body.stream:
        async def lines():
            async for ev in events():
                ev.pop("_status", None)
                ev.pop("path", None)
                yield json.dumps(ev) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")
    last: dict[str, Any] = {}
    async for ev in events():
        last = ev
    if "error" in last:
        raise APIError(last.get("_status", 502), last["error"])
    return {"status": "success"}


# ------------------------------------------------------------------------------------------- delete/copy

@router.delete("/api/delete")
async def delete_model(body: DeleteRequest, request: Request):
    _refuse_unmanaged(request)
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required")
    if any(remove_alias(n) for n in (name, name.removesuffix(":latest"), f"{name}:latest")):
        request.app.state.server.models.forget_name(name)
        return {"status": "success"}  # a name made with /api/copy: only the name goes
    model = _find(name)
    refusal = deletion_refusal(model)
    if refusal:
        raise APIError(403, f"not deleting: {refusal}")
    await request.app.state.server.models.unload_path(model.path)  # 409 while it answers requests
    await asyncio.to_thread(delete, model)
    await asyncio.to_thread(forget_aliases_of, model)
    return {"status": "success"}


@router.post("/api/copy")
async def copy_model(body: CopyRequest, request: Request):
    _refuse_unmanaged(request)
    if names.looks_like_path(body.destination):
        raise APIError(400, f"destination {body.destination!r} must be a name, not a path", param="destination")
    _find(body.source)
    try:
        find_local(body.destination, by_path=False)
    except names.ModelNotFound:
        pass
    else:
        if body.destination not in aliases():
            raise APIError(409, f"{body.destination!r} already names a model")
    add_alias(body.source, body.destination)
    request.app.state.server.models.forget_name(body.destination)
    return {"status": "success"}


# ------------------------------------------------------------------------------------------------- lists

def local_entries(served: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """/api/tags entries for every local model and copied name, then `served` (name → folder: the
    command-line model, which may live outside every store). Blocking: run it in a thread."""
    models = list_models() + alias_models()
    for name, folder in (served or {}).items():
        try:
            models.append(dataclasses.replace(find_local(str(folder)), name=name))
        except names.ModelNotFound:  # gone from the disk since the server started
            continue
    return [_tag_entry(m) for m in models]


def _tag_entry(m: LocalModel) -> dict[str, Any]:
    from datetime import datetime, timezone

    try:
        mtime = m.path.stat().st_mtime
    except OSError:
        mtime = 0.0
    try:
        total = parameter_counts(m.path / "config.json")["total"] if not m.is_gguf else 0
    except Exception:  # an unusual config still gets listed
        total = 0
    size = f"{total / 1e9:.1f}B" if total >= 1e8 else f"{total / 1e6:.1f}M" if total else ""
    return {"name": m.name, "model": m.name, "size": m.size, "digest": "",
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
            "details": {"parent_model": "", "format": "gguf" if m.is_gguf else "safetensors",
                        "family": "qwen35", "families": ["qwen35"], "parameter_size": size,
                        "quantization_level": m.quant}}


# -------------------------------------------------------------------------------------------------- show

def show_local(name: str, trusted: bool = False) -> dict[str, Any]:
    """/api/show's answer for a local model from the store: details, model_info, template, license
    (`trusted`: `name` is the command line's folder)."""
    model = _find(name, trusted)
    if model.is_gguf:
        return {"modelfile": "", "parameters": "", "template": "", "license": "",
                "details": {"parent_model": "", "format": "gguf", "family": "qwen35", "families": ["qwen35"],
                            "parameter_size": "", "quantization_level": model.quant},
                "model_info": {"general.architecture": "qwen35", "general.file_type": model.quant},
                "capabilities": ["completion"]}
    return folder_show(model.path, model.quant)


def folder_show(folder, quant: str) -> dict[str, Any]:
    """The /api/show fields of a checkpoint folder (config.json, template, README/LICENSE)."""
    cfg = read_json(folder / "config.json") or {}
    text = cfg.get("text_config", cfg)
    template = chat_template(folder) or ""
    try:
        counts = parameter_counts(folder / "config.json")
    except Exception:  # an unusual config still gets the rest
        counts = {}
    caps = ["completion"] + (["vision"] if cfg.get("vision_config") else []) + \
        (["tools"] if "tools" in template else []) + (["thinking"] if "<think>" in template else [])
    total = counts.get("total", 0)
    info = {"general.architecture": "qwen35", "general.parameter_count": total,
            "qwen35.text_parameter_count": counts.get("text", 0),
            "qwen35.vision_parameter_count": counts.get("vision", 0),
            "qwen35.mtp_parameter_count": counts.get("mtp", 0),
            "qwen35.context_length": text.get("max_position_embeddings"),
            "qwen35.embedding_length": text.get("hidden_size"), "qwen35.block_count": text.get("num_hidden_layers"),
            "qwen35.attention.head_count": text.get("num_attention_heads"),
            "qwen35.attention.head_count_kv": text.get("num_key_value_heads"),
            "qwen35.vocab_size": text.get("vocab_size")}
    layer_types = text.get("layer_types") or []
    if layer_types:
        info["qwen35.linear_attention_layers"] = layer_types.count("linear_attention")
        info["qwen35.full_attention_layers"] = layer_types.count("full_attention")
    size = f"{total / 1e9:.1f}B" if total >= 1e8 else f"{total / 1e6:.1f}M" if total else ""
    return {"modelfile": "", "parameters": "", "template": template, "license": license_of(folder) or "",
            "details": {"parent_model": "", "format": "safetensors", "family": "qwen35", "families": ["qwen35"],
                        "parameter_size": size, "quantization_level": quant},
            "model_info": info, "capabilities": caps}
