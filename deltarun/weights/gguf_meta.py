"""GGUF files (llama.cpp / Ollama, architecture `qwen35`) → a small sidecar model folder.

The sidecar lives under `cache_dir()/gguf/<key>` (key: the file's resolved path, size and mtime) and
holds what the rest of deltarun reads from a model folder: `config.json` rebuilt from the GGUF
metadata (the inverse of llama.cpp's `Qwen3_5TextModel.set_gguf_parameters`, and of Ollama's own
converter, which writes per-layer `head_count_kv` and `mrope_sections`), `tokenizer.json` from
`tokenizer.ggml.tokens/token_type/merges`, the chat template, and `gguf.json` naming the GGUF file.
No weights are copied: `weights/gguf.py` reads them from the file itself. The vision tower is not in
a GGUF (llama.cpp ships it as a separate mmproj file), so the config has no `vision_config`; MTP
(`nextn`) layers are not declared either.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import sweep, temp_path
from ..paths import cache_dir
from .common import LoadError
from .gguf_file import GGUFFile

ARCH = "qwen35"
MARKER = "gguf.json"
SIDECAR_FORMAT = 1  # bump when the sidecar's content changes: old sidecars are then rebuilt
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # gguf.TokenType values
_MISSING = object()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed header of `path` (tensor data memory-mapped); LoadError for anything not a whole GGUF."""
    return GGUFFile(path)


