// Inner loops of the CPU decode kernels (gemv.cpp holds the ops that call them): one weight row or
// one 64-row int4 block against up to 4 activation rows, per instruction set. Included once.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ROWS = 4;      // weight rows per inner step (x loads shared across them)
constexpr int64_t MAX_M = 16;    // activation rows per call (the Python side routes more to F.linear)
constexpr int64_t BF16_ROWS = 8;  // weight rows per bf16 tile

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------- bf16 weights
#if defined(__AVX512BF16__)
// [Σa, Σb, Σc, Σd] of four 16-lane vectors, by one fixed tree (a lane's sum does not depend on its neighbours).
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(half(a), half(b)), _mm_hadd_ps(half(c), half(d)));
}

// NR weight rows against MR activation rows (K a multiple of 32): MR·NR independent dot products, each
// weight and activation load shared by a row of the tile, so up to 16 rows stay compute-bound rather than
// load-bound. Every (m, n) sum runs in the same order whatever the tile, so a result does not depend on M.
template <int MR, int NR>
inline void bf16_tile(const uint16_t* x, int64_t K, const uint16_t* w, float* out, int64_t N, const char* pf,
                      int pf_lines) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    for (int i = 0; i < pf_lines; ++i) _mm_prefetch(pf + (k / 32 * pf_lines + i) * 64, _MM_HINT_T0);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  const __m512 z = _mm512_setzero_ps();
  auto at = [&](int m, int r) { return r < NR ? acc[m][r < NR ? r : 0] : z; };
  for (int m = 0; m < MR; ++m) {
    _mm_mask_storeu_ps(out + m * N, static_cast<__mmask8>((1 << (NR < 4 ? NR : 4)) - 1),
                       sum4(at(m, 0), at(m, 1), at(m, 2), at(m, 3)));
    if (NR > 4)
      _mm_mask_storeu_ps(out + m * N + 4, static_cast<__mmask8>((1 << (NR > 4 ? NR - 4 : 0)) - 1),
                         sum4(at(m, 4), at(m, 5), at(m, 6), at(m, 7)));
  }
}

constexpr int64_t PF_ROWS = 16;   // prefetch distance: two tiles on
constexpr int64_t ROW_BY_ROW = 4;  // up to this many rows, weight rows may go one by one
constexpr int64_t ROW_BY_ROW_BYTES = 16384;  // … when the activation rows take at most this much
constexpr int64_t BF16_MR = 2;     // activation rows per tile pass (8 × 2 accumulators)

template <int NR>
inline void bf16_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* wr, float* out, int64_t N) {
  // Bandwidth-bound: one weight row after another is one sequential stream, while the activation rows stay
  // in L1 beside it (at 3-4 rows of K = 3,584 they do not, and the tile is faster).
  if (M <= 2 || (M <= ROW_BY_ROW && M * K * 2 <= ROW_BY_ROW_BYTES)) {
    for (int r = 0; r < NR; ++r) {
      switch (M) {
        case 1: bf16_tile<1, 1>(x, K, wr + r * K, out + r, N, nullptr, 0); break;
        case 2: bf16_tile<2, 1>(x, K, wr + r * K, out + r, N, nullptr, 0); break;
        case 3: bf16_tile<3, 1>(x, K, wr + r * K, out + r, N, nullptr, 0); break;
        default: bf16_tile<4, 1>(x, K, wr + r * K, out + r, N, nullptr, 0); break;
      }
    }
    return;
  }
  // The passes over these rows share out the prefetches of a later tile's (PF_ROWS rows on), a few cache
  // lines per step: the weights stream from memory while the tile computes from L1.
  const int64_t passes = (M + BF16_MR - 1) / BF16_MR, lines = BF16_ROWS * K * 2 / 64;
  const int64_t per_pass = (lines + passes - 1) / passes, steps = K / 32;
  const int pf_lines = static_cast<int>(std::min<int64_t>((per_pass + steps - 1) / steps, 2));
  for (int64_t m = 0; m < M; m += BF16_MR) {
    const uint16_t* xm = x + m * K;
    float* o = out + m * N;
    const char* pf = reinterpret_cast<const char*>(wr + PF_ROWS * K) + m / BF16_MR * per_pass * 64;
    switch (M - m < BF16_MR ? M - m : BF16_MR) {
      case 1: bf16_tile<1, NR>(xm, K, wr, o, N, pf, pf_lines); break;
      default: bf16_tile<2, NR>(xm, K, wr, o, N, pf, pf_lines); break;
    }
  }
}

