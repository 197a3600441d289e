"""From a model name in a request (or on the command line) to what the server loads: `Target`.

Names resolve through the store (the resolver every command uses: aliases made by /api/copy, the HF
cache, Ollama's store, deltarun's folder), never by downloading; only the command line may download.
A quantization tag (`qwen3.5:0.8b-int4`) becomes `quantization="int4"` for `AsyncLLM` (`llm_kwargs`).
Also here: Ollama's `keep_alive` durations, the memory a model will take once loaded, and loading and
unloading one (in worker threads).
"""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import EngineClient
from ..store import names
from ..store.aliases import aliases
from ..store.info import parameter_counts
from ..store.listing import find_local
from ..store.ollama_store import ollama_dir
from ..store.records import folder_size
from ..store.resolve import resolve_model

FOREVER = None  # keep_alive of a model that never expires
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive → seconds (FOREVER = None). A number is seconds; a string is a Go duration
    ("5m", "1h30m", "300ms", "-1m") or a number; negative keeps the model forever, 0 unloads it after
    the request."""
    if isinstance(value, bool):
        raise ValueError(f"keep_alive must be a duration like '5m' or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"keep_alive {value!r} is not a duration (use e.g. '5m', '1h', '30s', "
                                 "0 to unload, -1 to keep forever)") from None
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise ValueError(f"keep_alive must be a duration like '5m' or a number of seconds, got {value!r}")
    if seconds != seconds:  # NaN
        raise ValueError("keep_alive must be a number of seconds or a duration")
    return FOREVER if seconds < 0 else seconds


@dataclass(frozen=True)
class Target:
    key: str                # one loaded copy per (folder, quantization)
    name: str               # the name it was asked by
    path: Path
    quantization: str | None
    estimate: int           # bytes it will take in memory once loaded


def _follow_aliases(name: str) -> str:
    """The name a copied name (/api/copy) stands for, through chains of copies."""
    table = aliases()
    for _ in range(8):
        target = table.get(name) or table.get(name.removesuffix(":latest")) or table.get(f"{name}:latest")
        if target is None:
            break
        name = target
    return name


def resolve_target(name: str, options: dict[str, Any] | None = None, *, download: bool = False) -> Target:
    """What `name` loads. Requests (download=False) name local models only, and never by path: a client
    must not make the server read arbitrary folders; the command line may give a folder or download."""
    options = options or {}
    if not name or not name.strip():
        raise names.ModelNotFound("model is required")
    if not download and names.looks_like_path(name):  # the same answer whether such a path exists or not
        raise names.ModelNotFound(f"{name!r}: the server loads models by name (see /api/tags), not by path; "
                                "start it with `deltarun serve PATH` to serve a folder")
    effective = _follow_aliases(name)
    base, quant = names.split_quant(effective)
    if effective == names.DEMO:
        path = names.demo_path()
    else:
        try:
            try:
                found = find_local(name, by_path=download)
            except names.ModelNotFound:
                if not name.endswith(":latest"):
                    raise
                found = find_local(name.removesuffix(":latest"), by_path=download)  # Ollama clients add the tag
            path = found.path
        except names.ModelNotFound:
            if not download:
                raise
            found, path = None, resolve_model(base)
        if found is not None and found.is_gguf:
            quant = None  # the file is the quantization
        elif quant not in (None, "int4", "int8"):  # GGUF quant tags name files in Ollama's store
            raise names.ModelNotFound(f"{name!r} names a GGUF quantization ({quant}) that is not in Ollama's store "
                                    f"({ollama_dir()}); run {base!r}, or {base + '-int4'!r} / "
                                    f"{base + '-int8'!r} (quantized while loading)")
    return Target(f"{Path(path).resolve()}|{quant or ''}", name, Path(path), quant,
                  estimate_bytes(Path(path), quant or options.get("quantization"), str(options.get("dtype") or "auto")))


_BYTES = {"float32": 4.0, "fp32": 4.0, "float16": 2.0, "fp16": 2.0, "bfloat16": 2.0, "bf16": 2.0, "auto": 2.0,
          "int8": 1.06, "int4": 0.56}  # int: the weights plus their per-channel / per-group scales


def estimate_bytes(path: Path, quant: str | None, dtype: str) -> int:
    """Memory the text model will take: its parameters at the dtype (or quantization) asked, plus ~10%
    and 64 MB for the engine's buffers. Unknown layouts (GGUF) count their size on disk."""
    try:
        counts = parameter_counts(path / "config.json")
        per = _BYTES.get((quant or "").split(":")[0].lower()) or _BYTES.get(dtype.lower(), 2.0)  # int4:GROUP
        return int(counts["text"] * per * 1.1) + (64 << 20)
    except Exception:  # no config (a GGUF file), or one we cannot read
        try:
            return int((path.stat().st_size if path.is_file() else folder_size(path)) * 1.1)
        except OSError:
            return 0


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def free_memory_for(device: str) -> int:
    """Free RAM (or free memory on the GPU the models go to)."""
    import torch

    from ..engine.memory import free_bytes

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    return free_bytes(torch.device(dev))


def llm_kwargs(options: dict[str, Any], quantization: str | None) -> dict[str, Any]:
    """`AsyncLLM` keywords: the server's engine options, with the name's quantization tag on top."""
    kwargs = {k: v for k, v in options.items() if v is not None}  # unset options: AsyncLLM's defaults
    if quantization:
        kwargs["quantization"] = quantization
    return kwargs


def load_llm(target: Target, options: dict[str, Any]) -> EngineClient:
    """Load `target` with the server's engine options (runs in a worker thread): the local client."""
    from ..async_llm import AsyncLLM

    kwargs = llm_kwargs(options, target.quantization)
    try:
        llm = AsyncLLM(target.path, **kwargs)
        llm.template  # noqa: B018 - built now, so a broken chat template fails the load, not a request
        return llm
    except TypeError as e:  # a build whose LLM takes no `quantization` yet
        if "quantization" not in str(e):
            raise
        raise names.ModelNotFound(f"quantization {kwargs['quantization']!r} is not supported by this build: "
                                "use the full-precision name") from None


def unload_llm(box: list) -> None:
    """Stop the engine thread of the model in `box` (its only reference, taken out here) and give its
    memory back."""
    llm = box.pop()
    llm.shutdown()
    cuda = getattr(getattr(llm.model, "device", None), "type", "cpu") == "cuda"
    del llm
    gc.collect()
    gc.collect()  # measured: the first pass can leave the engine (a cycle found late) holding the weights
    _malloc_trim()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS. Without it glibc keeps them (the tokenizer's and the engine
    thread's allocations fragment its arenas): measured, RSS grew ~150 MB per load/unload cycle of a
    64 MB model, and stays flat with it."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def weight_bytes(llm: Any) -> int:
    """Bytes of the model's weights: parameters, buffers, and the packed copies quantized layers keep in
    their matmul kernels (ops/quant.py `_kernel`: not buffers), each tensor counted once."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.data_ptr()] = t.numel() * t.element_size()

    model = llm.model
    for t in (*model.parameters(), *model.buffers()):
        add(t)
    for module in model.modules():
        kernel = getattr(module, "_kernel", None)
        for t in (getattr(kernel, "packed", None), *getattr(kernel, "args", ())):
            add(t)
    return sum(seen.values())
