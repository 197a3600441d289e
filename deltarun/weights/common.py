"""What every weights/ reader shares: `LoadError`, dtype/device resolution, a folder's safetensors files, and
adopting checkpoint tensors into a meta-built module. loader.py re-exports these names."""
from __future__ import annotations

import ctypes
import json
import mmap
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

FP32_PARAMS = ("A_log", "in_proj_a.weight", "in_proj_b.weight")  # tiny, and they set every decay


class LoadError(RuntimeError):
    """A model folder that cannot be loaded; the message names the file or tensor at fault."""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in (None, "auto"):
        return torch.bfloat16
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available (try --device cpu)")
    return dev


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index} is not a valid safetensors index: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise LoadError(f"{index.name} lists {f.name}, which is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no *.safetensors weights in {folder}")
    return files


def adopt_tensors(folder: Path, model: torch.nn.Module, params: Mapping[str, torch.Tensor],
                  name_of, dtype_of, device: torch.device, prefix: str = "", convert=None) -> None:
    """Replace each parameter/buffer of a meta-built `model` by its checkpoint tensor (cast to
    `dtype_of(name)`, None = keep the stored dtype).

    `name_of(key)` maps a checkpoint key to a parameter name, or None to skip the tensor;
    `convert(name, tensor)` may consume a tensor itself (returns True). Unexpected, wrongly-shaped or
    missing tensors raise LoadError naming the tensor (missing ones as `prefix + name`).
    """
    loaded: set[str] = set()
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = name_of(key)
                    if name is None:
                        continue
                    if name not in params:
                        raise LoadError(f"{path.name}: unexpected tensor {key} (not part of a Qwen3.5 model)")
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(params[name].shape):
                        raise LoadError(f"{path.name}: tensor {key} has shape {list(tensor.shape)}, "
                                        f"expected {list(params[name].shape)}")
                    loaded.add(name)
                    if convert is not None and convert(name, tensor):
                        drop_pages(tensor)
                        continue
                    module_name, _, attr = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    tensor = tensor.to(device=device, dtype=dtype_of(name) or tensor.dtype)
                    if attr in module._buffers:
                        module._buffers[attr] = tensor
                    else:
                        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
        except SafetensorError as e:
            raise LoadError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise LoadError(f"cannot read {path}: {e}") from None
    missing = [n for n in params if n not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"tensor {prefix}{missing[0]} is missing from the checkpoint in {folder}{more}")


_MADV_DONTNEED = 4
_libc: list = []  # ctypes' handle on the C library, opened on first use


def drop_pages(t: torch.Tensor, file_mapped: bool = False) -> None:
    """Give back the resident pages of a checkpoint tensor that was consumed (quantized on load, or repacked
    for a kernel). safetensors maps the file, and each page read stays in this process's RSS while the
    mapping lives — a whole second copy beside the one in use. Only pages wholly inside `t`, and only where
    they lie in a mapping of a file: such a page is read again from the file if ever touched, so for a tensor
    nobody wrote to (checkpoint tensors are never written in place) no value changes. Anonymous memory (a
    converted copy, the heap), where DONTNEED would zero the pages, is left alone. Linux only."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a, b = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if b > a and (file_mapped or _file_mapping(a, b)):  # file_mapped: the caller mapped the file itself
        if not _libc:
            _libc.append(ctypes.CDLL(None))
        _libc[0].madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)


def _file_mapping(a: int, b: int) -> bool:
    """Whether [a, b) lies in one mapping of a file (/proc/self/maps: an inode and a path)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, _, _, _, inode, *path = line.split()
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= a < hi:
                    return b <= hi and inode != "0" and bool(path) and not path[0].startswith("[")
                if lo > a:  # the lines are sorted by address
                    break
    except (OSError, ValueError):
        pass
    return False


def trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim). Quantizing on load frees
    hundreds of MB of fp32 temporaries that glibc keeps in its arenas (0.46 GB after an int4 0.8B load):
    resident, counted in RSS, and reused only by allocations that happen to fit. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        if not _libc:
            _libc.append(ctypes.CDLL(None))
        _libc[0].malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (musl has no malloc_trim)
        pass
