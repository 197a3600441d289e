// Decode-time matmuls on the CPU: y[M, N] = x[M, K] · W[N, K]ᵀ for few rows M (one token per running
// sequence), W in bf16, int8 (one scale per row) or int4 (torch's CPU int4 layout, group-wise). Memory-
// bound: every weight byte is read once per call, rows are split across torch's intra-op threads
// (at::parallel_for), activation rows stay in L1 while a weight row streams past. Accumulation is fp32.
// Here: argument checks, dispatch by instruction set, registration as torch.ops.deltarun.*; the inner
// loops are in gemv_kernels.h (AVX-512) and gemv_avx2.h (AVX2, plain C++). References: F.linear and torch's int8/int4 ops (ops/gemv.py's self-check,
// tests/test_gemv.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemv_kernels.h"
#include "gemv_avx2.h"
#include "ops.h"
#include "xquant.h"

namespace {

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.size(0) <= MAX_M, "gemv: at most 16 rows");
  TORCH_CHECK(w.is_contiguous(), "gemv: w must be contiguous");
}

// fp32 results, or (cast) in the activations' dtype: what a Linear returns, without a second op from Python.
// bf16 by a plain loop (round to nearest even, as Tensor.to): a torch op here costs ~10 µs per call.
at::Tensor finish(const at::Tensor& out, const at::Tensor& x, bool cast) {
  if (!cast || x.scalar_type() == at::kFloat) return out;
  if (x.scalar_type() != at::kBFloat16) return out.to(x.scalar_type());
  at::Tensor y = at::empty(out.sizes(), out.options().dtype(at::kBFloat16));
  const float* o = out.data_ptr<float>();
  at::BFloat16* d = y.data_ptr<at::BFloat16>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) d[i] = at::BFloat16(o[i]);
  return y;
}

// x [M, K] as contiguous fp32: bf16 widened by a plain loop (exact), fp32 as is, other dtypes by torch
at::Tensor as_f32(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  if (x.scalar_type() != at::kBFloat16) return x.to(at::kFloat).contiguous();
  const at::Tensor xc = x.contiguous();
  at::Tensor f = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  const at::BFloat16* s = xc.data_ptr<at::BFloat16>();
  float* d = f.data_ptr<float>();
  for (int64_t i = 0, n = xc.numel(); i < n; ++i) d[i] = static_cast<float>(s[i]);
  return f;
}

constexpr int64_t GRAIN = 256;  // rows per parallel task: ≥ 0.5 MB of bf16 weights at K = 1024

}  // namespace

// x [M, K] bf16, w [N, K] bf16 → [M, N] fp32
at::Tensor gemv_bf16(const at::Tensor& x_in, const at::Tensor& w, bool cast) {
  check(x_in, w);
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 tensors");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* O = out.data_ptr<float>();
#if defined(__AVX512BF16__)
  if (K % 32 == 0) {
    at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; n += BF16_ROWS) bf16_block(X, M, K, W, n, std::min(BF16_ROWS, b - n), O, N);
    });
    return finish(out, x, cast);
  }
#endif
#if defined(__AVX512F__) && !defined(__AVX512BF16__)
  if (K % 64 == 0) {
    std::vector<float> xe(M * K / 2), xo(M * K / 2);  // even and odd columns, widened
    for (int64_t i = 0; i < M * K / 2; ++i) xe[i] = bf16_to_f32(X[2 * i]), xo[i] = bf16_to_f32(X[2 * i + 1]);
    at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n)
        by_rows<4>(M, [&](auto mc, int64_t m) {
          bf16_row_split<mc.value>(xe.data() + m * K / 2, xo.data() + m * K / 2, K, W + n * K, O + m * N + n, N);
        });
    });
    return finish(out, x, cast);
  }
#endif
  const at::Tensor xf = as_f32(x);
  const float* XF = xf.data_ptr<float>();
#if defined(__AVX2__) && defined(__FMA__)
  if (K % 16 == 0) {
    at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n)
        by_rows<2>(M, [&](auto mc, int64_t m) {
          row_fma_avx2<mc.value, WidenBf16>(XF + m * K, K, W + n * K, O + m * N + n, N);
        });
    });
    return finish(out, x, cast);
  }
#endif
  at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; n += ROWS) bf16_block_generic(XF, M, K, W, n, std::min(ROWS, b - n), O, N);
  });
  return finish(out, x, cast);
}

// x [M, K] (any float dtype), w [N, K] fp32 → [M, N] fp32: the small fp32 projections of a decode step (DeltaNet's
// in_proj_a / in_proj_b, Hv rows), where F.linear's dispatch costs ~30–60 µs for microseconds of work. Eight
// partial sums per output, added in a fixed order (a row's result does not depend on M).
at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w) {
  check(x, w);
  TORCH_CHECK(w.scalar_type() == at::kFloat, "gemv_f32: fp32 weights");
  const at::Tensor xf = as_f32(x);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, xf.options());
  const float *X = xf.data_ptr<float>(), *W = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const float *xr = X + m * K, *wr = W + n * K;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += xr[k + j] * wr[k + j];
      float t = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; k < K; ++k) t += xr[k] * wr[k];
      O[m * N + n] = t;
    }
  return out;
}

