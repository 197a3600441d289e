"""Images and video through the engine and every front end: exact against transformers, and every way
of scheduling (chunked prefill, batched decode, preemption, prefix reuse) gives the same tokens.

Reference numbers: `Qwen3_5ForConditionalGeneration` on the same tiny checkpoint (fp32), run over the
prompt plus our greedy continuation in one forward; its logits at each position must pick our next
token and give the same log-probs.
"""
import asyncio
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import write_clip

from deltarun import LLM, SamplingParams
from deltarun.engine.engine import Engine, EngineConfig
from deltarun.processor.mrope import mm_token_types
from deltarun.processor.multimodal import MediaRef, extract_media
from deltarun.processor.video import VideoProcessorConfig
from deltarun.processor.vision import ImageProcessorConfig

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0, prompt_logprobs=0)
SMALL_IMAGES = ImageProcessorConfig(min_pixels=1024, max_pixels=20_000)


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def base(chat_ckpt):
    llm = LLM(str(chat_ckpt), dtype="float32", device="cpu")
    llm.image_config = SMALL_IMAGES  # small grids keep the tests fast
    llm.video_config = VideoProcessorConfig(max_pixels=40_000)
    llm.load_vision()
    return llm


def _llm(base, **kw):
    """`base` (model, tokenizer, vision tower shared) over a fresh engine configured by `kw`."""
    kw.setdefault("prefix_cache_memory", 0)
    kw.setdefault("max_memory", 1 << 30)
    llm = copy.copy(base)
    llm.engine = Engine(base.model, eos_token_ids=base.tokenizer.eos_token_ids, valid_vocab=base.tokenizer.vocab_size,
                        config=EngineConfig(**kw), vision=base.engine.vision)
    return llm


def _msgs(*parts, text="What is in it?"):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _img_part(img):
    return {"type": "image", "image": img}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", frames=9, height=96, width=64, seed=2)


def _run_full(llm, msgs, params=GREEDY):
    """(prompt ids, generated ids, generated logprobs, prompt logprobs, the request's MultiModalInput)."""
    prompt, ids, _, mm = llm.render_chat(msgs, enable_thinking=False)
    out = llm._run([llm.prepare(ids, params, mm)])[0]
    c = out.outputs[0]
    plps = [None if lp is None else lp[t].logprob for lp, t in zip(out.prompt_logprobs or [], ids)]
    return ids, c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)], plps, mm


@pytest.mark.parametrize("media", ["image", "two_images_and_video"])
def test_matches_transformers(base, hf_ref, clip, media):
    llm = _llm(base, max_prefill_tokens=7)  # chunked too: the image spans several chunks
    parts = [_img_part(_image(70, 50, 0))]
    if media != "image":
        parts += [{"type": "video_url", "video_url": {"url": str(clip)}}, _img_part(_image(40, 130, 1))]
    ids, gen, lps, plps, mm = _run_full(llm, _msgs(*parts))
    items = mm.items
    imgs = [it for it in items if it.kind == "image"]
    vids = [it for it in items if it.kind == "video"]
    full = torch.tensor([ids + gen[:-1]])
    kw = dict(pixel_values=torch.cat([it.image.pixel_values for it in imgs]),
              image_grid_thw=torch.tensor([it.grid_thw for it in imgs]))
    if vids:
        kw.update(pixel_values_videos=vids[0].video.pixel_values, video_grid_thw=torch.tensor([vids[0].grid_thw]))
    with torch.no_grad():
        logits = hf_ref(input_ids=full, mm_token_type_ids=torch.tensor([mm_token_types(ids) + [0] * (len(gen) - 1)]),
                        **kw).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    p = len(ids)
    assert ref[p - 1:].argmax(-1).tolist() == gen
    want = ref[p - 1:][torch.arange(len(gen)), torch.tensor(gen)]  # the model's full distribution
    assert torch.allclose(torch.tensor(lps), want, atol=1e-4)
    want_prompt = ref[torch.arange(p - 1), torch.tensor(ids[1:])]
    # fp32 sums in another order than transformers' through the ViT and 9 chunks: measured up to 2.5e-4 on
    # an AVX2 machine (5e-6 with AVX-512) on log-probs near −12; a real mistake is off by ≥ 1e-2
    assert plps[0] is None and torch.allclose(torch.tensor(plps[1:]), want_prompt, atol=5e-4)


