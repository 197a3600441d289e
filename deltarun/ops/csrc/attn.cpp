// Attention of a bf16 prompt chunk on CPUs with AVX512-BF16: o = softmax(q·kᵀ·scale) · v, causal (the T queries are
// the last T of the S key positions) or not (the vision tower's frames). torch's CPU flash attention multiplies its
// blocks with MKL's bf16 → fp32 GEMM, which on AMD CPUs widens to fp32 SGEMM (~180 GFLOP/s on 2 Zen 4 cores); here
// both products are bf16 dot products in hardware (vdpbf16ps, fp32 sums) inside one online-softmax loop: 385 GFLOP/s
// for 2,048 queries at depth 32K, ~93% of what 2 such cores do in a loop of nothing but vdpbf16ps (405–430).
//  - per KV head, K is packed once into 16-key tiles of dimension pairs [S/16][D/2][16] and V into key pairs
//    [S/2][D] (32-bit lanes of two bf16), so a broadcast query pair (or probability pair) times one load is 16
//    dot-product steps; every query head of the group reads the same packed copy;
//  - a task is MQ = 128 queries of one head: per block of KB = 256 keys (the next one prefetched), the scores
//    (8 rows × 48 keys per micro-tile, 24 accumulators), the running max and sum (exp2 by polynomial; p rounded to
//    bf16 before the second product, as torch does), then p·v into fp32 output rows (8 rows × 48 dims per tile);
//  - causal: keys past a query's position are masked to p = 0; blocks past every query of a task are skipped.
// Reference: an explicit fp64 softmax (tests/test_attn_kernel.py): no further from it than torch's bf16 attention.
// Not here: fp32 inputs, decode (one query: memory-bound, ops/attention.py), other CPU levels (torch's flash runs
// fp32 FMA GEMMs there, the arithmetic a kernel of ours would have too).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define DELTARUN_ATTN 1
#endif

namespace {

#ifdef DELTARUN_ATTN
constexpr int QK_R = 8, QK_N = 3;  // q·kᵀ micro-tile: query rows × 16-key vectors (24 accumulators)
constexpr int PV_R = 8, PV_N = 3;  // p·v micro-tile: query rows × 16-dim vectors (4×6, 4×4, 6×4 measured level)
constexpr int64_t MR = std::lcm(QK_R, PV_R);  // a task's rows are padded to this
constexpr int64_t MQ = 128;  // query rows per task: each streams its keys once (64: 330, 128: 360 GFLOP/s at 32K)
constexpr int64_t KB = 256;  // keys per online-softmax block

inline __mmask16 first(int64_t n) {  // the lowest min(n, 16) lanes
  return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1);
}

// c[0 … 16) = the columns of the 16 × 16 uint32 matrix whose rows are r[0 … 16).
inline void transpose16(const __m512i* r, __m512i* c) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + m], 128-bit lane L: column 4L + m of rows 4i … 4i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44), x1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
    c[m] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    c[4 + m] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    c[8 + m] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    c[12 + m] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// Rows of k [S, D] (row stride ks) → kp [ceil(S/16)][D/2][16] uint32 for 16-key tiles t0 … t1; keys ≥ S are zero.
// 16 × 16 transposes in registers (a scalar transpose ran at ~2 GB/s, gathers slower still).
void pack_k(const uint16_t* k, int64_t ks, int64_t S, int64_t D, uint32_t* kp, int64_t t0, int64_t t1) {
  const int64_t dp = D / 2;
  for (int64_t t = t0; t < t1; ++t) {
    uint32_t* dst = kp + t * dp * 16;
    const int64_t keys = std::min<int64_t>(16, S - t * 16);
    const auto src = [&](int64_t j) { return reinterpret_cast<const uint32_t*>(k + (t * 16 + j) * ks); };
    int64_t d = 0;
    for (; d + 16 <= dp; d += 16) {
      __m512i r[16], c[16];
      for (int64_t j = 0; j < 16; ++j) r[j] = j < keys ? _mm512_loadu_si512(src(j) + d) : _mm512_setzero_si512();
      transpose16(r, c);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (d + i) * 16, c[i]);
    }
    for (; d < dp; ++d)
      for (int64_t j = 0; j < 16; ++j) dst[d * 16 + j] = j < keys ? src(j)[d] : 0u;
  }
}

