"""Prompt assembly (placeholder expansion, M-RoPE positions) and the end-to-end image/video prompt.

Expansion is checked against the text transformers' Qwen3-VL processor builds (its own
`replace_image_token` / `replace_video_token`, run on a stand-in object since its video processor needs
torchvision); positions against `Qwen3_5Model.get_rope_index`; and the whole path (our processors →
our vision tower → `embed_multimodal` → our text model with M-RoPE positions) against
`Qwen3_5ForConditionalGeneration` logits on the same tiny checkpoint, fp32, judged against its fp64 run
(tests/accuracy.py).
"""
import copy
import importlib
import re
import types

import numpy as np
import pytest
import torch
from accuracy import assert_fp32_accurate
from PIL import Image
from tiny import write_clip
from transformers.video_utils import VideoMetadata

from deltarun.model.vision import embed_multimodal
from deltarun.processor.mrope import VisionTokens, decode_positions, expand_placeholders, mm_token_types, rope_index
from deltarun.processor.tokenizer import Tokenizer
from deltarun.processor.video import VideoProcessorConfig, load_video
from deltarun.processor.vision import ImageProcessorConfig, preprocess_image
from deltarun.weights.loader import load_model
from deltarun.weights.vision_loader import load_vision

QVP = importlib.import_module("transformers.models.qwen3_vl.processing_qwen3_vl").Qwen3VLProcessor
TOK = VisionTokens()
IMG, VID = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"


def _hf_expand(text, image_grids, video_grids, video_meta):
    """The prompt text transformers' processor makes (its replacement methods on a stand-in self)."""
    stub = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(merge_size=2),
        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
        image_token="<|image_pad|>", video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    stub._calculate_timestamps = lambda *a: QVP._calculate_timestamps(stub, *a)
    counters = {"image": 0, "video": 0}

    def sub(m):
        if m.group() == "<|image_pad|>":
            i = counters["image"]
            counters["image"] += 1
            return QVP.replace_image_token(stub, {"image_grid_thw": torch.tensor(image_grids)}, i)
        i = counters["video"]
        counters["video"] += 1
        return QVP.replace_video_token(stub, {"video_grid_thw": torch.tensor(video_grids),
                                              "video_metadata": video_meta}, i)
    return re.sub(r"<\|image_pad\|>|<\|video_pad\|>", sub, text)


def _hf_rope(ref, ids, image_grids, video_grids):
    x = torch.tensor([ids])
    pos, delta = ref.model.get_rope_index(
        x, torch.tensor([mm_token_types(ids)]),
        image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids) if video_grids else None)
    return pos[:, 0], int(delta[0, 0])


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", frames=11, height=96, width=64, seed=2)


def test_rope_index_matches_transformers(hf_ref):
    cases = [  # (image grids, video grids, prompt layout)
        ([[1, 4, 6]], [], ["a", "I", "bc"]),
        ([[1, 2, 2], [1, 8, 4]], [], ["I", "x", "I", "yz"]),
        ([], [[3, 4, 4]], ["q", "V", "r"]),
        ([[1, 6, 2]], [[2, 2, 8]], ["s", "V", "t", "I", "u"]),
        ([[1, 4, 4]], [], ["I"]),
    ]
    text_ids = {"a": [5, 6], "bc": [7, 8, 9], "x": [10], "yz": [11, 12], "q": [13], "r": [14, 15],
                "s": [16], "t": [17, 18], "u": [19]}
    encode = lambda s: [100 + int(10 * float(s[1:-9]))]  # noqa: E731 (stand-in for "<t seconds>" text)
    for images, vids, layout in cases:
        ids = []
        for part in layout:
            ids += ([TOK.vision_start_token_id, TOK.image_token_id, TOK.vision_end_token_id] if part == "I" else
                    [TOK.vision_start_token_id, TOK.video_token_id, TOK.vision_end_token_id] if part == "V" else
                    text_ids[part])
        ts = [[0.5 * k for k in range(t)] for t, _, _ in vids]
        full = expand_placeholders(ids, images, vids, ts, encode, TOK)
        pos, delta = rope_index(full, images, vids, TOK)
        want_pos, want_delta = _hf_rope(hf_ref, full, images, vids)
        assert torch.equal(pos, want_pos), layout
        assert delta == want_delta
        assert torch.equal(decode_positions(len(full), 3, delta)[0], torch.arange(3) + len(full) + delta)


