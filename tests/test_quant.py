"""Weight-only int8/int4: the kernels against the plain dequantize-then-matmul reference, the quantizer's
rounding bounds, loading (on the fly == saved folder; every layer, tied embeddings) and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from deltarun.cli import main
from deltarun.ops.quant import (
    QuantEmbedding,
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from deltarun.store.names import quant_tag, split_quant
from deltarun.weights import quantize as quant
from deltarun.weights.loader import LoadError, load_model


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_rounding_error_is_at_most_half_a_step():
    w = _weight(96, 256)
    q, s = quantize_int8(w)
    assert ((dequantize_int8(q, s) - w).abs() <= s[:, None] * 0.51).all()
    for g in (32, 64, 128):
        q4, s4, z4 = quantize_int4(w, g)
        assert int(q4.max()) <= 15 and torch.equal(unpack_int4(pack_int4(q4)), q4)
        err = (dequantize_int4(pack_int4(q4), s4, z4) - w).abs().reshape(96, -1, g)
        assert (err <= s4[..., None] * 0.51).all()  # half a step (+ the bf16 rounding of scale/zero)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_kernel_matches_dequantized_reference(bits, group, dtype, rows):
    w = _weight(128, 256, seed=bits + group)
    mod = QuantLinear.from_float(w, bits, group, dtype)
    ref_w = mod.dequantize()
    mod.pack()
    assert mod._kernel is not None, "the CPU weight-only kernel should be in use"
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = mod(x).float()
    want = F.linear(x.float(), ref_w)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the AVX2 kernel's column-pair order
def test_packed_int4_rows_read_back_exactly(dtype):
    w = _weight(192, 128, seed=3)
    mod = QuantLinear.from_float(w, 4, 32, dtype)
    portable = mod.dequantize()
    mod.pack()
    assert mod._cpu4 is not None and mod.qweight is None, "the kernel's copy should be the only copy"
    idx = torch.tensor([0, 31, 32, 63, 64, 100, 191, 5])
    torch.testing.assert_close(mod.rows(idx), portable[idx], rtol=0, atol=0)
    torch.testing.assert_close(mod.dequantize(), portable, rtol=0, atol=0)  # in-order block reads
    emb = QuantEmbedding(192, 128, 4, 32, dtype, "meta")
    emb.share(mod)
    torch.testing.assert_close(emb(idx.view(2, 4)), portable[idx].view(2, 4, 128).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32), (4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_row_dequantization_is_bit_exact(bits, group, dtype):
    """Prefill dequantizes row blocks in one C++ pass (ops/csrc/dequant.cpp): the very same fp32 values as
    the torch expression, for whole matrices and block-aligned ranges."""
    from deltarun.ops import kernels
    from deltarun.ops.quant import cpu_int4_block

    if not kernels.available():
        from cpu_kernels import require_cpu_kernels

        require_cpu_kernels()  # skips only without a compiler; a failed build fails
    mod = QuantLinear.from_float(_weight(256, 192, seed=bits + group), bits, group, dtype)
    mod.pack()
    blk = cpu_int4_block() or 64
    for start, end in [(0, 256), (blk, 2 * blk), (0, blk), (256 - blk, 256)]:
        want = mod.row_block_reference(start, end)
        got = mod.row_block(start, end)
        assert got.dtype == torch.float32 and torch.equal(got, want), (start, end)


def test_int4_packing_by_row_blocks_equals_whole(monkeypatch):
    import deltarun.ops.quant as q

    w = _weight(256, 64, seed=4)
    whole = QuantLinear.from_float(w, 4, 32, torch.float32)
    whole.pack()
    monkeypatch.setattr(q, "ROW_BLOCK", 64)
    blocked = QuantLinear.from_float(w, 4, 32, torch.float32)
    blocked.pack()
    assert torch.equal(blocked._cpu4[0], whole._cpu4[0])
    x = torch.randn(40, 64)
    torch.testing.assert_close(blocked(x), whole(x), rtol=0, atol=0)  # the dequantized path, block by block


def _logits(model, ids):
    cache = model.new_cache(1)
    prefill = model.logits(model(ids[:, :-1], cache))  # many rows: the dequantized matmul
    step = model.logits(model(ids[:, -1:], cache))  # one row: the weight-only kernels
    return torch.cat([prefill, step], dim=1)


@pytest.mark.parametrize("scheme,variant", [
    ("int8", "hybrid"), ("int8", "untied_gqa4"), ("int4:32", "hybrid"), ("int4:32", "untied_gqa4"),
    ("int4:128", "hybrid"),  # hidden 64: the tied embedding/lm_head stay full precision, o_proj (K=128) is int4
])
def test_quantized_model_equals_float_model_with_dequantized_weights(tiny_ckpts, scheme, variant):
    """Independent of the loader's plumbing: put quantize→dequantize weights into the fp32 model by hand."""
    ckpt = tiny_ckpts[variant]
    spec = quant.QuantSpec.parse(scheme)
    qmodel = load_model(ckpt, dtype="float32", device="cpu", quantization=scheme)
    ref = load_model(ckpt, dtype="float32", device="cpu")
    n_quant = 0
    for name, p in ref.named_parameters():
        if quant.is_quantizable(name, tuple(p.shape), spec):
            n_quant += 1
            if spec.bits == 8:
                p.copy_(dequantize_int8(*quantize_int8(p)))
            else:
                q, s, z = quantize_int4(p, spec.group_size)
                p.copy_(dequantize_int4(pack_int4(q), s, z))
    assert n_quant >= (2 if scheme == "int4:128" else 10)
    n_mods = sum(isinstance(m, QuantLinear) for m in qmodel.modules())
    assert n_mods >= n_quant  # every quantizable weight became a quantized module (tied: embed + lm_head)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(_logits(qmodel, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_saved_folder_loads_without_requantizing(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "q4"
    sizes = quant.save_quantized(tiny_ckpt, out, quant.QuantSpec(4, 32))
    assert sizes["after"] < sizes["before"] / 2
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    on_load = load_model(tiny_ckpt, dtype="float32", device="cpu", quantization="int4:32")

    def no_requantizing(*a, **k):
        raise AssertionError("a saved quantized folder must not be quantized again")
    monkeypatch.setattr(quant, "quantize_into", no_requantizing)
    saved = load_model(out, dtype="float32", device="cpu")
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(_logits(saved, ids), _logits(on_load, ids), rtol=0, atol=0)
    with pytest.raises(LoadError, match="already quantized as int4"):
        load_model(out, dtype="float32", device="cpu", quantization="int8")
    assert not list(tmp_path.glob(".*partial"))


