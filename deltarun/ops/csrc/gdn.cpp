// One Gated DeltaNet decode token on the CPU, fused: causal conv1d step + SiLU, q/k L2 norm, the gates,
// the gated delta rule on the recurrent state IN PLACE in the state pool, and the gated RMSNorm — what
// model/deltanet.py's `_decode_step` does in ~40 small torch ops per layer, in one pass over each state.
// The projections (in_proj_*, out_proj) stay outside (they are the decode matmuls of gemv.cpp).
// Rounding follows the torch reference step for step: the conv output, o and the normalised o are
// rounded to the model dtype where the reference rounds them; everything else is fp32.
// Reference: model/deltanet.py `_decode_step` with ops/gdn.py `gated_delta_step_` (tests/test_gdn_fused.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }  // round to T (RNE), back to fp32

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// x rounded to bf16 (nearest, ties to even), in place and kept as fp32: c10::BFloat16's rounding (a NaN stays
// a NaN), in integer operations the compiler vectorizes
inline void round_bf16_(float* x, int64_t n) {
  auto* u = reinterpret_cast<uint32_t*>(x);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = u[i];
    const uint32_t r = (v + 0x7FFFu + ((v >> 16) & 1u)) & 0xFFFF0000u;
    u[i] = (v & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : r;
  }
}

inline float softplus(float v) { return v > 20.f ? v : std::log1p(std::exp(v)); }  // torch's threshold 20

#if defined(__AVX512F__)
using vf = __m512;
constexpr int64_t VL = 16;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vset1(float v) { return _mm512_set1_ps(v); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
#define DELTARUN_GDN_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int64_t VL = 8;
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vset1(float v) { return _mm256_set1_ps(v); }
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
#define DELTARUN_GDN_VEC 1
#endif

// Sᵀk and Sᵀq (rk, rq [dv]) in one pass over S [dk, dv], and the state update S ← decay·S + k ⊗ δ. The plain
// loops kept rk and rq in memory (a load and a store of each per 16 products: 2–3× the time of the products);
// here each 4-vector column slice of them is held in registers for the whole pass over the rows. The same
// products and sums in the same order (one fused multiply-add per product, rows in order), so the same results.
#if defined(DELTARUN_GDN_VEC)
constexpr int64_t SLICE = 4 * VL;
inline void read_state(const float* S, const float* k, const float* q, int64_t dk, int64_t dv, float* rk, float* rq) {
  for (int64_t j = 0; j < dv; j += SLICE) {
    vf ak[4] = {vzero(), vzero(), vzero(), vzero()}, aq[4] = {vzero(), vzero(), vzero(), vzero()};
    for (int64_t i = 0; i < dk; ++i) {
      const float* s = S + i * dv + j;
      const vf ki = vset1(k[i]), qi = vset1(q[i]);
      for (int v = 0; v < 4; ++v) {
        const vf sv = vload(s + v * VL);
        ak[v] = vfma(sv, ki, ak[v]);
        aq[v] = vfma(sv, qi, aq[v]);
      }
    }
    for (int v = 0; v < 4; ++v) vstore(rk + j + v * VL, ak[v]), vstore(rq + j + v * VL, aq[v]);
  }
}
inline void update_state(float* S, const float* k, const float* delta, float decay, int64_t dk, int64_t dv) {
  const vf d = vset1(decay);
  for (int64_t i = 0; i < dk; ++i) {
    float* s = S + i * dv;
    const vf ki = vset1(k[i]);
    for (int64_t j = 0; j < dv; j += VL) vstore(s + j, vfma(d, vload(s + j), vmul(ki, vload(delta + j))));
  }
}
#endif

// One value head of one sequence: state S [Dk, Dv] fp32 in place; q, k [Dk] and v [Dv] are the conv
// outputs (already rounded to T); writes the gated-normed output [Dv] (in T) to out.
template <typename T>
void head_step(float* S, const float* qin, const float* kin, const float* vin, float decay, float beta,
               const T* z, const T* norm_w, float eps, int64_t dk, int64_t dv, T* out) {
  constexpr int64_t MAX_D = 512;  // a stack buffer for the usual head sizes (128), the heap beyond
  float stack[2 * MAX_D + 3 * MAX_D];
  std::vector<float> heap;
  float* q = stack;
  if (dk > MAX_D || dv > MAX_D) {
    heap.resize(2 * dk + 3 * dv);
    q = heap.data();
  }
  float *k = q + dk, *rk = k + dk, *rq = rk + dv, *o = rq + dv;
  float qq = 0.f, kk = 0.f;
  for (int64_t i = 0; i < dk; ++i) qq += qin[i] * qin[i], kk += kin[i] * kin[i];
  const float qs = 1.f / std::sqrt(qq + 1e-6f) / std::sqrt(static_cast<float>(dk)), ks = 1.f / std::sqrt(kk + 1e-6f);
  float kq = 0.f;
  for (int64_t i = 0; i < dk; ++i) q[i] = qin[i] * qs, k[i] = kin[i] * ks, kq += k[i] * q[i];
#if defined(DELTARUN_GDN_VEC)
  const bool vec = dv % SLICE == 0;
#else
  const bool vec = false;
#endif
  if (vec) {
#if defined(DELTARUN_GDN_VEC)
    read_state(S, k, q, dk, dv, rk, rq);
#endif
  } else {
    for (int64_t j = 0; j < dv; ++j) rk[j] = rq[j] = 0.f;
    for (int64_t i = 0; i < dk; ++i) {  // Sᵀk and Sᵀq in one pass over S
      const float* s = S + i * dv;
      for (int64_t j = 0; j < dv; ++j) rk[j] = std::fma(s[j], k[i], rk[j]), rq[j] = std::fma(s[j], q[i], rq[j]);
    }
  }
  // δ = β (v − e^g·Sᵀk);  o = e^g·Sᵀq + (k·q) δ;  S ← e^g·S + k ⊗ δ
  for (int64_t j = 0; j < dv; ++j) {
    const float delta = beta * (vin[j] - decay * rk[j]);
    o[j] = rnd<T>(decay * rq[j] + kq * delta);
    rk[j] = delta;
  }
  if (vec) {
#if defined(DELTARUN_GDN_VEC)
    update_state(S, k, rk, decay, dk, dv);
#endif
  } else {
    for (int64_t i = 0; i < dk; ++i) {
      float* s = S + i * dv;
      for (int64_t j = 0; j < dv; ++j) s[j] = std::fma(decay, s[j], k[i] * rk[j]);
    }
  }
  float ss = 0.f;
  for (int64_t j = 0; j < dv; ++j) ss += o[j] * o[j];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(dv) + eps);
  for (int64_t j = 0; j < dv; ++j) {
    const float n = rnd<T>(static_cast<float>(norm_w[j]) * rnd<T>(o[j] * r));
    out[j] = static_cast<T>(n * silu(static_cast<float>(z[j])));
  }
}

