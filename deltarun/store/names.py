"""Resolve a model name to a local folder: a path, `demo`, `qwen3.5:0.8b`-style names or `org/repo`.

Names are looked up in the local Hugging Face cache first (any tool's downloads count) and fetched
with huggingface_hub only when the network allows; offline, the error says what to download, where
to put it, and how to try the offline demo.
"""
from __future__ import annotations

import difflib
import re
import shutil
from pathlib import Path

from ..atomic import publish_dir, sweep, temp_path
from ..paths import cache_dir

ALIASES = {f"qwen3.5:{size}": f"Qwen/Qwen3.5-{size.upper()}" for size in ("0.8b", "2b", "4b", "9b")}
ALIASES.update({f"{k}-base": f"{v}-Base" for k, v in list(ALIASES.items())})
DEFAULT_MODEL = "qwen3.5:0.8b"
DEMO = "demo"
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "LICENSE", "README.md"]


QUANT_RE = re.compile(r"-(int4|int8|q\d(?:_[a-z0-9]+)*|iq\d(?:_[a-z0-9]+)*|f16|bf16|fp16|f32)$", re.IGNORECASE)


class ModelNotFound(RuntimeError):
    """The model is neither local nor downloadable; the message tells the user what to do."""


def looks_like_path(name: str) -> bool:
    """Whether a client's model name is a filesystem path in any spelling (absolute, relative, `..`, `~`,
    a drive letter, a backslash, URL-encoded): the server refuses those without looking at the disk."""
    text = name.strip()
    if not text or text.startswith(("/", "\\", "~", ".")) or any(c in text for c in "\\%\0"):
        return True
    if re.match(r"^[A-Za-z]:/", text):  # C:/… (C:\… has a backslash)
        return True
    return any(seg in ("", ".", "..") for seg in text.split("/"))


def split_quant(name: str) -> tuple[str, str | None]:
    """`qwen3.5:9b-q4_k_m` → ("qwen3.5:9b", "q4_k_m"); names without a quantization tag → (name, None)."""
    m = QUANT_RE.search(name) if ":" in name else None  # org/repo ids keep their suffixes
    if not m or name.startswith((".", "/", "~")):
        return name, None
    return name[:m.start()], m.group(1).lower()


def quant_tag(name: str) -> str | None:
    """The weight-only quantization a name asks for (`qwen3.5:9b-int4` → "int4"), else None."""
    tag = split_quant(name)[1]
    return tag if tag in ("int4", "int8") else None


def repo_for(name: str) -> str | None:
    """The Hugging Face repo id a model name stands for (alias or `org/repo`), else None."""
    base, _ = split_quant(name)
    repo = ALIASES.get(base.lower(), base)
    if repo.count("/") != 1 or base.startswith((".", "/", "~")) or ":" in repo:
        return None
    return repo


def alias_for(repo: str) -> str | None:
    """The short name of an official repo (`Qwen/Qwen3.5-0.8B` → `qwen3.5:0.8b`), else None."""
    for alias, r in ALIASES.items():
        if r.lower() == repo.lower():
            return alias
    return None


def closest_names(name: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Known names that look like `name` (for "did you mean" hints)."""
    candidates = sorted(set(ALIASES) | {DEMO} | set(ALIASES.values()) | set(extra))
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    return [lowered[h] for h in hits]


def unknown_name_message(text: str, extra: list[str] | tuple[str, ...] = ()) -> str:
    close = closest_names(text, extra)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    known = ", ".join(sorted(ALIASES))
    return (f"no model folder {text!r} and it is not a known name; {hint}"
            f"(try one of {known}, an org/repo id, a folder, or 'demo')")


def demo_path() -> Path:
    """The `demo` checkpoint: random weights in the 0.8B layout, made on first use."""
    path = cache_dir() / "demo-qwen3.5-0.8b-random"
    if (path / "model.safetensors.index.json").exists() and (path / "tokenizer.json").exists():
        return path
    from ..weights.random_init import write_random_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent)  # a demo a killed process left half-written (1.7 GB)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        write_random_checkpoint("0.8B", tmp, seed=0)
        (tmp / "README.md").write_text(
            "# deltarun demo model\n\nRANDOM WEIGHTS in the exact Qwen3.5-0.8B layout, made by "
            "`deltarun init-random 0.8B`. It exercises every code path offline; its output is noise.\n")
        publish_dir(tmp, path)  # atomic: a half-written demo is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_demo(path: Path) -> bool:
    return Path(path).resolve() == (cache_dir() / "demo-qwen3.5-0.8b-random").resolve()