// Weight rows n0 … n0 + nr (nr ≤ BF16_ROWS) against all M activation rows.
inline void bf16_block(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t nr,
                       float* out, int64_t N) {
  const uint16_t* wr = w + n0 * K;
  float* o = out + n0;
  switch (nr) {
    case 1: bf16_rows<1>(x, M, K, wr, o, N); break;
    case 2: bf16_rows<2>(x, M, K, wr, o, N); break;
    case 3: bf16_rows<3>(x, M, K, wr, o, N); break;
    case 4: bf16_rows<4>(x, M, K, wr, o, N); break;
    case 5: bf16_rows<5>(x, M, K, wr, o, N); break;
    case 6: bf16_rows<6>(x, M, K, wr, o, N); break;
    case 7: bf16_rows<7>(x, M, K, wr, o, N); break;
    default: bf16_rows<8>(x, M, K, wr, o, N); break;
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


#if defined(__AVX512F__) && !defined(__AVX512BF16__)
// bf16 weights on AVX-512 without bf16 dot products: 32 weights per load become two fp32 vectors by a shift and a
// mask (the even and the odd columns) — no widening shuffle, which left the ymm loop at ~80% of the bandwidth limit.
// xe / xo: the activation rows' even and odd columns in fp32 ([MC][K/2] each, stride K/2). Each row keeps four sums
// (even/odd × two steps), added in a fixed order: a row's result does not depend on MC.
template <int MC>
inline void bf16_row_split(const float* xe, const float* xo, int64_t K, const uint16_t* wr, float* out, int64_t N) {
  const int64_t H = K / 2;
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[MC][4];
  for (int m = 0; m < MC; ++m)
    for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const __m512i v0 = _mm512_loadu_si512(wr + k), v1 = _mm512_loadu_si512(wr + k + 32);
    const __m512 w[4] = {_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), _mm512_castsi512_ps(_mm512_and_si512(v0, hi)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), _mm512_castsi512_ps(_mm512_and_si512(v1, hi))};
    const int64_t i = k / 2;
    for (int m = 0; m < MC; ++m) {
      acc[m][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xe + m * H + i), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xo + m * H + i), acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(xe + m * H + i + 16), acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(xo + m * H + i + 16), acc[m][3]);
    }
  }
  for (int m = 0; m < MC; ++m)
    out[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                    _mm512_add_ps(acc[m][2], acc[m][3])));
}
#endif

// ---------------------------------------------------------------- int4 weights in torch's CPU layout
// packed [N/64, K, 32] uint8: byte (b, k, j) holds row 64b+j (low nibble) and row 64b+32+j (high);
// sz [K/g, N, 2] bf16 (scale, zero) per group of g columns: w = (q − 8)·scale + zero.
#if defined(__AVX512F__)
// End of one group of columns for a 64-row block: fold the group's Σq·x (acc) into the totals with the
// rows' scales and zeros (s: 64 (scale, zero) bf16 pairs read as uint32): Σ((q−8)s + z)x = s·(Σqx − 8Σx) + z·Σx.
template <int MC>
inline void int4_group_end(const __m512 (&acc)[MC][4], __m512 (&tot)[MC][4], const uint32_t* s, const float* xsum,
                           int64_t G, int64_t gi) {
  for (int v = 0; v < 4; ++v) {
    const __m512i pair = _mm512_loadu_si512(s + 16 * v);
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(0xFFFF0000u)));
    for (int m = 0; m < MC; ++m) {
      const float sx = xsum[m * G + gi];
      const __m512 t = _mm512_sub_ps(acc[m][v], _mm512_set1_ps(8.f * sx));
      tot[m][v] = _mm512_fmadd_ps(scale, t, _mm512_fmadd_ps(zero, _mm512_set1_ps(sx), tot[m][v]));
    }
  }
}
#endif

#if defined(__AVX512F__)
template <int MC>
inline void int4_block(const float* x, const float* xsum, int64_t K, int64_t g, const uint8_t* pb,
                       const uint32_t* sz, int64_t N, int64_t b, float* out) {
  __m512 tot[MC][4];
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < 4; ++v) tot[m][v] = _mm512_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t G = K / g;
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512 acc[MC][4];
    for (int m = 0; m < MC; ++m)
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_ps();
    for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + k * 32));
      const __m256i lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
      __m512 q[4];
      q[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
      q[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
      q[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
      q[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
      for (int m = 0; m < MC; ++m) {
        const __m512 xk = _mm512_set1_ps(x[m * K + k]);
        for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_fmadd_ps(q[v], xk, acc[m][v]);
      }
    }
    int4_group_end<MC>(acc, tot, sz + gi * N + b * 64, xsum, G, gi);
  }
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + m * N + b * 64 + 16 * v, tot[m][v]);
}
#endif

#if defined(__AVX512F__)
// the fp32 int4 kernel as a type, for gemv.cpp's dispatch loop (AVX-512 without BW: Xeon Phi)
struct Int4F32 {
  static constexpr int MC_MAX = 4, BLOCK = 64;
  template <int MC>
  static void run(const float* x, const float* xsum, int64_t K, int64_t g, const uint8_t* pb, const uint32_t* sz,
                  int64_t N, int64_t b, float* out) { int4_block<MC>(x, xsum, K, g, pb, sz, N, b, out); }
};
#endif