def field(reader: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """A metadata value (arrays as lists); LoadError naming the key when it is absent and required."""
    if key not in reader.fields:
        if default is _MISSING:
            raise LoadError(f"{reader.path}: GGUF metadata lacks {key}")
        return default
    return reader.value(key)


# ------------------------------------------------------------------------------------------- config
def config_from_gguf(reader) -> dict:
    """The Hugging Face style config.json (nested `qwen3_5` layout) the GGUF metadata describes."""
    arch = field(reader, "general.architecture")
    if arch != ARCH:
        raise LoadError(f"{reader.path}: GGUF architecture {arch!r} is not Qwen3.5 "
                        f"(deltarun runs architecture {ARCH!r})")

    def kv(name: str, default: Any = _MISSING) -> Any:
        return field(reader, f"{ARCH}.{name}", default)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LoadError(f"{reader.path}: tensor token_embd.weight is missing")
    vocab, hidden = tensors["token_embd.weight"].shape
    n_nextn = int(kv("nextn_predict_layers", 0))
    n_layer = int(kv("block_count")) - n_nextn  # the converter counts MTP blocks in block_count
    heads, head_dim = int(kv("attention.head_count")), int(kv("attention.key_length"))
    nv = int(kv("ssm.time_step_rank"))
    recurrent = kv("attention.recurrent_layers", None)
    kv_heads = kv("attention.head_count_kv")
    if isinstance(kv_heads, list):  # Ollama's converter: per layer, 0 for the linear-attention ones
        recurrent = recurrent if recurrent is not None else [n == 0 for n in kv_heads]
        kv_heads = max(kv_heads)
    if recurrent is not None:
        layer_types = ["linear_attention" if r else "full_attention" for r in recurrent[:n_layer]]
    else:  # what llama.cpp assumes without the array
        interval = int(kv("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layer)]
    sections = [int(s) for s in kv("rope.dimension_sections", kv("mrope_sections", [11, 11, 10]))][:3]
    rope: dict[str, Any] = {
        "mrope_interleaved": True, "mrope_section": sections, "rope_type": "default",
        "rope_theta": _f32(kv("rope.freq_base", 10_000_000.0)),
        "partial_rotary_factor": int(kv("rope.dimension_count", head_dim // 4)) / head_dim,
    }
    if field(reader, f"{ARCH}.rope.scaling.type", "none") == "yarn":
        rope.update(rope_type="yarn", factor=float(kv("rope.scaling.factor")),
                    original_max_position_embeddings=int(kv("rope.scaling.original_context_length")))
    tied = "output.weight" not in tensors
    eos = int(field(reader, "tokenizer.ggml.eos_token_id", 248044))
    text = {
        "model_type": "qwen3_5_text", "attention_bias": False, "attn_output_gate": True, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": int(kv("feed_forward_length")),
        "num_hidden_layers": n_layer, "layer_types": layer_types,
        "num_attention_heads": heads, "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "linear_conv_kernel_dim": int(kv("ssm.conv_kernel")),
        "linear_key_head_dim": int(kv("ssm.state_size")),
        "linear_num_key_heads": int(kv("ssm.group_count")),
        "linear_num_value_heads": nv,
        "linear_value_head_dim": int(kv("ssm.inner_size")) // nv,
        "max_position_embeddings": int(kv("context_length", 262_144)),
        "rms_norm_eps": _f32(kv("attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": vocab, "tie_word_embeddings": tied, "eos_token_id": eos,
        "mtp_num_hidden_layers": 0,  # GGUF `nextn` blocks are ignored (see module docstring)
        "rope_parameters": rope,
    }
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "tie_word_embeddings": tied, "text_config": text}


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.9999999747e-07)."""
    return float(str(np.float32(value)))


# ---------------------------------------------------------------------------------------- tokenizer
def tokenizer_json(reader) -> str | None:
    """tokenizer.json text for the file's byte-level BPE vocabulary (None when the file has none)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from ..processor.tokenizer_files import NOT_SPECIAL, PRETOKENIZE_REGEX

    if field(reader, "tokenizer.ggml.model", None) is None:
        return None
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise LoadError(f"{reader.path}: tokenizer model {field(reader, 'tokenizer.ggml.model')!r} "
                        f"is not Qwen's byte-level BPE ('gpt2')")
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    types: list[int] = field(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = [m.split(" ", 1) for m in field(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_NORMAL}
    added: list[dict[str, Any]] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": ty == TOKEN_CONTROL and t not in NOT_SPECIAL}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    # The same pipeline as the official tokenizer.json (processor/tokenizer_files.build_hf_tokenizer);
    # vocabulary, merges and added tokens are then put in as JSON so that every id is the file's.
    tok = Tokenizer(models.BPE(vocab={}, merges=[], ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    # the stubs declare no arguments for decoders.ByteLevel, which takes (and ignores) these keywords
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False,  # type: ignore[call-arg]
                                     use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    data = json.loads(tok.to_str())
    data["model"].update(vocab=vocab, merges=merges)
    data["added_tokens"] = added
    text = json.dumps(data, ensure_ascii=False)
    check = Tokenizer.from_str(text)
    for a in added:  # the library must keep the file's ids (it would renumber a clash silently)
        if check.token_to_id(a["content"]) != a["id"]:
            raise LoadError(f"{reader.path}: token {a['content']!r} does not keep id {a['id']}")
    return text


def tokenizer_config(reader, tokens: list[str] | None) -> dict:
    """tokenizer_config.json: the chat template and the special tokens the template reads."""
    out: dict[str, Any] = {"add_bos_token": False, "bos_token": None, "clean_up_tokenization_spaces": False}
    template = field(reader, "tokenizer.chat_template", None)
    if template:
        out["chat_template"] = template
    for key, name in (("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"), ("bos_token", "bos_token_id")):
        idx = field(reader, f"tokenizer.ggml.{name}", None)
        if tokens is not None and idx is not None and 0 <= int(idx) < len(tokens) and key != "bos_token":
            out[key] = tokens[int(idx)]  # Qwen adds no BOS, whatever the file's bos id says
    return out


def is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (its magic bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ sidecar
def sidecar_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{SIDECAR_FORMAT}".encode()).hexdigest()
    return cache_dir() / "gguf" / f"{path.stem[:48]}-{key[:16]}"


def sidecar_for(path: str | os.PathLike) -> Path:
    """The sidecar folder of GGUF file `path` (built on first use; the file is only read)."""
    path = Path(path).expanduser().resolve()
    out = sidecar_dir(path)
    if (out / MARKER).is_file():
        return out
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tok_text = tokenizer_json(reader)
    tokens = field(reader, "tokenizer.ggml.tokens", None)
    tok_config = tokenizer_config(reader, tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep(out.parent)  # sidecars a killed process left half-built
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tok_text is not None:
            (tmp / "tokenizer.json").write_text(tok_text, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
        if tok_config.get("chat_template"):
            (tmp / "chat_template.jinja").write_text(tok_config["chat_template"], encoding="utf-8")
        st = path.stat()
        (tmp / MARKER).write_text(json.dumps({"gguf": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                              "format": SIDECAR_FORMAT}, indent=2) + "\n")
        if out.exists() and not (out / MARKER).is_file():
            shutil.rmtree(out, ignore_errors=True)  # a broken leftover
        try:
            tmp.rename(out)  # atomic: a half-built sidecar is never picked up
        except OSError:
            if not (out / MARKER).is_file():  # else another process built the same sidecar meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_of(folder: Path) -> Path | None:
    """The GGUF file a sidecar folder stands for (None for ordinary folders); LoadError if it changed."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    path = Path(info["gguf"])
    if not path.is_file():
        raise LoadError(f"{folder} stands for {path}, which no longer exists")
    if path.stat().st_size != info["size"]:
        raise LoadError(f"{path} changed since {folder} was made from it; load the .gguf file again")
    return path
