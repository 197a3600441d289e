"""`resolve_model`: a model name → a local folder holding config.json and weights (a path, a GGUF file's
sidecar, `demo`, `qwen3.5:0.8b`-style names, `org/repo`), looked up in the Hugging Face cache, then
Ollama's store, then fetched with huggingface_hub when the network allows (names.py parses the names,
ollama_store.py finds GGUF files in Ollama's store)."""
from __future__ import annotations

import os
from pathlib import Path

from .names import (
    DEMO,
    WEIGHT_PATTERNS,
    ModelNotFound,
    demo_path,
    repo_for,
    split_quant,
    unknown_name_message,
)


def resolve_model(name: str | os.PathLike, *, download: bool = True) -> Path:
    """A local folder holding config.json and weights for `name`."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return path
        from ..weights.gguf_meta import is_gguf, sidecar_for

        if is_gguf(path):
            return sidecar_for(path)  # a small folder (config, tokenizer) beside the GGUF's own weights
        raise ModelNotFound(f"{path} is a file, not a model folder or a GGUF file")
    if text == DEMO:
        return demo_path()
    base, quant = split_quant(text)
    repo = repo_for(text)
    if (repo is None or (quant and quant not in ("int4", "int8"))) and (found := _ollama(text)):
        return found  # qwen3.5:latest, qwen3.5:9b-q4_K_M…: GGUF files in Ollama's store
    if repo is None:
        raise ModelNotFound(unknown_name_message(text))
    if quant and quant not in ("int4", "int8"):  # int4/int8: quantized while loading (LLM reads the tag)
        raise ModelNotFound(f"quantization tag {quant!r} in {text!r} names a GGUF file, and none is in "
                            f"Ollama's store: run {base!r} or {base + '-int4'!r} (quantized while loading)")
    from huggingface_hub import snapshot_download

    from .pull import pull
    from .records import hf_cache_dir, snapshot_is_whole

    try:
        cached = Path(snapshot_download(repo, local_files_only=True, allow_patterns=WEIGHT_PATTERNS,
                                        cache_dir=hf_cache_dir()))
        if snapshot_is_whole(cached):  # else a pull was killed midway: never load part of a model
            return cached
    except Exception:  # not in the cache (huggingface_hub raises several types)
        pass
    if found := _ollama(text):  # not in the HF cache, but Ollama has it: no download needed
        return found
    if download and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        try:
            return pull(repo)  # marked partial until every file is there and verified
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


def _ollama(name: str) -> Path | None:
    """The GGUF sidecar of Ollama store model `name` (read-only in the store), else None."""
    from ..weights.gguf_meta import sidecar_for
    from .ollama_store import ollama_gguf

    blob = ollama_gguf(name)
    return sidecar_for(blob) if blob is not None else None
