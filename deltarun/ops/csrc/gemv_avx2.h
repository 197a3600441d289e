// Inner loops of the CPU decode kernels for machines without AVX-512 (most laptops: AVX2 + FMA). Same contracts and the same
// arithmetic as gemv_kernels.h (exact bf16·bf16 / int8·fp32 products summed in fp32; bf16 activations
// into the int8 path as 13-bit integers). Included once, after gemv_kernels.h.
#pragma once

#include <cstdint>
#include <type_traits>

namespace {

// Runs f(std::integral_constant<int, MC>, m) over activation rows m, MC_MAX at a time (register blocking).
template <int MC_MAX, class F>
inline void by_rows(int64_t M, F&& f) {
  for (int64_t m = 0; m < M; m += MC_MAX) {
    const int64_t r = M - m < MC_MAX ? M - m : MC_MAX;
    if (r >= 4 && MC_MAX >= 4) f(std::integral_constant<int, (MC_MAX >= 4 ? 4 : 1)>{}, m);
    else if (r == 3) f(std::integral_constant<int, (MC_MAX >= 3 ? 3 : 1)>{}, m);
    else if (r == 2) f(std::integral_constant<int, (MC_MAX >= 2 ? 2 : 1)>{}, m);
    else f(std::integral_constant<int, 1>{}, m);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t PREFETCH_BYTES = 16384;  // how far ahead a weight row's stream is requested (row_fma_avx2)

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 bf16x8(const uint16_t* p) {  // 8 bf16 → 8 fp32, exact
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// 8 fp32 → 8 bf16 (packed in 128 bits), rounded to nearest even with NaN kept NaN: torch's conversion.
inline __m128i bf16x8_round(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// Weights k … k+15 of a row widened exactly to fp32: bf16 (shift into the high half) and int8.
struct WidenBf16 {
  static void load(const uint16_t* wr, __m256& w0, __m256& w1) { w0 = bf16x8(wr), w1 = bf16x8(wr + 8); }
};
struct WidenInt8 {
  static void load(const int8_t* wr, __m256& w0, __m256& w1) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr));
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  }
};

// One weight row (bf16 or int8, widened by Widen) against MC fp32 activation rows (K a multiple of 16):
// exact products summed in fp32. An FMA's result feeds the next one 4–5 cycles later, so each row keeps
// four independent sums (32 columns a step); MC ≤ 2 keeps them in registers. A row's sums are added in the
// same order whatever MC is: a token's logits do not depend on how many rows share the call (MTP's verify
// reproduces plain decoding bit for bit).
template <int MC, class Widen, typename W>
inline void row_fma_avx2(const float* x, int64_t K, const W* wr, float* out, int64_t N) {
  static_assert(MC <= 2, "register budget");
  constexpr int A = 4;  // sums per activation row
  __m256 acc[MC][A];
  for (int m = 0; m < MC; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * A <= K; k += 8 * A) {
    // the next rows' lines requested ahead (one stream per thread is latency-bound): int8 weights of a 0.8B
    // layer's shapes on a 2-core EPYC 14.2 → 15.5 GB/s (medians of 4 interleaved runs); bf16 14.5 either way
    _mm_prefetch(reinterpret_cast<const char*>(wr + k + PREFETCH_BYTES / sizeof(W)), _MM_HINT_T0);
    __m256 w[A];
    for (int a = 0; a < A; a += 2) Widen::load(wr + k + 8 * a, w[a], w[a + 1]);
    for (int m = 0; m < MC; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * a), w[a], acc[m][a]);
  }
  for (; k < K; k += 16) {  // K = 16 mod 32
    __m256 w0, w1;
    Widen::load(wr + k, w0, w1);
    for (int m = 0; m < MC; ++m) {
      acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8), w1, acc[m][1]);
    }
  }
  for (int m = 0; m < MC; ++m) {
    __m256 t = acc[m][0];
    for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]);
    out[m * N] = hsum256(t);
  }
}

