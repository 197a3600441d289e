"""Image and video preprocessing against transformers, every input form, and every bad input.

Images: bit-identical pixel_values and grids to transformers' `Qwen2VLImageProcessorPil` with the
Qwen3.5 settings (patch 16, mean/std 0.5). Videos: transformers' Qwen3-VL video processor needs
torchvision, which cannot be installed beside this torch; the reference below runs its own
`sample_frames`, `smart_resize` and `patchify` (taken from the class, no instance), the processor's
`_calculate_timestamps`, and the torchvision CPU resize path for uint8 bicubic (a native
`F.interpolate(uint8, antialias=True)`, see torchvision `resize_image`), with the fused normalisation.
"""
import base64
import importlib
import io
import types

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.video_utils import VideoMetadata

from deltarun.processor.video import VideoProcessorConfig, load_video, sample_frame_indices
from deltarun.processor.vision import ImageProcessorConfig, load_image, preprocess_image, preprocess_images

VP = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
QVP = importlib.import_module("transformers.models.qwen3_vl.processing_qwen3_vl").Qwen3VLProcessor


def _rand(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    arr = rng.integers(0, 256, (h, w) if c is None else (h, w, c), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_images_match_transformers():
    ref = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                   size={"shortest_edge": 4096, "longest_edge": 200_000})
    cfg = ImageProcessorConfig(min_pixels=4096, max_pixels=200_000)
    pal = _rand(33, 47, seed=3).convert("P")
    pal.info["transparency"] = 0
    imgs = [_rand(50, 70), _rand(300, 900, seed=1), _rand(64, 64, seed=2), _rand(20, 1000, seed=4),
            _rand(90, 40, "RGBA", seed=5), _rand(90, 40, "L", seed=6), pal, _rand(9, 7, seed=7)]
    want = ref(imgs, return_tensors="pt")
    pv, grid = preprocess_images(imgs, cfg)
    assert grid.tolist() == want["image_grid_thw"].tolist()
    assert torch.equal(pv, want["pixel_values"])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_encoded_formats_and_sources(fmt, tmp_path):
    img = _rand(70, 100, seed=8)
    data = _encoded(img, fmt)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    ref = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                   size={"shortest_edge": 4096, "longest_edge": 200_000})
    want = ref([decoded], return_tensors="pt")["pixel_values"]
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    cfg = ImageProcessorConfig(min_pixels=4096, max_pixels=200_000)
    for src in (data, str(path), path, b64, f"data:image/{fmt.lower()};base64,{b64}"):
        out = preprocess_image(src, cfg)
        assert torch.equal(out.pixel_values, want), f"{fmt} from {type(src).__name__}"


def test_gif_first_frame():
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    assert img.getpixel((5, 5)) == (255, 0, 0)


def test_bad_images(tmp_path):
    png = _encoded(_rand(64, 64), "PNG")
    cases = {
        "corrupt": b"\x89PNG\r\n\x1a\n" + b"garbage" * 10,
        "truncated": png[: len(png) // 2],
        "not an image": b"hello world, not an image at all",
        "unsupported format": _encoded(_rand(8, 8), "BMP"),
        "empty": b"",
    }
    for name, data in cases.items():
        with pytest.raises(ValueError):
            load_image(data)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(_encoded(Image.new("L", (4000, 3000)), "PNG"), max_image_pixels=10_000_000)
    with pytest.raises(ValueError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="disabled"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ValueError, match="base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(_rand(2, 500))


def _make_video(path, n, w, h, fps, codec="mpeg4", fmt=None):
    rng = np.random.default_rng(1)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            img[..., 0] += np.uint8(i * 9 % 180)
            img[:, : w // 2, 1] += 150
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _reference_video(path, cfg: VideoProcessorConfig):
    with av.open(str(path)) as c:
        fps = float(c.streams.video[0].average_rate)
        allf = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    md = VideoMetadata(total_num_frames=len(allf), fps=fps)
    stub = types.SimpleNamespace(fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames)
    idx = VP.Qwen3VLVideoProcessor.__dict__["sample_frames"](stub, md, fps=cfg.fps)
    v = torch.from_numpy(allf[idx]).permute(0, 3, 1, 2).contiguous()
    h, w = VP.smart_resize(num_frames=v.shape[0], height=v.shape[-2], width=v.shape[-1], temporal_factor=2,
                           factor=32, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    if (h, w) != tuple(v.shape[-2:]):
        v = F.interpolate(v, size=[h, w], mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    std = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    v = ((v.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))[None]
    pv, gt, gh, gw = VP.Qwen3VLVideoProcessor.__dict__["patchify"](None, v, 16, 2, 2)
    ts = QVP._calculate_timestamps(None, list(idx), fps, 2)
    return pv[0], (gt, gh, gw), ts, list(idx)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("vid")
    return {"mp4": _make_video(d / "a.mp4", 23, 90, 60, 10),
            "webm": _make_video(d / "b.webm", 15, 80, 48, 6, codec="libvpx", fmt="webm"),
            "mkv_odd": _make_video(d / "c.mkv", 5, 64, 64, 2, fmt="matroska")}


@pytest.mark.parametrize("name,cfg", [
    ("mp4", VideoProcessorConfig(min_pixels=4096, max_pixels=60_000)),
    ("mp4", VideoProcessorConfig(fps=4.0, max_pixels=30_000)),
    ("webm", VideoProcessorConfig(fps=1.0)),
    ("mkv_odd", VideoProcessorConfig(min_frames=3)),
])
def test_video_matches_transformers(videos, name, cfg):
    got = load_video(videos[name], cfg)
    pv, grid, ts, idx = _reference_video(videos[name], cfg)
    assert got.grid_thw == grid and got.frame_indices == idx
    assert got.timestamps == pytest.approx(ts)
    assert torch.equal(got.pixel_values, pv)
    chunks = list(got.pixel_chunks(max_temporal=1))
    assert len(chunks) == grid[0] and torch.equal(torch.cat([c for c, _ in chunks]), pv)


def test_video_sources(videos):
    data = videos["mp4"].read_bytes()
    want = load_video(videos["mp4"]).pixel_values
    for src in (data, str(videos["mp4"]), base64.b64encode(data).decode(),
                "data:video/mp4;base64," + base64.b64encode(data).decode()):
        assert torch.equal(load_video(src).pixel_values, want)


def test_bad_videos(videos, tmp_path):
    data = videos["mp4"].read_bytes()
    with pytest.raises(ValueError):
        load_video(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    with pytest.raises(ValueError):
        load_video(data[:200])  # truncated before any frame
    with pytest.raises(ValueError, match="disabled"):
        load_video("https://example.com/clip.mp4")
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as c:  # a valid container with a video stream and zero frames
        s = c.add_stream("mpeg4", rate=2)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    with pytest.raises(ValueError, match="no video stream|no .*frames|cannot"):
        load_video(empty)
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 30.0, VideoProcessorConfig())
    audio = tmp_path / "a.wav"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(ValueError, match="no video stream"):
        load_video(audio)
