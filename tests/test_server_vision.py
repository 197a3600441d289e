"""Images and video over HTTP: the official `openai` and `ollama` clients against a live server with the
tiny checkpoint (it has a vision tower). Greedy fp32 answers must be exactly what `LLM.chat` gives for the
same media in-process; bad media is a 400 in the API's own error shape and the server keeps serving."""
import base64
import functools
import http.server
import io
import threading

import httpx
import numpy as np
import ollama
import openai
import pytest
from PIL import Image
from server_helpers import live_server, wait_idle
from tiny import write_clip

from deltarun import SamplingParams

N = 6
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True}


@pytest.fixture(scope="module")
def live(chat_ckpt):
    return live_server(chat_ckpt)


@pytest.fixture(scope="module")
def oa(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ol(live):
    return ollama.Client(host=live.url)


def _png(seed: int, h: int = 40, w: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory) -> bytes:
    return write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", frames=6, height=48, width=32, seed=3).read_bytes()


def _reference(chat_llm, parts: list[dict], text: str = "What is in it?"):
    """(expanded prompt ids, greedy token ids, content) from the in-process `LLM.chat`."""
    out = chat_llm.chat([{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
                        SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), enable_thinking=False)
    return out.prompt_token_ids, out.outputs[0].token_ids, out.outputs[0].content


def _openai_tokens(oa, parts: list[dict], text: str = "What is in it?"):
    r = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
        *parts, {"type": "text", "text": text}]}], max_tokens=N, temperature=0, logprobs=True, extra_body=NO_THINK)
    return r, [bytes(e.bytes) for e in r.choices[0].logprobs.content]


def _token_bytes(chat_llm, ids):
    return [bytes(chat_llm.tokenizer.id_to_token_bytes(t)) for t in ids]


@pytest.mark.parametrize("form", ["data_url", "bare_base64"])
def test_openai_image_matches_in_process(oa, chat_llm, form):
    png = _png(0)
    url = "data:image/png;base64," + _b64(png) if form == "data_url" else _b64(png)
    prompt, gen, content = _reference(chat_llm, [{"type": "image", "image": png}])
    r, toks = _openai_tokens(oa, [{"type": "image_url", "image_url": {"url": url}}])
    assert toks == _token_bytes(chat_llm, gen) and r.choices[0].message.content == content
    assert r.usage.prompt_tokens == len(prompt) > 60  # the image's vision tokens are counted


def test_openai_two_images_and_a_video(oa, chat_llm, clip_mp4):
    video = "data:video/mp4;base64," + _b64(clip_mp4)
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(_png(1))}},
             {"type": "video_url", "video_url": {"url": video}},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(_png(2, 24, 60))}}]
    prompt, gen, _ = _reference(chat_llm, parts, "Compare them.")
    r, toks = _openai_tokens(oa, parts, "Compare them.")
    assert toks == _token_bytes(chat_llm, gen) and r.usage.prompt_tokens == len(prompt)


def test_ollama_images_match_in_process(ol, chat_llm):
    png = _png(4)
    prompt, gen, content = _reference(chat_llm, [{"type": "image", "image": png}])
    r = ol.chat(model="tiny", messages=[{"role": "user", "content": "What is in it?", "images": [png]}],
                think=False, options={"num_predict": N, "temperature": 0})
    assert r.message.content == content and r.prompt_eval_count == len(prompt) and r.eval_count == N
    g = ol.generate(model="tiny", prompt="What is in it?", images=[_b64(png)], think=False,
                    options={"num_predict": N, "temperature": 0})
    assert g.context == prompt + gen and g.response == content


