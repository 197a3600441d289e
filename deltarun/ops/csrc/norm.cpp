// The decoder's zero-centred RMSNorm for decode-sized inputs on the CPU, alone and fused with the residual
// add before it: y = x·rsqrt(mean(x²) + eps)·(1 + w) in fp32, rounded once to x's dtype; with h, the sum
// s = x + h is rounded to x's dtype first (as a bf16 `x + h` is) and both s and norm(s) are returned.
// A few microseconds per row here against the half-dozen torch ops (casts, add, norm) it replaces.
// Reference: model/layers.py `RMSNorm` (F.rms_norm in fp32), tests/test_gemv.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {

template <typename T, typename W>
void norm_rows(const T* x, const T* h, T* s, const W* w, float eps, int64_t rows, int64_t H, T* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * H;
    T* sr = s + r * H;
    float ss = 0.f;
    for (int64_t j = 0; j < H; ++j) {
      const float v = h ? static_cast<float>(static_cast<T>(static_cast<float>(xr[j]) + static_cast<float>(h[r * H + j])))
                        : static_cast<float>(xr[j]);
      if (h) sr[j] = static_cast<T>(v);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    const T* src = h ? sr : xr;
    for (int64_t j = 0; j < H; ++j)
      y[r * H + j] = static_cast<T>(static_cast<float>(src[j]) * inv * (1.f + static_cast<float>(w[j])));
  }
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& x_in, const at::Tensor* h_in, const at::Tensor& w, double eps) {
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(x_in.device().is_cpu() && (dt == at::kFloat || dt == at::kBFloat16), "rms_norm_zc: CPU fp32/bf16");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x_in.size(-1) && w.is_contiguous() &&
              (w.scalar_type() == dt || w.scalar_type() == at::kFloat), "rms_norm_zc: weight [H] in x's dtype or fp32");
  const at::Tensor x = x_in.contiguous();
  at::Tensor h, s;
  if (h_in) {
    TORCH_CHECK(h_in->sizes() == x_in.sizes() && h_in->scalar_type() == dt, "add_rms_norm_zc: h like x");
    h = h_in->contiguous();
    s = at::empty_like(x);
  }
  at::Tensor y = at::empty_like(x);
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  auto go = [&](auto tag, auto wtag) {
    using T = decltype(tag);
    using W = decltype(wtag);
    norm_rows<T, W>(x.data_ptr<T>(), h_in ? h.data_ptr<T>() : nullptr, h_in ? s.data_ptr<T>() : nullptr,
                    w.data_ptr<W>(), static_cast<float>(eps), rows, H, y.data_ptr<T>());
  };
  if (dt == at::kFloat) go(float{}, float{});
  else if (w.scalar_type() == at::kFloat) go(at::BFloat16{}, float{});
  else go(at::BFloat16{}, at::BFloat16{});
  return {s, y};
}

}  // namespace

at::Tensor rms_norm_zc(const at::Tensor& x, const at::Tensor& w, double eps) { return std::get<1>(run(x, nullptr, w, eps)); }

std::tuple<at::Tensor, at::Tensor> add_rms_norm_zc(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w,
                                                   double eps) {
  return run(x, &h, w, eps);
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("rms_norm_zc(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm_zc(Tensor x, Tensor h, Tensor w, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("rms_norm_zc", &rms_norm_zc);
  m.impl("add_rms_norm_zc", &add_rms_norm_zc);
}
