// A decoder layer's decode step (one token per sequence, a few sequences) as one op: the same kernels,
// in the same order, that the Python modules call one by one (model/qwen3_5.py `DecoderLayer`), so the
// result is bit for bit theirs; what goes away is ~0.3 ms of Python and dispatch per layer, about as
// long as a 0.8B layer's int4 matmuls take. Python builds the argument lists once per layer
// (ops/layer.py); prefill, speculative verifies and anything without a kernel stay on the modules.
// A linear layer arrives as the tensors its kernel reads: [w bf16] or [w fp32] (gemv_bf16 / gemv_f32),
// [q int8, scales fp32] (gemv_int8), [packed uint8, sz bf16] (gemv_int4, group = K / sz.size(0)), each followed
// by [A, Bt, mask] where some rows run a LoRA adapter (`lin` below).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "ops.h"

namespace {

// x [M, K] → [M, N]: in x's dtype (cast), fp32 from fp32 weights
at::Tensor base_lin(const at::Tensor& x, at::TensorList w) {
  const at::Tensor& a = w[0];
  if (w.size() == 1) return a.scalar_type() == at::kFloat ? gemv_f32(x, a) : gemv_bf16(x, a, true);
  if (a.scalar_type() == at::kChar) return gemv_int8(x, a, w[1], true);
  TORCH_CHECK(a.scalar_type() == at::kByte && w[1].dim() == 3, "layer: int4 is [packed uint8, sz [K/g, N, 2]]");
  return gemv_int4(x, a, x.size(1) / w[1].size(0), w[1], true);
}

// The kernel's tensors, then (4 or 5 tensors in all) the rows' LoRA adapters as ops/lora.py `SlotDelta` holds
// them: A [S·R, K], Bt [S·R, N], mask [M, S·R] fp32; their delta ((x · Aᵀ) ⊙ mask) · Bt is made by the same
// kernel calls as `SlotDelta` makes (shrink on gemv_bf16, or torch's fp32 GEMM for DeltaNet's small a/b
// projections; expand on lora.cpp) and added the same way, so the sum is bit for bit the modules'.
at::Tensor lin(const at::Tensor& x, at::TensorList w) {
  const size_t nk = w.size() >= 4 ? w.size() - 3 : w.size();
  TORCH_CHECK(nk >= 1 && nk <= 2, "layer: a linear is 1 or 2 tensors, then optionally [A, Bt, mask]");
  const at::Tensor y = base_lin(x, w.slice(0, nk));
  if (nk == w.size()) return y;
  const at::Tensor& A = w[nk];
  const at::Tensor t =
      A.scalar_type() == at::kBFloat16 ? gemv_bf16(x.to(at::kBFloat16), A, false) : at::linear(x.to(at::kFloat), A);
  return y + lora_expand(t, w[nk + 2], w[nk + 1]).to(y.scalar_type());
}

at::Tensor f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

}  // namespace

// x [B, 1, H] (the residual stream), h [B, 1, H] (the token mixer's output) → the layer's output [B, 1, H]:
// s, n = s + h, post_norm(s + h); s + down(silu(gate(n)) · up(n)).
at::Tensor layer_tail(const at::Tensor& x, const at::Tensor& h, const at::Tensor& post_norm, double post_eps,
                      at::TensorList gate, at::TensorList up, at::TensorList down) {
  const auto [s, n] = add_rms_norm_zc(x, h, post_norm, post_eps);
  const at::Tensor n2 = n.reshape({-1, n.size(-1)});
  at::Tensor m = at::silu(lin(n2, gate));
  m = m * lin(n2, up);
  return s + lin(m, down).view(s.sizes());
}

// A linear-attention layer: input norm, in_proj_{qkv,z,a,b}, the fused DeltaNet step on the pooled states
// (gdn.cpp; conv_pool and rec_pool updated in place at `slots` [B] int64), out_proj, then layer_tail.
at::Tensor gdn_layer_decode(const at::Tensor& x, const at::Tensor& in_norm, double in_eps, at::TensorList qkv,
                            at::TensorList z, at::TensorList a, at::TensorList b, const at::Tensor& conv_w,
                            const at::Tensor& A_log, const at::Tensor& dt_bias, const at::Tensor& norm_w,
                            double norm_eps, at::TensorList out, const at::Tensor& conv_pool,
                            const at::Tensor& rec_pool, const at::Tensor& slots, int64_t hk,
                            const at::Tensor& post_norm, double post_eps, at::TensorList gate, at::TensorList up,
                            at::TensorList down) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "gdn_layer_decode: x [B, 1, H]");
  const at::Tensor h = rms_norm_zc(x, in_norm, in_eps).view({x.size(0), x.size(2)});
  const at::Tensor o = gdn_decode_(lin(h, qkv), conv_pool, conv_w, f32(lin(h, a)), f32(lin(h, b)), A_log, dt_bias,
                                   rec_pool, slots, hk, lin(h, z), norm_w, norm_eps, std::nullopt);
  return layer_tail(x, lin(o, out).view(x.sizes()), post_norm, post_eps, gate, up, down);
}

namespace {

// apply_rotary (model/layers.py) on x [R, D] bf16 rows in place, with cos / sin [rd] bf16: the first rd
// channels become x·cos + rotate_half(x)·sin, each product and the sum rounded to bf16 as the torch ops do.
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t R = x.size(0), D = x.size(1), rd = cos.size(-1), half = rd / 2;
  auto* X = x.data_ptr<at::BFloat16>();
  const auto *C = cos.data_ptr<at::BFloat16>(), *S = sin.data_ptr<at::BFloat16>();
  std::vector<float> row(rd);
  for (int64_t r = 0; r < R; ++r) {
    at::BFloat16* xr = X + r * D;
    for (int64_t j = 0; j < rd; ++j) row[j] = static_cast<float>(xr[j]);
    for (int64_t j = 0; j < rd; ++j) {
      const float rot = j < half ? -row[j + half] : row[j - half];
      const float a = static_cast<float>(at::BFloat16(row[j] * static_cast<float>(C[j])));
      const float b = static_cast<float>(at::BFloat16(rot * static_cast<float>(S[j])));
      xr[j] = at::BFloat16(a + b);
    }
  }
}

}  // namespace

