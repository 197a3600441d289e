// Decode-time matmuls on the CPU: y[M, N] = x[M, K] · W[N, K]ᵀ for few rows M (one token per running
// sequence), with W in bf16 or int8 (one scale per row). Memory-bound: every weight byte is read once
// per call, rows are split across torch's intra-op threads (at::parallel_for), and the M activation rows
// stay in L1 while a weight row streams past. bf16 uses AVX512-BF16 dot products where the compiler
// targets them; otherwise bf16/int8 values are widened to fp32 and multiplied in fp32 (vectorised by
// the compiler). Accumulation is fp32 in both. The plain torch reference is F.linear (ops/gemv.py
// compares them in its self-check, tests/test_gemv.py on many shapes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ROWS = 4;      // weight rows per inner step (x loads shared across them)
constexpr int64_t MAX_M = 16;    // activation rows per call (the Python side routes more to F.linear)

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------- bf16 weights
#if defined(__AVX512BF16__)
// One weight row against MC activation rows (K a multiple of 64): the row streams through once, two
// partial sums per activation row keep the dot products independent.
template <int MC>
inline void bf16_row(const uint16_t* x, int64_t K, const uint16_t* wr, float* out, int64_t N) {
  __m512 acc[MC][2];
  for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k), w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
    for (int m = 0; m < MC; ++m) {
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(x + m * K + k), w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)_mm512_loadu_si512(x + m * K + k + 32), w1);
    }
  }
  for (int m = 0; m < MC; ++m) out[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

inline void bf16_block(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t nr,
                       float* out, int64_t N) {
  for (int64_t n = n0; n < n0 + nr; ++n) {
    const uint16_t* wr = w + n * K;
    for (int64_t m = 0; m < M; m += 4) {
      const uint16_t* xm = x + m * K;
      float* o = out + m * N + n;
      switch (M - m < 4 ? M - m : 4) {
        case 1: bf16_row<1>(xm, K, wr, o, N); break;
        case 2: bf16_row<2>(xm, K, wr, o, N); break;
        case 3: bf16_row<3>(xm, K, wr, o, N); break;
        default: bf16_row<4>(xm, K, wr, o, N); break;
      }
    }
  }
}
#endif

// Generic: x already widened to fp32 (xf [M, K]).
inline void bf16_block_generic(const float* xf, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t nr,
                               float* out, int64_t N) {
  float wf[ROWS][256];
  for (int64_t m = 0; m < M; ++m) {
    float acc[ROWS][16] = {};
    for (int64_t k0 = 0; k0 < K; k0 += 256) {
      const int64_t kk = K - k0 < 256 ? K - k0 : 256;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t k = 0; k < kk; ++k) wf[r][k] = bf16_to_f32(w[(n0 + r) * K + k0 + k]);
      const float* xm = xf + m * K + k0;
      for (int64_t r = 0; r < nr; ++r) {
        int64_t k = 0;
        for (; k + 16 <= kk; k += 16)
          for (int64_t j = 0; j < 16; ++j) acc[r][j] += xm[k + j] * wf[r][k + j];
        for (; k < kk; ++k) acc[r][0] += xm[k] * wf[r][k];
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      float s = 0.f;
      for (int64_t j = 0; j < 16; ++j) s += acc[r][j];
      out[m * N + n0 + r] = s;
    }
  }
}

// ---------------------------------------------------------------- int8 weights (per-row scale)
#if defined(__AVX512F__)
// One int8 weight row against MC fp32 activation rows (K a multiple of 32), widened to fp32 on the fly.
template <int MC>
inline void int8_row(const float* x, int64_t K, const int8_t* wr, float* out, int64_t N) {
  __m512 acc[MC][2];
  for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k + 16))));
    for (int m = 0; m < MC; ++m) {
      acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16), w1, acc[m][1]);
    }
  }
  for (int m = 0; m < MC; ++m) out[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}
#endif

inline void int8_block(const float* xf, int64_t M, int64_t K, const int8_t* w, int64_t n0, int64_t nr,
                       float* out, int64_t N) {
#if defined(__AVX512F__)
  if (K % 32 == 0) {
    for (int64_t n = n0; n < n0 + nr; ++n) {
      const int8_t* wr = w + n * K;
      for (int64_t m = 0; m < M; m += 4) {
        const float* xm = xf + m * K;
        float* o = out + m * N + n;
        switch (M - m < 4 ? M - m : 4) {
          case 1: int8_row<1>(xm, K, wr, o, N); break;
          case 2: int8_row<2>(xm, K, wr, o, N); break;
          case 3: int8_row<3>(xm, K, wr, o, N); break;
          default: int8_row<4>(xm, K, wr, o, N); break;
        }
      }
    }
    return;
  }
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xf + m * K;
    for (int64_t r = 0; r < nr; ++r) {
      float acc[16] = {};
      const int8_t* wr = w + (n0 + r) * K;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int64_t j = 0; j < 16; ++j) acc[j] += xm[k + j] * static_cast<float>(wr[k + j]);
      float s = 0.f;
      for (; k < K; ++k) s += xm[k] * static_cast<float>(wr[k]);
      for (int64_t j = 0; j < 16; ++j) s += acc[j];
      out[m * N + n0 + r] = s;
    }
  }
}

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

// x [M, K] (any float dtype), w [N, K] int8, scales [N] → [M, N] fp32
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check(x, w);
  TORCH_CHECK(w.scalar_type() == at::kChar, "gemv_int8: int8 weights");
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

TORCH_LIBRARY(deltarun, m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
}
