// Prefill matmuls with quantized weights on the CPU: y[M, N] = x[M, K] · W[N, K]ᵀ for many rows M (a prompt's
// tokens), with the decode kernels' integer arithmetic — activations quantized by the same code (xquant.h),
// exact integer products — laid out for throughput instead of streaming. Dequantizing to fp32 for torch's
// GEMM runs at the FMA rate (16 products a cycle per core on AVX2); vpmaddubsw/vpmaddwd multiply 32–64.
//  - int8 weights (one scale per row), 16-bit activations: the decode kernel's row loop itself, over a block of
//    32 weight rows (L1/L2) for 4 activation rows at a time (L1) — so a token's outputs are bit for bit decode's.
//  - int4 weights (the 32-row pairs layout of gemv_avx2.h, AVX2 builds), int8 activations per group: each
//    32-row block unpacked once per call into tiles of 8 rows × 4 columns (one byte each, as vpmaddubsw takes
//    them); 4 activation rows share each tile load; int16 sums widened every 32 columns (8 · 2 · 15 · 127 < 2¹⁵).
//  - int4 weights in the quads layout (gemv_kernels.h, AVX-512 with or without VNNI): the decode kernel's own
//    loop, 4 activation rows per pass over each 64-row block — a prompt's outputs are decode's bit for bit.
// References: the decode ops and dequantize + F.linear (tests/test_qgemm.py). Not here: fp32 activations
// (exact products: ops/quant.py dequantizes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv_kernels.h"
#include "gemv_avx2.h"
#include "xquant.h"

namespace {

constexpr int64_t NB8 = 32;
constexpr int64_t MB4 = 64;  // activation rows per pass over an int4 panel  // int8 weight rows per block: 32 KB at K = 1024, shared by all activation rows

at::Tensor widen(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }  // torch's conversion: parallel

at::Tensor narrow(const at::Tensor& out, const at::Tensor& x, bool cast) {
  return cast && x.scalar_type() != at::kFloat ? out.to(x.scalar_type()) : out;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// The 32-row block at pb (pairs layout: K/2 column pairs of 32 bytes) → panel [4 octets][K/4][32 bytes]: byte 4r + j
// of tile t of octet o is row 8o + r, column 4t + j, as 0…15. In the pairs layout 16-bit unit i of 128-bit lane L
// holds row 8L + i (low nibbles; + 16 in the high ones) for the pair's two columns, so interleaving two pairs'
// units gives rows (0-3 | 8-11) and (4-7 | 12-15) with four columns each.
inline void pack_int4_block(const uint8_t* pb, int64_t K, uint8_t* panel) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t T = K / 4;
  auto* out = reinterpret_cast<__m256i*>(panel);
  for (int64_t t = 0; t < T; ++t) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + t * 64));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + t * 64 + 32));
    const __m256i lo0 = _mm256_and_si256(v0, low4), lo1 = _mm256_and_si256(v1, low4);
    const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
    const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
    const __m256i a = _mm256_unpacklo_epi16(lo0, lo1), b = _mm256_unpackhi_epi16(lo0, lo1);
    const __m256i c = _mm256_unpacklo_epi16(hi0, hi1), d = _mm256_unpackhi_epi16(hi0, hi1);
    _mm256_storeu_si256(out + t, _mm256_permute2x128_si256(a, b, 0x20));          // rows 0-7
    _mm256_storeu_si256(out + T + t, _mm256_permute2x128_si256(a, b, 0x31));      // rows 8-15
    _mm256_storeu_si256(out + 2 * T + t, _mm256_permute2x128_si256(c, d, 0x20));  // rows 16-23
    _mm256_storeu_si256(out + 3 * T + t, _mm256_permute2x128_si256(c, d, 0x31));  // rows 24-31
  }
}

