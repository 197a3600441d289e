"""Test helper: write a Qwen3.5 model folder as a llama.cpp-style GGUF file (the converter's side).

Follows llama.cpp's `Qwen3_5TextModel` conversion (conversion/qwen.py): value heads reordered from
grouped to tiled order, then A_log → −exp(A_log) as `ssm_a`, dt_bias → `ssm_dt.bias`, conv1d squeezed,
norm weights + 1 (not the DeltaNet output norm), llama.cpp tensor names, `qwen35.*` metadata, MTP
blocks appended as `blk.{n_layer}` with `nextn` tensors, vision tensors dropped; or (`ollama=True`) as
Ollama's `convert_qwen35.go` lays it out (grouped value heads, `ssm_ba`, `ssm_dt`, in_proj_qkv in
thirds). Matmul weights whose row length fits the type's block get `qtype`; the rest stay F32
(llama-quantize falls back similarly).
Q4_K has no quantizer in the gguf package, so `quantize_q4_k` builds its blocks here; Q5_K / Q6_K
tensors are random valid blocks (of the original's scale), not a quantization of the original.
`write_gguf` returns, per quantized tensor, the weight it really encodes (dequantized with
`gguf.quants` and mapped back to the checkpoint's order) so tests can build the exact reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

HF_TO_GGUF = {  # checkpoint names (after dropping `language_model.`) → llama.cpp names
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight", "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
         "linear_attn.in_proj_z.weight": "attn_gate.weight", "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
         "linear_attn.in_proj_b.weight": "ssm_beta.weight", "linear_attn.conv1d.weight": "ssm_conv1d.weight",
         "linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias",
         "linear_attn.norm.weight": "ssm_norm.weight", "linear_attn.out_proj.weight": "ssm_out.weight"}
MTP_TOP = {"fc.weight": "nextn.eh_proj.weight", "pre_fc_norm_embedding.weight": "nextn.enorm.weight",
           "pre_fc_norm_hidden.weight": "nextn.hnorm.weight", "norm.weight": "nextn.shared_head_norm.weight"}


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[N, K] fp32 (K % 256 == 0) → Q4_K bytes [N, K/256·144]: per 32-value sub-block a 6-bit scale and
    min under the super-block's f16 d and dmin; w ≈ d·sc·q − dmin·m."""
    n, k = w.shape
    sub = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0)  # the format's minimum is −dmin·m ≤ 0
    span = np.maximum(sub.max(-1) - lo, 1e-8) / 15
    d = (span.max(-1) / 63).astype(np.float16)
    dmin = (np.maximum((-lo).max(-1), 1e-8) / 63).astype(np.float16)
    sc = np.clip(np.round(span / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    scale = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.round((sub + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    packed_sc = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                                (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # pair i: sub-block 2i low, 2i+1 high
    blocks = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed_sc, qs], axis=1)
    return blocks.reshape(n, -1)


# K-quants the gguf package cannot quantize: random blocks whose f16 super-scales (byte offsets) give
# weights of about the original's size; the returned effective weight is what they decode to.
RANDOM_BLOCKS = {Q.Q6_K: ((208,), 1024), Q.Q5_K: ((0, 2), 512)}


def _quantize(x: np.ndarray, qtype: Q, seed: int = 0) -> np.ndarray:
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    if qtype in RANDOM_BLOCKS:
        offsets, spread = RANDOM_BLOCKS[qtype]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = np.random.default_rng(seed).integers(0, 256, (x.size // block, size), dtype=np.uint8)
        for off in offsets:
            data[:, off:off + 2] = np.float16(x.std() / spread).reshape(1).view(np.uint8)
        return data.reshape(x.shape[0], -1)
    try:
        return gguf.quants.quantize(x, qtype)
    except NotImplementedError:  # e.g. Q2_K, for the unsupported-type test: bytes of the right size
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return np.random.default_rng(seed).integers(0, 256, (x.shape[0], x.shape[1] // block * size), dtype=np.uint8)


def _tiled(n_k: int, per_k: int, width: int) -> torch.Tensor:
    """The converter's grouped → tiled value-head order, as an index: tiled = grouped[idx]."""
    return torch.arange(n_k * per_k * width).reshape(n_k, per_k, width).permute(1, 0, 2).reshape(-1)


def write_gguf(folder: Path, out: Path, qtype: Q = Q.F32, tokenizer: bool = False, fuse_qkv: bool = False,
               overrides: dict[str, Q] | None = None, ollama: bool = False) -> dict[str, torch.Tensor]:
    """Write `folder` as GGUF `out`; returns {checkpoint name: effective fp32 weight} of quantized tensors.
    `ollama`: lay it out as Ollama's own converter does (convert_qwen35.go) instead of llama.cpp's."""
    raw = json.loads((folder / "config.json").read_text())
    t = {**raw, **raw.get("text_config", {})}
    n_layer, n_mtp = t["num_hidden_layers"], t.get("mtp_num_hidden_layers", 0)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            tensors.update({k.replace("language_model.", ""): sf.get_tensor(k).float() for k in sf.keys()
                            if "visual." not in k})
    w = gguf.GGUFWriter(str(out), "qwen35")
    _metadata(w, t, n_layer, 0 if ollama else n_mtp, ollama)
    if tokenizer:
        _tokenizer(w, folder)
    nk, nv = t["linear_num_key_heads"], t["linear_num_value_heads"]
    per_k, dv, qk = nv // nk, t["linear_value_head_dim"], 2 * nk * t["linear_key_head_dim"]
    # GGUF name → (fp32 tensor, [(checkpoint name, its first row here, row count)]) in writing order
    staged: dict[str, tuple[torch.Tensor, list[tuple[str, int, int]]]] = {}
    perms: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # x = x[rows][:, cols]

    def stage(gname: str, x: torch.Tensor, name: str) -> None:
        if gname in staged:  # a fused tensor: rows appended
            prev, src = staged[gname]
            staged[gname] = (torch.cat([prev, x]), src + [(name, prev.shape[0], x.shape[0])])
        else:
            staged[gname] = (x, [(name, 0, x.shape[0] if x.ndim else 1)])

    for name, x in tensors.items():
        gname, bid = _gguf_name(name, n_layer, ollama)
        rows = cols = None
        if ".linear_attn." in name and per_k > 1 and not ollama:  # Ollama keeps the grouped order
            v_rows = _tiled(nk, per_k, dv)
            if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
                rows = torch.cat([torch.arange(qk), qk + v_rows])
            elif name.endswith("in_proj_z.weight"):
                rows = v_rows
            elif name.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
                rows = _tiled(nk, per_k, 1)
            elif name.endswith("out_proj.weight"):
                cols = v_rows
        perms[name] = (rows, cols)
        x = x[rows] if rows is not None else x
        x = x[:, cols] if cols is not None else x
        if name.endswith("A_log"):
            x = -torch.exp(x)
        elif "conv1d" in name:
            x = x.squeeze(1)
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            x = x + 1
        if ollama and gname.endswith(".attn_qkv.weight") and not name.startswith("mtp."):
            third = x.shape[0] // 3  # Ollama's splitDim: three equal parts
            for j, part in enumerate("qkv"):
                stage(gname.replace("attn_qkv", f"attn_{part}"), x[j * third:(j + 1) * third], name)
            continue
        stage(gname, x, name)
    for bid in range(n_layer):  # fused tensors, in the converters' row order
        if fuse_qkv and f"blk.{bid}.attn_q.weight" in staged and f"blk.{bid}.attn_qkv.weight" not in staged:
            _fuse(staged, [f"blk.{bid}.attn_{p}.weight" for p in "qkv"], f"blk.{bid}.attn_qkv.weight")
        if ollama and f"blk.{bid}.ssm_ba_b.weight" in staged:
            _fuse(staged, [f"blk.{bid}.ssm_ba_{p}.weight" for p in "ba"], f"blk.{bid}.ssm_ba.weight")
    effective: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for gname, (x, src) in staged.items():
        qt = (overrides or {}).get(gname, qtype)
        arr = x.numpy().astype(np.float32)
        if arr.ndim != 2 or "conv1d" in gname or arr.shape[1] % gguf.GGML_QUANT_SIZES[qt][0] or qt == Q.F32:
            w.add_tensor(gname, arr)  # 1-D tensors and conv stay F32, as in the converter
            continue
        if qt == Q.F16:
            w.add_tensor(gname, arr.astype(np.float16))
            continue
        data = _quantize(arr, qt, seed=len(effective))
        w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qt)
        with np.errstate(all="ignore"):  # random blocks of unsupported types may decode to NaN
            back = torch.from_numpy(gguf.quants.dequantize(data, qt).astype(np.float32))
        for name, lo, n in src:
            effective.setdefault(name, []).append((lo, back[lo:lo + n]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {name: _unpermute(torch.cat([p for _, p in parts]), *perms[name]) for name, parts in effective.items()}


def _fuse(staged: dict, parts: list[str], fused: str) -> None:
    xs, src, lo = [], [], 0
    for p in parts:
        x, ((name, _, n),) = staged.pop(p)
        xs.append(x), src.append((name, lo, n))
        lo += n
    staged[fused] = (torch.cat(xs), src)


def _unpermute(x: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    x = x[torch.argsort(rows)] if rows is not None else x
    return x[:, torch.argsort(cols)] if cols is not None else x


def _gguf_name(name: str, n_layer: int, ollama: bool = False) -> tuple[str, int | None]:
    if name in HF_TO_GGUF:
        return HF_TO_GGUF[name], None
    if ollama and name.startswith("mtp."):
        return name, None  # Ollama's replacements leave mtp.* names alone
    if ollama:  # its own names for three DeltaNet tensors (in_proj_b/a are then stacked as ssm_ba)
        _, _, idx, rest = name.split(".", 3)
        other = {"linear_attn.dt_bias": "ssm_dt", "linear_attn.in_proj_a.weight": "ssm_ba_a.weight",
                 "linear_attn.in_proj_b.weight": "ssm_ba_b.weight"}.get(rest)
        if other:
            return f"blk.{idx}.{other}", int(idx)
    if name.startswith("mtp."):  # the converter appends MTP as block n_layer
        rest = name[4:]
        if rest in MTP_TOP:
            return f"blk.{n_layer}.{MTP_TOP[rest]}", n_layer
        _, idx, rest = rest.split(".", 2)
        return f"blk.{n_layer + int(idx)}.{LAYER[rest]}", n_layer + int(idx)
    _, _, idx, rest = name.split(".", 3)
    return f"blk.{idx}.{LAYER[rest]}", int(idx)


def _metadata(w: gguf.GGUFWriter, t: dict, n_layer: int, n_mtp: int, ollama: bool) -> None:
    rope = t["rope_parameters"]
    full = [lt == "full_attention" for lt in t["layer_types"]]
    w.add_block_count(n_layer + n_mtp)
    w.add_context_length(t["max_position_embeddings"])
    w.add_embedding_length(t["hidden_size"])
    w.add_feed_forward_length(t["intermediate_size"])
    w.add_head_count(t["num_attention_heads"])
    if ollama:  # per-layer KV heads (0 = linear attention) and its own mrope key
        w.add_array("qwen35.attention.head_count_kv", [t["num_key_value_heads"] if f else 0 for f in full])
        w.add_array("qwen35.mrope_sections", list(rope["mrope_section"]))
    else:
        w.add_head_count_kv(t["num_key_value_heads"])
        w.add_rope_dimension_sections(list(rope["mrope_section"]) + [0] * (4 - len(rope["mrope_section"])))
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(t["rms_norm_eps"])
    w.add_key_length(t["head_dim"])
    w.add_value_length(t["head_dim"])
    w.add_file_type(1)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_ssm_conv_kernel(t["linear_conv_kernel_dim"])
    w.add_ssm_state_size(t["linear_key_head_dim"])
    w.add_ssm_group_count(t["linear_num_key_heads"])
    w.add_ssm_time_step_rank(t["linear_num_value_heads"])
    w.add_ssm_inner_size(t["linear_value_head_dim"] * t["linear_num_value_heads"])
    if not ollama:
        w.add_array("qwen35.attention.recurrent_layers", [not f for f in full] + [False] * n_mtp)
        w.add_full_attention_interval(t.get("full_attention_interval", 4))
    w.add_rope_dimension_count(int(t["head_dim"] * rope.get("partial_rotary_factor", 0.25)))


def _tokenizer(w: gguf.GGUFWriter, folder: Path) -> None:
    """What `_set_vocab_gpt2` writes: every id's token (padded to the model's vocab), its type, merges,
    special ids and the chat template."""
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab_size = json.loads((folder / "config.json").read_text()).get("text_config", {}).get("vocab_size", 0)
    by_id = {i: (t, gguf.TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()}
    for a in tok["added_tokens"]:
        looks = a["content"].startswith("<|") and a["content"].endswith("|>")
        kind = gguf.TokenType.CONTROL if a["special"] or looks else gguf.TokenType.USER_DEFINED
        by_id[a["id"]] = (a["content"], kind)
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list([t for t, _ in tokens])
    w.add_token_types([int(ty) for _, ty in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    ids = {t: i for i, (t, _) in enumerate(tokens)}
    w.add_eos_token_id(ids[cfg["eos_token"]])
    w.add_pad_token_id(ids[cfg["pad_token"]])
    w.add_add_bos_token(False)
    template = (folder / "chat_template.jinja")
    w.add_chat_template(template.read_text(encoding="utf-8") if template.exists() else cfg["chat_template"])