// int8 weights · 16-bit activations (quantized as for VNNI) with vpmaddwd, flushed to fp32 every XQ_FLUSH.
// Stream: the row comes from memory (decode) and its lines are requested ahead; the prefill GEMM's rows sit
// in cache (qgemm.cpp), where the prefetch only costs (int8 prefill 112 → 95 tok/s with it).
template <int MC, bool Stream = true>
inline void int8_row_madd(const int16_t* xq, int64_t K, const int8_t* wr, float* out, int64_t N) {
  __m256 accf[MC];
  for (int m = 0; m < MC; ++m) accf[m] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += XQ_FLUSH) {
    const int64_t k1 = k0 + XQ_FLUSH < K ? k0 + XQ_FLUSH : K;
    __m256i acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int64_t k = k0; k < k1; k += 16) {
      if (Stream && (k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k + PREFETCH_BYTES), _MM_HINT_T0);
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k)));
      for (int m = 0; m < MC; ++m)
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(w, _mm256_loadu_si256(
                                                                   reinterpret_cast<const __m256i*>(xq + m * K + k))));
    }
    for (int m = 0; m < MC; ++m) accf[m] = _mm256_add_ps(accf[m], _mm256_cvtepi32_ps(acc[m]));
  }
  for (int m = 0; m < MC; ++m) out[m * N] = hsum256(accf[m]);
}

// int4 weights for AVX2 machines: torch's 32-row CPU layout, packed [N/32, K, 16] uint8 where byte (b, k, j)
// holds row 32b+j (low nibble) and row 32b+16+j (high), with the 32 bytes of each column pair (k, k+1) of a
// block reordered into row pairs (ops/quant.py `int4_pairs`): byte 16L + 2i + c is column k+c of block row
// 8L + i (low nibble) and 8L + i + 16 (high), for L = 0, 1, i < 8, c = 0, 1 — what vpmaddubsw multiplies,
// so the inner loop loads it as is (a vpermq and a vpshufb per column pair less than torch's order).
// sz [K/g, N, 2] bf16 as for the 64-row layout.
// Undo the reordering of a column pair: [column k (16 bytes) | column k+1] as torch lays them out.
inline __m256i int4_unpair(__m256i v) {
  const __m256i cols = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, cols), 0xD8);
}

// One 32-row block against MC ≤ 2 fp32 activation rows (accumulators and widened nibbles in 16 registers).
template <int MC>
inline void int4_block_avx2(const float* x, const float* xsum, int64_t K, int64_t g, const uint8_t* pb,
                            const uint32_t* sz, int64_t N, int64_t b, float* out) {
  static_assert(MC <= 2, "register budget");
  __m256 tot[MC][4];
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < 4; ++v) tot[m][v] = _mm256_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t G = K / g;
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256 acc[MC][4];
    for (int m = 0; m < MC; ++m)
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_setzero_ps();
    for (int64_t k = gi * g; k < (gi + 1) * g; k += 2) {
      const __m256i both = int4_unpair(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + k * 16)));
      for (int c = 0; c < 2; ++c) {  // column k + c
        const __m128i bytes = c ? _mm256_extracti128_si256(both, 1) : _mm256_castsi256_si128(both);
        const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const __m256 q[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                             _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
        for (int m = 0; m < MC; ++m) {
          const __m256 xk = _mm256_broadcast_ss(x + m * K + k + c);
          for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_fmadd_ps(q[v], xk, acc[m][v]);
        }
      }
    }
    // Σ((q−8)s + z)x = s·(Σqx − 8Σx) + z·Σx, with the rows' (scale, zero) bf16 pairs read as uint32
    const uint32_t* s = sz + gi * N + b * 32;
    for (int v = 0; v < 4; ++v) {
      const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * v));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
      const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
      for (int m = 0; m < MC; ++m) {
        const __m256 sx = _mm256_set1_ps(xsum[m * G + gi]);
        const __m256 t = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), sx, acc[m][v]);
        tot[m][v] = _mm256_fmadd_ps(scale, t, _mm256_fmadd_ps(zero, sx, tot[m][v]));
      }
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + m * N + b * 32 + 8 * v, tot[m][v]);
}