template <typename T>
void decode(const at::Tensor& mixed, const at::Tensor& conv_pool, const at::Tensor& conv_w, const at::Tensor& a,
            const at::Tensor& b, const at::Tensor& A_log, const at::Tensor& dt_bias, const at::Tensor& rec_pool,
            const at::Tensor& slots, int64_t hk, const at::Tensor& z, const at::Tensor& norm_w, double eps,
            at::Tensor& out, float* snap) {
  const int64_t B = mixed.size(0), C = mixed.size(1), K = conv_w.size(1);
  const int64_t hv = rec_pool.size(1), dk = rec_pool.size(2), dv = rec_pool.size(3), key_dim = hk * dk;
  const T* X = mixed.data_ptr<T>();
  T* CS = conv_pool.data_ptr<T>();
  const T* W = conv_w.data_ptr<T>();
  const int64_t* SL = slots.data_ptr<int64_t>();
  at::Tensor qkv = at::empty({B, C}, mixed.options().dtype(at::kFloat));
  float* Q = qkv.data_ptr<float>();
  // conv1d over the window [state (K−1) | new input], rounded to T as the reference; the state shifts. A row's
  // channels at a time (no division per channel), the 4-tap kernel of Qwen3.5 unrolled (the generic loop moved
  // each state with a memmove call).
  at::parallel_for(0, B * C, 2048, [&](int64_t s, int64_t e) {
    for (int64_t bc = s; bc < e;) {
      const int64_t bi = bc / C, c0 = bc % C, c1 = std::min(C, c0 + (e - bc));
      T* st = CS + SL[bi] * C * (K - 1);
      const T* x = X + bi * C;
      float* q = Q + bi * C;
      if (K == 4) {
        for (int64_t c = c0; c < c1; ++c) {
          T* sc = st + c * 3;
          const T* w = W + c * 4;
          float y = static_cast<float>(x[c]) * static_cast<float>(w[3]);
          y += static_cast<float>(sc[0]) * static_cast<float>(w[0]);
          y += static_cast<float>(sc[1]) * static_cast<float>(w[1]);
          y += static_cast<float>(sc[2]) * static_cast<float>(w[2]);
          sc[0] = sc[1], sc[1] = sc[2], sc[2] = x[c];
          q[c] = y;
        }
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          T* sc = st + c * (K - 1);
          const T* w = W + c * K;
          float y = static_cast<float>(x[c]) * static_cast<float>(w[K - 1]);
          for (int64_t t = 0; t < K - 1; ++t) y += static_cast<float>(sc[t]) * static_cast<float>(w[t]);
          for (int64_t t = 0; t + 1 < K - 1; ++t) sc[t] = sc[t + 1];
          if (K > 1) sc[K - 2] = x[c];
          q[c] = y;
        }
      }
      bc += c1 - c0;
    }
  });
  // SiLU as the reference takes it: torch's own vectorized kernel on the fp32 sums (a scalar exp per channel was
  // most of this op: ~1.4 ms of a 16-row step's 18 layers), then rounded to T
  at::silu_(qkv);
  if (!std::is_same_v<T, float>) round_bf16_(Q, B * C);
  const float* AL = A_log.data_ptr<float>();
  const float* DT = dt_bias.data_ptr<float>();
  const float* Aa = a.data_ptr<float>();
  const float* Bb = b.data_ptr<float>();
  float* R = rec_pool.data_ptr<float>();
  const T* Z = z.data_ptr<T>();
  const T* NW = norm_w.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t rep = hv / hk;
  at::parallel_for(0, B * hv, 1, [&](int64_t s, int64_t e) {
    for (int64_t bh = s; bh < e; ++bh) {
      const int64_t bi = bh / hv, h = bh % hv, kh = h / rep;
      const float* row = Q + bi * C;
      const float g = -std::exp(AL[h]) * softplus(Aa[bh] + DT[h]);
      const float beta = 1.f / (1.f + std::exp(-Bb[bh]));
      float* S = R + (SL[bi] * hv + h) * dk * dv;
      head_step<T>(S, row + kh * dk, row + key_dim + kh * dk, row + 2 * key_dim + h * dv, std::exp(g), beta,
                   Z + bh * dv, NW, static_cast<float>(eps), dk, dv, O + bh * dv);
      if (snap) std::memcpy(snap + bh * dk * dv, S, sizeof(float) * dk * dv);  // still in cache: a write only
    }
  });
}

}  // namespace