// Rows of v [S, D] → vp [ceil(S/2)][D] uint32 (low half: the even key) for key pairs p0 … p1; keys ≥ S are zero.
void pack_v(const uint16_t* v, int64_t vs, int64_t S, int64_t D, uint32_t* vp, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* a = v + 2 * p * vs;
    const uint16_t* b = a + vs;
    uint32_t* dst = vp + p * D;
    if (2 * p + 1 < S)
      for (int64_t d = 0; d < D; ++d) dst[d] = a[d] | (static_cast<uint32_t>(b[d]) << 16);
    else if (2 * p < S)
      for (int64_t d = 0; d < D; ++d) dst[d] = a[d];
    else
      std::fill(dst, dst + D, 0u);
  }
}

// s[r][0 … NV·16) = q[r] · (NV·16 packed keys), MR rows: q as uint32 dimension pairs (dp per row).
template <int MR, int N>
inline void qk_tile(const uint32_t* q, int64_t dp, const uint32_t* kp, float* s) {
  __m512 acc[MR][N];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < N; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dp; ++d) {
    __m512bh kv[N];
    for (int v = 0; v < N; ++v) kv[v] = (__m512bh)_mm512_loadu_si512(kp + (v * dp + d) * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * dp + d]));
      for (int v = 0; v < N; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], qb, kv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < N; ++v) _mm512_storeu_ps(s + r * KB + v * 16, acc[r][v]);
}

// o[r][0 … N·16) += Σ_pairs p[r][pair] · vp[pair][0 … N·16), MR rows: p as uint32 key pairs (KB / 2 per row).
template <int MR, int N>
inline void pv_tile(const uint32_t* p, int64_t pairs, const uint32_t* vp, int64_t D, float* o) {
  __m512 acc[MR][N];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < N; ++v) acc[r][v] = _mm512_loadu_ps(o + r * D + v * 16);
  for (int64_t k = 0; k < pairs; ++k) {
    __m512bh vv[N];
    for (int v = 0; v < N; ++v) vv[v] = (__m512bh)_mm512_loadu_si512(vp + k * D + v * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * (KB / 2) + k]));
      for (int v = 0; v < N; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pb, vv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < N; ++v) _mm512_storeu_ps(o + r * D + v * 16, acc[r][v]);
}

// 2^x for x ≥ -126 (lanes below are masked by the caller): degree-6 Taylor of 2^f on [-0.5, 0.5], ≤ 1.2e-7 relative.
inline __m512 exp2v(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}


// One key block's online softmax for row r: scores s (kb of them, `vis` visible) → p as bf16 pairs into pr, the
// running max m (log2 units) and sum l updated, the output row o rescaled.
void softmax_row(const float* s, int64_t kb, int64_t vis, float c, float& m, float& l, uint16_t* pr, float* o,
                 int64_t D) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < vis; j += 16) mx = _mm512_mask_max_ps(mx, first(vis - j), mx, _mm512_loadu_ps(s + j));
  const float mnew = std::max(m, _mm512_reduce_max_ps(mx) * c);
  const float alpha = std::exp2(m - mnew);  // 0 on the first block (m = -inf)
  const __m512 cv = _mm512_set1_ps(c), mv = _mm512_set1_ps(mnew);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < kb; j += 32) {
    const __m512 e0 = _mm512_maskz_mov_ps(first(vis - j), exp2v(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), cv, mv)));
    const __m512 e1 =
        _mm512_maskz_mov_ps(first(vis - j - 16), exp2v(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), cv, mv)));
    sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
    _mm512_storeu_si512(pr + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  }
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = mnew;
  if (alpha != 1.f) {
    const __m512 av = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
  }
}

