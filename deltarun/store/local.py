"""What is on this machine: Qwen3.5 models in the Hugging Face cache, Ollama's store and deltarun's own folder.

Used by `deltarun list | show | pull | rm`. Everything here reads in place; only `delete` writes, and only
where deltarun may (the standard HF cache, deltarun's folder; another tool's files need `force`).
Names go through `hub` (the one resolver): aliases, `org/repo`, folders, `demo`, quantization tags.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..weights.gguf_meta import is_gguf
from . import names

QWEN_TYPES = ("qwen3_5", "qwen3_5_text")
OLLAMA_LIBRARY = ("manifests", "registry.ollama.ai", "library")
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"


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


# ---------------------------------------------------------------------------------------------- places

def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


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
                top = max(sizes, key=sizes.get)
                if not (cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")):
                    return SAFETENSORS_DTYPES.get(top, top.lower())
        except (OSError, ValueError):
            pass
    return config_dtype(cfg)


def is_qwen35_folder(path: Path) -> dict | None:
    cfg = read_json(path / "config.json")
    return cfg if cfg and cfg.get("model_type") in QWEN_TYPES else None


def folder_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size  # follows HF snapshot symlinks to the blobs
        except OSError:
            pass
    return total


# ------------------------------------------------------------------------------------------- listings

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
        if cfg is None:
            continue
        out.append(LocalModel(name=names.alias_for(repo.repo_id) or repo.repo_id, source="hf",
                              path=Path(rev.snapshot_path), size=repo.size_on_disk,
                              quant=weights_dtype(Path(rev.snapshot_path), cfg),
                              repo_id=repo.repo_id, extra={"revision": rev.commit_hash, "repo_path": repo.repo_path}))
    return out


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


def deltarun_models() -> list[LocalModel]:
    """Checkpoints in deltarun's own folder (the demo, conversions)."""
    root = names.cache_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        cfg = is_qwen35_folder(d) if d.is_dir() and not d.name.startswith(".") else None
        if cfg is None:
            continue
        name = names.DEMO if names.is_demo(d) else d.name
        out.append(LocalModel(name=name, source="deltarun", path=d, size=folder_size(d), quant=weights_dtype(d, cfg)))
    return out


def list_models() -> list[LocalModel]:
    return hf_models() + ollama_models() + deltarun_models()


# ------------------------------------------------------------------------------------------ look-ups

ALIASES_FILE = "aliases.json"


def aliases() -> dict[str, str]:
    """Names made with `/api/copy` (new name → the name or path it stands for), in deltarun's folder."""
    data = read_json(names.cache_dir() / ALIASES_FILE) or {}
    return {str(k): str(v) for k, v in data.items()}


def _write_aliases(table: dict[str, str]) -> None:
    path = names.cache_dir() / ALIASES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


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
    _write_aliases(table)
    return model


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


def forget_aliases_of(model: LocalModel) -> list[str]:
    """Remove the copied names that point at `model` (after deleting it); returns them."""
    table = aliases()
    targets = {t for t in (model.name, model.repo_id, str(model.path)) if t}
    gone = [k for k, v in table.items() if v in targets or names.split_quant(v)[0] in targets]
    if gone:
        _write_aliases({k: v for k, v in table.items() if k not in gone})
    return gone


def remove_alias(name: str) -> bool:
    table = aliases()
    if name not in table:
        return False
    del table[name]
    _write_aliases(table)
    return True


def find_local(name: str, _depth: int = 0) -> LocalModel:
    """The local model `name` stands for, never downloading; ModelNotFound with a hint otherwise."""
    text = str(name)
    table = aliases()  # Ollama's names: "mine" is "mine:latest"
    target = table.get(text) or table.get(text.removesuffix(":latest")) or table.get(f"{text}:latest")
    if target is not None and _depth < 8:
        import dataclasses

        m = find_local(target, _depth + 1)
        return dataclasses.replace(m, name=text, extra={**m.extra, "alias_of": m.name})
    path = Path(text).expanduser()
    if path.exists():
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


# -------------------------------------------------------------------------------------------- details

def parameter_counts(cfg_path: Path) -> dict[str, int]:
    from ..config import ModelConfig
    from ..weights.random_init import tensor_shapes

    counts = {"total": 0, "text": 0, "vision": 0, "mtp": 0, "embedding": 0}
    for name, shape in tensor_shapes(ModelConfig.from_file(cfg_path)).items():
        n = 1
        for s in shape:
            n *= s
        counts["total"] += n
        part = "vision" if name.startswith("model.visual.") else "mtp" if name.startswith("mtp.") else "text"
        counts[part] += n
        if "embed_tokens" in name or name == "lm_head.weight":
            counts["embedding"] += n
    return counts