// MC activation rows (xq [MC, K] int8, stride K) · one octet of a panel (wt [K/4][32]) → out[m * N + 0…7].
// Per group: xa = xs, xb = xs·Σxq (per row), sv = [scale ×8, zero − 8·scale ×8] (per octet row):
// Σ((q − 8)·scale + zero)·xs·xq = xs·scale·Σq·xq + xs·Σxq·(zero − 8·scale).
template <int MC>
inline void int4_tile(const int8_t* xq, int64_t K, int64_t g, const float* xa, const float* xb, int64_t G,
                      const uint8_t* wt, const float* sv, float* out, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 tot[MC];
  for (int m = 0; m < MC; ++m) tot[m] = _mm256_setzero_ps();
  const int64_t H = g / 32;  // 32-column steps per group
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256i i32[MC];
    for (int m = 0; m < MC; ++m) i32[m] = _mm256_setzero_si256();
    for (int64_t h = 0; h < H; ++h) {
      const int64_t k0 = (gi * H + h) * 32;
      const auto* w = reinterpret_cast<const __m256i*>(wt + k0 * 8);
      const int8_t* x = xq + k0;
      __m256i a16[MC];
      for (int m = 0; m < MC; ++m) a16[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256i wj = _mm256_loadu_si256(w + j);
#pragma GCC unroll 4
        for (int m = 0; m < MC; ++m) {
          int32_t x4;
          std::memcpy(&x4, x + m * K + 4 * j, 4);
          // saturating add: never saturates here, but is not reassociated (GCC's reordering spills registers)
          a16[m] = _mm256_adds_epi16(a16[m], _mm256_maddubs_epi16(wj, _mm256_set1_epi32(x4)));
        }
      }
      for (int m = 0; m < MC; ++m) i32[m] = _mm256_add_epi32(i32[m], _mm256_madd_epi16(a16[m], ones));
    }
    const __m256 scale = _mm256_loadu_ps(sv + gi * 16), zoff = _mm256_loadu_ps(sv + gi * 16 + 8);
    for (int m = 0; m < MC; ++m) {
      const __m256 s = _mm256_mul_ps(scale, _mm256_set1_ps(xa[m * G + gi]));
      tot[m] = _mm256_fmadd_ps(zoff, _mm256_set1_ps(xb[m * G + gi]), _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[m]), s, tot[m]));
    }
  }
  for (int m = 0; m < MC; ++m) _mm256_storeu_ps(out + m * N, tot[m]);
}

// Block b's (scale, zero) bf16 pairs (sz [G, N] as uint32) → sv [4 octets][G][16] as int4_tile reads them.
inline void pack_int4_scales(const uint32_t* sz, int64_t G, int64_t N, int64_t b, float* sv) {
  for (int64_t o = 0; o < 4; ++o)
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t r = 0; r < 8; ++r) {
        const uint32_t pair = sz[gi * N + b * 32 + 8 * o + r];
        float scale, zero;
        const uint32_t s = pair << 16, z = pair & 0xFFFF0000u;
        std::memcpy(&scale, &s, 4), std::memcpy(&zero, &z, 4);
        float* d = sv + (o * G + gi) * 16;
        d[r] = scale, d[8 + r] = zero - 8.f * scale;
      }
}
#endif

}  // namespace

// Whether qgemm_int4 is built here (AVX2 without AVX-512: the 32-row pairs layout; AVX-512 BW: the 64-row
// quads layout).
bool qgemm_int4_available() {
#if (defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)) || defined(DELTARUN_INT4_QUADS)
  return true;
#else
  return false;
#endif
}

// x [M, K] bf16/fp16, packed [N/32, K, 16] uint8 (pairs layout) or [N/64, K, 32] (quads), sz [K/g, N, 2] bf16,
// g % 32 == 0 → [M, N] fp32 (or x's dtype with cast)
at::Tensor qgemm_int4(const at::Tensor& x, const at::Tensor& packed, int64_t g, const at::Tensor& sz, bool cast) {
  TORCH_CHECK(qgemm_int4_available(), "qgemm_int4: built for neither the pairs nor the quads layout");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && x.dim() == 2, "qgemm_int4: CPU x [M, K]");
  TORCH_CHECK(x.scalar_type() != at::kFloat, "qgemm_int4: fp32 activations take the exact path");
  const int64_t M = x.size(0), K = x.size(1), N = sz.size(1);
  TORCH_CHECK(g % 32 == 0 && K % g == 0, "qgemm_int4: groups of a multiple of 32 columns");
#if defined(DELTARUN_INT4_QUADS)
  constexpr int64_t B = 64;
#else
  constexpr int64_t B = 32;
#endif
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == N * K / 2 && N % B == 0,
              "qgemm_int4: packed [N/B, K, B/2] uint8");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) * g == K &&
              sz.size(2) == 2, "qgemm_int4: sz [K/g, N, 2] bf16");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
