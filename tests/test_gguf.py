"""GGUF loading: files written like llama.cpp's converter load with the right weights, formats, tokenizer,
chat template and config; Ollama store names resolve; broken files give a clear LoadError."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_writer import write_gguf
from tiny import make_checkpoint, tiny_config

from deltarun.config import ModelConfig
from deltarun.ops.quant import QuantEmbedding, QuantLinear, dequantize_int8, quantize_int8
from deltarun.store.resolve import resolve_model
from deltarun.weights import common
from deltarun.weights.gguf_meta import sidecar_for
from deltarun.weights.loader import LoadError, load_model

# llama.cpp sources (its converter; llama-quantize when built): .ci/run unpacks them from llama-cpp-python's sdist
LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR", "/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp"))
# Row lengths that are whole Q4_K super-blocks (256) and value heads of 64 (whole int4 groups).
BIG = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "head_dim": 32,
       "linear_key_head_dim": 32, "linear_value_head_dim": 64}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTARUN_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gguf") / "big", tiny_config(**BIG), seed=3)


def logits(model, n: int = 12) -> torch.Tensor:
    ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(0))
    return model.logits(model(ids, model.new_cache(1)))


def dlogp(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.log_softmax(a, -1) - torch.log_softmax(b, -1)).abs().mean().item()


def reference(ckpt: Path, effective: dict[str, torch.Tensor]):
    """The checkpoint with each quantized tensor replaced by what its GGUF blocks decode to."""
    model = load_model(ckpt, dtype="float32", device="cpu")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in effective.items():
        if not name.startswith("mtp."):
            params[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
                   ].data.copy_(value)
    return model


def load_gguf_file(path: Path, **kw):
    return load_model(sidecar_for(path), dtype="float32", device="cpu", **kw)


def quant_bits(model) -> dict[int, int]:
    out: dict[int, int] = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            out[mod.bits] = out.get(mod.bits, 0) + 1
    return out


@pytest.mark.parametrize("variant", ["hybrid", "untied_gqa4"])
def test_f32_matches_safetensors(tiny_ckpts, tmp_path, variant):
    ckpt = tiny_ckpts[variant]
    write_gguf(ckpt, tmp_path / "m.gguf", Q.F32)
    side = sidecar_for(tmp_path / "m.gguf")
    ours, theirs = ModelConfig.from_file(side / "config.json").text, ModelConfig.from_file(ckpt / "config.json").text
    assert ours.mtp_num_hidden_layers == 0 and not ModelConfig.from_file(side / "config.json").vision
    ours.mtp_num_hidden_layers = theirs.mtp_num_hidden_layers
    assert ours == theirs
    got = logits(load_model(side, dtype="float32", device="cpu"))
    want = logits(load_model(ckpt, dtype="float32", device="cpu"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_qkv_and_f16(tiny_ckpt, tmp_path):
    want = logits(load_model(tiny_ckpt, dtype="float32", device="cpu"))
    write_gguf(tiny_ckpt, tmp_path / "f.gguf", Q.F32, fuse_qkv=True)
    torch.testing.assert_close(logits(load_gguf_file(tmp_path / "f.gguf")), want, atol=1e-5, rtol=1e-5)
    write_gguf(tiny_ckpt, tmp_path / "h.gguf", Q.F16)
    assert dlogp(logits(load_gguf_file(tmp_path / "h.gguf")), want) < 5e-3  # F16 storage rounding only


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_4bit_types_load_as_int4_exactly(big_ckpt, tmp_path, qtype):
    effective = write_gguf(big_ckpt, tmp_path / "m.gguf", qtype)
    model, ref = load_gguf_file(tmp_path / "m.gguf"), reference(big_ckpt, effective)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in ref.modules())
    assert quant_bits(model) == {4: n_linear + 1}  # every matmul, the tied lm_head and the embedding
    embed = model.model.language_model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and embed.bits == 4 and embed.group_size == 32
    got, want = logits(model), logits(ref)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K, Q.Q5_K])
def test_8bit_and_k_types_load_as_int8(big_ckpt, tmp_path, qtype):
    effective = write_gguf(big_ckpt, tmp_path / "m.gguf", qtype)
    model = load_gguf_file(tmp_path / "m.gguf")
    assert set(quant_bits(model)) == {8}
    for name, mod in model.named_modules():  # exactly the per-row int8 of what the blocks decode to
        if isinstance(mod, QuantLinear) and not isinstance(mod, QuantEmbedding):  # tied: lm_head holds the table
            tied = name == "lm_head" or name.endswith("._source")
            key = "model.embed_tokens" if tied else name.replace("language_model.", "")
            q, s = quantize_int8(effective[key + ".weight"])
            torch.testing.assert_close(mod.dequantize(), dequantize_int8(q, s), atol=1e-6, rtol=1e-6)
    got, want = logits(model), logits(reference(big_ckpt, effective))
    assert dlogp(got, want) < 0.1  # the per-row requantization is the only difference


def test_q4_0_with_unaligned_value_heads(tiny_ckpt, tmp_path):
    """Value heads of 24 columns cut int4 groups of 32 when out_proj's columns are reordered: those
    layers are requantized to int8, the rest stay int4."""
    effective = write_gguf(tiny_ckpt, tmp_path / "m.gguf", Q.Q4_0)
    model = load_gguf_file(tmp_path / "m.gguf")
    outs = [layer.linear_attn.out_proj for layer in model.model.language_model.layers
            if layer.layer_type == "linear_attention"]
    assert all(o.bits == 8 for o in outs) and quant_bits(model)[4] > len(outs)
    assert dlogp(logits(model), logits(reference(tiny_ckpt, effective))) < 0.05


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
def test_ollama_converter_layout(tmp_path, qtype):
    """Files from Ollama's own converter: grouped value heads, ssm_ba, ssm_dt, in_proj_qkv in thirds,
    per-layer head_count_kv, mrope_sections, mtp.* left in the file."""
    ckpt = make_checkpoint(tmp_path / "c", tiny_config(linear_value_head_dim=8), seed=7)  # q/k/v thirds
    effective = write_gguf(ckpt, tmp_path / "o.gguf", qtype, ollama=True)
    side = sidecar_for(tmp_path / "o.gguf")
    assert ModelConfig.from_file(side / "config.json").text.layer_types == \
        ModelConfig.from_file(ckpt / "config.json").text.layer_types
    got, want = logits(load_model(side, dtype="float32", device="cpu")), logits(reference(ckpt, effective))
    if qtype == Q.F32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert effective and dlogp(got, want) < 0.05


def test_quantization_option_applies_to_float_tensors(big_ckpt, tmp_path):
    write_gguf(big_ckpt, tmp_path / "m.gguf", Q.F32)
    model = load_gguf_file(tmp_path / "m.gguf", quantization="int8")
    assert 8 in quant_bits(model)


def test_tokenizer_and_chat_template_from_gguf(chat_ckpt, tmp_path):
    from deltarun.processor.chat_template import ChatTemplate
    from deltarun.processor.tokenizer import Tokenizer

    write_gguf(chat_ckpt, tmp_path / "c.gguf", Q.F16, tokenizer=True)
    side = sidecar_for(tmp_path / "c.gguf")
    ours, theirs = Tokenizer.from_folder(side), Tokenizer.from_folder(chat_ckpt)
    for text in ["Hello, world!", "<|im_start|>user\nnaïve 日本語 🦙 12345<|im_end|>\n",
                 "<think>\nx</think><tool_call>{}</tool_call><|fim_prefix|>a<|endoftext|>"]:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.special_ids == theirs.special_ids and ours.eos_token_ids == theirs.eos_token_ids
    assert ours.decode(ours.encode("<|im_start|>hi"), skip_special_tokens=True) == "hi"
    messages = [{"role": "user", "content": "hi"}]
    rendered = ChatTemplate.from_folder(side).render(messages, add_generation_prompt=True)
    assert rendered == ChatTemplate.from_folder(chat_ckpt).render(messages, add_generation_prompt=True)
    assert "<|im_start|>assistant" in str(rendered)


def test_gguf_path_runs_text_only(tiny_ckpt, tmp_path):
    from deltarun import LLM

    write_gguf(tiny_ckpt, tmp_path / "m.gguf", Q.Q8_0)
    llm = LLM(str(tmp_path / "m.gguf"), dtype="float32", device="cpu")
    assert (llm.path / "gguf.json").is_file()
    with pytest.raises(ValueError, match="no vision tower"):
        llm.load_vision()


def _ollama_store(root: Path, name: str, tag: str, gguf: Path) -> Path:
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    manifest = {"schemaVersion": 2, "layers": [{"mediaType": "application/vnd.ollama.image.model",
                                               "digest": f"sha256:{digest}", "size": len(data)}]}
    path = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blob


def test_ollama_store_names_resolve(tiny_ckpt, tmp_path, monkeypatch):
    write_gguf(tiny_ckpt, tmp_path / "m.gguf", Q.Q8_0)
    store = tmp_path / "ollama"
    blob = _ollama_store(store, "qwen3.5", "0.8b", tmp_path / "m.gguf")
    _ollama_store(store, "qwen3.5", "9b-q4_K_M", tmp_path / "m.gguf")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty HF cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = (blob.stat().st_mtime_ns, hashlib.sha256(blob.read_bytes()).hexdigest())
    side = resolve_model("qwen3.5:0.8b")
    assert json.loads((side / "gguf.json").read_text())["gguf"] == str(blob.resolve())
    assert resolve_model("qwen3.5:9b-q4_K_M") == side  # same blob, same sidecar
    torch.testing.assert_close(logits(load_model(side, dtype="float32", device="cpu")),
                               logits(load_gguf_file(tmp_path / "m.gguf")))
    assert (blob.stat().st_mtime_ns, hashlib.sha256(blob.read_bytes()).hexdigest()) == before  # read-only


def test_unsupported_type_is_a_clear_error(big_ckpt, tmp_path):
    write_gguf(big_ckpt, tmp_path / "m.gguf", Q.F32, overrides={"blk.0.ffn_up.weight": Q.Q2_K})
    with pytest.raises(LoadError, match=r"blk\.0\.ffn_up\.weight has type Q2_K"):
        load_gguf_file(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.97, 40])
def test_truncated_file_is_a_clear_error(tiny_ckpt, tmp_path, keep):
    write_gguf(tiny_ckpt, tmp_path / "m.gguf", Q.Q8_0)
    data = (tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(LoadError, match="truncated"):
        load_gguf_file(cut)


def test_other_architecture_is_rejected(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(LoadError, match="architecture 'llama' is not Qwen3.5"):
        sidecar_for(tmp_path / "llama.gguf")


@pytest.mark.skipif(not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(),
                    reason=f"llama.cpp sources not at {LLAMA_CPP} (set LLAMA_CPP_DIR; .ci/run fetches them)")
def test_real_llama_cpp_converter(chat_ckpt, tmp_path):
    """llama.cpp's own converter (and llama-quantize, when built) produce files that load exactly."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LLAMA_CPP / "gguf-py"), os.environ["PYTHONPATH"]])}
    out = tmp_path / "real-f32.gguf"
    r = subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(chat_ckpt), "--outtype", "f32",
                        "--outfile", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]  # its dependencies are the test extra's: a failure, never a skip
    want = logits(load_model(chat_ckpt, dtype="float32", device="cpu"))
    side = sidecar_for(out)
    torch.testing.assert_close(logits(load_model(side, dtype="float32", device="cpu")), want, atol=1e-5, rtol=1e-5)
    from deltarun.processor.tokenizer import Tokenizer

    text = "<|im_start|>user\nnaïve 日本語 🦙<|im_end|>"
    assert Tokenizer.from_folder(side).encode(text) == Tokenizer.from_folder(chat_ckpt).encode(text)
    quantize = LLAMA_CPP / "build" / "bin" / "llama-quantize"
    if not quantize.is_file():
        return  # the F32 check above stands; a quantized file needs the built tool
    for kind, pure in (("Q4_K_M", []), ("Q4_0", ["--pure"])):  # rows of 64: Q4_K_M falls back to Q5_0/Q8_0
        q = tmp_path / f"real-{kind}.gguf"
        r = subprocess.run([str(quantize), *pure, str(out), str(q), kind], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        model = load_model(sidecar_for(q), dtype="float32", device="cpu")
        assert quant_bits(model) and dlogp(logits(model), want) < 0.5
    assert 4 in quant_bits(model)  # llama.cpp's own Q4_0 blocks became int4


def test_sidecar_is_reused_and_refuses_a_changed_file(tiny_ckpt, tmp_path):
    write_gguf(tiny_ckpt, tmp_path / "m.gguf", Q.F32)
    side = sidecar_for(tmp_path / "m.gguf")
    assert sidecar_for(tmp_path / "m.gguf") == side and not (side / "model.safetensors").exists()
    shutil.copy(tmp_path / "m.gguf", tmp_path / "keep.gguf")
    with open(tmp_path / "m.gguf", "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(LoadError, match="changed"):
        load_model(side, device="cpu")
    assert sidecar_for(tmp_path / "m.gguf") != side  # a new key: rebuilt for the new content


def test_string_arrays_are_decoded_when_asked_and_bad_utf8_is_a_clear_error(tmp_path):
    """A GGUF's string arrays (the 248K-token vocabulary) are walked at parse time and decoded only when read
    (gguf_file.py `value`): the right strings, and invalid UTF-8 is a LoadError naming the key, not a traceback."""
    import gguf
    import numpy as np

    from deltarun.weights.gguf_file import GGUFFile

    path = tmp_path / "s.gguf"
    w = gguf.GGUFWriter(str(path), "qwen35")
    w.add_array("tokenizer.ggml.tokens", ["ab", "QQQQ", "ü"])
    w.add_uint32("qwen35.block_count", 3)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    f = GGUFFile(path)
    assert f.value("qwen35.block_count") == 3 and f.value("tokenizer.ggml.tokens") == ["ab", "QQQQ", "ü"]
    assert [t.name for t in f.tensors] == ["token_embd.weight"]
    path.write_bytes(path.read_bytes().replace(b"QQQQ", b"\xff\xfeQQ"))
    bad = GGUFFile(path)
    with pytest.raises(LoadError, match="tokenizer.ggml.tokens"):
        bad.value("tokenizer.ggml.tokens")


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("qtype", ["Q6_K", "Q8_0"])
def test_fused_int8_requantization_is_bit_exact(qtype):
    """csrc/gguf_blocks.cpp: Q6_K / Q8_0 blocks → per-row int8 in one pass, bit for bit what the reference path
    makes of them (gguf-py's numpy dequantize, or q8_0_values, then quantize_int8): random blocks with finite
    f16 scales of every magnitude, plus an all-zero row and a row whose scale is the f16 maximum."""
    import numpy as np

    from deltarun.weights.gguf_file import dequantize_blocks, q8_0_values

    qk, size, K = (256, 210, 512) if qtype == "Q6_K" else (32, 34, 96)
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (40, K // qk, size), dtype=np.uint8)
    d_at = size - 2 if qtype == "Q6_K" else 0
    d = (rng.standard_normal((40, K // qk)) * 10.0 ** rng.integers(-6, 3, (40, K // qk))).astype(np.float16)
    d[1] = np.float16(65504.0)
    rows[..., d_at:d_at + 2] = d.view(np.uint8).reshape(40, K // qk, 2)
    rows[0] = 0
    data = rows.reshape(40, -1)

    def to_int8(blocks, type_, k):  # the op writes q into the caller's buffer and returns the scales
        q = torch.empty(blocks.shape[0], k, dtype=torch.int8)
        return q, torch.ops.deltarun.gguf_to_int8_into(blocks, type_, k, q)
    q, s = to_int8(torch.from_numpy(data.copy()), qtype, K)
    w = q8_0_values(data) if qtype == "Q8_0" else torch.from_numpy(dequantize_blocks(data, qtype).reshape(40, K))
    want_q, want_s = quantize_int8(w)
    assert torch.equal(s, want_s) and torch.equal(q, want_q)
    damaged = rows[:1].copy()  # NaN scales (a damaged file): defined zeros, not an undefined conversion
    damaged[..., d_at:d_at + 2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    q, _ = to_int8(torch.from_numpy(damaged.reshape(1, -1)), qtype, K)
    assert not q.any()
    with pytest.raises(RuntimeError, match="Q6_K or Q8_0"):
        to_int8(torch.from_numpy(data.copy()), "Q5_K", K)
    with pytest.raises(RuntimeError, match="rows of"):
        to_int8(torch.from_numpy(data.copy()), qtype, K + qk)
    with pytest.raises(RuntimeError, match="q int8"):  # a buffer of the wrong shape is refused, not overrun
        torch.ops.deltarun.gguf_to_int8_into(torch.from_numpy(data.copy()), qtype, K,
                                             torch.empty(39, K, dtype=torch.int8))


@pytest.mark.usefixtures("cpu_kernels")
def test_fused_q4_0_rows_are_the_reference_bytes():
    """csrc/gguf_blocks.cpp's Q4_0 → portable int4: the bytes and scales of int4_blocks + pack_int4, exactly."""
    import numpy as np

    from deltarun.ops.quant import pack_int4
    from deltarun.weights.gguf_file import int4_blocks

    rng = np.random.default_rng(9)
    rows = rng.integers(0, 256, (24, 4, 18), dtype=np.uint8)
    rows[..., :2] = rng.standard_normal((24, 4)).astype(np.float16).view(np.uint8).reshape(24, 4, 2)
    data = rows.reshape(24, -1)
    packed, scales = torch.ops.deltarun.gguf_q4_0_rows(torch.from_numpy(data.copy()), 128)
    q, s, z = int4_blocks(data, "Q4_0")
    assert torch.equal(packed, pack_int4(torch.from_numpy(q.reshape(24, -1))))
    assert torch.equal(scales, torch.from_numpy(s.reshape(24, -1))) and not z.any()
    with pytest.raises(RuntimeError, match="Q4_0|uint8"):
        torch.ops.deltarun.gguf_q4_0_rows(torch.from_numpy(data.copy()), 96)


@pytest.mark.usefixtures("cpu_kernels")
def test_fused_q4_k_rows_are_the_reference_bytes():
    """csrc/gguf_blocks.cpp's Q4_K → portable int4: the bytes, scales and zeros of int4_blocks + pack_int4, bit for
    bit (random bytes: every 6-bit scale/min pattern; f16 d and dmin of many magnitudes)."""
    import numpy as np

    from deltarun.ops.quant import pack_int4
    from deltarun.weights.gguf_file import int4_blocks

    rng = np.random.default_rng(11)
    n, per_row = 24, 2  # K = 512
    rows = rng.integers(0, 256, (n, per_row, 144), dtype=np.uint8)
    dd = (rng.standard_normal((n, per_row, 2)) * 10.0 ** rng.integers(-5, 2, (n, per_row, 2))).astype(np.float16)
    rows[..., :4] = dd.view(np.uint8).reshape(n, per_row, 4)
    data = rows.reshape(n, -1)
    packed, scales, zeros = torch.ops.deltarun.gguf_q4_k_rows(torch.from_numpy(data.copy()), 512)
    q, s, z = int4_blocks(data, "Q4_K")
    assert torch.equal(packed, pack_int4(torch.from_numpy(q.reshape(n, -1))))
    assert torch.equal(scales, torch.from_numpy(s.reshape(n, -1)))
    assert torch.equal(zeros, torch.from_numpy(z.reshape(n, -1)))
    with pytest.raises(RuntimeError, match="Q4_K|uint8"):
        torch.ops.deltarun.gguf_q4_k_rows(torch.from_numpy(data.copy()), 256)


def test_the_type_table_is_gguf_pys():
    """gguf_file._TYPES (read without importing gguf-py) names and sizes each type as gguf-py does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from deltarun.weights.gguf_file import _TYPES

    for type_id, (name, block, size) in _TYPES.items():
        assert GGMLQuantizationType(type_id).name == name and GGML_QUANT_SIZES[GGMLQuantizationType(type_id)] == (
            block, size)


def test_converted_tensors_give_back_the_files_pages(big_ckpt, tmp_path, monkeypatch):
    """After each tensor is converted, its bytes' pages of the file mapping are dropped from the process (a Q8_0
    0.8B load otherwise held the file and the int8 copy: 1.76 GB against llama.cpp's 0.87); the model is the
    same as one loaded without dropping anything."""
    from deltarun.weights import gguf as gguf_mod
    from deltarun.weights.gguf_meta import open_gguf

    write_gguf(big_ckpt, tmp_path / "m.gguf", Q.Q8_0)
    monkeypatch.setattr(gguf_mod, "drop_pages", lambda t, file_mapped=False: None)
    kept = logits(load_gguf_file(tmp_path / "m.gguf"))
    dropped: list[int] = []
    real = common.drop_pages

    def record(t, file_mapped=False):
        dropped.append(t.numel() * t.element_size())
        real(t, file_mapped)

    monkeypatch.setattr(gguf_mod, "drop_pages", record)
    got = logits(load_gguf_file(tmp_path / "m.gguf"))
    assert torch.equal(got, kept)
    sizes = sorted(t.data.nbytes for t in open_gguf(tmp_path / "m.gguf").tensors)
    assert sorted(dropped) == sizes