template <int NV, typename Tile>
inline void by_vectors(int64_t n, Tile&& tile) {  // n 16-wide vectors in micro-tiles of NV, then the rest
  int64_t v = 0;
  for (; v + NV <= n; v += NV) tile(std::integral_constant<int, NV>{}, v);
  if constexpr (NV > 1) {
    if (n > v) by_vectors<NV - 1>(n - v, [&](auto m, int64_t w) { tile(m, v + w); });
  }
}

// Queries i0 … i0 + nq of one head (q rows with stride qs, out rows contiguous) over the packed keys of its KV head.
void task(const uint16_t* q, int64_t qs, int64_t i0, int64_t nq, int64_t T, int64_t S, int64_t D, float c, bool causal,
          const uint32_t* kp, const uint32_t* vp, uint16_t* out, std::vector<uint16_t>& qt, std::vector<float>& sc,
          std::vector<uint16_t>& pb, std::vector<float>& o) {
  const int64_t dp = D / 2, rows = (nq + MR - 1) / MR * MR;
  std::fill(qt.begin(), qt.end(), 0);
  for (int64_t r = 0; r < nq; ++r) std::copy(q + (i0 + r) * qs, q + (i0 + r) * qs + D, qt.data() + r * D);
  std::fill(o.begin(), o.end(), 0.f);
  float m[MQ + MR], l[MQ + MR];
  int64_t lim[MQ + MR];  // keys visible to each row (padding rows copy the last real one)
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
    lim[r] = causal ? S - T + i0 + std::min(r, nq - 1) + 1 : S;
  }
  const auto* q32 = reinterpret_cast<const uint32_t*>(qt.data());
  const auto* p32 = reinterpret_cast<const uint32_t*>(pb.data());
  const int64_t kend = lim[nq - 1];
  for (int64_t k0 = 0; k0 < kend; k0 += KB) {
    const int64_t kb = std::min(KB, (kend - k0 + 31) / 32 * 32);
    if (k0 + KB < kend) {  // the next block's keys and values into L2 (at depth 32K: 290 → 330 GFLOP/s at MQ 64)
      const int64_t nb = std::min(KB, (kend - k0 - KB + 31) / 32 * 32);
      const char* kn = reinterpret_cast<const char*>(kp + (k0 + KB) / 16 * dp * 16);
      const char* vn = reinterpret_cast<const char*>(vp + (k0 + KB) / 2 * D);
      for (int64_t b = 0; b < nb * D * 2; b += 64) {
        _mm_prefetch(kn + b, _MM_HINT_T1);
        _mm_prefetch(vn + b, _MM_HINT_T1);
      }
    }
    for (int64_t r = 0; r < rows; r += QK_R)
      by_vectors<QK_N>(kb / 16, [&](auto n, int64_t v) {
        qk_tile<QK_R, decltype(n)::value>(q32 + r * dp, dp, kp + (k0 / 16 + v) * dp * 16, sc.data() + r * KB + v * 16);
      });
    for (int64_t r = 0; r < rows; ++r)
      softmax_row(sc.data() + r * KB, kb, std::clamp<int64_t>(lim[r] - k0, 0, kb), c, m[r], l[r],
                  pb.data() + r * KB, o.data() + r * D, D);
    for (int64_t r = 0; r < rows; r += PV_R)
      by_vectors<PV_N>(D / 16, [&](auto n, int64_t v) {
        pv_tile<PV_R, decltype(n)::value>(p32 + r * (KB / 2), kb / 2, vp + (k0 / 2) * D + v * 16, D,
                                          o.data() + r * D + v * 16);
      });
  }
  for (int64_t r = 0; r < nq; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int64_t d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (i0 + r) * D + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o.data() + r * D + d), inv)));
  }
}
#endif

#ifdef DELTARUN_ATTN
// The packed K and V of one KV head. Up to KEEP_WORDS they are kept between calls (per calling thread): a fresh
// 2 × 20 MB at 40K keys cost ~30 ms of page faults per call, more than a short chunk's whole attention. The kept
// buffer shrinks when a call needs under a quarter of it; larger ones (past ~64K keys of head size 256, where a
// chunk's arithmetic dwarfs the faults) are the call's own, so a long prompt leaves nothing behind for its decode.
constexpr int64_t KEEP_WORDS = int64_t{16} << 20;  // 64 MB

