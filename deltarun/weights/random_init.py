"""Write a random-weights Qwen3.5 checkpoint in the exact official layout (`deltarun init-random`).

The folder holds config.json, sharded safetensors with the official tensor names and dtypes (bf16,
F32 `A_log` and `linear_attn.norm.weight`, `model.visual.*` and `mtp.*` included) plus
`model.safetensors.index.json`, tokenizer files and the chat template — what the real repos ship,
so every loading path is exercised without the real weights.
"""
from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig

BUNDLED = ("0.8B", "2B", "4B", "9B")
F32_SUFFIXES = ("linear_attn.A_log", "linear_attn.norm.weight")
SHARD_BYTES = 2 << 30


def bundled_config_path(name: str) -> Path:
    return Path(str(resources.files("deltarun") / "data" / "configs" / f"{name}.json"))


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official checkpoint for this config: name → shape."""
    t = config.text
    h, inter, v = t.hidden_size, t.intermediate_size, t.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.language_model.embed_tokens.weight": (v, h),
                                          "model.language_model.norm.weight": (h,)}
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)

    def attn(prefix: str) -> None:
        qd = t.num_attention_heads * t.head_dim
        kvd = t.num_key_value_heads * t.head_dim
        shapes.update({f"{prefix}.self_attn.q_proj.weight": (qd * (2 if t.attn_output_gate else 1), h),
                       f"{prefix}.self_attn.k_proj.weight": (kvd, h),
                       f"{prefix}.self_attn.v_proj.weight": (kvd, h),
                       f"{prefix}.self_attn.o_proj.weight": (h, qd),
                       f"{prefix}.self_attn.q_norm.weight": (t.head_dim,),
                       f"{prefix}.self_attn.k_norm.weight": (t.head_dim,)})

    def common(prefix: str) -> None:
        shapes.update({f"{prefix}.input_layernorm.weight": (h,),
                       f"{prefix}.post_attention_layernorm.weight": (h,),
                       f"{prefix}.mlp.gate_proj.weight": (inter, h),
                       f"{prefix}.mlp.up_proj.weight": (inter, h),
                       f"{prefix}.mlp.down_proj.weight": (h, inter)})

    for i, layer_type in enumerate(t.layer_types):
        p = f"model.language_model.layers.{i}"
        common(p)
        if layer_type == "full_attention":
            attn(p)
            continue
        la = f"{p}.linear_attn"
        shapes.update({f"{la}.in_proj_qkv.weight": (t.conv_dim, h),
                       f"{la}.in_proj_z.weight": (t.linear_value_dim, h),
                       f"{la}.in_proj_b.weight": (t.linear_num_value_heads, h),
                       f"{la}.in_proj_a.weight": (t.linear_num_value_heads, h),
                       f"{la}.conv1d.weight": (t.conv_dim, 1, t.linear_conv_kernel_dim),
                       f"{la}.dt_bias": (t.linear_num_value_heads,),
                       f"{la}.A_log": (t.linear_num_value_heads,),
                       f"{la}.norm.weight": (t.linear_value_head_dim,),
                       f"{la}.out_proj.weight": (h, t.linear_value_dim)})
    for i in range(t.mtp_num_hidden_layers):
        common(f"mtp.layers.{i}")
        attn(f"mtp.layers.{i}")
    if t.mtp_num_hidden_layers:
        shapes.update({"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
                       "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)})
    if config.vision:
        shapes.update(_vision_shapes(config.vision))
    return shapes


def _vision_shapes(vc: dict) -> dict[str, tuple[int, ...]]:
    c, f, out = vc["hidden_size"], vc["intermediate_size"], vc["out_hidden_size"]
    p, tp, m = vc["patch_size"], vc["temporal_patch_size"], vc["spatial_merge_size"]
    cm = c * m * m
    s = {"model.visual.patch_embed.proj.weight": (c, vc.get("in_channels", 3), tp, p, p),
         "model.visual.patch_embed.proj.bias": (c,),
         "model.visual.pos_embed.weight": (vc["num_position_embeddings"], c),
         "model.visual.merger.norm.weight": (c,), "model.visual.merger.norm.bias": (c,),
         "model.visual.merger.linear_fc1.weight": (cm, cm), "model.visual.merger.linear_fc1.bias": (cm,),
         "model.visual.merger.linear_fc2.weight": (out, cm), "model.visual.merger.linear_fc2.bias": (out,)}
    for j in range(vc["depth"]):
        b = f"model.visual.blocks.{j}"
        s.update({f"{b}.norm1.weight": (c,), f"{b}.norm1.bias": (c,), f"{b}.norm2.weight": (c,),
                  f"{b}.norm2.bias": (c,), f"{b}.attn.qkv.weight": (3 * c, c), f"{b}.attn.qkv.bias": (3 * c,),
                  f"{b}.attn.proj.weight": (c, c), f"{b}.attn.proj.bias": (c,),
                  f"{b}.mlp.linear_fc1.weight": (f, c), f"{b}.mlp.linear_fc1.bias": (f,),
                  f"{b}.mlp.linear_fc2.weight": (c, f), f"{b}.mlp.linear_fc2.bias": (c,)})
    return s


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values in the ranges real checkpoints have, so activations stay finite and outputs vary."""
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(0.5, 8.0, generator=gen).log()
    if name.endswith("dt_bias"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("linear_attn.norm.weight") or (name.endswith(".weight") and "norm" in name
                                                    and name.startswith("model.visual.")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if "norm" in name or name.endswith(".bias"):  # zero-centred RMSNorm weights, biases
        return 0.1 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    std = 0.02 if "embed" in name or name == "lm_head.weight" else 1.0 / math.sqrt(fan_in)
    return std * torch.randn(shape, generator=gen)


def write_random_checkpoint(config: str | Path, out_dir: str | Path, *, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES,
                            tokenizer: bool = True) -> Path:
    """Write a random checkpoint for `config` (a bundled name like "0.8B" or a config.json path)."""
    src = bundled_config_path(str(config)) if str(config) in BUNDLED else Path(config)
    if not src.is_file():
        raise FileNotFoundError(f"config {config!r} is neither a bundled name ({', '.join(BUNDLED)}) "
                                f"nor a config.json file")
    cfg = ModelConfig.from_file(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out / "config.json")  # byte-identical to the official file

    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in tensor_shapes(cfg).items():
        t = _random_tensor(name, shape, gen).to(torch.float32 if name.endswith(F32_SUFFIXES) else dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model.safetensors-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer:
        from ..processor.tokenizer_files import write_tokenizer_files
        write_tokenizer_files(out, thinking_default=_thinking_default(cfg))
    return out


def _thinking_default(cfg: ModelConfig) -> bool:
    """The model cards: 4B and 9B think by default, 0.8B and 2B do not (judged by hidden size)."""
    return cfg.text.hidden_size >= 2560
