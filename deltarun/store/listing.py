"""The Qwen3.5 models on this machine: listed per store (the Hugging Face cache, deltarun's folder; Ollama's
store is ollama_store.py), all together (`list_models`, plus the copied names: `alias_models`), and one
found by name, never downloading (`find_local`: copied names, paths, exact names, `org/repo`, aliases).
Reads only. Not here: fetching a name's folder to run it (resolve.py), changes (operations.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..paths import cache_dir
from ..weights.gguf_meta import is_gguf
from . import names
from .aliases import aliases
from .ollama_store import ollama_dir, ollama_models
from .records import (
    LocalModel,
    folder_size,
    hf_cache_dir,
    is_qwen35_folder,
    read_json,
    snapshot_is_whole,
    weights_dtype,
)


def hf_models() -> list[LocalModel]:
    """Qwen3.5 repos in the Hugging Face cache (any tool's downloads), newest revision of each."""
    from huggingface_hub import scan_cache_dir

    cache = hf_cache_dir()
    if not cache.is_dir():
        return []
    try:
        info = scan_cache_dir(cache)
    except Exception:  # unreadable cache: nothing to list
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = next((r for r in repo.revisions if "main" in r.refs), None) or \
            max(repo.revisions, key=lambda r: r.last_modified)
        cfg = is_qwen35_folder(Path(rev.snapshot_path))
        if cfg is None or not snapshot_is_whole(Path(rev.snapshot_path)):  # a pull killed or failed midway
            continue
        out.append(LocalModel(name=names.alias_for(repo.repo_id) or repo.repo_id, source="hf",
                              path=Path(rev.snapshot_path), size=repo.size_on_disk,
                              quant=weights_dtype(Path(rev.snapshot_path), cfg),
                              repo_id=repo.repo_id, extra={"revision": rev.commit_hash, "repo_path": repo.repo_path}))
    return out


def deltarun_models() -> list[LocalModel]:
    """Checkpoints in deltarun's own folder (the demo, conversions)."""
    root = cache_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):  # hidden names: temp folders of writes in progress or killed (atomic.py)
        cfg = is_qwen35_folder(d) if d.is_dir() and not d.name.startswith(".") else None
        if cfg is None:
            continue
        name = names.DEMO if names.is_demo(d) else d.name
        out.append(LocalModel(name=name, source="deltarun", path=d, size=folder_size(d), quant=weights_dtype(d, cfg)))
    return out


def list_models() -> list[LocalModel]:
    return hf_models() + ollama_models() + deltarun_models()


def alias_models() -> list[LocalModel]:
    """The names made with `/api/copy`, each as the model it stands for (names whose model is gone are
    left out)."""
    out = []
    for name in sorted(aliases()):
        try:
            out.append(find_local(name))
        except names.ModelNotFound:
            continue
    return out


def find_local(name: str, _depth: int = 0, *, by_path: bool = True) -> LocalModel:
    """The local model `name` stands for, never downloading; ModelNotFound with a hint otherwise.
    `by_path=False` (a name from a client): only what the store lists and the copies made of it, never a
    folder or file on the disk, so the answer says nothing about paths."""
    text = str(name)
    table = aliases()  # Ollama's names: "mine" is "mine:latest"
    target = table.get(text) or table.get(text.removesuffix(":latest")) or table.get(f"{text}:latest")
    if target is not None and _depth < 8:
        m = find_local(target, _depth + 1)  # the copy's target was checked when the copy was made
        return dataclasses.replace(m, name=text, extra={**m.extra, "alias_of": m.name})
    if not by_path and names.looks_like_path(text):
        raise names.ModelNotFound(names.unknown_name_message(text))
    path = Path(text).expanduser()
    if by_path and path.exists():
        if path.is_file():
            if is_gguf(path):
                return LocalModel(name=path.name, source="folder", path=path, size=path.stat().st_size, quant="gguf")
            raise names.ModelNotFound(f"{path} is a file, not a model folder or a GGUF file")
        cfg = read_json(path / "config.json")
        if cfg is None:
            raise names.ModelNotFound(f"{path} has no config.json: not a model folder")
        for m in deltarun_models():
            if m.path.resolve() == path.resolve():
                return m
        return LocalModel(name=path.name, source="folder", path=path, size=folder_size(path),
                          quant=weights_dtype(path, cfg))
    everything = list_models()
    lowered = text.lower()
    for m in everything:  # exact names first: ollama's qwen3.5:9b-q4_K_M, deltarun's demo
        if m.name.lower() == lowered or (m.repo_id and m.repo_id.lower() == lowered):
            return m
    repo = names.repo_for(text)
    if repo is not None:
        for m in everything:
            if m.repo_id and m.repo_id.lower() == repo.lower():
                return m
        base, quant = names.split_quant(text)
        note = ("" if quant in (None, "int4", "int8") else  # int4/int8: quantized from it while loading
                f" and no GGUF {quant!r} file for it is in Ollama's store ({ollama_dir()})")
        raise names.ModelNotFound(f"{text!r} ({repo}) is not downloaded{note}; run `deltarun pull {base}`")
    if text == names.DEMO:
        raise names.ModelNotFound("the demo checkpoint is not made yet; `deltarun chat demo` makes it")
    raise names.ModelNotFound(names.unknown_name_message(text, [m.name for m in everything]))