def test_tied_int4_embedding_is_held_once(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype="float32", device="cpu", quantization="int4:32")
    embed = model.model.language_model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and embed.qweight is None and embed._source is model.lm_head
    full = load_model(tiny_ckpt, dtype="float32", device="cpu")
    q_bytes = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                  for t in ([*m._cpu4[:2]] if m._cpu4 else [x for x in m.portable().values() if x is not None]))
    f_bytes = sum(p.numel() * 4 for n, p in full.named_parameters()
                  if quant.is_quantizable(n, tuple(p.shape), quant.QuantSpec(4, 32)))
    assert q_bytes < f_bytes / 4


def test_bad_quantization_names():
    with pytest.raises(ValueError, match="unknown quantization"):
        quant.QuantSpec.parse("int3")
    with pytest.raises(ValueError, match="group size"):
        quant.QuantSpec.parse("int4:48")
    assert quant.QuantSpec.parse("none") is None and quant.QuantSpec.parse("int4:128").group_size == 128
    assert quant_tag("qwen3.5:9b-int4") == "int4" and quant_tag("qwen3.5:9b-q4_k_m") is None
    assert split_quant("qwen3.5:0.8b-int8") == ("qwen3.5:0.8b", "int8")


def test_cli_quantize_then_generate(chat_ckpt, tmp_path, capsys):
    from deltarun import LLM, SamplingParams

    out = tmp_path / "chat-q8"
    assert main(["quantize", str(chat_ckpt), str(out), "--bits", "8"]) == 0
    assert main(["generate", str(out), "hello there", "--raw", "--max-tokens", "6", "--temperature", "0",
                 "--dtype", "float32"]) == 0
    text = capsys.readouterr().out.strip()
    llm = LLM(str(chat_ckpt), dtype="float32", device="cpu", quantization="int8")
    want = llm.generate("hello there", SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    assert text == want.strip()
    assert main(["generate", str(chat_ckpt), "hi", "--quantize", "int5"]) == 1
    assert "unknown quantization" in capsys.readouterr().err


def test_int8_kv_cache_holds_keys_within_half_a_step():
    from deltarun.cache.state import KVCache

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 70, 32, generator=g), torch.randn(1, 2, 70, 32, generator=g)
    c = KVCache(quantized=True)
    c.append(k[:, :, :5], v[:, :, :5])
    k_all, v_all = c.append(k[:, :, 5:], v[:, :, 5:])  # grows past the first reservation
    for x, got in ((k, k_all), (v, v_all)):
        step = x.abs().amax(-1, keepdim=True) / 127
        assert got.dtype == x.dtype and ((got - x).abs() <= step * 0.5 + 1e-6).all()
    plain = KVCache()
    plain.append(k, v)
    assert c.token_bytes() == 2 * 2 * (32 + 4) and plain.token_bytes() == 2 * 2 * 32 * 4
    hit = KVCache()
    hit.copy_prefix(c, 40)
    torch.testing.assert_close(hit.append(k[:, :, 40:41], v[:, :, 40:41])[0], k_all[:, :, :41], rtol=0, atol=0)


