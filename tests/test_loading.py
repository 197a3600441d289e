"""Checkpoint loading: the published layouts load, and every kind of broken folder gives a clear error."""
import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltarun.config import ModelConfig
from deltarun.weights.loader import LoadError, load_model, weight_files
from deltarun.weights.random_init import tensor_shapes


@pytest.fixture()
def ckpt(tiny_ckpt, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def test_official_layout(tiny_ckpt):
    files = weight_files(tiny_ckpt)
    assert len(files) > 1 and all("-of-" in f.name for f in files)
    names = set()
    for f in files:
        with safe_open(str(f), "pt") as sf:
            names |= set(sf.keys())
            for k in sf.keys():
                if k.endswith(("A_log", "linear_attn.norm.weight")):
                    assert sf.get_slice(k).get_dtype() == "F32"
    assert any(n.startswith("mtp.") for n in names) and any(n.startswith("model.visual.") for n in names)
    assert names == set(tensor_shapes(ModelConfig.from_file(tiny_ckpt / "config.json")))


def test_official_0_8b_tensor_names_and_count():
    """The 0.8B config gives exactly the published parameter total (FACTS.md §3): 873,438,784."""
    from deltarun.weights.random_init import bundled_config_path

    shapes = tensor_shapes(ModelConfig.from_file(bundled_config_path("0.8B")))
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert total == 873_438_784
    assert "lm_head.weight" not in shapes  # tied


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes(tiny_ckpt, dtype):
    m = load_model(tiny_ckpt, dtype=dtype, device="cpu")
    assert m.dtype == getattr(torch, dtype)
    assert m.model.language_model.layers[0].linear_attn.A_log.dtype == torch.float32


def test_single_file_layout(ckpt):
    tensors = {}
    for f in weight_files(ckpt):
        with safe_open(str(f), "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
        f.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    save_file(tensors, str(ckpt / "model.safetensors"))
    load_model(ckpt, dtype="float32", device="cpu")


def test_missing_folder(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(LoadError, match="no config.json"):
        load_model(ckpt)


def test_other_architecture(ckpt):
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(LoadError, match="llama.*not a Qwen3.5 model"):
        load_model(ckpt)


def test_bad_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load_model(ckpt)


def test_missing_shard(ckpt):
    victim = weight_files(ckpt)[0]
    victim.unlink()
    with pytest.raises(LoadError, match=victim.name):
        load_model(ckpt)


def test_truncated_file(ckpt):
    victim = weight_files(ckpt)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=f"{victim.name}.*truncated or corrupt"):
        load_model(ckpt)


def test_corrupt_header(ckpt):
    victim = weight_files(ckpt)[0]
    data = bytearray(victim.read_bytes())
    data[8:40] = b"#" * 32
    victim.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="truncated or corrupt"):
        load_model(ckpt)


def _rewrite(ckpt, edit):
    for f in weight_files(ckpt):
        with safe_open(str(f), "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        edit(tensors)
        save_file(tensors, str(f))


def test_missing_tensor_is_named(ckpt):
    name = "model.language_model.layers.1.self_attn.k_norm.weight"
    _rewrite(ckpt, lambda t: t.pop(name, None))
    with pytest.raises(LoadError, match=f"tensor {name} is missing"):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt):
    name = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"

    def edit(t):
        if name in t:
            t[name] = t[name][:-1]
    _rewrite(ckpt, edit)
    with pytest.raises(LoadError, match=f"tensor {name} has shape"):
        load_model(ckpt)


def test_bad_dtype_and_device(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_ckpt, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model(tiny_ckpt, device="cuda")


def _rss_file_mb() -> float:
    import re
    return int(re.search(r"RssFile:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile and madvise are Linux's")
def test_quantize_on_load_gives_back_the_source_pages(tmp_path):
    """A tensor quantized on load is read through safetensors' file mapping; weights/common.py `drop_pages`
    returns its pages (they would stay in RSS beside the quantized copy), and only its own: the tensor
    beside it keeps its values, and the dropped one reads back from the file unchanged."""
    from deltarun.weights.common import drop_pages

    g = torch.Generator().manual_seed(0)
    want_a, want_b = torch.randn(4096, 4096, generator=g).to(torch.bfloat16), torch.randn(3, 5, generator=g)
    save_file({"a": want_a, "b": want_b}, str(tmp_path / "w.safetensors"))  # 32 MB, then a small neighbour
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt", device="cpu") as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
        before = _rss_file_mb()
        a.float().sum()  # every page of `a` read, as the quantizer reads it
        touched = _rss_file_mb()
        drop_pages(a)
        after = _rss_file_mb()
        assert touched - before > 24 and after < touched - 24, (before, touched, after)
        assert torch.equal(b, want_b) and torch.equal(a, want_a)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_drop_pages_leaves_memory_that_is_not_a_file_alone():
    """DONTNEED zeroes anonymous pages: `drop_pages` must refuse a converted copy or any heap tensor."""
    from deltarun.weights.common import drop_pages

    x = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MB of anonymous pages
    drop_pages(x)
    assert torch.equal(x, torch.arange(4 * 2**20, dtype=torch.float32))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's")
def test_saved_int4_folder_keeps_no_mapped_copy(tmp_path):
    """A `deltarun quantize`d int4 folder is repacked for the kernel while loading; the stored pages read then
    go back (RssFile), and the model gives the same logits as the same folder quantized on load."""
    from deltarun.weights.quantize import QuantSpec, save_quantized
    from tests.tiny import make_checkpoint, tiny_config

    src = make_checkpoint(tmp_path / "src", tiny_config(hidden_size=512, intermediate_size=1024, vocab_size=32768),
                          dtype=torch.bfloat16)
    save_quantized(src, tmp_path / "q4", QuantSpec.parse("int4"))
    stored = sum(f.stat().st_size for f in (tmp_path / "q4").glob("*.safetensors")) / 2**20
    want = load_model(src, dtype="bfloat16", device="cpu", quantization="int4")  # kernels loaded before measuring
    before = _rss_file_mb()
    saved = load_model(tmp_path / "q4", dtype="bfloat16", device="cpu")
    held = _rss_file_mb() - before
    assert held < stored / 4, (held, stored)
    ids = torch.tensor([[1, 5, 900, 4000, 17]])
    with torch.inference_mode():
        got, ref = saved.logits(saved(ids, saved.new_cache(1))), want.logits(want(ids, want.new_cache(1)))
    assert torch.equal(got, ref)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is Linux's")
def test_state_pool_takes_memory_only_for_used_slots():
    """cache/state.py `untouched_zeros`: a 64-slot pool reads as zeros, costs nothing until a slot is used, then
    about that slot; its tensors behave as torch.zeros' (written, read, indexed)."""
    import re

    from deltarun.cache.state import StatePool

    def anon_mb() -> float:
        return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    before = anon_mb()
    pool = StatePool([((32, 3), (16, 128, 128))], 64, torch.bfloat16, torch.device("cpu"))  # 1 MB a slot
    assert anon_mb() - before < 8
    slot = pool.alloc()
    pool.recurrent[0][slot] += 1.5
    assert 0.9 < anon_mb() - before < 12
    assert pool.recurrent[0].sum() == 1.5 * 16 * 128 * 128 and pool.conv[0].abs().sum() == 0
    assert torch.equal(pool.recurrent[0][[slot, 5]][1], torch.zeros(16, 128, 128))