// mixed [B, C] (in_proj_qkv output; bf16 or fp32), conv_pool [S, C, K−1] (same dtype, updated in place),
// conv_w [C, K], a / b [B, Hv] fp32 (in_proj_a / in_proj_b outputs), A_log / dt_bias [Hv] fp32,
// rec_pool [S, Hv, Dk, Dv] fp32 (updated in place), slots [B] int64, hk = q/k heads,
// z [B, Hv·Dv], norm_w [Dv], eps → o [B, Hv·Dv] in mixed's dtype (gated-normed, ready for out_proj).
// snap, when given: [B, Hv, Dk, Dv] fp32 receives a copy of each row's new state (speculative verify).
at::Tensor gdn_decode_(const at::Tensor& mixed, const at::Tensor& conv_pool, const at::Tensor& conv_w,
                       const at::Tensor& a, const at::Tensor& b, const at::Tensor& A_log, const at::Tensor& dt_bias,
                       const at::Tensor& rec_pool, const at::Tensor& slots, int64_t hk, const at::Tensor& z,
                       const at::Tensor& norm_w, double eps, const std::optional<at::Tensor>& snap) {
  const auto dt = mixed.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "gdn_decode_: fp32 or bf16");
  for (const at::Tensor* t : {&mixed, &conv_pool, &conv_w, &z, &norm_w})
    TORCH_CHECK(t->scalar_type() == dt && t->is_contiguous() && t->device().is_cpu(), "gdn_decode_: dtype/layout");
  for (const at::Tensor* t : {&a, &b, &A_log, &dt_bias, &rec_pool})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "gdn_decode_: fp32 gates and state");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "gdn_decode_: int64 slots");
  const int64_t B = mixed.size(0), hv = rec_pool.size(1), dk = rec_pool.size(2), dv = rec_pool.size(3);
  TORCH_CHECK(mixed.dim() == 2 && conv_pool.size(1) == mixed.size(1) && conv_w.size(0) == mixed.size(1) &&
              conv_pool.size(2) == conv_w.size(1) - 1 && hk > 0 && hv % hk == 0 &&
              mixed.size(1) == 2 * hk * dk + hv * dv && a.numel() == B * hv && b.numel() == B * hv &&
              z.numel() == B * hv * dv && norm_w.numel() == dv && slots.numel() == B, "gdn_decode_: shapes");
  float* sn = nullptr;
  if (snap.has_value()) {
    TORCH_CHECK(snap->scalar_type() == at::kFloat && snap->is_contiguous() && snap->numel() == B * hv * dk * dv,
                "gdn_decode_: snap must be a contiguous fp32 [B, Hv, Dk, Dv]");
    sn = snap->data_ptr<float>();
  }
  at::Tensor out = at::empty({B, hv * dv}, mixed.options());
  if (dt == at::kFloat)
    decode<float>(mixed, conv_pool, conv_w, a, b, A_log, dt_bias, rec_pool, slots, hk, z, norm_w, eps, out, sn);
  else
    decode<at::BFloat16>(mixed, conv_pool, conv_w, a, b, A_log, dt_bias, rec_pool, slots, hk, z, norm_w, eps, out, sn);
  return out;
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("gdn_decode_(Tensor mixed, Tensor(a!) conv_pool, Tensor conv_w, Tensor a, Tensor b, Tensor A_log, "
        "Tensor dt_bias, Tensor(b!) rec_pool, Tensor slots, int hk, Tensor z, Tensor norm_w, float eps, "
        "Tensor(c!)? snap=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) { m.impl("gdn_decode_", &gdn_decode_); }
