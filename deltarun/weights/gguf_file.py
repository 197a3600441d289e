"""A fast, read-only GGUF (v2/v3) header parser with memory-mapped tensor data.

Why not `gguf.GGUFReader`: it builds a numpy view for every element of every metadata array, which
takes ~20 s for Qwen's 248K-token vocabulary plus 247K merges, on every load. Here numeric arrays are
one `np.frombuffer` and strings a tight loop (~0.5 s). The type tables (value types, quantization
block sizes) still come from the `gguf` package. Tensor data is never read until a tensor's `data`
view is touched. Every malformed or cut-off file is a `LoadError` naming the file (and tensor).
Also here: decoding blocks (Q4_0/Q4_1/Q4_K into int4 groups, Q8_0 and the rest into fp32 values).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import LoadError

MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
# GGML type id → (name, values per block, bytes per block) for the types weights/gguf.py loads, as gguf-py's
# GGMLQuantizationType / GGML_QUANT_SIZES give them (tests/test_gguf.py checks): importing gguf-py (and the YAML
# parser it pulls in) cost ~0.1 s of every GGUF start. Other ids are looked up in gguf-py.
_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
          6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
          13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
_U64 = struct.Struct("<Q")
_FLOAT_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: raw bits


@dataclass
class GGUFTensor:
    name: str
    type_name: str  # gguf.GGMLQuantizationType name: F32, F16, Q4_K, …
    shape: tuple[int, ...]  # PyTorch order (GGUF dims reversed): [rows, row length]
    data: np.ndarray  # float [*shape], or uint8 [rows, bytes per row] for block-quantized types


@dataclass
class _Strings:
    """A string array not decoded yet: where its first length sits, and how many strings."""

    start: int
    n: int


class GGUFFile:
    """`fields` (metadata key → value; arrays as lists, string arrays decoded by `value`) and `tensors` (in file
    order) of a GGUF file."""

    _pos: int = 0  # the parser's read position

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise LoadError(f"cannot read {self.path} as GGUF: {e}") from None
        try:
            self._parse()
        except (struct.error, ValueError, IndexError, UnicodeDecodeError, KeyError) as e:
            raise LoadError(f"{self.path} is not a valid GGUF file (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from None

    def _read(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > len(self._mm):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        s = self._mm[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            sub, n = self._read("<I"), self._read("<Q")
            if sub == STRING:  # walked over now, decoded when asked for (`value`): 0.8 s for a 248K vocabulary
                start, pos, unpack, mm = self._pos, self._pos, _U64.unpack_from, self._mm
                for _ in range(n):  # a length past the end fails the next unpack (struct.error), or the check below
                    pos += 8 + unpack(mm, pos)[0]
                if pos > len(mm):
                    raise ValueError("a string array runs past the end of the file")
                self._pos = pos
                return _Strings(start, n)
            if sub not in _NUMPY:
                raise ValueError(f"unsupported array element type {sub}")
            dt = np.dtype(_NUMPY[sub])
            arr = np.frombuffer(self._mm, dtype=dt, count=n, offset=self._pos)
            self._pos += n * dt.itemsize
            return arr.tolist()
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self._read(_SCALAR[vtype])

    def value(self, key: str) -> Any:
        """fields[key], with a string array decoded (a list of str)."""
        v = self.fields[key]
        if isinstance(v, _Strings):
            self._pos = v.start
            try:
                v = self.fields[key] = [self._string() for _ in range(v.n)]
            except UnicodeDecodeError as e:
                raise LoadError(f"{self.path} is not a valid GGUF file: metadata {key}: {e}") from None
        return v

    def _parse(self) -> None:
        self._pos = 0
        if self._mm[:4] != MAGIC:
            raise ValueError("no GGUF magic at the start of the file")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (deltarun reads versions 2 and 3)")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            infos.append((name, dims, self._read("<I"), self._read("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensor] = []
        for name, dims, type_id, offset in infos:
            type_name, block, size = _type(type_id, name, self.path)
            shape = tuple(int(d) for d in reversed(dims))
            n = int(np.prod(shape))
            nbytes = n // block * size
            if start + offset + nbytes > len(self._mm):
                raise LoadError(f"{self.path}: data of tensor {name} runs past the end of the file "
                                f"(truncated download?)")
            if type_name in _FLOAT_NP:
                data = np.frombuffer(self._mm, _FLOAT_NP[type_name], n, start + offset).reshape(shape)
            else:
                if shape[-1] % block:
                    raise LoadError(f"{self.path}: tensor {name} rows of {shape[-1]} are not whole {type_name} "
                                    f"blocks of {block}")
                data = np.frombuffer(self._mm, np.uint8, nbytes, start + offset).reshape(
                    -1, shape[-1] // block * size)
            self.tensors.append(GGUFTensor(name, type_name, shape, data))


def _type(type_id: int, name: str, path: Path) -> tuple[str, int, int]:
    """(type name, values per block, bytes per block) of a GGML type id."""
    if type_id in _TYPES:
        return _TYPES[type_id]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise LoadError(f"{path}: tensor {name} has unknown GGML type id {type_id}") from None
    return (qtype.name, *GGML_QUANT_SIZES[qtype])


# ------------------------------------------------------------------------------- block decoding
def q8_0_values(data: np.ndarray) -> torch.Tensor:
    """Q8_0 rows → fp32 [rows, K] in torch (multi-threaded; exact: an f16 scale times an int8)."""
    b = torch.from_numpy(np.array(data).reshape(-1, 34))
    d = b[:, :2].contiguous().view(torch.float16).float()
    return (b[:, 2:].contiguous().view(torch.int8).float() * d).reshape(data.shape[0], -1)


def dequantize_blocks(data: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(np.ascontiguousarray(data), GGMLQuantizationType[type_name]).astype(np.float32)


def int4_blocks(data: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of Q4_0 / Q4_1 / Q4_K blocks → (q uint8 [n, 32] per group, scale [n], zero [n]) with
    w = (q − 8)·scale + zero, n = number of 32-value groups, in row order."""
    size = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}[type_name]
    b = np.ascontiguousarray(data).reshape(-1, size)

    def f16(lo: int, hi: int) -> np.ndarray:
        return b[:, lo:hi].copy().view(np.float16).astype(np.float32)[:, 0]

    if type_name in ("Q4_0", "Q4_1"):
        qs = b[:, size - 16:]  # value j in the low nibble of byte j, value 16 + j in its high nibble
        q = np.concatenate([qs & 15, qs >> 4], axis=1)
        d = f16(0, 2)
        zero = np.zeros_like(d) if type_name == "Q4_0" else 8 * d + f16(2, 4)  # Q4_1: w = d·q + m
        return q, d, zero
    # Q4_K: d, dmin, 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks, then 128 bytes of nibbles
    d, dmin = f16(0, 2)[:, None], f16(2, 4)[:, None]
    sc_bytes = b[:, 4:16].reshape(-1, 3, 4)
    lo, hi, mix = sc_bytes[:, 0], sc_bytes[:, 1], sc_bytes[:, 2]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 2) & 48)], axis=1).astype(np.float32)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 2) & 48)], axis=1).astype(np.float32)
    qs = b[:, 16:].reshape(-1, 4, 32)  # sub-block 2i: low nibbles of the i-th 32 bytes, 2i+1: high ones
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 32)
    scale = (d * sc).reshape(-1)  # w = d·sc·q − dmin·m = (q − 8)·(d·sc) + (8·d·sc − dmin·m)
    return q, scale, 8 * scale - (dmin * mn).reshape(-1)