// ---------------------------------------------------------------- int4 for AVX-512 (BW): the quads layout
// The 64-row kernel above widens every nibble to fp32 (four conversions per 64 weights): compute-bound at ~40% of
// the memory bandwidth. bf16 dot products (an earlier kernel, nibbles to bf16 by table lookup) still needed two
// conversions. Here the activations are int8 per group (as AVX2's path and llama.cpp's) and vpdpbusd multiplies
// 64 nibbles by them at once: on a 2-core Zen 4, 0.8B int4 pp512 241 → 302 tok/s and tg128 45 → 52 against the
// bf16 dot products, with mean |Δ logprob| vs bf16 0.5794 → 0.5816 (bench_quant_accuracy.py; llama.cpp Q4_0:
// 0.5591). For that each 128 bytes of a 64-row block (columns 4t … 4t + 3) hold torch's bytes (k, j) at
// 64·(j / 16) + 4·(j mod 16) + (k mod 4) (ops/int4_layout.py `QUADS`): a 32-bit lane is one row's four columns,
// low nibbles rows j, high nibbles rows 32 + j. Without VNNI (Skylake-SP) each vpdpbusd is vpmaddubsw + vpmaddwd +
// vpaddd, the same exact sums (a pair of products is at most 2·15·127 < 2¹⁵, so vpmaddubsw never saturates):
// emulated on Zen 4 (DELTARUN_CPU_LEVEL=avx512_core), 0.8B int4 pp512 114 → 256 tok/s and tg128 35 → 51 against the
// fp32 kernel (+ dequantizing for prefill); llama.cpp built for that level: 137 / 31.
#if defined(__AVX512BW__)
#define DELTARUN_INT4_QUADS 1
// acc + the sums of each lane's four u8 · s8 products (u: nibbles, s: int8 activations)
inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
// One 64-row block (pb: K/4 quads of 128 bytes) against MC activation rows xq [MC, K] int8 (stride K), with xs
// (scale) and xqs (Σxq) per (row, group) [MC, G]; adds into (gi > 0) or writes out[m·ldo + 0 … 63]. The int32
// sums of a group stay exact: g·15·127 < 2³¹.
template <int MC>
inline void int4_quads_block(const int8_t* xq, const float* xs, const float* xqs, int64_t K, int64_t g,
                             const uint8_t* pb, const uint32_t* sz, int64_t N, int64_t b, float* out, int64_t ldo) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t G = K / g;
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512i acc[MC][4];  // rows 0-15, 16-31, 32-47, 48-63
    for (int m = 0; m < MC; ++m)
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_si512();
    for (int64_t k = gi * g; k < (gi + 1) * g; k += 4) {
      const __m512i v0 = _mm512_loadu_si512(pb + k * 32), v1 = _mm512_loadu_si512(pb + k * 32 + 64);
      const __m512i t[4] = {_mm512_and_si512(v0, low4), _mm512_and_si512(v1, low4),
                            _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4),
                            _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4)};
      for (int m = 0; m < MC; ++m) {
        int32_t x4;
        std::memcpy(&x4, xq + m * K + k, 4);
        const __m512i xv = _mm512_set1_epi32(x4);
        for (int v = 0; v < 4; ++v) acc[m][v] = dot_u8s8(acc[m][v], t[v], xv);
      }
    }
    // Σ((q − 8)·scale + zero)·x̃ = xs·(scale·(Σq·xq − 8·Σxq) + zero·Σxq), the rows' (scale, zero) read as uint32
    const uint32_t* s = sz + gi * N + b * 64;
    for (int v = 0; v < 4; ++v) {
      const __m512i pair = _mm512_loadu_si512(s + 16 * v);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(0xFFFF0000u)));
      for (int m = 0; m < MC; ++m) {
        const __m512 sq = _mm512_set1_ps(xqs[m * G + gi]), sc = _mm512_set1_ps(xs[m * G + gi]);
        const __m512 t = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sq, _mm512_cvtepi32_ps(acc[m][v]));
        float* o = out + m * ldo + 16 * v;
        const __m512 prev = gi ? _mm512_loadu_ps(o) : _mm512_setzero_ps();
        _mm512_storeu_ps(o, _mm512_fmadd_ps(sc, _mm512_fmadd_ps(scale, t, _mm512_mul_ps(zero, sq)), prev));
      }
    }
  }
}
#endif