struct Packed {
  std::unique_ptr<uint32_t[]> own;  // set when the buffer is this call's alone
  uint32_t* words;
};

Packed packed(int64_t n) {
  thread_local std::unique_ptr<uint32_t[]> buf;
  thread_local int64_t size = 0;
  if (n > KEEP_WORDS) {
    buf.reset();
    size = 0;
    std::unique_ptr<uint32_t[]> own(new uint32_t[n]);  // not zeroed: every packed word is written
    uint32_t* w = own.get();
    return {std::move(own), w};
  }
  if (n > size || 4 * n < size) {
    buf.reset();
    buf.reset(new uint32_t[n]);
    size = n;
  }
  return {nullptr, buf.get()};
}
#endif

bool attn_bf16_available() {
#ifdef DELTARUN_ATTN
  return true;
#else
  return false;
#endif
}

// q [B, Hq, T, D], k and v [B, Hkv, S, D] (bf16, last dimension contiguous, Hq a multiple of Hkv, D a multiple of
// 16). Causal (T ≤ S): the T queries are positions S - T … S - 1 and see keys 0 … their own; otherwise every query
// sees every key. Returns [B, Hq, T, D] bf16.
at::Tensor attn_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal) {
  TORCH_CHECK(attn_bf16_available(), "attn_bf16: built without AVX512-BF16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attn_bf16: 4-d q, k, v");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attn_bf16: bf16 tensors");
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == S && k.size(3) == D &&
                  v.size(3) == D && Hkv > 0 && Hq % Hkv == 0 && D % 16 == 0 && (T <= S || !causal) && (S > 0 || T == 0),
              "attn_bf16: shapes");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attn_bf16: contiguous last dim");
  at::Tensor out = at::empty({B, Hq, T, D}, q.options());
#ifdef DELTARUN_ATTN
  if (T == 0) return out;
  const int64_t G = Hq / Hkv, tiles = (T + MQ - 1) / MQ, spad = (S + 31) / 32 * 32;
  const float c = static_cast<float>(scale) * 1.4426950408889634f;  // scores in log2 units
  const Packed buf = packed(spad * D);
  uint32_t* kp = buf.words;
  uint32_t* vp = kp + spad * D / 2;
  const auto* Q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* K = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* V = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const uint16_t* kh = K + b * k.stride(0) + h * k.stride(1);
      const uint16_t* vh = V + b * v.stride(0) + h * v.stride(1);
      at::parallel_for(0, spad / 16, 16, [&](int64_t a, int64_t e) {
        pack_k(kh, k.stride(2), S, D, kp, a, e);
        pack_v(vh, v.stride(2), S, D, vp, a * 8, e * 8);
      });
      // tiles of one head ordered short, long, short, long …: a thread's contiguous share costs about the same
      at::parallel_for(0, G * tiles, 1, [&](int64_t a, int64_t e) {
        std::vector<uint16_t> qt(MQ * D), pb(MQ * KB);
        std::vector<float> sc(MQ * KB), o(MQ * D);
        for (int64_t t = a; t < e; ++t) {
          const int64_t g = t / tiles, j = t % tiles, tile = j % 2 ? tiles - 1 - j / 2 : j / 2;
          const int64_t hq = h * G + g, i0 = tile * MQ;
          task(Q + b * q.stride(0) + hq * q.stride(1), q.stride(2), i0, std::min(MQ, T - i0), T, S, D, c, causal, kp,
               vp, O + (b * Hq + hq) * T * D, qt, sc, pb, o);
        }
      });
    }
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("attn_bf16(Tensor q, Tensor k, Tensor v, float scale, bool causal=True) -> Tensor");
  m.def("attn_bf16_available() -> bool", &attn_bf16_available);
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) { m.impl("attn_bf16", &attn_bf16); }
