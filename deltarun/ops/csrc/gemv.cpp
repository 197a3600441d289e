// Decode-time matmuls on the CPU: y[M, N] = x[M, K] · W[N, K]ᵀ for few rows M (one token per running
// sequence), W in bf16, int8 (one scale per row) or int4 (torch's CPU int4 layout, group-wise). Memory-
// bound: every weight byte is read once per call, rows are split across torch's intra-op threads
// (at::parallel_for), activation rows stay in L1 while a weight row streams past. Accumulation is fp32.
// Here: argument checks, dispatch by instruction set, registration as torch.ops.deltarun.*; the inner
// loops are in gemv_kernels.h. References: F.linear and torch's int8/int4 ops (ops/gemv.py's self-check,
// tests/test_gemv.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "gemv_kernels.h"

namespace {

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.size(0) <= MAX_M, "gemv: at most 16 rows");
  TORCH_CHECK(w.is_contiguous(), "gemv: w must be contiguous");
}

constexpr int64_t GRAIN = 256;  // rows per parallel task: ≥ 0.5 MB of bf16 weights at K = 1024

}  // namespace

// x [M, K] bf16, w [N, K] bf16 → [M, N] fp32
at::Tensor gemv_bf16(const at::Tensor& x_in, const at::Tensor& w) {
  check(x_in, w);
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 tensors");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* O = out.data_ptr<float>();
#if defined(__AVX512BF16__)
  if (K % 64 == 0) {
    at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; n += ROWS) bf16_block(X, M, K, W, n, std::min(ROWS, b - n), O, N);
    });
    return out;
  }
#endif
  const at::Tensor xf = x.to(at::kFloat);
  const float* XF = xf.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n += ROWS) bf16_block_generic(XF, M, K, W, n, std::min(ROWS, b - n), O, N);
  });
  return out;
}

// x [M, K] (any float dtype), w [N, K] int8, scales [N] → [M, N] fp32. bf16/fp16 activations go through
// VNNI as 13-bit integers; fp32 activations are widened and multiplied exactly in fp32.
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check(x, w);
  TORCH_CHECK(w.scalar_type() == at::kChar, "gemv_int8: int8 weights");
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (x.size(1) % 32 == 0 && x.scalar_type() != at::kFloat) {  // fp32 activations take the exact path below
    const at::Tensor xf = x.to(at::kFloat);
    const at::Tensor sx = xf.abs().amax(1, true).clamp_min(1e-30) / XQ_MAX;  // [M, 1]
    const at::Tensor xq = (xf / sx).round_().to(at::kShort).contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor out = at::empty({M, N}, xf.options());
    const int16_t* XQ = xq.data_ptr<int16_t>();
    const int8_t* W = w.data_ptr<int8_t>();
    float* O = out.data_ptr<float>();
    at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        for (int64_t m = 0; m < M; m += 4) {
          const int16_t* xm = XQ + m * K;
          float* o = O + m * N + n;
          switch (M - m < 4 ? M - m : 4) {
            case 1: int8_row_vnni<1>(xm, K, W + n * K, o, N); break;
            case 2: int8_row_vnni<2>(xm, K, W + n * K, o, N); break;
            case 3: int8_row_vnni<3>(xm, K, W + n * K, o, N); break;
            default: int8_row_vnni<4>(xm, K, W + n * K, o, N); break;
          }
        }
      }
    });
    return out.mul_(sx).mul_(scales.to(at::kFloat).view({1, N}));
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, xf.options());
  const float* XF = xf.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n += ROWS) int8_block(XF, M, K, W, n, std::min(ROWS, b - n), O, N);
  });
  return out.mul_(scales.to(at::kFloat).view({1, N}));
}


#if defined(__AVX512F__)
// Every 64-row block of an int4 weight, in torch's threads, against x's rows four at a time.
template <class Kernel, typename T>
void int4_all(const T* X, const float* XS, int64_t M, int64_t K, int64_t g, const uint8_t* P, const uint32_t* SZ,
              int64_t N, float* O) {
  const int64_t G = K / g;
  at::parallel_for(0, N / 64, 4, [&](int64_t a, int64_t e) {
    for (int64_t b = a; b < e; ++b) {
      const uint8_t* pb = P + b * K * 32;
      for (int64_t m = 0; m < M; m += 4) {
        const T* x = X + m * K;
        const float* xs = XS + m * G;
        float* o = O + m * N;
        switch (M - m < 4 ? M - m : 4) {
          case 1: Kernel::template run<1>(x, xs, K, g, pb, SZ, N, b, o); break;
          case 2: Kernel::template run<2>(x, xs, K, g, pb, SZ, N, b, o); break;
          case 3: Kernel::template run<3>(x, xs, K, g, pb, SZ, N, b, o); break;
          default: Kernel::template run<4>(x, xs, K, g, pb, SZ, N, b, o); break;
        }
      }
    }
  });
}
#endif

// x [M, K] (any float dtype), packed [N/64, K, 32] uint8, sz [K/g, N, 2] bf16 → [M, N] fp32
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& packed, int64_t g, const at::Tensor& sz) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "gemv_int4: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= MAX_M, "gemv_int4: x [M ≤ 16, K]");
  const int64_t M = x.size(0), K = x.size(1), N = sz.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * K / 2 && N % 64 == 0,
              "gemv_int4: packed [N/64, K, 32] uint8");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) * g == K &&
              sz.size(2) == 2, "gemv_int4: sz [K/g, N, 2] bf16");
#if defined(__AVX512F__)
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t G = K / g;
  const at::Tensor xsum = xf.view({M, G, g}).sum(-1).contiguous();  // [M, K/g]
  at::Tensor out = at::empty({M, N}, xf.options());
  const float* X = xf.data_ptr<float>();
  const float* XS = xsum.data_ptr<float>();
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const auto* SZ = reinterpret_cast<const uint32_t*>(sz.data_ptr());
  float* O = out.data_ptr<float>();
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  if (x.scalar_type() == at::kBFloat16 && g % 2 == 0) {
    const at::Tensor xb = x.contiguous();
    int4_all<Int4Bf16>(reinterpret_cast<const uint16_t*>(xb.data_ptr()), XS, M, K, g, P, SZ, N, O);
    return out;
  }
#endif
  int4_all<Int4F32>(X, XS, M, K, g, P, SZ, N, O);
  return out;
#else
  TORCH_CHECK(false, "gemv_int4: built without AVX-512");
#endif
}

TORCH_LIBRARY(deltarun, m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, int group, Tensor sz) -> Tensor");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
}