def test_ollama_generate_context_then_images(ol, chat_llm):
    """The context goes before the new turn and the image positions follow it."""
    first = ol.generate(model="tiny", prompt="Hi", think=False, options={"num_predict": 3, "temperature": 0})
    png = _png(5)
    g = ol.generate(model="tiny", prompt="And this?", images=[_b64(png)], context=first.context, think=False,
                    options={"num_predict": N, "temperature": 0})
    turn = chat_llm.render_chat([{"role": "user", "content": [{"type": "image", "image": png},
                                                              {"type": "text", "text": "And this?"}]}], False)[1]
    assert g.context[:len(first.context)] == first.context
    assert g.prompt_eval_count == len(first.context) + len(turn) and len(g.context) == g.prompt_eval_count + N
    with pytest.raises(ollama.ResponseError, match="context holding images") as e:  # its pads cannot be replayed
        ol.generate(model="tiny", prompt="more", context=g.context, options={"num_predict": 1})
    assert e.value.status_code == 400


def test_bad_media_is_a_400_and_serving_goes_on(oa, ol, live, tmp_path):
    corrupt = "data:image/png;base64," + _b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(openai.BadRequestError, match="image 1") as e:
        oa.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": corrupt}}, {"type": "text", "text": "hi"}]}])
    assert e.value.status_code == 400
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": corrupt}}]}]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == "messages"
    r = httpx.post(live.url + "/api/chat", json={"model": "tiny", "messages": [
        {"role": "user", "content": "hi", "images": [_b64(b"not an image at all")]}]}, timeout=60)
    assert r.status_code == 400 and set(r.json()) == {"error"} and "image 1" in r.json()["error"]
    on_disk = tmp_path / "a.png"
    on_disk.write_bytes(_png(0))
    for bad in ["not base64 !!", str(on_disk), f"file://{on_disk}"]:  # a path is read as base64: refused
        r = httpx.post(live.url + "/api/chat", json={"model": "tiny", "messages": [
            {"role": "user", "content": "hi", "images": [bad]}]}, timeout=60)
        assert r.status_code == 400 and "image 1" in r.json()["error"]
        with pytest.raises(openai.BadRequestError, match="image 1"):
            _openai_tokens(oa, [{"type": "image_url", "image_url": {"url": bad}}])
    with pytest.raises(ollama.ResponseError, match="raw") as e:
        ol.generate(model="tiny", prompt="hi", raw=True, images=[_b64(_png(0))])
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="unsupported content part"):
        oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}])
    assert wait_idle(live.llm)
    ok = oa.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_http_urls_need_the_flag(oa, ol, chat_llm, live, tmp_path, monkeypatch):
    png = _png(6)
    (tmp_path / "a.png").write_bytes(png)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/a.png"
    part = [{"type": "image_url", "image_url": {"url": url}}]
    try:
        with pytest.raises(openai.BadRequestError, match="--allow-http-media"):
            _openai_tokens(oa, part)
        with pytest.raises(openai.BadRequestError, match="--allow-http-media"):
            _openai_tokens(oa, [{"type": "video_url", "video_url": {"url": url}}])
        monkeypatch.setattr(live.llm.image_config, "allow_http", True)  # what `serve --allow-http-media` sets
        with pytest.raises(openai.BadRequestError, match="--allow-private-media"):  # 127.0.0.1 is private
            _openai_tokens(oa, part)
        monkeypatch.setattr(live.llm.image_config, "allow_private", True)  # `--allow-private-media`
        _, gen, _ = _reference(chat_llm, [{"type": "image", "image": png}])
        assert _openai_tokens(oa, part)[1] == _token_bytes(chat_llm, gen)
    finally:
        srv.shutdown()
        srv.server_close()


def test_show_lists_vision(ol):
    assert "vision" in ol.show("tiny").capabilities


def test_serve_flag_parses():
    from deltarun.cli import build_parser

    assert build_parser().parse_args(["serve", "demo", "--allow-http-media"]).allow_http_media is True
    assert build_parser().parse_args(["serve", "demo"]).allow_http_media is False
    assert build_parser().parse_args(["serve", "demo", "--allow-private-media"]).allow_private_media is True
    assert build_parser().parse_args(["serve", "demo"]).allow_private_media is False