// A gated full-attention layer for B sequences, one token each: input norm, q (with its gate) / k / v
// projections, per-head q/k norms, rotary (cos, sin [B, rd] bf16), the new key and value written at
// position lengths[b] of row b's cache buffers (k_cache[b], v_cache[b] [1, Hkv, capacity, D], room made by
// the caller, who also advances the lengths), attention over positions 0 … lengths[b], the sigmoid gate,
// o_proj, then layer_tail. bf16 only (as the modules run it: gemv kernels, rms_norm_zc, torch's SDPA).
at::Tensor attn_layer_decode(const at::Tensor& x, const at::Tensor& in_norm, double in_eps, at::TensorList qp,
                             at::TensorList kp, at::TensorList vp, const at::Tensor& q_norm, double q_eps,
                             const at::Tensor& k_norm, double k_eps, const at::Tensor& cos, const at::Tensor& sin,
                             at::TensorList k_cache, at::TensorList v_cache, at::IntArrayRef lengths, int64_t nq,
                             int64_t nkv, double scale, at::TensorList op, const at::Tensor& post_norm,
                             double post_eps, at::TensorList gate, at::TensorList up, at::TensorList down) {
  const int64_t B = x.size(0), H = x.size(2);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == at::kBFloat16,
              "attn_layer_decode: x [B, 1, H] bf16");
  TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == B && static_cast<int64_t>(v_cache.size()) == B &&
              static_cast<int64_t>(lengths.size()) == B, "attn_layer_decode: one cache per row");
  const at::Tensor h = rms_norm_zc(x, in_norm, in_eps).view({B, H});
  const at::Tensor qg = lin(h, qp).view({B, 1, nq, -1});
  const int64_t d = qg.size(3) / 2, groups = nq / nkv;
  const at::Tensor g = qg.narrow(3, d, d).reshape({B, 1, nq * d});
  at::Tensor q = rms_norm_zc(qg.narrow(3, 0, d), q_norm, q_eps);  // [B, 1, nq, d], contiguous
  at::Tensor k = rms_norm_zc(lin(h, kp).view({B, 1, nkv, d}), k_norm, k_eps);
  const at::Tensor v = lin(h, vp).view({B, 1, nkv, d});
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && cos.is_contiguous() && sin.is_contiguous() &&
              cos.numel() == B * cos.size(-1) && cos.size(-1) <= d, "attn_layer_decode: cos / sin [B, rd] bf16");
  std::vector<at::Tensor> rows;
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor qb = q.select(0, b).view({nq, d}), kb = k.select(0, b).view({nkv, d});
    rotary_(qb, cos.view({B, -1}).select(0, b), sin.view({B, -1}).select(0, b));
    rotary_(kb, cos.view({B, -1}).select(0, b), sin.view({B, -1}).select(0, b));
    const int64_t n = lengths[b];
    TORCH_CHECK(k_cache[b].dim() == 4 && k_cache[b].size(2) > n, "attn_layer_decode: no room in the cache");
    k_cache[b].narrow(2, n, 1).copy_(kb.view({1, nkv, 1, d}));
    v_cache[b].narrow(2, n, 1).copy_(v.select(0, b).view({1, nkv, 1, d}));
    // one query per head: each KV head's query group folded into the query axis (ops/attention.py)
    rows.push_back(at::scaled_dot_product_attention(q.select(0, b).view({1, nkv, groups, d}),
                                                    k_cache[b].narrow(2, 0, n + 1), v_cache[b].narrow(2, 0, n + 1),
                                                    std::nullopt, 0.0, false, scale).reshape({1, nq * d}));
  }
  const at::Tensor o = (B > 1 ? at::cat(rows) : rows[0]) * at::sigmoid(g.view({B, nq * d}));
  return layer_tail(x, lin(o, op).view(x.sizes()), post_norm, post_eps, gate, up, down);
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("layer_tail(Tensor x, Tensor h, Tensor post_norm, float post_eps, Tensor[] gate, Tensor[] up, "
        "Tensor[] down) -> Tensor");
  m.def("gdn_layer_decode(Tensor x, Tensor in_norm, float in_eps, Tensor[] qkv, Tensor[] z, Tensor[] a, "
        "Tensor[] b, Tensor conv_w, Tensor A_log, Tensor dt_bias, Tensor norm_w, float norm_eps, Tensor[] out, "
        "Tensor(a!) conv_pool, Tensor(b!) rec_pool, Tensor slots, int hk, Tensor post_norm, float post_eps, "
        "Tensor[] gate, Tensor[] up, Tensor[] down) -> Tensor");
  m.def("attn_layer_decode(Tensor x, Tensor in_norm, float in_eps, Tensor[] q, Tensor[] k, Tensor[] v, "
        "Tensor q_norm, float q_eps, Tensor k_norm, float k_eps, Tensor cos, Tensor sin, Tensor(a!)[] k_cache, "
        "Tensor(b!)[] v_cache, int[] lengths, int nq, int nkv, float scale, Tensor[] o, Tensor post_norm, "
        "float post_eps, Tensor[] gate, Tensor[] up, Tensor[] down) -> Tensor");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("layer_tail", &layer_tail);
  m.impl("gdn_layer_decode", &gdn_layer_decode);
  m.impl("attn_layer_decode", &attn_layer_decode);
}
