"""Load a Qwen3.5 GGUF file (llama.cpp / Ollama, `qwen35`) into `Qwen3_5ForCausalLM`, weights read in place.

`load_gguf(sidecar_folder, …)` is what `loader.load_model` delegates to for a folder made by
`gguf_meta.sidecar_for`. It inverts what llama.cpp's converter (`Qwen3_5TextModel.modify_tensors`) did:
GGUF names → ours; norm weights stored as 1 + w (except the DeltaNet output norm); `ssm_a` = −exp(A_log);
conv1d squeezed to [C, K]; `dt_bias` as `ssm_dt.bias`; DeltaNet value heads reordered from grouped
(by key head) to tiled order in in_proj_qkv's V rows, in_proj_z, in_proj_a/b, A_log, dt_bias, conv1d's
V channels and out_proj's columns; optionally q/k/v fused as `attn_qkv` in attention layers.
Tensor types: F32/F16/BF16 → the model dtype; Q4_0/Q4_1/Q4_K → int4 with group 32 (exact: the block
scales/mins become our scales/zeros); Q8_0, Q5_0, Q5_1, Q5_K, Q6_K → int8 per output channel,
requantized from the dequantized values (one scale per row is what our kernel takes). Anything else is a
LoadError naming the type. MTP blocks (`blk.N…` past the decoder, with `nextn` tensors) are ignored.
Files from Ollama's own converter (`convert_qwen35.go`) differ: value heads stay grouped, in_proj_b/a are
one `ssm_ba` tensor, dt_bias is `ssm_dt`, in_proj_qkv is split in thirds as attn_q/k/v, and the vision
tower (`v.*`) may share the file; those are read too (the vision tower is not).
Here: name mapping, transforms and formats. The file parser and block decoders live in gguf_file.py;
metadata, tokenizer and the sidecar in gguf_meta.py.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, ModelConfig, apply_rope_override
from ..model.qwen3_5 import Qwen3_5ForCausalLM
from ..ops import kernels, routes
from ..ops.memory import weight_empty
from ..ops.quant import QuantEmbedding, QuantLinear, pack_int4, quantize_int8
from . import quantize as quant
from .common import FP32_PARAMS, LoadError, drop_pages, resolve_device, resolve_dtype, trim_heap
from .gguf_file import GGUFTensor, dequantize_blocks, int4_blocks, q8_0_values
from .gguf_meta import MARKER, gguf_of, open_gguf

P = "model.language_model."
TOP = {"token_embd.weight": P + "embed_tokens.weight", "output_norm.weight": P + "norm.weight",
       "output.weight": "lm_head.weight"}
BLOCK = {"attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
         "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
         "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
         "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
         "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
         "ffn_down.weight": "mlp.down_proj.weight",
         "attn_gate.weight": "linear_attn.in_proj_z.weight", "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
         "ssm_beta.weight": "linear_attn.in_proj_b.weight", "ssm_conv1d.weight": "linear_attn.conv1d.weight",
         "ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias",
         "ssm_norm.weight": "linear_attn.norm.weight", "ssm_out.weight": "linear_attn.out_proj.weight"}
BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
IGNORED = ("v.", "mm.", "mtp.")  # vision tower and MTP head that Ollama's files carry: not loaded here
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")  # requantized per row
FUSED_INT8 = ("Q8_0", "Q6_K")  # … by one kernel pass where the CPU kernels are built
FLOAT_TYPES = ("F32", "F16", "BF16")
GROUP = 32  # the int4 group: a Q4_0/Q4_1 block, a Q4_K sub-block
CHUNK_ROWS = 8192  # decode big tensors (the 248K-row embedding) a slice at a time


class Weight:
    """One tensor on its way from the file: float rows, or raw quantized rows (blocks never cross a
    row, so row permutations act on the bytes) plus a pending column permutation."""

    def __init__(self, name: str, tensor: GGUFTensor):
        self.name, self.type = name, tensor.type_name
        self.shape = tensor.shape  # ours: [rows, K]
        self.data = tensor.data  # memory-mapped: float [..., K] (BF16 as raw bits) or uint8 [rows, bytes per row]
        self.cols: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.type not in FLOAT_TYPES

    def rows(self, index) -> "Weight":
        """These rows only (a slice, or a permutation as an index array)."""
        out = copy.copy(self)
        out.data = self.data[index]
        out.shape = (out.data.shape[0],) + self.shape[1:]
        return out

    def check(self) -> None:
        if self.type not in FLOAT_TYPES + INT4_TYPES + INT8_TYPES:
            raise LoadError(f"GGUF tensor {self.name} has type {self.type}, which deltarun cannot load "
                            f"(supported: {', '.join(FLOAT_TYPES + INT4_TYPES + INT8_TYPES)})")

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as plain numbers (dequantized: for float tensors, small non-matmul tensors, and
        the rows being requantized to int8)."""
        if self.type == "BF16":
            t = torch.from_numpy(np.array(self.data).view(np.int16)).view(torch.bfloat16)
        elif self.type in FLOAT_TYPES:
            t = torch.from_numpy(np.array(self.data))
        else:
            t = torch.from_numpy(dequantize_blocks(self.data, self.type).reshape(self.shape))
        if self.cols is not None:
            t = t[:, torch.from_numpy(self.cols)]
        return t.reshape(self.shape).to(dtype)

    def bits(self) -> int:
        """4 or 8: the format this tensor keeps (0 for float)."""
        if self.type in INT4_TYPES:
            aligned = True
            if self.cols is not None:
                starts = self.cols[::GROUP, None]
                aligned = bool(np.all(starts % GROUP == 0) and np.array_equal(
                    self.cols.reshape(-1, GROUP), starts + np.arange(GROUP)))
            return 4 if aligned else 8  # a permutation splitting a group: requantize (toy shapes only)
        return 8 if self.quantized else 0

    def int4(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed [N, K/2], scales [N, K/32], zeros [N, K/32]) fp32, exactly the file's values."""
        if self.type == "Q4_0" and self.cols is None and kernels.available():
            # the same bytes as below, in one pass over the mapped blocks (csrc/gguf_blocks.cpp): no copy
            p, s = torch.ops.deltarun.gguf_q4_0_rows(_mapped(self.data), self.shape[1])
            return p, s, torch.zeros_like(s)
        if self.type == "Q4_K" and self.cols is None and kernels.available():  # likewise
            return torch.ops.deltarun.gguf_q4_k_rows(_mapped(self.data), self.shape[1])
        packed, scales, zeros = [], [], []
        for i in range(0, self.shape[0], CHUNK_ROWS):  # packed a slice at a time: no [N, K] byte copy
            q, s, z = int4_blocks(self.data[i:i + CHUNK_ROWS], self.type)
            rows = min(CHUNK_ROWS, self.shape[0] - i)
            q, s, z = q.reshape(rows, -1), s.reshape(rows, -1), z.reshape(rows, -1)
            if self.cols is not None:
                q, groups = q[:, self.cols], self.cols[::GROUP] // GROUP
                s, z = s[:, groups], z[:, groups]
            packed.append(pack_int4(torch.from_numpy(q)))
            scales.append(torch.from_numpy(s))
            zeros.append(torch.from_numpy(z))
        return torch.cat(packed), torch.cat(scales), torch.cat(zeros)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [N, K], scales [N]) requantized per row from the dequantized (or float) values."""
        if self.type in FUSED_INT8 and self.cols is None and kernels.available():
            # the same numbers as below, in one pass over the mapped blocks (csrc/gguf_blocks.cpp): no copy
            q = weight_empty((self.shape[0], self.shape[1]), torch.int8)  # decode streams it: 2 MB pages
            return q, torch.ops.deltarun.gguf_to_int8_into(_mapped(self.data), self.type, self.shape[1], q)
        qs, ss = [], []
        for i in range(0, self.shape[0], CHUNK_ROWS):
            part = self.rows(slice(i, i + CHUNK_ROWS))
            w = q8_0_values(part.data) if self.type == "Q8_0" else part.values(torch.float32)
            if self.type == "Q8_0" and self.cols is not None:
                w = w[:, torch.from_numpy(self.cols)]
            q, s = quantize_int8(w.reshape(part.shape))
            qs.append(q)
            ss.append(s)
        return torch.cat(qs), torch.cat(ss)


def _mapped(data: np.ndarray) -> torch.Tensor:
    """A uint8 block array as a tensor without a copy, for the kernels that only read it: the file's mapping is
    read-only, which torch warns about for any tensor (it cannot mark one read-only)."""
    data = np.ascontiguousarray(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data)


# ---------------------------------------------------------------------------------- name + transforms
def _untile(n_heads_k: int, per_k: int, width: int) -> np.ndarray:
    """Index that turns llama.cpp's tiled value-head order back into grouped order (ours)."""
    tiled = np.arange(n_heads_k * per_k * width).reshape(n_heads_k, per_k, width).transpose(1, 0, 2).reshape(-1)
    return np.argsort(tiled)


