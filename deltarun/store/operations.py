"""The store's changes: a new name for a local model (`add_alias`, for `/api/copy` / `ollama cp`) and
deleting a model (`deletion_refusal` says when `rm` needs --force; `delete` frees the space). Writes only
where deltarun may: the standard HF cache and deltarun's folder; another tool's files need `force`. Not
here: the alias table itself (aliases.py), downloading (pull.py)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ..paths import cache_dir
from . import names
from .aliases import aliases, write_aliases
from .listing import find_local
from .ollama_store import delete_ollama_model, ollama_dir
from .records import LocalModel, hf_cache_dir, is_inside


def add_alias(source: str, destination: str) -> LocalModel:
    """Record `destination` as another name for the local model `source` (which must exist)."""
    if not destination or destination != destination.strip() or any(c in destination for c in "\\\n\t "):
        raise ValueError(f"invalid model name {destination!r}")
    model = find_local(source)
    table = aliases()
    target = table.get(source, str(model.path) if model.source == "folder" else model.name)
    if names.split_quant(source)[1] and not model.is_gguf and source not in table:
        target = source  # keep the quantization tag: the copy runs quantized too
    if target == destination:
        raise ValueError(f"{destination!r} is the model itself")
    table[destination] = target
    write_aliases(table)
    return model


def deletion_refusal(model: LocalModel) -> str | None:
    """Why `rm` needs --force for this model, or None when deltarun may delete it."""
    if model.source == "ollama":
        return f"{model.name} belongs to Ollama's store ({ollama_dir()}); use `ollama rm` (or --force)"
    if model.source == "hf" and is_inside(model.path, hf_cache_dir()):
        return None
    if model.source == "deltarun" and is_inside(model.path, cache_dir()):
        return None
    return f"{model.path} is outside the caches deltarun manages; refusing without --force"


def delete(model: LocalModel) -> int:
    """Delete a model; returns the bytes freed. The caller has checked `deletion_refusal` / --force."""
    if model.source == "hf":
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(hf_cache_dir())
        repo = next((r for r in info.repos if r.repo_id == model.repo_id and r.repo_type == "model"), None)
        if repo is None:
            return 0
        # only this repo: delete_revisions matches commit hashes across every repo of the cache
        only = dataclasses.replace(info, repos=frozenset({repo}))
        strategy = only.delete_revisions(*(r.commit_hash for r in repo.revisions))
        freed = strategy.expected_freed_size
        strategy.execute()
        if Path(repo.repo_path).exists():  # leftovers (refs, .no_exist, partial downloads)
            shutil.rmtree(repo.repo_path, ignore_errors=True)
        return freed
    if model.source == "ollama":
        return delete_ollama_model(model)
    if model.path.is_file():
        model.path.unlink()
    else:
        shutil.rmtree(model.path)
    return model.size