// x [M, K] (any float dtype), w [N, K] int8, scales [N] → [M, N] fp32. bf16/fp16 activations go through
// VNNI (or AVX2's vpmaddwd) as 13-bit integers; fp32 activations are widened and multiplied exactly in fp32.
// Activation quantization and the scaling are plain loops here: as torch ops they cost ~30 µs a call, as much
// as a small layer's whole matmul.
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, bool cast) {
  check(x, w);
  TORCH_CHECK(w.scalar_type() == at::kChar, "gemv_int8: int8 weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(scales.numel() == N, "gemv_int8: scales [N]");
  const int8_t* W = w.data_ptr<int8_t>();
  const at::Tensor xf = as_f32(x);
  const at::Tensor sf = scales.to(at::kFloat).contiguous();  // pass fp32 scales: no conversion per call
  const float* S = sf.data_ptr<float>();
  at::Tensor out = at::empty({M, N}, xf.options());
  float* O = out.data_ptr<float>();
  const float* XF = xf.data_ptr<float>();
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
  if (K % 32 == 0 && x.scalar_type() != at::kFloat) {  // fp32 activations take the exact path below
    std::vector<int16_t> xq(M * K);
    std::vector<float> sx(M);
    for (int64_t m = 0; m < M; ++m) sx[m] = quantize_q16_row(XF + m * K, K, XQ_MAX, xq.data() + m * K);  // x ≈ sx·xq
#if defined(__AVX512VNNI__)
    const bool split = K % 64 == 0 && M == 1;  // gemv_kernels.h int8_row_split: same results as int8_row_vnni
#elif defined(__AVX512BW__)
    const bool split = K % 64 == 0;
#endif
#if defined(__AVX512BW__)
    if (split)
      for (int64_t m = 0; m < M; ++m) split_q16(xq.data() + m * K, K);
#endif
    const int16_t* XQ = xq.data();
    at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        by_rows<4>(M, [&](auto mc, int64_t m) {
#if defined(__AVX512BW__)
          if (split) return int8_row_split<mc.value>(XQ + m * K, K, W + n * K, O + m * N + n, N);
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
          int8_row_vnni<mc.value>(XQ + m * K, K, W + n * K, O + m * N + n, N);
#else
          int8_row_madd<mc.value>(XQ + m * K, K, W + n * K, O + m * N + n, N);
#endif
        });
        for (int64_t m = 0; m < M; ++m) O[m * N + n] = O[m * N + n] * sx[m] * S[n];
      }
    });
    return finish(out, x, cast);
  }
#endif
  at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    if (K % 16 == 0) {
      for (int64_t n = a; n < b; ++n) {
        by_rows<2>(M, [&](auto mc, int64_t m) {
          row_fma_avx2<mc.value, WidenInt8>(XF + m * K, K, W + n * K, O + m * N + n, N);
        });
        for (int64_t m = 0; m < M; ++m) O[m * N + n] *= S[n];
      }
      return;
    }
#endif
    for (int64_t n = a; n < b; n += ROWS) {
      int8_block(XF, M, K, W, n, std::min(ROWS, b - n), O, N);
      for (int64_t r = n; r < std::min(n + ROWS, b); ++r)
        for (int64_t m = 0; m < M; ++m) O[m * N + r] *= S[r];
    }
  });
  return finish(out, x, cast);
}

// Every Kernel::BLOCK-row block of an int4 weight, in torch's threads, against x's rows Kernel::MC_MAX at a time.
template <class Kernel, typename T>
void int4_all(const T* X, const float* XS, int64_t M, int64_t K, int64_t g, const uint8_t* P, const uint32_t* SZ,
              int64_t N, float* O) {
  const int64_t G = K / g, B = Kernel::BLOCK;
  at::parallel_for(0, N / B, 256 / B, [&](int64_t a, int64_t e) {
    for (int64_t b = a; b < e; ++b)
      by_rows<Kernel::MC_MAX>(M, [&](auto mc, int64_t m) {
        Kernel::template run<mc.value>(X + m * K, XS + m * G, K, g, P + b * K * B / 2, SZ, N, b, O + m * N);
      });
  });
}

