// Prefill matmul with bf16 weights on CPUs without hardware bf16: y[M, N] = x[M, K] · W[N, K]ᵀ in fp32 (the same
// products and fp32 sums as a bf16 GEMM), for many rows M (a prompt's tokens). torch's bf16 GEMM is emulated on
// such CPUs (~18 GFLOP/s on a 2-core AVX2 EPYC); widening the whole weight for an fp32 GEMM costs a copy per
// call. Here the weight is widened while it is packed, a panel at a time, for a BLIS-style kernel:
//  - W is cut into blocks of NC rows × KC columns; each block is packed (bf16 → fp32, transposed in 8×8 tiles)
//    into [NC/NR][KC][NR] — 64 KB, L2 — once per call, by the thread that owns those output columns;
//  - the micro-kernel multiplies MR activation rows (broadcast straight from x, which stays in L1 for the
//    block) by NR packed columns: AVX2 6 × 16 (12 ymm accumulators, 2 loads + 6 broadcasts per 12 FMAs),
//    AVX-512 8 × 32 (16 zmm accumulators, 2 loads + 8 broadcasts per 16 FMAs);
//  - bf16 outputs are accumulated in a per-thread fp32 tile and rounded once (to nearest even, as torch's
//    .to(bfloat16)), so the caller never makes an fp32 [M, N] copy.
// Threads split the output columns (and the rows, when there are few column blocks). Reference: F.linear in
// fp32 and fp64 (tests/test_fgemm.py). Not here: bias (the caller adds it), CPUs without AVX2 (ops/gemv.py widens for
// oneDNN), CPUs with hardware bf16 (torch's own GEMM).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv_kernels.h"
#include "gemv_avx2.h"

#if defined(__AVX2__) && defined(__FMA__)
#define DELTARUN_FGEMM 1
#endif

namespace {

#ifdef DELTARUN_FGEMM
#if defined(__AVX512F__)
// zmm: 32 columns (two registers) × 8 rows = 16 accumulators. Intel's server cores run two 512-bit FMAs a cycle,
// twice what a ymm kernel can issue; Zen 4 splits each into 256-bit halves, and there it is level (or up to 5%
// ahead) with the ymm kernel. 12 rows (24 accumulators) and 64 columns × 6 rows measured slower on Zen 4.
constexpr int64_t NR = 32, MR = 8;
#else
constexpr int64_t NR = 16, MR = 6;
#endif
constexpr int64_t KC = 256, NC = 64;  // measured on [512, 1024]·[1024, 6144] and [512, 3584]·[3584, 1024]

// Rows n0 … n0 + nr (nr ≤ NR) of w [., K] bf16, columns k0 … k0 + kc → dst [kc][NR] fp32, rows past nr zero.
void pack_panel(const uint16_t* w, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* dst) {
  int64_t k = 0;
  if (nr == NR)
    for (; k + 8 <= kc; k += 8)
      for (int64_t h = 0; h < NR / 8; ++h) {  // 8×8 transposes
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = bf16x8(w + (n0 + 8 * h + i) * K + k0 + k);
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 s[8] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE),
                             _mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                             _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
        float* d = dst + k * NR + 8 * h;
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(d + i * NR, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
          _mm256_storeu_ps(d + (i + 4) * NR, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
        }
      }
  for (; k < kc; ++k)
    for (int64_t j = 0; j < NR; ++j) {
      const uint32_t u = j < nr ? uint32_t(w[(n0 + j) * K + k0 + k]) << 16 : 0;
      std::memcpy(dst + k * NR + j, &u, 4);
    }
}

#if defined(__AVX512F__)
template <int R>
inline void micro(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, bool acc) {
  constexpr int V = NR / 16;
  __m512 cv[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) cv[i][v] = acc ? _mm512_loadu_ps(c + i * ldc + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_ps(b + k * NR + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
      for (int v = 0; v < V; ++v) cv[i][v] = _mm512_fmadd_ps(ai, bv[v], cv[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, cv[i][v]);
}
#else
// c[R, NR] (+)= a[R, kc] (row stride lda) · b [kc][16]
template <int R>
inline void micro(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, bool acc) {
  __m256 c0[R], c1[R];
  for (int i = 0; i < R; ++i) {
    c0[i] = acc ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    c1[i] = acc ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * NR), b1 = _mm256_loadu_ps(b + k * NR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * lda + k);
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(c + i * ldc, c0[i]), _mm256_storeu_ps(c + i * ldc + 8, c1[i]);
}

#endif

// The micro-kernel for R ≤ MR rows and nr ≤ NR columns (a narrower tile goes through an NR-wide scratch).
template <int R>
void tile(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, bool acc, int64_t nr) {
  if (nr == NR) return micro<R>(kc, a, lda, b, c, ldc, acc);
  float t[R * NR];
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < NR; ++j) t[i * NR + j] = acc && j < nr ? c[i * ldc + j] : 0.f;
  micro<R>(kc, a, lda, b, t, NR, true);
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = t[i * NR + j];
}

template <int R = MR>
void rows_tile(int64_t rows, int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, bool acc,
               int64_t nr) {
  if constexpr (R > 1)
    if (rows < R) return rows_tile<R - 1>(rows, kc, a, lda, b, c, ldc, acc, nr);
  tile<R>(kc, a, lda, b, c, ldc, acc, nr);
}

// n fp32 → bf16, rounded to nearest even (NaN stays NaN), as torch's conversion.
void round_bf16(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), bf16x8_round(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]).x;
}
#endif

}  // namespace