def test_chunked_prefill_and_vision_runs_once(base):
    msgs = _msgs(_img_part(_image(96, 128, 3)))
    one_shot = _run_full(_llm(base), msgs)
    llm = _llm(base, max_prefill_tokens=5)
    calls = []
    hook = llm.engine.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        chunked = _run_full(llm, msgs)
    finally:
        hook.remove()
    assert len(one_shot[0]) > 3 * 5 and one_shot[4].num_vision_tokens > 5  # the image crosses chunk ends
    assert chunked[1] == one_shot[1]
    assert torch.allclose(torch.tensor(chunked[2]), torch.tensor(one_shot[2]), atol=1e-5)
    assert torch.allclose(torch.tensor(chunked[3][1:]), torch.tensor(one_shot[3][1:]), atol=1e-5)
    assert len(calls) == 1 and llm.engine.stats["vision_encodes"] == 1


def test_batched_with_text_and_other_images_equals_alone(base):
    convs = [_msgs(_img_part(_image(70, 50, 0))),
             [{"role": "user", "content": "Just text, no picture."}],
             _msgs(_img_part(_image(40, 130, 1)), _img_part(_image(64, 64, 2)), text="Compare them")]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    batched = _llm(base, max_prefill_tokens=16).chat(convs, params, enable_thinking=False)
    for conv, out in zip(convs, batched):
        alone = _llm(base).chat(conv, params, enable_thinking=False)
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    forked = _llm(base).chat(convs[0], SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True),
                             enable_thinking=False)  # n > 1: one prefill, forked state, same delta
    assert [c.token_ids for c in forked.outputs] == [batched[0].outputs[0].token_ids] * 2


def test_preempted_image_request_recomputes_exactly(base):
    probe = _llm(base)
    kv, slot = probe.engine.kv_token_bytes, probe.engine.pool.slot_nbytes()
    convs = [_msgs(_img_part(_image(70, 50, 0))), _msgs(_img_part(_image(40, 130, 1)), text="And this?")]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    llm = _llm(base, max_memory=2 * slot + 150 * kv, max_prefill_tokens=32)
    outs = llm.chat(convs, params, enable_thinking=False)
    assert llm.engine.stats["preemptions"] > 0
    for conv, out in zip(convs, outs):
        assert out.outputs[0].token_ids == _llm(base).chat(conv, params, enable_thinking=False).outputs[0].token_ids


def test_prefix_cache_keys_on_media(base):
    img_a, img_b = _image(96, 128, 4), _image(96, 128, 5)  # same size: same token count, same text ids
    llm = _llm(base, prefix_cache_memory=1 << 28, prefix_block=16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)  # (prompt logprobs skip hits)
    first = _run_full(llm, _msgs(_img_part(img_a)), params)
    assert llm.engine.stats["vision_encodes"] == 1
    again = _run_full(llm, _msgs(_img_part(img_a)), params)
    last_vision = int(again[4].vision_index[-1])
    assert llm.engine.prefix.hits == 1 and llm.engine.prefix.hit_tokens > last_vision  # the image came from cache
    assert llm.engine.stats["vision_encodes"] == 1  # so the tower did not run again
    assert again[1] == first[1] and torch.allclose(torch.tensor(again[2]), torch.tensor(first[2]), atol=1e-5)

    hits = llm.engine.prefix.hit_tokens
    other = _run_full(llm, _msgs(_img_part(img_b)), params)
    assert other[0] == first[0]  # identical token ids: only the pixels differ
    assert llm.engine.prefix.hit_tokens - hits <= int(other[4].vision_index[0])  # no hit past the image start
    assert llm.engine.stats["vision_encodes"] == 2
    cold = _run_full(_llm(base), _msgs(_img_part(img_b)), params)
    assert other[1] == cold[1] and other[1] != first[1]


