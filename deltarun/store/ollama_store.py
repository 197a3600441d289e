"""Ollama's store, read in place: its folder ($OLLAMA_MODELS), the qwen3.5* models its manifests name (GGUF
blobs), the blob for a name (`ollama_gguf`, used to run `qwen3.5:9b-q4_K_M`), and removing a manifest (and
its blob once no manifest uses it) for a forced `rm`. Not here: the other stores and the combined list
(listing.py), GGUF parsing (weights/gguf_meta.py)."""
from __future__ import annotations

import os
from pathlib import Path

from ..weights.gguf_meta import is_gguf
from . import names
from .records import LocalModel, read_json

OLLAMA_LIBRARY = ("manifests", "registry.ollama.ai", "library")
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _ollama_quant(root: Path, manifest: dict, tag: str) -> str:
    cfg_digest = (manifest.get("config") or {}).get("digest", "")
    cfg = read_json(root / "blobs" / cfg_digest.replace(":", "-")) if cfg_digest else None
    if cfg and cfg.get("file_type"):
        return str(cfg["file_type"])
    _, quant = names.split_quant(f"x:{tag}")
    return quant.upper() if quant else "gguf"


def ollama_models() -> list[LocalModel]:
    """qwen3.5* GGUF models in Ollama's store (read-only: they stay Ollama's)."""
    root = ollama_dir()
    lib = root.joinpath(*OLLAMA_LIBRARY)
    if not lib.is_dir():
        return []
    out = []
    for model_dir in sorted(lib.iterdir()):
        if not model_dir.name.lower().startswith("qwen3.5") or not model_dir.is_dir():
            continue
        for tag_file in sorted(model_dir.iterdir()):
            manifest = read_json(tag_file) if tag_file.is_file() else None
            if not manifest:
                continue
            layer = next((x for x in manifest.get("layers") or [] if x.get("mediaType") == OLLAMA_MODEL_MEDIA), None)
            if not layer or "digest" not in layer:
                continue
            blob = root / "blobs" / layer["digest"].replace(":", "-")
            if not blob.is_file():
                continue
            out.append(LocalModel(name=f"{model_dir.name}:{tag_file.name}", source="ollama", path=blob,
                                  size=blob.stat().st_size, quant=_ollama_quant(root, manifest, tag_file.name),
                                  extra={"manifest": tag_file, "gguf": is_gguf(blob)}))
    return out


def ollama_gguf(name: str) -> Path | None:
    """The GGUF blob of Ollama store model `name` (`qwen3.5:0.8b`, `qwen3.5` = `:latest`), else None."""
    wanted = name.lower() if ":" in name else f"{name.lower()}:latest"
    for m in ollama_models():
        if m.name.lower() == wanted and is_gguf(m.path):
            return m.path
    return None


def delete_ollama_model(model: LocalModel) -> int:
    """Remove an Ollama store model's manifest, and its blob when no other manifest names it; the bytes freed."""
    manifest: Path = model.extra["manifest"]
    manifest.unlink()
    digest_name = model.path.name.replace("-", ":", 1)
    still_used = any(digest_name in p.read_text(errors="replace")
                     for p in ollama_dir().joinpath(*OLLAMA_LIBRARY).rglob("*") if p.is_file())
    if not still_used:
        model.path.unlink(missing_ok=True)
        return model.size
    return 0
