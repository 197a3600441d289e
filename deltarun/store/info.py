"""What a local model is, for `deltarun show` and `/api/show`: parameter counts (from the config, no
weights read), the chat template, the license, and `describe` (label → value, as `show` prints it).
Reads only. Not here: finding the model (listing.py), sizes and dtypes on disk (records.py)."""
from __future__ import annotations

import re
from pathlib import Path

from ..weights.gguf_meta import is_gguf
from . import names
from .records import LocalModel, human_size, read_json


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