def test_async_chat_stream_with_image(base, chat_ckpt):
    from deltarun.async_llm import AsyncLLM

    msgs = _msgs({"type": "image_url", "image_url": {"url": _data_url(_image(70, 50, 0))}})
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = _llm(base).chat(msgs, params, enable_thinking=False).outputs[0].text
    llm = AsyncLLM(str(chat_ckpt), dtype="float32", device="cpu", prefix_cache_memory=0, max_memory=1 << 30)
    llm.image_config = SMALL_IMAGES

    async def go():
        return "".join([d.text async for d in llm.chat_stream(msgs, params, enable_thinking=False)])
    try:
        assert asyncio.run(go()) == want
    finally:
        llm.shutdown()


def _data_url(img) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_extract_media_parts():
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}},
                                         {"type": "text", "text": "hi"}, {"video": "/v.mp4"},
                                         {"type": "video_url", "video_url": "/w.mp4"}, {"image": b"raw"}]}]
    plain, media = extract_media(msgs)
    assert media == [MediaRef("image", "data:x"), MediaRef("video", "/v.mp4"), MediaRef("video", "/w.mp4"),
                     MediaRef("image", b"raw")]
    assert [p.get("type") for p in plain[1]["content"]] == ["image", "text", "video", "video", "image"]
    assert msgs[1]["content"][0]["type"] == "image_url"  # the caller's messages are not changed
    for bad, needle in [({"type": "audio", "audio": "x"}, "unsupported content part"),
                        ({"type": "image_url", "image_url": {}}, "names no image")]:
        with pytest.raises(ValueError, match=needle):
            extract_media([{"role": "user", "content": [bad]}])


def test_bad_media_errors(base, tmp_path):
    llm = _llm(base, max_model_len=64)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    cases = [(_msgs(_img_part(str(bad))), "image 1: cannot read image"),
             (_msgs(_img_part(str(tmp_path / "none.png"))), "image 1: image file not found"),
             (_msgs({"type": "video", "video": str(bad)}), "video 1: cannot (read|decode) video"),
             ([{"role": "system", "content": [_img_part(_image(8, 8, 0))]},
               {"role": "user", "content": "hi"}], "System message cannot contain images")]
    for msgs, needle in cases:
        with pytest.raises(ValueError, match=needle):
            llm.chat(msgs, GREEDY)
    llm.image_config = ImageProcessorConfig()
    with pytest.raises(ValueError, match=r"of them for images/videos\), but the context length is 64"):
        llm.chat(_msgs(_img_part(_image(70, 50, 0))), GREEDY)
    assert not llm.engine.has_unfinished()


def test_text_only_checkpoint_refuses_images(tmp_path):
    from tiny import make_checkpoint, tiny_config

    cfg = tiny_config(vocab_size=248320)
    del cfg["vision_config"]
    ckpt = make_checkpoint(tmp_path / "m", cfg, tokenizer=True)
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="no vision tower"):
        llm.chat(_msgs(_img_part(_image(70, 50, 0))), GREEDY)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "deltarun.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=ENV)


def test_cli_image(base, chat_ckpt, tmp_path):
    img = tmp_path / "a.png"
    _image(70, 50, 0).save(img)
    common = ["--dtype", "float32", "--temperature", "0", "--max-tokens", "6", "--no-think"]
    r = _cli("generate", str(chat_ckpt), "Describe", "--image", str(img), *common)
    assert r.returncode == 0, r.stderr
    llm = _llm(base)
    llm.image_config = ImageProcessorConfig()  # the CLI's (the checkpoint's) settings
    want = llm.chat(_msgs({"type": "image", "image": str(img)}, text="Describe"),
                    SamplingParams(temperature=0, max_tokens=6), enable_thinking=False).content
    assert r.stdout == want + "\n"

    r = _cli("chat", str(chat_ckpt), *common, stdin=f"/image {img}\n/image {tmp_path}/nope.png\nDescribe\n/exit\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"attached image {img}" in r.stdout and "image file not found" in r.stdout
    assert want in r.stdout

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = _cli("generate", str(chat_ckpt), "hi", "--image", str(bad), *common)
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert r.returncode == 1 and len(lines) == 1 and "cannot read image" in lines[0], r.stderr
