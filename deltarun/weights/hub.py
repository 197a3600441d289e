"""Resolve a model name to a local folder: a path, `demo`, `qwen3.5:0.8b`-style names or `org/repo`.

Names are looked up in the local Hugging Face cache first (any tool's downloads count) and fetched
with huggingface_hub only when the network allows; offline, the error says what to download, where
to put it, and how to try the offline demo.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ALIASES = {f"qwen3.5:{size}": f"Qwen/Qwen3.5-{size.upper()}" for size in ("0.8b", "2b", "4b", "9b")}
ALIASES.update({f"{k}-base": f"{v}-Base" for k, v in list(ALIASES.items())})
DEFAULT_MODEL = "qwen3.5:0.8b"
DEMO = "demo"
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "LICENSE", "README.md"]


class ModelNotFound(RuntimeError):
    """The model is neither local nor downloadable; the message tells the user what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("DELTARUN_HOME", Path.home() / ".cache" / "deltarun"))


def demo_path() -> Path:
    """The `demo` checkpoint: random weights in the 0.8B layout, made on first use."""
    path = cache_dir() / "demo-qwen3.5-0.8b-random"
    if (path / "model.safetensors.index.json").exists() and (path / "tokenizer.json").exists():
        return path
    from .random_init import write_random_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        write_random_checkpoint("0.8B", tmp, seed=0)
        (tmp / "README.md").write_text(
            "# deltarun demo model\n\nRANDOM WEIGHTS in the exact Qwen3.5-0.8B layout, made by "
            "`deltarun init-random 0.8B`. It exercises every code path offline; its output is noise.\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)  # atomic: a half-written demo is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_demo(path: Path) -> bool:
    return Path(path).resolve() == (cache_dir() / "demo-qwen3.5-0.8b-random").resolve()


def resolve_model(name: str | os.PathLike, *, download: bool = True) -> Path:
    """A local folder holding config.json and weights for `name`."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return path
        raise ModelNotFound(f"{path} is a file; give the model folder (GGUF files are not supported yet)")
    if text == DEMO:
        return demo_path()
    repo = ALIASES.get(text.lower(), text)
    if repo.count("/") != 1 or text.startswith((".", "/", "~")):
        known = ", ".join(sorted(ALIASES))
        raise ModelNotFound(f"no model folder {text!r} and it is not a known name "
                            f"(try one of {known}, an org/repo id, a folder, or 'demo')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=WEIGHT_PATTERNS))
    except Exception:  # not in the cache (huggingface_hub raises several types)
        pass
    if download and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        try:
            return Path(snapshot_download(repo, allow_patterns=WEIGHT_PATTERNS))
        except Exception as e:  # no network, unknown repo, …
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:  # pragma: no cover - unreachable
            reason = ""
    else:
        reason = "offline mode"
    raise ModelNotFound(
        f"{repo} is not in the local Hugging Face cache and could not be downloaded ({reason}). "
        f"On a machine with internet run `huggingface-cli download {repo}` and copy the cache "
        f"(~/.cache/huggingface/hub/models--{repo.replace('/', '--')}) here, or pass a local model folder. "
        f"To try deltarun offline now: `deltarun chat demo` (random weights)."
    )
