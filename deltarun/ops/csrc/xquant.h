// Activation quantization for the integer CPU kernels, shared by decode (gemv.cpp) and prefill (qgemm.cpp):
// one definition, so a token's activations round to the same integers whichever kernel multiplies them (a
// prompt's logits then match token-by-token decoding). Vector loops with a scalar tail; the same
// arithmetic either way (IEEE division, round half to even, as torch.round). Included after gemv_kernels.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__AVX2__)
inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
inline float hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
// round(min(hi, max(−hi, x / s))) as int32: division and rounding as the scalar loops below
inline __m256i q8_round(const float* x, __m256 s, __m256 hi) {
  const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), hi), _mm256_div_ps(_mm256_loadu_ps(x), s)));
  return _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

inline float absmax(const float* x, int64_t n) {
  float amax = 0.f;
  int64_t k = 0;
#if defined(__AVX2__)
  __m256 m = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) m = _mm256_max_ps(m, abs8(_mm256_loadu_ps(x + k)));
  amax = hmax256(m);
#endif
  for (; k < n; ++k) amax = std::max(amax, std::abs(x[k]));
  return amax;
}

// n groups of g values of x (fp32, consecutive): xq = round(x / xs) in ±127, xs = max(max|x| / 127, 1e-30),
// xqs = Σxq, per group — int4's activations (int8 per group of the weight's group size).
inline void quantize_q8_groups(const float* x, int64_t n, int64_t g, int8_t* xq, float* xs, float* xqs) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xv = x + i * g;
    int8_t* q = xq + i * g;
    const float sc = std::max(absmax(xv, g) / 127.f, 1e-30f);
    int32_t sum = 0;
    int64_t k = 0;
#if defined(__AVX2__)
    const __m256 s = _mm256_set1_ps(sc), hi = _mm256_set1_ps(127.f);
    __m256i acc = _mm256_setzero_si256();
    for (; k + 32 <= g; k += 32) {
      const __m256i a = q8_round(xv + k, s, hi), b = q8_round(xv + k + 8, s, hi);
      const __m256i c = q8_round(xv + k + 16, s, hi), d = q8_round(xv + k + 24, s, hi);
      acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
      // packs interleave the 128-bit lanes: 4-byte units come out as a0 b0 c0 d0 a1 b1 c1 d1
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                          _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    int32_t part[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(part), acc);
    for (int j = 0; j < 8; ++j) sum += part[j];
#endif
    for (; k < g; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(std::min(127.f, std::max(-127.f, xv[k] / sc))));
      q[k] = static_cast<int8_t>(v);
      sum += v;
    }
    xs[i] = sc, xqs[i] = static_cast<float>(sum);
  }
}

// x [M, K] fp32 quantized as int4's activations (`quantize_q8_groups`, groups of g): q [M, K], and per (row, group)
// the scale s and Σq [M, K/g] — in parallel over rows, for the decode kernels and the prefill GEMMs alike.
struct Q8Groups {
  std::vector<int8_t> q;
  std::vector<float> s, sum;
  Q8Groups(const float* x, int64_t M, int64_t K, int64_t g) : q(M * K), s(M * K / g), sum(M * K / g) {
    const int64_t G = K / g;
    at::parallel_for(0, M, 16, [&](int64_t a, int64_t e) {
      quantize_q8_groups(x + a * K, (e - a) * G, g, q.data() + a * K, s.data() + a * G, sum.data() + a * G);
    });
  }
};

// One row of K values: xq = round(x / sx) with sx = max(max|x|, 1e-30) / qmax — int8 weights' 16-bit activations.
inline float quantize_q16_row(const float* x, int64_t K, int qmax, int16_t* xq) {
  const float sx = std::max(absmax(x, K), 1e-30f) / static_cast<float>(qmax);
  int64_t k = 0;
#if defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(sx), hi = _mm256_set1_ps(static_cast<float>(qmax));
  for (; k + 16 <= K; k += 16) {  // |x / sx| ≤ qmax already: the clamp changes nothing
    const __m256i p = _mm256_packs_epi32(q8_round(x + k, s, hi), q8_round(x + k + 8, s, hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k), _mm256_permute4x64_epi64(p, 0xD8));
  }
#endif
  for (; k < K; ++k) xq[k] = static_cast<int16_t>(std::nearbyint(x[k] / sx));
  return sx;
}

}  // namespace