def test_int8_kv_cache_accuracy_and_exact_prefix_reuse(chat_ckpt):
    from deltarun import LLM, SamplingParams

    ids = torch.randint(0, 5000, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)

    def run(llm):
        out = llm.generate(ids, params)[0]
        lp = torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])
        return lp, out.outputs[0].token_ids

    lp_ref, _ = run(LLM(str(chat_ckpt), dtype="float32", device="cpu", mtp="off"))
    llm = LLM(str(chat_ckpt), dtype="float32", device="cpu", kv_cache_dtype="int8", mtp="off",
              max_prefill_tokens=64)
    lp, cold = run(llm)
    assert (lp - lp_ref).abs().mean() < 5e-3  # the accuracy cost of 8-bit keys/values
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)  # prompt logprobs skip the cache
    first = llm.generate(ids, plain)[0].outputs[0].token_ids
    warm = llm.generate(ids, plain)[0].outputs[0].token_ids  # resumed from the prefix cache
    assert llm.engine.prefix.hit_tokens >= 128
    assert warm == first == cold


def test_quantizers_release_each_block_once_consumed(monkeypatch):
    """ops/quant.py `_by_rows`: with `release`, each block of rows is handed back right after it is quantized
    (quantize-on-load gives its mapped pages back block by block), every row exactly once, results unchanged."""
    from deltarun.ops import quant as q

    monkeypatch.setattr(q, "QUANT_ROW_BLOCK", 16)
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
    for fn, args in ((q.quantize_int8, ()), (q.quantize_int4, (32,))):
        seen: list[tuple[int, int]] = []
        got = fn(w, *args, release=lambda b: seen.append((b.data_ptr(), b.shape[0])))
        assert [n for _, n in seen] == [16, 16, 16, 2]
        assert [p for p, _ in seen] == [w[i:].data_ptr() for i in (0, 16, 32, 48)]
        for a, b in zip(got, fn(w, *args)):
            assert torch.equal(a, b)


def test_int4_quantized_packed_block_by_block_equals_packing_after():
    """Quantize-on-load packs each row block as it goes (no [N, K] byte copy of a 248K-row embedding): the same
    bytes, scales and zeros as quantizing the whole weight and packing it afterwards."""
    from deltarun.ops.quant import QUANT_ROW_BLOCK, pack_int4, quantize_int4, quantize_int4_packed

    w = torch.randn(QUANT_ROW_BLOCK * 2 + 64, 64, generator=torch.Generator().manual_seed(3))
    q, s, z = quantize_int4(w, 32)
    p2, s2, z2 = quantize_int4_packed(w, 32)
    assert torch.equal(p2, pack_int4(q)) and torch.equal(s2, s) and torch.equal(z2, z)