def _targets(name: str, w: Weight, config: ModelConfig, tensors: dict[str, GGUFTensor],
             tiled: bool) -> list[tuple[str, Weight, str]]:
    """(our parameter name, tensor, value transform) for one GGUF tensor; [] for ignored tensors.
    `tiled`: value heads in llama.cpp's tiled order (False for Ollama-converted files)."""
    t = config.text
    if name.startswith(IGNORED):
        return []
    if name in TOP:
        return [(TOP[name], w, "norm" if name == "output_norm.weight" else "")]
    m = BLOCK_RE.fullmatch(name)
    if not m:
        raise LoadError(f"unexpected GGUF tensor {name} (not part of a Qwen3.5 model)")
    i, rest = int(m.group(1)), m.group(2)
    if i >= t.num_hidden_layers:
        return []  # MTP (`nextn`) blocks follow the decoder layers: not used
    pre = f"{P}layers.{i}."
    linear = t.layer_types[i] == "linear_attention"
    if linear and rest in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):  # Ollama split in_proj_qkv
        if rest != "attn_q.weight":
            return []  # joined to attn_q's
        found = [tensors.get(f"blk.{i}.attn_{x}.weight") for x in "qkv"]
        parts = [p for p in found if p is not None]
        if len(parts) != 3 or any(p.type_name != parts[0].type_name for p in parts):
            raise LoadError(f"blk.{i}.attn_q/k/v.weight: missing, or of different types")
        w.data = np.concatenate([p.data for p in parts])
        w.shape = (w.data.shape[0],) + w.shape[1:]
        rest = "attn_qkv.weight"
    if rest == "ssm_ba.weight":  # Ollama: in_proj_b and in_proj_a rows stacked, b first
        nv = t.linear_num_value_heads
        return [(pre + "linear_attn.in_proj_b.weight", w.rows(slice(0, nv)), ""),
                (pre + "linear_attn.in_proj_a.weight", w.rows(slice(nv, None)), "")]
    rest = "ssm_dt.bias" if rest == "ssm_dt" else rest  # Ollama's name for dt_bias
    if rest == "attn_qkv.weight" and not linear:  # converted with --fuse-qkv: [q; k; v] rows
        nq, nk = t.num_attention_heads * t.head_dim * 2, t.num_key_value_heads * t.head_dim
        return [(pre + "self_attn.q_proj.weight", w.rows(slice(0, nq)), ""),
                (pre + "self_attn.k_proj.weight", w.rows(slice(nq, nq + nk)), ""),
                (pre + "self_attn.v_proj.weight", w.rows(slice(nq + nk, None)), "")]
    ours = pre + ("linear_attn.in_proj_qkv.weight" if rest == "attn_qkv.weight" else BLOCK.get(rest, ""))
    if ours == pre:
        raise LoadError(f"unexpected GGUF tensor {name} (not part of a Qwen3.5 model)")
    per_k = t.linear_num_value_heads // t.linear_num_key_heads
    if linear and per_k > 1 and tiled:  # value heads back from tiled to grouped order
        nk, dv, qk = t.linear_num_key_heads, t.linear_value_head_dim, 2 * t.linear_key_dim
        if rest in ("attn_qkv.weight", "ssm_conv1d.weight"):
            w = w.rows(np.concatenate([np.arange(qk), qk + _untile(nk, per_k, dv)]))
        elif rest == "attn_gate.weight":
            w = w.rows(_untile(nk, per_k, dv))
        elif rest in ("ssm_alpha.weight", "ssm_beta.weight", "ssm_a", "ssm_dt.bias"):
            w = w.rows(_untile(nk, per_k, 1))
        elif rest == "ssm_out.weight":
            w.cols = _untile(nk, per_k, dv)
    transform = {"ssm_a": "a_log", "ssm_conv1d.weight": "conv"}.get(rest, "")
    if rest.endswith("norm.weight") and rest != "ssm_norm.weight":
        transform = "norm"
    return [(ours, w, transform)]


