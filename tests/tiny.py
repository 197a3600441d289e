"""Tiny random Qwen3.5 configs that keep every structural feature, and checkpoints made from them.

Features kept: both layer types with a `layer_types` pattern that is not 3:1, nv > nk head grouping,
unequal key/value head dims in DeltaNet, GQA, partial interleaved M-RoPE, an MTP layer and a small
vision tower (so the loader sees `mtp.*` and `model.visual.*`), tied or untied lm_head.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from deltarun.weights.random_init import write_random_checkpoint

BASE = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "image_token_id": 248056, "video_token_id": 248057,
    "vision_start_token_id": 248053, "vision_end_token_id": 248054,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_5_text", "attention_bias": False, "attention_dropout": 0.0,
        "attn_output_gate": True, "dtype": "float32", "eos_token_id": 248044,
        "full_attention_interval": 4, "head_dim": 32, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 96,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                        "full_attention"],
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_value_head_dim": 24, "max_position_embeddings": 4096,
        "mlp_only_layers": [], "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": 4, "num_hidden_layers": 5, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 1024,
        "mamba_ssm_dtype": "float32",
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [2, 1, 1], "rope_type": "default",
                            "rope_theta": 10000, "partial_rotary_factor": 0.25},
    },
    "vision_config": {
        "deepstack_visual_indexes": [], "depth": 1, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64, "model_type": "qwen3_5",
        "num_heads": 2, "num_position_embeddings": 16, "out_hidden_size": 64, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
}


def tiny_config(**text_overrides) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["text_config"].update(text_overrides)
    if "tie_word_embeddings" in text_overrides:
        cfg["tie_word_embeddings"] = text_overrides["tie_word_embeddings"]
    cfg["text_config"]["num_hidden_layers"] = len(cfg["text_config"]["layer_types"])
    return cfg


VARIANTS = {
    # name: text_config overrides
    "hybrid": {},
    "untied_gqa4": {"tie_word_embeddings": False, "num_attention_heads": 8, "num_key_value_heads": 2,
                    "layer_types": ["full_attention", "linear_attention", "linear_attention"]},
    "equal_heads": {"linear_num_value_heads": 2, "linear_value_head_dim": 16,
                    "layer_types": ["linear_attention"] * 3 + ["full_attention"] * 2 + ["linear_attention"]},
}


def make_checkpoint(out: Path, cfg: dict, seed: int = 0, dtype=torch.float32, tokenizer: bool = False,
                    shard_bytes: int = 1 << 20) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "src_config.json").write_text(json.dumps(cfg, indent=2))
    write_random_checkpoint(out / "src_config.json", out, seed=seed, dtype=dtype, shard_bytes=shard_bytes,
                            tokenizer=tokenizer)
    (out / "src_config.json").unlink()
    return out


def write_clip(path: Path, frames: int, height: int, width: int, seed: int) -> Path:
    """A small mpeg4 clip of random frames at 4 fps (vision tests)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                                               format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
