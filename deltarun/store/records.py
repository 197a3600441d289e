"""A local model's record (`LocalModel`) and the facts read from files on disk to fill one in: the Hugging
Face cache's place, a folder's config, dtype and size, human-readable sizes, whether a path lies inside a
folder. Reads only. Not here: finding and listing models (listing.py), Ollama's store (ollama_store.py),
what `show` prints (info.py), deleting and copying (operations.py)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

QWEN_TYPES = ("qwen3_5", "qwen3_5_text")
# In an HF cache repo folder while deltarun pulls it, and left there when a pull dies (killed, network
# gone, checksum failed): the snapshot may be partial, so the repo is not listed or loaded until a pull
# finishes it (store/pull.py writes and removes it).
PULL_MARKER = ".deltarun-pulling"


@dataclass
class LocalModel:
    name: str             # what to type: qwen3.5:0.8b, Org/Repo, ollama name:tag, demo, folder name
    source: str           # "hf", "ollama", "deltarun", "folder"
    path: Path            # model folder (HF snapshot, deltarun folder) or GGUF blob
    size: int             # bytes on disk
    quant: str            # dtype (bfloat16) or quantization (Q4_K_M, int4)
    repo_id: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_gguf(self) -> bool:
        return self.source == "ollama" or self.path.suffix == ".gguf"

    @property
    def where(self) -> str:
        return {"hf": "HF cache", "ollama": "Ollama store", "deltarun": "deltarun", "folder": "folder"}[self.source]


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def human_size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def config_dtype(cfg: dict) -> str:
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if isinstance(q, dict):
        bits = q.get("bits") or q.get("weight_bits")
        return f"{q.get('quant_method', 'quantized')}{f'-int{bits}' if bits else ''}"
    t = cfg.get("text_config") or {}
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or t.get("torch_dtype") or t.get("dtype") or "?")


SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8",
                      "I8": "int8", "U8": "uint8", "I32": "int32"}


def weights_dtype(folder: Path, cfg: dict) -> str:
    """The dtype most weight bytes have (from the first shard's safetensors header), else the config's."""
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        try:
            with open(shards[0], "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(min(n, 100 << 20)))
            sizes: dict[str, int] = {}
            for k, v in header.items():
                if k != "__metadata__" and isinstance(v, dict):
                    start, end = v.get("data_offsets", (0, 0))
                    sizes[v.get("dtype", "?")] = sizes.get(v.get("dtype", "?"), 0) + end - start
            if sizes:
                top = max(sizes, key=lambda d: sizes[d])
                if not (cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")):
                    return SAFETENSORS_DTYPES.get(top, top.lower())
        except (OSError, ValueError):
            pass
    return config_dtype(cfg)


def is_qwen35_folder(path: Path) -> dict | None:
    cfg = read_json(path / "config.json")
    return cfg if cfg and cfg.get("model_type") in QWEN_TYPES else None


def hf_repo_folder(repo: str) -> Path:
    """The HF cache folder of model repo `repo` (models--Org--Name)."""
    return hf_cache_dir() / f"models--{repo.replace('/', '--')}"


def snapshot_is_whole(snapshot: Path) -> bool:
    """Whether an HF cache snapshot may be loaded: no unfinished deltarun pull of its repo, and its config
    and weights all there (a partial download by any tool has some files and not others)."""
    snapshot = Path(snapshot)
    if (snapshot.parent.parent / PULL_MARKER).exists() or not (snapshot / "config.json").is_file():
        return False
    index = read_json(snapshot / "model.safetensors.index.json")
    if index is not None:
        shards = set((index.get("weight_map") or {}).values())
        return bool(shards) and all((snapshot / str(s)).is_file() for s in shards)  # is_file follows the link
    return any(p.is_file() for p in snapshot.glob("*.safetensors"))


def folder_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size  # follows HF snapshot symlinks to the blobs
        except OSError:
            pass
    return total


def is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False