@pytest.mark.parametrize("block", [32, 64])
def test_repack_from_portable_bytes_matches_the_cpu_layout(block):
    """int4_layout.cpu_layout_from_portable (nibble arithmetic on the stored bytes) gives torch's CPU int4 layout
    exactly as `cpu_layout` builds it from the unpacked values (checked against torch's own packing op where this
    CPU's torch uses that block size: ops/int4_layout.py `cpu_int4_block`)."""
    from deltarun.ops.int4_layout import cpu_int4_block, cpu_layout, cpu_layout_from_portable
    from deltarun.ops.quant import pack_int4, unpack_int4

    q = torch.randint(0, 16, (block * 3, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(block))
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    got = cpu_layout_from_portable(packed, block)
    assert got.shape == packed.shape
    assert torch.equal(got.flatten(), cpu_layout(q.to(torch.int32), block).flatten())
    if cpu_int4_block() == block:
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        assert torch.equal(got.flatten(), want.flatten())


@pytest.mark.parametrize("k", [192, 200])  # 200: stored rows of 100 bytes, 6 tiles of 16 and a scalar tail
@pytest.mark.parametrize("block,order", [(32, 0), (32, 1), (64, 0), (64, 2), (8, 0)])
def test_repack_kernel_matches_the_torch_reference(block, order, k):
    """csrc/dequant.cpp `repack_int4` lays the stored bytes out exactly as int4_layout.py's torch expression
    (`cpu_layout_from_portable`, then `int4_reorder` for our kernels' byte orders), for every CPU layout."""
    from deltarun.ops import gemv, kernels
    from deltarun.ops.int4_layout import cpu_layout_from_portable, int4_reorder

    if not kernels.available():
        from cpu_kernels import require_cpu_kernels

        require_cpu_kernels()  # skips only without a compiler; a failed build fails
    q = torch.randint(0, 16, (block * 5, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    packed = pack_int4(q)
    want = int4_reorder(cpu_layout_from_portable(packed, block), order)
    got = gemv.repack_int4(packed, block, order)
    assert got.shape == packed.shape and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="multiple of the block"):
        gemv.repack_int4(packed[:block + 2], block, order)


@pytest.mark.parametrize("block,order", [(32, 1), (64, 2), (64, 0)])
def test_every_byte_order_reads_back_the_weights(block, order, monkeypatch):
    """Whatever order this machine's kernels read, each of them is read back right: `QuantLinear.rows` (embedding
    lookups), `row_block_reference` and csrc/dequant.cpp's `dequant_int4_rows` give the portable weights exactly."""
    from deltarun.ops import gemv, kernels
    from deltarun.ops import quant as ops_quant
    from deltarun.ops.int4_layout import cpu_layout, int4_reorder

    if not kernels.available():
        from cpu_kernels import require_cpu_kernels

        require_cpu_kernels()
    w = torch.randn(block * 3, 96, generator=torch.Generator().manual_seed(order))
    mod = QuantLinear.from_float(w, 4, 32, dtype=torch.bfloat16)
    want = ops_quant.dequantize_int4(mod.qweight, mod.scales, mod.zeros)
    packed = int4_reorder(cpu_layout(ops_quant.unpack_int4(mod.qweight), block), order).view(block * 3, -1)
    sz = torch.stack((mod.scales, mod.zeros), dim=-1).transpose(0, 1).contiguous()
    idx = torch.tensor([0, 5, block // 2 - 1, block // 2, block - 1, block + 17, 3 * block - 1])
    monkeypatch.setattr(ops_quant, "cpu_int4_block", lambda: block)
    mod._cpu4 = packed, sz, order
    assert torch.equal(mod.rows(idx), want[idx])
    assert torch.equal(mod.row_block_reference(block, 3 * block), want[block:])
    assert torch.equal(gemv.dequant_int4_rows(packed, sz, 32, block, 0, 3 * block, order), want)


def test_a_kernel_that_disagrees_is_not_used(monkeypatch):
    """QuantLinear.pack probes the kernel against the dequantized reference once per weight shape: a kernel that
    gives wrong numbers leaves every weight of that shape on the reference path, with the reference's outputs."""
    from deltarun.ops import gemv, kernels
    from deltarun.ops import quant as q

    if not kernels.available():
        from cpu_kernels import require_cpu_kernels

        require_cpu_kernels()
    monkeypatch.setattr(q, "_VERDICTS", {})
    monkeypatch.setattr(gemv, "int4_mm", lambda x, packed, g, sz: torch.zeros(x.shape[0], sz.shape[1], dtype=x.dtype))
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for seed in (1, 2):  # the second weight of the shape takes the first one's verdict
        w = _weight(64, 128, seed)
        mod = QuantLinear.from_float(w, 4, 32, torch.bfloat16)
        want = F.linear(x.float(), mod.dequantize()).to(torch.bfloat16)
        mod.pack()
        assert mod.routes["decode"] == "dequant"
        torch.testing.assert_close(mod(x), want, rtol=2e-2, atol=2e-2)  # the zeros would be off by ~1
    assert len(q._VERDICTS) == 1 and list(q._VERDICTS.values()) == [(False, False, False)]


@pytest.mark.parametrize("bits", [8, 4])
def test_first_rows_are_the_packed_rows_themselves(bits):
    """QuantLinear.first_rows (the MTP draft head: the lm_head's first rows) multiplies by exactly the lm_head's
    first n rows, for decode rows (kernel), prefill rows and the dequantized weight, without re-quantizing."""
    from deltarun.ops import kernels

    if not kernels.available():
        from cpu_kernels import require_cpu_kernels

        require_cpu_kernels()
    head = QuantLinear.from_float(_weight(512, 128, seed=bits), bits, 32, torch.bfloat16)
    head.pack()
    part = head.first_rows(128)
    assert part is not None and part.out_features == 128 and part.routes == head.routes
    for rows in (1, 3, 40):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        assert torch.equal(part(x), head(x)[:, :128])
    assert torch.equal(part.dequantize(), head.dequantize()[:128])
    assert head.first_rows(512) is None and head.first_rows(0) is None