def chat_template(folder: Path) -> str | None:
    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8", errors="replace")
    tc = read_json(folder / "tokenizer_config.json") or {}
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def license_of(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
        if m:
            lic = re.search(r"^license:\s*(\S.*)$", m.group(1), re.M)
            if lic:
                link = re.search(r"^license_link:\s*(\S.*)$", m.group(1), re.M)
                return lic.group(1).strip() + (f" ({link.group(1).strip()})" if link else "")
    lic_file = folder / "LICENSE"
    if lic_file.is_file():
        for line in lic_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                return line.strip()
    return None


def describe(model: LocalModel) -> dict:
    """What `deltarun show` prints, as a dict (label → value)."""
    info: dict = {"name": model.name, "where": f"{model.where}: {model.path}", "size": human_size(model.size)}
    if model.repo_id:
        info["repo"] = model.repo_id + (f" @ {model.extra['revision'][:12]}" if model.extra.get("revision") else "")
    if model.is_gguf:
        magic = model.extra.get("gguf", True) and is_gguf(model.path)
        info["format"] = "GGUF" if magic else "unknown (no GGUF magic)"
        info["quantization"] = model.quant
        info["runs"] = "in place, read-only (weights read from the GGUF file)"
        return info
    cfg = read_json(model.path / "config.json") or {}
    text = cfg.get("text_config", cfg)
    info["architecture"] = ", ".join(cfg.get("architectures") or []) + f" ({cfg.get('model_type')})"
    try:
        counts = parameter_counts(model.path / "config.json")
    except Exception as e:  # a config we cannot parse still gets shown
        info["parameters"] = f"unknown ({e})"
    else:
        info["parameters"] = (f"{_count(counts['total'])} total: text {_count(counts['text'])} "
                              f"(embedding {_count(counts['embedding'])}), vision {_count(counts['vision'])}, "
                              f"MTP {_count(counts['mtp'])}")
    layer_types = text.get("layer_types") or []
    if layer_types:
        info["layers"] = (f"{len(layer_types)} ({layer_types.count('linear_attention')} Gated DeltaNet, "
                          f"{layer_types.count('full_attention')} full attention)")
    info["context length"] = str(text.get("max_position_embeddings", "?"))
    info["dtype"] = model.quant
    template = chat_template(model.path) or ""
    caps = ["completion"]
    if cfg.get("vision_config"):
        caps.append("vision")
    if "tools" in template:
        caps.append("tools")
    if "<think>" in template:
        caps.append("thinking")
    info["capabilities"] = ", ".join(caps)
    info["license"] = license_of(model.path) or "unknown (no LICENSE or README license)"
    if template:
        lines = template.strip().splitlines()
        info["chat template"] = "\n".join(lines[:6]) + (f"\n… ({len(lines)} lines)" if len(lines) > 6 else "")
    else:
        info["chat template"] = "none"
    if names.is_demo(model.path):
        info["note"] = "RANDOM WEIGHTS (the demo): output is noise"
    return info


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# ----------------------------------------------------------------------------------------- deletion

def is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def deletion_refusal(model: LocalModel) -> str | None:
    """Why `rm` needs --force for this model, or None when deltarun may delete it."""
    if model.source == "ollama":
        return f"{model.name} belongs to Ollama's store ({ollama_dir()}); use `ollama rm` (or --force)"
    if model.source == "hf" and is_inside(model.path, hf_cache_dir()):
        return None
    if model.source == "deltarun" and is_inside(model.path, names.cache_dir()):
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
        import dataclasses

        only = dataclasses.replace(info, repos=frozenset({repo}))
        strategy = only.delete_revisions(*(r.commit_hash for r in repo.revisions))
        freed = strategy.expected_freed_size
        strategy.execute()
        if Path(repo.repo_path).exists():  # leftovers (refs, .no_exist, partial downloads)
            shutil.rmtree(repo.repo_path, ignore_errors=True)
        return freed
    if model.source == "ollama":
        manifest: Path = model.extra["manifest"]
        manifest.unlink()
        digest_name = model.path.name.replace("-", ":", 1)
        still_used = any(digest_name in p.read_text(errors="replace")
                         for p in ollama_dir().joinpath(*OLLAMA_LIBRARY).rglob("*") if p.is_file())
        if not still_used:
            model.path.unlink(missing_ok=True)
            return model.size
        return 0
    if model.path.is_file():
        model.path.unlink()
    else:
        shutil.rmtree(model.path)
    return model.size


def ollama_gguf(name: str) -> Path | None:
    """The GGUF blob of Ollama store model `name` (`qwen3.5:0.8b`, `qwen3.5` = `:latest`), else None."""
    wanted = name.lower() if ":" in name else f"{name.lower()}:latest"
    for m in ollama_models():
        if m.name.lower() == wanted and is_gguf(m.path):
            return m.path
    return None