// The same block with integer products (llama.cpp's approach): x quantized to int8 per group of g columns
// (xq [M, K], scale xs and Σxq per (row, group)), nibbles · xq by vpmaddubsw over column pairs (k, k+1)
// into int16 (|sum| ≤ 8 pairs · 2 · 15 · 127 < 2¹⁵), widened to int32 every 8 pairs. Exact for that x̃.
template <int MC>
inline void int4_block_avx2_q8(const int16_t* xp, const float* xs, const float* xqs, int64_t K, int64_t g,
                               const uint8_t* pb, const uint32_t* sz, int64_t N, int64_t b, float* out) {
  static_assert(MC <= 2, "register budget");
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int64_t G = K / g, P = K / 2;  // xp holds one int16 = (x_k, x_k+1) int8 pair per column pair
  __m256 tot[MC][4];
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < 4; ++v) tot[m][v] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256i acc[MC][4];  // int32: rows 0-7, 8-15, 16-23, 24-31
    for (int m = 0; m < MC; ++m)
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm256_setzero_si256();
    for (int64_t k0 = gi * g; k0 < (gi + 1) * g; k0 += 16) {
      __m256i a16[MC][2];
      for (int m = 0; m < MC; ++m) a16[m][0] = a16[m][1] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + 16; k += 2) {
        // columns k, k+1 as (k, k+1) byte pairs of block rows 0-7 | 8-15 (low nibbles; 16-31 in the high ones)
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + k * 16));
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int m = 0; m < MC; ++m) {
          const __m256i xk = _mm256_set1_epi16(xp[m * P + k / 2]);
          a16[m][0] = _mm256_add_epi16(a16[m][0], _mm256_maddubs_epi16(lo, xk));  // rows 0-15
          a16[m][1] = _mm256_add_epi16(a16[m][1], _mm256_maddubs_epi16(hi, xk));  // rows 16-31
        }
      }
      for (int m = 0; m < MC; ++m)
        for (int h = 0; h < 2; ++h) {
          acc[m][2 * h] = _mm256_add_epi32(acc[m][2 * h], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a16[m][h])));
          acc[m][2 * h + 1] =
              _mm256_add_epi32(acc[m][2 * h + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a16[m][h], 1)));
        }
    }
    // Σ((q−8)s + z)·x̃ = xs·(s·(Σq·xq − 8Σxq) + z·Σxq)
    const uint32_t* s = sz + gi * N + b * 32;
    for (int v = 0; v < 4; ++v) {
      const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * v));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
      const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
      for (int m = 0; m < MC; ++m) {
        const __m256 sq = _mm256_set1_ps(xqs[m * G + gi]), sc = _mm256_set1_ps(xs[m * G + gi]);
        const __m256 t = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), sq, _mm256_cvtepi32_ps(acc[m][v]));
        tot[m][v] = _mm256_fmadd_ps(sc, _mm256_fmadd_ps(scale, t, _mm256_mul_ps(zero, sq)), tot[m][v]);
      }
    }
  }
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + m * N + b * 32 + 8 * v, tot[m][v]);
}

struct Int4Avx2Q8 {
  static constexpr int MC_MAX = 2, BLOCK = 32;
  template <int MC>
  static void run(const int16_t* xp, const float* xs, const float* xqs, int64_t K, int64_t g, const uint8_t* pb,
                  const uint32_t* sz, int64_t N, int64_t b, float* out) {
    int4_block_avx2_q8<MC>(xp, xs, xqs, K, g, pb, sz, N, b, out);
  }
};

struct Int4Avx2 {
  static constexpr int MC_MAX = 2, BLOCK = 32;
  template <int MC>
  static void run(const float* x, const float* xsum, int64_t K, int64_t g, const uint8_t* pb, const uint32_t* sz,
                  int64_t N, int64_t b, float* out) { int4_block_avx2<MC>(x, xsum, K, g, pb, sz, N, b, out); }
};
#endif

}  // namespace
