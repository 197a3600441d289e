"""Model configuration read from a Hugging Face `config.json` (Qwen3.5 layout).

Only what the model code needs lives here; engine settings live with the engine. The official files
nest the decoder under `text_config` (architecture `Qwen3_5ForConditionalGeneration`); a flat
`qwen3_5_text` config (as `Qwen3_5ForCausalLM` saves it) is accepted too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(ValueError):
    """A config.json that deltarun cannot run."""


@dataclass
class RopeConfig:
    theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    mrope_interleaved: bool = True
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0  # YaRN
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RopeConfig":
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"unsupported rope_type {rope_type!r} (supported: default, yarn)")
        return cls(
            theta=float(d.get("rope_theta", 10_000_000.0)),
            partial_rotary_factor=float(d.get("partial_rotary_factor", 0.25)),
            mrope_section=tuple(d.get("mrope_section", (11, 11, 10))),
            mrope_interleaved=bool(d.get("mrope_interleaved", True)),
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
            beta_fast=float(d.get("beta_fast", 32.0)),
            beta_slow=float(d.get("beta_slow", 1.0)),
            attention_factor=d.get("attention_factor"),
        )


@dataclass
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    vocab_size: int
    layer_types: list[str]
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262_144
    tie_word_embeddings: bool = True
    attn_output_gate: bool = True
    attention_bias: bool = False
    eos_token_id: int | list[int] | None = 248044
    mtp_num_hidden_layers: int = 0
    rope: RopeConfig = field(default_factory=RopeConfig)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim


@dataclass
class ModelConfig:
    """The parsed config.json: the text decoder plus what the edges need (vision ids, raw dicts)."""

    text: TextConfig
    architectures: list[str]
    model_type: str
    vision: dict[str, Any] | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(data.get("architectures") or []) or "unknown"
            raise ConfigError(
                f"{source}: model_type {model_type!r} (architectures: {archs}) is not a Qwen3.5 model; "
                f"deltarun runs model_type {' or '.join(SUPPORTED_MODEL_TYPES)}"
            )
        text = data.get("text_config", data) if model_type == "qwen3_5" else data
        return cls(
            text=_text_config(text, data, source),
            architectures=list(data.get("architectures") or []),
            model_type=model_type,
            vision=data.get("vision_config"),
            image_token_id=data.get("image_token_id"),
            video_token_id=data.get("video_token_id"),
            vision_start_token_id=data.get("vision_start_token_id"),
            vision_end_token_id=data.get("vision_end_token_id"),
            raw=data,
        )


def apply_rope_override(config: ModelConfig, override: dict[str, Any] | str | None,
                        context_length: int | None = None) -> None:
    """Apply a user's rope override (the model card's YaRN recipe) and check the context length.

    `override` is a dict like the card's `rope_parameters`, or "yarn:FACTOR" as a shorthand for
    YaRN over the model's native length. A context longer than the native one needs YaRN.
    """
    t = config.text
    if isinstance(override, str):
        kind, _, factor = override.partition(":")
        if kind != "yarn":
            raise ConfigError(f"rope override {override!r}: use yarn:FACTOR or a JSON object")
        try:
            override = {"rope_type": "yarn", "factor": float(factor or 4.0)}
        except ValueError:
            raise ConfigError(f"rope override {override!r}: FACTOR must be a number") from None
    if override:
        merged = {"rope_theta": t.rope.theta, "partial_rotary_factor": t.rope.partial_rotary_factor,
                  "mrope_section": list(t.rope.mrope_section), "mrope_interleaved": t.rope.mrope_interleaved,
                  "original_max_position_embeddings": t.max_position_embeddings, **override}
        t.rope = RopeConfig.from_dict(merged)
        if t.rope.rope_type == "yarn":
            t.max_position_embeddings = int(t.rope.factor * (t.rope.original_max_position_embeddings
                                                             or t.max_position_embeddings))
    if context_length is not None:
        if context_length < 2:
            raise ConfigError(f"context length {context_length} is too small")
        if context_length > t.max_position_embeddings:
            need = context_length / (t.rope.original_max_position_embeddings or t.max_position_embeddings)
            raise ConfigError(
                f"context length {context_length} exceeds the model's {t.max_position_embeddings} positions; "
                f"enable YaRN, e.g. --rope-scaling yarn:{max(2.0, float(int(need + 0.999)))}")


def _text_config(t: dict[str, Any], top: dict[str, Any], source: str) -> TextConfig:
    required = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads",
        "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "vocab_size",
    )
    missing = [k for k in required if k not in t]
    if missing:
        raise ConfigError(f"{source}: text config lacks {', '.join(missing)}")
    n = int(t["num_hidden_layers"])
    layer_types = t.get("layer_types")
    if layer_types is None:
        interval = int(t.get("full_attention_interval", 4))
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)
        ]
    if len(layer_types) != n or any(lt not in LAYER_TYPES for lt in layer_types):
        raise ConfigError(f"{source}: layer_types must list {n} entries from {LAYER_TYPES}")
    if int(t["linear_num_value_heads"]) % int(t["linear_num_key_heads"]):
        raise ConfigError(f"{source}: linear_num_value_heads must be a multiple of linear_num_key_heads")
    if int(t["num_attention_heads"]) % int(t["num_key_value_heads"]):
        raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope = {"rope_theta": t.get("rope_theta", 10_000_000.0), **rope}
    if "partial_rotary_factor" in t and "partial_rotary_factor" not in rope:
        rope["partial_rotary_factor"] = t["partial_rotary_factor"]
    tie = t.get("tie_word_embeddings", top.get("tie_word_embeddings", True))
    head_dim = t.get("head_dim") or int(t["hidden_size"]) // int(t["num_attention_heads"])
    return TextConfig(
        hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]),
        num_hidden_layers=n,
        num_attention_heads=int(t["num_attention_heads"]),
        num_key_value_heads=int(t["num_key_value_heads"]),
        head_dim=int(head_dim),
        linear_num_key_heads=int(t["linear_num_key_heads"]),
        linear_num_value_heads=int(t["linear_num_value_heads"]),
        linear_key_head_dim=int(t["linear_key_head_dim"]),
        linear_value_head_dim=int(t["linear_value_head_dim"]),
        linear_conv_kernel_dim=int(t["linear_conv_kernel_dim"]),
        vocab_size=int(t["vocab_size"]),
        layer_types=list(layer_types),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(t.get("max_position_embeddings", 262_144)),
        tie_word_embeddings=bool(tie),
        attn_output_gate=bool(t.get("attn_output_gate", True)),
        attention_bias=bool(t.get("attention_bias", False)),
        eos_token_id=t.get("eos_token_id", top.get("eos_token_id")),
        mtp_num_hidden_layers=int(t.get("mtp_num_hidden_layers", 0)),
        rope=RopeConfig.from_dict(rope),
    )
