"""ops/memory.py: weights on 2 MB pages — advised, aligned, unmapped with the tensor, off when switched off; int8
quantize-on-load writes into them the same bytes as one unblocked pass."""
import gc
import mmap
import os
import sys

import pytest
import torch

from deltarun.ops import memory
from deltarun.ops import settings as settings_mod
from deltarun.ops.quant import QUANT_ROW_BLOCK, _quantize_int8, quantize_int8

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE")
                           or not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                           reason="needs a Linux kernel with transparent huge pages")


def _vma(addr: int) -> dict | None:
    """The /proc/self/smaps entry of the mapping holding `addr`: {"range": (start, end), "flags": [...]}."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                entry = {"range": (start, end), "flags": []} if start <= addr < end else None
            elif entry is not None and line.startswith("VmFlags:"):
                entry["flags"] = line.split()[1:]
                return entry
    return None


@pytest.fixture
def hugepages(monkeypatch):
    def switch(on: bool):
        monkeypatch.setenv("DELTARUN_HUGEPAGES", "1" if on else "0")
        settings_mod.reload()
    yield switch
    monkeypatch.delenv("DELTARUN_HUGEPAGES", raising=False)
    settings_mod.reload()


@linux
def test_large_weight_is_advised_aligned_and_unmapped_with_its_tensor(hugepages):
    hugepages(True)
    t = memory.weight_empty((3000, 1024), torch.int8)  # 2.9 MB
    assert t.shape == (3000, 1024) and t.dtype == torch.int8 and t.is_contiguous()
    assert t.data_ptr() % memory.HUGE == 0
    t.fill_(3)
    assert int(t.sum()) == 3 * 3000 * 1024
    vma = _vma(t.data_ptr())
    assert vma is not None and "hg" in vma["flags"]  # MADV_HUGEPAGE took
    view = t[5:7]  # a view keeps the mapping alive
    addr = t.data_ptr()
    del t
    gc.collect()
    assert _vma(addr) is not None and int(view.sum()) == 3 * 2 * 1024
    del view
    gc.collect()
    assert _vma(addr) is None  # unmapped: the memory went back


@linux
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_other_dtypes_and_shapes(hugepages, dtype):
    hugepages(True)
    t = memory.weight_empty((7, 300, 1024), dtype)
    assert t.shape == (7, 300, 1024) and t.dtype == dtype and t.data_ptr() % memory.HUGE == 0
    t.copy_(torch.arange(t.numel()).reshape(t.shape).to(dtype))
    assert torch.equal(t, torch.arange(t.numel()).reshape(t.shape).to(dtype))


def test_small_or_switched_off_is_plain_torch_memory(hugepages, monkeypatch):
    def no_mmap(*a, **k):
        raise AssertionError("mapped")

    monkeypatch.setattr(memory.mmap, "mmap", no_mmap)
    hugepages(True)
    assert memory.weight_empty((16, 1024), torch.int8).shape == (16, 1024)  # 16 KB: below one huge page
    hugepages(False)
    assert memory.weight_empty((4096, 1024), torch.int8).shape == (4096, 1024)


@linux
def test_int8_quantize_on_load_lands_on_huge_pages_with_the_same_bytes(hugepages):
    hugepages(True)
    w = torch.randn(3 * QUANT_ROW_BLOCK + 37, 2048, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)  # blocks of rows written into one buffer
    ref_q, ref_s = _quantize_int8(w)  # one pass, torch's own allocation
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    assert q.data_ptr() % memory.HUGE == 0 and "hg" in _vma(q.data_ptr())["flags"]


def test_quantize_on_load_trims_the_heap_as_it_goes(tiny_ckpt, monkeypatch):
    """The fp32 temporaries of quantize-on-load go back to the system every TRIM_EVERY checkpoint bytes, not only
    at the end (glibc kept ~0.2 GB of them resident through a 0.8B int8 load): with a threshold of one byte,
    every quantized tensor is followed by a trim, and the loaded weights are the ones of an untrimmed load."""
    from deltarun.weights import loader

    plain = loader.load_model(tiny_ckpt, dtype=torch.float32, device="cpu", quantization="int8")
    calls: list[int] = []
    monkeypatch.setattr(loader, "TRIM_EVERY", 1)
    monkeypatch.setattr(loader, "trim_heap", lambda: calls.append(1))
    trimmed = loader.load_model(tiny_ckpt, dtype=torch.float32, device="cpu", quantization="int8")
    quantized = [n for n, m in trimmed.named_modules() if type(m).__name__ == "QuantLinear"]
    assert len(calls) >= len(quantized) > 0
    for (na, a), (nb, b) in zip(plain.state_dict().items(), trimmed.state_dict().items()):
        assert na == nb and torch.equal(a, b), na