def test_expansion_errors():
    ids = [1, TOK.image_token_id, 2]
    with pytest.raises(ValueError, match="1 image placeholders but 0"):
        expand_placeholders(ids, [], None, tokens=TOK)
    with pytest.raises(ValueError, match="does not match its grid"):
        rope_index([TOK.image_token_id] * 3, [[1, 4, 4]], tokens=TOK)
    with pytest.raises(ValueError, match="more image grids"):
        rope_index([1, 2], [[1, 2, 2]], tokens=TOK)


def test_image_and_video_prompt_matches_transformers(chat_ckpt, hf_ref, clip):
    tok = Tokenizer.from_folder(chat_ckpt)
    icfg = ImageProcessorConfig(min_pixels=1024, max_pixels=20_000)
    images = [preprocess_image(_image(70, 50, 0), icfg), preprocess_image(_image(40, 130, 1), icfg)]
    video = load_video(clip, VideoProcessorConfig(max_pixels=40_000))
    text = (f"<|im_start|>user\nPicture 1: {IMG}and a clip {VID} then {IMG}What differs?<|im_end|>\n"
            "<|im_start|>assistant\n")
    igrids = [list(im.grid_thw) for im in images]
    vgrids = [list(video.grid_thw)]
    ids = expand_placeholders(tok.encode(text), igrids, vgrids, [video.timestamps], tok.encode, TOK)
    meta = [VideoMetadata(total_num_frames=11, fps=video.fps, frames_indices=video.frame_indices)]
    assert ids == tok.encode(_hf_expand(text, igrids, vgrids, meta))

    positions, delta = rope_index(ids, igrids, vgrids, TOK)
    want_pos, want_delta = _hf_rope(hf_ref, ids, igrids, vgrids)
    assert torch.equal(positions, want_pos) and delta == want_delta

    vis = load_vision(chat_ckpt, dtype="float32", device="cpu")
    with torch.no_grad():  # embeddings in prompt order: image 1, the video, image 2
        embeds = torch.cat([vis(images[0].pixel_values, [images[0].grid_thw]),
                            vis(video.pixel_values, [video.grid_thw], max_patches=24),
                            vis(images[1].pixel_values, [images[1].grid_thw])])
        model = load_model(chat_ckpt, dtype="float32", device="cpu")
        x = torch.tensor([ids])
        emb = embed_multimodal(model, x, embeds, (TOK.image_token_id, TOK.video_token_id))
        hidden = model(None, model.new_cache(1), positions=positions[:, None, :], inputs_embeds=emb)
        logits = model.logits(hidden)[0]
        inputs = dict(input_ids=x, mm_token_type_ids=torch.tensor([mm_token_types(ids)]),
                      pixel_values=torch.cat([im.pixel_values for im in images]),
                      image_grid_thw=torch.tensor(igrids), pixel_values_videos=video.pixel_values,
                      video_grid_thw=torch.tensor(vgrids))
        want = hf_ref(**inputs).logits[0]
        ref64 = copy.deepcopy(hf_ref).double()
        want64 = ref64(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).logits[0]
        del ref64
    lp = torch.log_softmax(logits, -1)
    want_lp, want_lp64 = torch.log_softmax(want.float(), -1), torch.log_softmax(want64, -1)
    assert_fp32_accurate(lp, want_lp, want_lp64, "logprobs")
    err = assert_fp32_accurate(logits, want, want64, "logits")
    top2 = want64.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err  # the greedy token where fp32 error cannot swap the top two
    assert clear.any() and torch.equal(logits.argmax(-1)[clear], want64.argmax(-1)[clear])