// int8 weights · 16-bit activations (VNNI's vpdpwssd, AVX2's vpmaddwd): x is scaled per row to at most
// XQ_MAX in magnitude, so its rounding error (≤ max|x|/(2·XQ_MAX)) stays far below bf16's own (max|x|/256),
// and int32 sums are flushed to fp32 every XQ_FLUSH columns, so they cannot overflow (127·XQ_MAX·XQ_FLUSH < 2³¹).
constexpr int XQ_MAX = 8191;
constexpr int64_t XQ_FLUSH = 1024;

#if defined(__AVX512BW__)
// Each 32-bit lane: acc + the two products of its int16 pairs (VNNI's vpdpwssd; vpmaddwd + vpaddd without it).
inline __m512i dot_s16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// int8 rows without widening shuffles: 64 weights per load become their even and their odd bytes as int16 lanes
// by shifts within each 16-bit lane (as bf16_row_split does for bf16), multiplied by the activations' even and odd
// columns. `xs`: a row of 16-bit activations split per 64 columns, 32 even then 32 odd (`split_q16`), K % 64 == 0.
// vpmovsxbw, the widening, runs on one port (and crosses lanes): the row loop was ~60 GB/s in cache on Zen 4,
// ~1.8× its DRAM rate, too little headroom to keep the loads streaming; split, 64–73 GB/s and decode +8%. With
// 4 activation rows (prefill, batched decode) the widening loop (int8_row_vnni) stays faster (qgemm_int8 ~295 vs
// ~200 GOP/s on Zen 4), so VNNI builds run this one for a single row only. Both reduce each XQ_FLUSH block's
// int32 lanes exactly, then add the block sums in fp32 in order: a row's result does not depend on the kernel.
inline void split_q16(int16_t* x, int64_t K) {  // in place
  int16_t t[64];
  for (int64_t k = 0; k < K; k += 64) {
    std::memcpy(t, x + k, sizeof t);
    for (int64_t i = 0; i < 32; ++i) x[k + i] = t[2 * i], x[k + 32 + i] = t[2 * i + 1];
  }
}

template <int MC>
inline void int8_row_split(const int16_t* xs, int64_t K, const int8_t* wr, float* out, int64_t N) {
  float sum[MC] = {};
  for (int64_t k0 = 0; k0 < K; k0 += XQ_FLUSH) {
    const int64_t k1 = k0 + XQ_FLUSH < K ? k0 + XQ_FLUSH : K;
    __m512i acc[MC][2];
    for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 64) {
      const __m512i v = _mm512_loadu_si512(wr + k);
      const __m512i we = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), wo = _mm512_srai_epi16(v, 8);
      for (int m = 0; m < MC; ++m) {
        acc[m][0] = dot_s16(acc[m][0], we, _mm512_loadu_si512(xs + m * K + k));
        acc[m][1] = dot_s16(acc[m][1], wo, _mm512_loadu_si512(xs + m * K + k + 32));
      }
    }
    for (int m = 0; m < MC; ++m)  // exact: |Σ| ≤ 127·XQ_MAX·XQ_FLUSH < 2³¹
      sum[m] += static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1])));
  }
  for (int m = 0; m < MC; ++m) out[m * N] = sum[m];
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// vpdpwssd accumulates in place, so one sum per row is a chain of its latency (~5 cycles per 32 weights, about
// half of what the loads allow): C interleaved sums per row break it. int32 sums are exact, so the result does
// not depend on C.
template <int MC>
inline void int8_row_vnni(const int16_t* xq, int64_t K, const int8_t* wr, float* out, int64_t N) {
  constexpr int C = MC == 1 ? 4 : 2;
  float sum[MC] = {};
  for (int64_t k0 = 0; k0 < K; k0 += XQ_FLUSH) {
    const int64_t k1 = k0 + XQ_FLUSH < K ? k0 + XQ_FLUSH : K;
    __m512i acc[C][MC];
    for (int c = 0; c < C; ++c)
      for (int m = 0; m < MC; ++m) acc[c][m] = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k + 32 * C <= k1; k += 32 * C)
      for (int c = 0; c < C; ++c) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + 32 * c)));
        for (int m = 0; m < MC; ++m)
          acc[c][m] = _mm512_dpwssd_epi32(acc[c][m], w, _mm512_loadu_si512(xq + m * K + k + 32 * c));
      }
    for (; k < k1; k += 32) {
      const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k)));
      for (int m = 0; m < MC; ++m) acc[0][m] = _mm512_dpwssd_epi32(acc[0][m], w, _mm512_loadu_si512(xq + m * K + k));
    }
    for (int m = 0; m < MC; ++m) {  // exact: |Σ| ≤ 127·XQ_MAX·XQ_FLUSH < 2³¹
      __m512i t = acc[0][m];
      for (int c = 1; c < C; ++c) t = _mm512_add_epi32(t, acc[c][m]);
      sum[m] += static_cast<float>(_mm512_reduce_add_epi32(t));
    }
  }
  for (int m = 0; m < MC; ++m) out[m * N] = sum[m];
}
#endif

}  // namespace