// The byte order within this build's int4 row blocks: 0 torch's own, 1 the AVX2 column pairs (gemv_avx2.h),
// 2 the AVX-512 quads (gemv_kernels.h, with or without VNNI and BF16); ops/int4_layout.py applies the same permutations.
int64_t int4_order() {
#if defined(DELTARUN_INT4_QUADS)
  return 2;
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// Which of torch's int4 layouts this build reads (the row-block size of `_convert_weight_to_int4pack_for_cpu`,
// which follows torch's own CPU capability: 64 for AVX-512, 32 for AVX2), 0 for none.
int64_t int4_layout_rows() {
#if defined(__AVX512F__)
  return 64;
#elif defined(__AVX2__) && defined(__FMA__)
  return 32;
#else
  return 0;
#endif
}

// x [M, K] (any float dtype), packed [N/B, K, B/2] uint8 (B = int4_layout_rows(); for B = 32 each column pair's
// bytes in the order of gemv_avx2.h), sz [K/g, N, 2] bf16 → [M, N] fp32
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& packed, int64_t g, const at::Tensor& sz, bool cast) {
  const int64_t B = int4_layout_rows();
  TORCH_CHECK(B > 0, "gemv_int4: built without AVX2/AVX-512");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "gemv_int4: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= MAX_M, "gemv_int4: x [M ≤ 16, K]");
  const int64_t M = x.size(0), K = x.size(1), N = sz.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * K / 2 && N % B == 0,
              "gemv_int4: packed [N/B, K, B/2] uint8");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) * g == K &&
              sz.size(2) == 2, "gemv_int4: sz [K/g, N, 2] bf16");
  TORCH_CHECK(B != 32 || g % 2 == 0, "gemv_int4: the 32-row layout is read by column pairs (even groups)");
  const at::Tensor xf = as_f32(x);
  const int64_t G = K / g;
  at::Tensor out = at::empty({M, N}, xf.options());
  const float* X = xf.data_ptr<float>();
  auto group_sums = [&] {  // Σx per (row, group) [M, K/g]: what the fp32-activation kernels fold the zeros with
    std::vector<float> xsum(M * G);
    for (int64_t i = 0; i < M * G; ++i)
      for (int64_t k = 0; k < g; ++k) xsum[i] += X[i * g + k];
    return xsum;
  };
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const auto* SZ = reinterpret_cast<const uint32_t*>(sz.data_ptr());
  float* O = out.data_ptr<float>();
#if defined(DELTARUN_INT4_QUADS)
  TORCH_CHECK(K % 4 == 0, "gemv_int4: the quads layout needs K a multiple of 4");
  if (x.scalar_type() != at::kFloat && g % 4 == 0) {  // bf16/fp16 activations: int8 per group, as AVX2's path
    const Q8Groups xa(X, M, K, g);
    at::parallel_for(0, N / 64, 4, [&](int64_t a, int64_t e) {
      for (int64_t b = a; b < e; ++b)
        by_rows<4>(M, [&](auto mc, int64_t m) {
          int4_quads_block<mc.value>(xa.q.data() + m * K, xa.s.data() + m * G, xa.sum.data() + m * G, K, g,
                                     P + b * K * 32, SZ, N, b, O + m * N + b * 64, N);
        });
    });
    return finish(out, x, cast);
  }
  // fp32 activations (exact products, as the other builds' fp32 paths; only the self-check comes here): rows
  // dequantized by dequant.cpp a block of them at a time, then torch's fp32 product
  for (int64_t n0 = 0; n0 < N; n0 += 4096) {
    const int64_t n1 = std::min(N, n0 + 4096);
    out.narrow(1, n0, n1 - n0).copy_(at::mm(xf, dequant_int4_rows(packed, sz, g, 64, n0, n1, 2).t()));
  }
#elif defined(__AVX512F__)
  int4_all<Int4F32>(X, group_sums().data(), M, K, g, P, SZ, N, O);
#elif defined(__AVX2__) && defined(__FMA__)
  if (x.scalar_type() != at::kFloat && g % 16 == 0) {  // bf16/fp16 activations: integer products, as int8's path
    // x̃ = xs·xq with xq int8 per group of g columns (xs = max|x|/127): the product is exact for x̃. Plain
    // loops: a handful of torch ops here would cost as much as a small layer's whole matmul.
    const Q8Groups xa(X, M, K, g);
    const auto* XP = reinterpret_cast<const int16_t*>(xa.q.data());
    at::parallel_for(0, N / 32, 8, [&](int64_t a, int64_t e) {
      for (int64_t b = a; b < e; ++b)
        by_rows<Int4Avx2Q8::MC_MAX>(M, [&](auto mc, int64_t m) {
          Int4Avx2Q8::run<mc.value>(XP + m * K / 2, xa.s.data() + m * G, xa.sum.data() + m * G, K, g, P + b * K * 16,
                                    SZ, N, b, O + m * N);
        });
    });
    return finish(out, x, cast);
  }
  int4_all<Int4Avx2>(X, group_sums().data(), M, K, g, P, SZ, N, O);
#endif
  return finish(out, x, cast);
}

// Whether gemv_bf16 runs the AVX512-BF16 tile kernel (compute-bound to 16 rows) rather than a widening loop.
bool gemv_bf16_tiled() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(deltarun, m) {
  m.def("gemv_bf16(Tensor x, Tensor w, bool cast=False) -> Tensor");
  m.def("gemv_f32(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales, bool cast=False) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, int group, Tensor sz, bool cast=False) -> Tensor");
  m.def("int4_layout_rows() -> int", &int4_layout_rows);
  m.def("int4_order() -> int", &int4_order);  // no tensors: not dispatched by device
  m.def("gemv_bf16_tiled() -> bool", &gemv_bf16_tiled);
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
}