def _float_value(w: Weight, transform: str, dtype: torch.dtype) -> torch.Tensor:
    v = w.values(torch.float32)
    if transform == "norm":  # stored as 1 + w (zero-centred RMSNorm)
        v = v - 1
    elif transform == "a_log":  # stored as −exp(A_log)
        v = torch.log(-v)
    elif transform == "conv":  # [C, K] → [C, 1, K]
        v = v.unsqueeze(1)
    return v.to(dtype)


# --------------------------------------------------------------------------------------------- load
def load_gguf(folder: str | Path, dtype=None, device=None, rope_scaling=None, context_length=None,
              quantization: str | None = None) -> Qwen3_5ForCausalLM:
    """The model of a GGUF sidecar folder. `quantization` applies to the file's float matmul weights only:
    quantized tensors keep their own format (int4 or int8)."""
    folder = Path(folder)
    path = gguf_of(folder)
    if path is None:
        raise LoadError(f"{folder} is not a GGUF sidecar folder (no {MARKER})")
    try:
        config = ModelConfig.from_file(folder / "config.json")
        apply_rope_override(config, rope_scaling, context_length)
        spec = quant.QuantSpec.parse(quantization)
    except (ConfigError, ValueError) as e:
        raise LoadError(str(e)) from None
    dev, reader = resolve_device(device), open_gguf(path)
    dt = resolve_dtype(dtype, dev)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = config.text.tie_word_embeddings
    if tied:
        params.pop("lm_head.weight")
    loaded: set[str] = set()
    tensors = {t.name: t for t in reader.tensors}
    tiled = not any(n.endswith(".ssm_ba.weight") for n in tensors)  # Ollama's converter keeps grouped heads
    for tensor in reader.tensors:
        for name, w, transform in _targets(tensor.name, Weight(tensor.name, tensor), config, tensors, tiled):
            w.check()
            if name not in params:
                raise LoadError(f"{path.name}: unexpected tensor {tensor.name} (as {name})")
            shape = (w.shape[0], 1, *w.shape[1:]) if transform == "conv" else w.shape
            if shape != tuple(params[name].shape):
                raise LoadError(f"{path.name}: tensor {tensor.name} has shape {list(w.shape)}, "
                                f"expected {list(params[name].shape)}")
            _adopt(model, name, w, transform, dt, dev, spec)
            loaded.add(name)
        # converted: the file's pages go back (re-read from the page cache if a later tensor needs them), else
        # they stay in RSS beside the converted copy (Q8_0 0.8B: peak 1.76 GB against llama.cpp's 0.87)
        if tensor.data.flags.c_contiguous:  # a view of the file's bytes (a copy would be anonymous memory)
            drop_pages(_mapped(tensor.data), file_mapped=True)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise LoadError(f"tensor {missing[0]} is missing from {path}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    embed = model.model.language_model.embed_tokens
    if tied and isinstance(embed, QuantEmbedding):  # lm_head reads the embedding's quantized rows
        # Qwen3_5ForCausalLM types lm_head as the nn.Linear it builds; a quantized one is a QuantLinear
        model.lm_head = QuantLinear(  # type: ignore[assignment]
            embed.embedding_dim, embed.out_features, embed.bits, embed.group_size, dt, "meta")
    elif tied:
        model.lm_head.weight = embed.weight
    quant.finish(model, tied)  # ties a quantized lm_head, packs every QuantLinear
    trim_heap()  # the conversions' temporaries
    model.eval().requires_grad_(False)
    routes.assign(model)  # each bf16 linear's route on this machine: decode and prefill kernels (ops/routes.py)
    model.from_gguf = True  # value heads reordered: weights/lora.py refuses adapters on it
    return model


def _adopt(model: nn.Module, name: str, w: Weight, transform: str, dt: torch.dtype, dev: torch.device,
           spec: "quant.QuantSpec | None") -> None:
    parent_name, _, attr = name.rpartition(".")
    module = model.get_submodule(parent_name)
    matmul = isinstance(module, (nn.Linear, nn.Embedding)) and attr == "weight" and not transform
    bits = w.bits() if matmul else 0
    if matmul and not bits and spec and quant.is_quantizable(name, w.shape, spec):
        bits = -spec.bits  # a float tensor quantized on load, as `quantization=` asks
    if not bits:
        value = _float_value(w, transform, torch.float32 if name.endswith(FP32_PARAMS) else dt)
        setattr(module, attr, nn.Parameter(value.to(dev), requires_grad=False))
        return
    group = spec.group_size if spec and bits == -4 else GROUP  # -4: quantized as spec asks; (unused for int8)
    n, k = w.shape
    if isinstance(module, nn.Embedding):
        shell: QuantLinear = QuantEmbedding(n, k, abs(bits), group, dt, "meta")
    else:
        shell = QuantLinear(k, n, abs(bits), group, dt, "meta")
    if bits == 4:
        packed, s, z = w.int4()
        shell.set_int4(packed.to(dev), s.to(dev), z.to(dev))
    elif bits == 8:
        q, s = w.int8()
        shell.set_int8(q.to(dev), s.to(dev))
    else:
        quant.quantize_into(shell, w.values(torch.float32), dev)
    grand, _, child = parent_name.rpartition(".")
    setattr(model.get_submodule(grand) if grand else model, child, shell)