// Whether gemm_bf16w is built here (AVX2 + FMA).
bool gemm_bf16w_available() {
#ifdef DELTARUN_FGEMM
  return true;
#else
  return false;
#endif
}

// x [M, K] (any float dtype; widened to fp32), w [N, K] bf16 contiguous → [M, N] fp32, or x's dtype with cast
// (bf16 rounded straight from the accumulators).
at::Tensor gemm_bf16w(const at::Tensor& x, const at::Tensor& w, bool cast) {
  TORCH_CHECK(gemm_bf16w_available(), "gemm_bf16w: built without AVX2/FMA");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "gemm_bf16w: CPU x [M, K], w [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "gemm_bf16w: contiguous bf16 weights");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gemm_bf16w: floating-point x");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool bf16_out = cast && x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
#ifdef DELTARUN_FGEMM
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* X = xf.data_ptr<float>();
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const int64_t nblocks = (N + NC - 1) / NC;
  // few column blocks (narrow weights): split the rows too, so every thread has work
  const int64_t want = 2 * at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min((want + nblocks - 1) / nblocks, (M + 47) / 48));
  const int64_t mstep = ((M + splits - 1) / splits + MR - 1) / MR * MR;
  const int64_t msplits = (M + mstep - 1) / mstep;
  at::parallel_for(0, nblocks * msplits, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panel(KC * NC), acc(bf16_out ? mstep * NC : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = (t / msplits) * NC, nc = std::min(NC, N - n0);
      const int64_t m0 = (t % msplits) * mstep, m1 = std::min(M, m0 + mstep);
      float* C = bf16_out ? acc.data() : out.data_ptr<float>() + m0 * N + n0;
      const int64_t ldc = bf16_out ? NC : N;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        for (int64_t j = 0; j < nc; j += NR) pack_panel(W, K, n0 + j, std::min(NR, nc - j), k0, kc, panel.data() + j * kc);
        for (int64_t m = m0; m < m1; m += MR)
          for (int64_t j = 0; j < nc; j += NR)
            rows_tile(std::min(MR, m1 - m), kc, X + m * K + k0, K, panel.data() + j * kc, C + (m - m0) * ldc + j, ldc,
                      k0 > 0, std::min(NR, nc - j));
      }
      if (bf16_out) {
        auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
        for (int64_t m = m0; m < m1; ++m) round_bf16(acc.data() + (m - m0) * NC, nc, O + m * N + n0);
      }
    }
  });
#endif
  return cast && !bf16_out && x.scalar_type() != at::kFloat ? out.to(x.scalar_type()) : out;
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("gemm_bf16w(Tensor x, Tensor w, bool cast=False) -> Tensor");
  m.def("gemm_bf16w_available() -> bool", &gemm_bf16w_available);
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) { m.impl("gemm_bf16w", &gemm_bf16w); }