#if defined(DELTARUN_INT4_QUADS)
  {  // the decode kernel's loop as it is: each 64-row block (32 KB at K = 1024) stays in L1/L2 for every 4 rows of x
    const at::Tensor xf = widen(x);
    const int64_t G = K / g;
    const Q8Groups xa(xf.data_ptr<float>(), M, K, g);
    const uint8_t* P = packed.data_ptr<uint8_t>();
    const auto* SZ = reinterpret_cast<const uint32_t*>(sz.data_ptr());
    float* O = out.data_ptr<float>();
    at::parallel_for(0, N / 64, 1, [&](int64_t a, int64_t e) {
      for (int64_t b = a; b < e; ++b)
        by_rows<4>(M, [&](auto mc, int64_t m) {
          int4_quads_block<mc.value>(xa.q.data() + m * K, xa.s.data() + m * G, xa.sum.data() + m * G, K, g,
                                     P + b * K * 32, SZ, N, b, O + m * N + b * 64, N);
        });
    });
  }
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  const at::Tensor xf = widen(x);
  const int64_t G = K / g;
  Q8Groups q8(xf.data_ptr<float>(), M, K, g);
  const std::vector<int8_t>& xq = q8.q;
  const std::vector<float>& xa = q8.s;
  std::vector<float>& xb = q8.sum;
  for (int64_t i = 0; i < M * G; ++i) xb[i] *= xa[i];
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const auto* SZ = reinterpret_cast<const uint32_t*>(sz.data_ptr());
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N / 32, 1, [&](int64_t a, int64_t e) {
    std::vector<uint8_t> panel(32 * K);
    std::vector<float> sv(4 * G * 16);
    for (int64_t b = a; b < e; ++b) {
      pack_int4_block(P + b * K * 16, K, panel.data());
      pack_int4_scales(SZ, G, N, b, sv.data());
      for (int64_t m0 = 0; m0 < M; m0 += MB4)  // MB4 rows of activations stay in L2 while the 4 octets pass
        for (int64_t o = 0; o < 4; ++o)
          by_rows<4>(std::min(MB4, M - m0), [&](auto mc, int64_t r) {
            const int64_t m = m0 + r;
            int4_tile<mc.value>(xq.data() + m * K, K, g, xa.data() + m * G, xb.data() + m * G, G,
                                panel.data() + o * K * 8, sv.data() + o * G * 16, O + m * N + b * 32 + 8 * o, N);
          });
    }
  });
#endif
  return narrow(out, x, cast);
}

// x [M, K] bf16/fp16, w [N, K] int8, scales [N] fp32, K % 32 == 0 → [M, N] fp32 (or x's dtype with cast): every
// output is computed as gemv_int8 computes it (same quantized row, same row loop, same scaling).
at::Tensor qgemm_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, bool cast) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "qgemm_int8: CPU x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() != at::kFloat, "qgemm_int8: fp32 activations take the exact path");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "qgemm_int8: contiguous int8 weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 32 == 0, "qgemm_int8: K a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "qgemm_int8: fp32 scales [N]");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
  const at::Tensor xf = widen(x);
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M);
  const float* X = xf.data_ptr<float>();
#if defined(__AVX512BW__) && !defined(__AVX512VNNI__)
  const bool split = K % 64 == 0;  // the decode kernel's row loop, so its activations' layout (gemv.cpp)
#endif
  at::parallel_for(0, M, 16, [&](int64_t a, int64_t e) {
    for (int64_t m = a; m < e; ++m) {
      sx[m] = quantize_q16_row(X + m * K, K, XQ_MAX, xq.data() + m * K);
#if defined(__AVX512BW__) && !defined(__AVX512VNNI__)
      if (split) split_q16(xq.data() + m * K, K);
#endif
    }
  });
  const int8_t* W = w.data_ptr<int8_t>();
  const float* S = scales.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, (N + NB8 - 1) / NB8, 1, [&](int64_t a, int64_t e) {
    for (int64_t n0 = a * NB8; n0 < std::min(N, e * NB8); n0 += NB8) {
      const int64_t n1 = std::min(N, n0 + NB8);
      by_rows<4>(M, [&](auto mc, int64_t m) {
        for (int64_t n = n0; n < n1; ++n)
#if defined(__AVX512BW__) && !defined(__AVX512VNNI__)
          if (split) int8_row_split<mc.value>(xq.data() + m * K, K, W + n * K, O + m * N + n, N); else
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
          int8_row_vnni<mc.value>(xq.data() + m * K, K, W + n * K, O + m * N + n, N);
#else
          int8_row_madd<mc.value, false>(xq.data() + m * K, K, W + n * K, O + m * N + n, N);
#endif
      });
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) O[m * N + n] = O[m * N + n] * sx[m] * S[n];
    }
  });
#else
  TORCH_CHECK(false, "qgemm_int8: built without AVX2");
#endif
  return narrow(out, x, cast);
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("qgemm_int4(Tensor x, Tensor packed, int group, Tensor sz, bool cast=False) -> Tensor");
  m.def("qgemm_int8(Tensor x, Tensor w, Tensor scales, bool cast=False) -> Tensor");
  m.def("qgemm_int4_available() -> bool", &qgemm_int4_available);
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("qgemm_int4", &qgemm_int4);
  m.impl("qgemm_int8", &qgemm_int8);
}
