// A decoder layer's decode step (one token per sequence, a few sequences) as one op: the same kernels,
// in the same order, that the Python modules call one by one (model/qwen3_5.py `DecoderLayer`), so the
// result is bit for bit theirs; what goes away is ~0.3 ms of Python and dispatch per layer, about as
// long as a 0.8B layer's int4 matmuls take. Python builds the argument lists once per layer
// (ops/layer.py); prefill, speculative verifies and anything without a kernel stay on the modules.
// A linear layer arrives as the tensors its kernel reads: [w bf16] or [w fp32] (gemv_bf16 / gemv_f32),
// [q int8, scales fp32] (gemv_int8), [packed uint8, sz bf16] (gemv_int4, group = K / sz.size(0)).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace {

// x [M, K] → [M, N]: in x's dtype (cast), fp32 from fp32 weights
at::Tensor lin(const at::Tensor& x, at::TensorList w) {
  TORCH_CHECK(!w.empty() && w.size() <= 2, "layer: a linear is 1 or 2 tensors");
  const at::Tensor& a = w[0];
  if (w.size() == 1) return a.scalar_type() == at::kFloat ? gemv_f32(x, a) : gemv_bf16(x, a, true);
  if (a.scalar_type() == at::kChar) return gemv_int8(x, a, w[1], true);
  TORCH_CHECK(a.scalar_type() == at::kByte && w[1].dim() == 3, "layer: int4 is [packed uint8, sz [K/g, N, 2]]");
  return gemv_int4(x, a, x.size(1) / w[1].size(0), w[1], true);
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

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("layer_tail(Tensor x, Tensor h, Tensor post_norm, float post_eps, Tensor[] gate, Tensor[] up, "
        "Tensor[] down) -> Tensor");
  m.def("gdn_layer_decode(Tensor x, Tensor in_norm, float in_eps, Tensor[] qkv, Tensor[] z, Tensor[] a, "
        "Tensor[] b, Tensor conv_w, Tensor A_log, Tensor dt_bias, Tensor norm_w, float norm_eps, Tensor[] out, "
        "Tensor(a!) conv_pool, Tensor(b!) rec_pool, Tensor slots, int hk, Tensor post_norm, float post_eps, "
        "Tensor[] gate, Tensor[] up, Tensor[] down) -> Tensor");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("layer_tail", &layer_tail);
  m.impl("gdn_layer_decode", &gdn_layer_decode);
}
