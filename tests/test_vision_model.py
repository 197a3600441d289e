"""The vision tower against transformers' Qwen3_5VisionModel (same random weights, fp32) and its loader.

Grids cover one image, several images of different sizes, non-square grids, and videos (t > 1); the
position table is resampled up and down (4×4 and 6×6 tables). Chunked video encoding must equal the
one-shot result up to fp32 summation order (attention is per frame, but a GEMM's blocking depends on its
row count). Accuracy is judged against transformers run in fp64 (tests/accuracy.py).
"""
import copy

import pytest
import torch
from accuracy import assert_fp32_accurate
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5VisionConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

from deltarun.model.vision import VisionConfig, VisionModel, num_vision_tokens
from deltarun.weights.loader import LoadError
from deltarun.weights.vision_loader import load_vision

VCFG = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48, patch_size=16,
            temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh")

GRIDS = [
    [[1, 4, 6]],                        # one non-square image
    [[1, 2, 2], [1, 8, 4], [1, 6, 10]],  # several images, sizes differ
    [[3, 4, 4]],                        # a video, 3 temporal patches
    [[1, 4, 4], [2, 6, 8], [1, 2, 12]],  # image, video, image
]


def _pair(num_pos: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = dict(VCFG, num_position_embeddings=num_pos)
    ref = Qwen3_5VisionModel._from_config(Qwen3_5VisionConfig(**cfg), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.1) + (1.0 if "norm" in name and
                                                                             name.endswith("weight") else 0.0))
    ours = VisionModel(VisionConfig.from_dict(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("num_pos", [16, 36])
def test_vision_tower_matches_transformers(num_pos):
    ref, ours = _pair(num_pos)
    ref64 = copy.deepcopy(ref).double()
    for grid in GRIDS:
        g = torch.tensor(grid)
        pv = torch.randn(int(g.prod(-1).sum()), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = ref(pv, grid_thw=g).pooler_output
            want64 = ref64(pv.double(), grid_thw=g).pooler_output
            got = ours(pv, g)
            chunked = ours(pv, g, max_patches=20)
        assert got.shape == (sum(num_vision_tokens(g)), 48)
        assert_fp32_accurate(got, want, want64, f"grid {grid}")
        assert_fp32_accurate(chunked, want, want64, f"grid {grid}, chunked")


def test_vision_tower_bf16_close():
    ref, ours = _pair(16)
    g = torch.tensor([[1, 4, 6], [2, 4, 4]])
    pv = torch.randn(int(g.prod(-1).sum()), 3 * 2 * 16 * 16)
    with torch.no_grad():
        want = ref(pv, grid_thw=g).pooler_output
        got = ours.to(torch.bfloat16)(pv, g).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 3e-2, rel


def test_bad_grid_raises():
    _, ours = _pair(16)
    with pytest.raises(ValueError, match="patches"):
        ours(torch.randn(10, 1536), torch.tensor([[1, 2, 2]]))


def test_load_vision_matches_transformers(tiny_ckpt):
    vis = load_vision(tiny_ckpt, dtype="float32", device="cpu")
    ref = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval().model.visual
    g = torch.tensor([[1, 4, 4], [2, 2, 6]])
    pv = torch.randn(int(g.prod(-1).sum()), 3 * 2 * 16 * 16)
    with torch.no_grad():
        want, got = ref(pv, grid_thw=g).pooler_output, vis(pv, g)
        want64 = ref.double()(pv.double(), grid_thw=g).pooler_output
    assert_fp32_accurate(got, want, want64, "loaded tower")
    assert vis.dtype == torch.float32 and not any(p.requires_grad for p in vis.parameters())


def test_load_vision_errors(tmp_path, tiny_ckpt):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["depth"] = 2  # the checkpoint has one block
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="missing"):
        load_vision(folder, dtype="float32", device="cpu")
    del cfg["vision_config"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_vision(folder, dtype="float32", device="cpu") is None


@pytest.mark.slow
def test_real_0_8b_vision_shape(real_08b_ckpt):
    """The 0.8B vision tower shape (12 blocks, 768 wide, 48×48 position table), random weights, fp32."""
    from safetensors import safe_open

    from deltarun.config import ModelConfig
    from deltarun.weights.loader import weight_files

    ours = load_vision(real_08b_ckpt, dtype="float32", device="cpu")
    vc = ModelConfig.from_file(real_08b_ckpt / "config.json").vision
    ref = Qwen3_5VisionModel._from_config(Qwen3_5VisionConfig(**vc), dtype=torch.float32).eval()
    state = {}
    for f in weight_files(real_08b_ckpt):
        with safe_open(str(f), "pt") as sf:
            state.update({k.removeprefix("model.visual."): sf.get_tensor(k).float()
                          for k in sf.keys() if k.startswith("model.visual.")})
    ref.load_state_dict(state)
    g = torch.tensor([[1, 8, 12], [2, 4, 6]])  # a 128×192 image and a 4-frame 64×96 video
    pv = torch.randn(int(g.prod(-1).sum()), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(pv, grid_thw=g).pooler_output
        got = ours(pv, g)
        want64 = ref.double()(pv.double(), grid_thw=g).pooler_output
    assert got.shape == (sum(num_vision_tokens(g)), 1024)
    assert_fp32_accurate(got, want, want64, "0.8B tower")
