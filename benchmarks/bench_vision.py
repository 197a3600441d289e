"""Vision encoding benchmark (issue 5): seconds to preprocess + encode media with the real tower shapes.

For the 0.8B and 2B vision configs (random weights: speed does not depend on them), in a fresh process
per case: a 1024×768 image and a 10 s 720p video sampled at 2 fps. Prints tokens produced, seconds
(preprocessing and tower separately) and peak RSS.

    .venv/bin/python benchmarks/bench_vision.py                       # both shapes, both media
    .venv/bin/python benchmarks/bench_vision.py --sizes 0.8B --dtype float32
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_media(folder: Path) -> tuple[Path, Path]:
    """A noisy 1024×768 PNG and a 10 s 1280×720 30 fps mp4 (noise is the worst case for codecs)."""
    import av
    from PIL import Image

    rng = np.random.default_rng(0)
    image = folder / "image.png"
    Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(image)
    video = folder / "video.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        base = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
        for i in range(300):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return image, video


def child(size: str, kind: str, path: str, dtype: str) -> None:
    from deltarun.config import ModelConfig
    from deltarun.model.vision import VisionConfig, VisionModel, num_vision_tokens
    from deltarun.processor.video import VideoProcessorConfig, load_video
    from deltarun.processor.vision import ImageProcessorConfig, preprocess_image
    from deltarun.weights.random_init import bundled_config_path

    vc = ModelConfig.from_file(bundled_config_path(size)).vision
    tower = VisionModel(VisionConfig.from_dict(vc)).eval().requires_grad_(False)
    for p in tower.parameters():  # the rotary buffer stays fp32, as the loader keeps it
        p.data = p.data.to(getattr(torch, dtype))
    t0 = time.perf_counter()
    if kind == "image":
        item = preprocess_image(path, ImageProcessorConfig())
        pixels, grid = item.pixel_values, torch.as_tensor(item.grid_thw).view(1, 3)
    else:
        item = load_video(path, VideoProcessorConfig())
        pixels, grid = item.pixel_values, torch.as_tensor(item.grid_thw).view(1, 3)
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = tower(pixels.to(tower.dtype), grid)
    t2 = time.perf_counter()
    print(json.dumps({"tokens": int(sum(num_vision_tokens(grid))), "grid": grid.tolist()[0], "prep": t1 - t0,
                      "encode": t2 - t1, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "shape": list(out.shape)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.8B,2B")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.dtype)
    load = open("/proc/loadavg").read().split()[0]
    print(f"command: {' '.join(sys.argv)}\ntorch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}, load average {load}\n", flush=True)
    rows = ["| vision shape | media | grid (t, h, w) | tokens | preprocess s | encode s | peak RSS GB |",
            "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        image, video = make_media(Path(tmp))
        for size in args.sizes.split(","):
            for kind, path in (("image", image), ("video", video)):
                res = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--child", size, kind,
                                      str(path)], capture_output=True, text=True)
                if res.returncode:
                    rows.append(f"| {size} | {kind} | failed: {res.stderr.strip().splitlines()[-1]} |")
                else:
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    label = "1024×768 image" if kind == "image" else "10 s 720p video, 2 fps"
                    rows.append(f"| {size} | {label} | {tuple(r['grid'])} | {r['tokens']} | {r['prep']:.2f} | "
                                f"{r['encode']:.1f} | {r['rss'] / 1e9:.2f} |")
                print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
