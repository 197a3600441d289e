// The chunked gated delta rule (a prompt's Gated DeltaNet recurrence) on the CPU, one task per (sequence, value
// head): the same UT-transform algorithm as ops/gdn.py `chunk_gated_delta_rule`, but each head's chunks run in
// thread-local buffers through small register-blocked fp32 matmuls — torch's version spends most of its time
// allocating and walking [B, H, n, 64, 128] temporaries and in batched matmuls of 64×128 operands.
// Per chunk of C = 64 positions (zero-padded at the end), gc = cumulative log decay, e = exp(gc):
//   A[i, j] = β_i (k_i·k_j) e^(gc_i − gc_j), j < i;  [U | W] = (I + A)⁻¹ [β v | β e^gc k] (forward substitution)
//   v'_i = U_i − W_i S;  o_i = e^gc_i q_i S + Σ_{j≤i} (q_i·k_j) e^(gc_i − gc_j) v'_j;  S ← e^gc_C S + Σ_j e^(gc_C − gc_j) k_j ⊗ v'_j
// q, k L2-normalised (q also by 1/√Dk), as `_prepare`. fp32 throughout; o rounded once to v's dtype.
// Reference: ops/gdn.py `recurrent_gated_delta_rule` (tests/test_gdn_ops.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t CH = 64;  // chunk length

// C[M, N] (+)= A[M, K] · B[K, N], row-major with leading dimensions; 4 × 16 register tiles where AVX2 allows.
void mm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
        int64_t ldc, bool acc) {
  int64_t n0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; n0 + 16 <= N; n0 += 16) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      __m256 c[4][2];
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h)
          c[r][h] = acc ? _mm256_loadu_ps(C + (m + r) * ldc + n0 + 8 * h) : _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb + n0), b1 = _mm256_loadu_ps(B + k * ldb + n0 + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 a = _mm256_broadcast_ss(A + (m + r) * lda + k);
          c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
          c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(C + (m + r) * ldc + n0 + 8 * h, c[r][h]);
    }
    for (; m < M; ++m)
      for (int64_t n = n0; n < n0 + 16; ++n) {
        float s = acc ? C[m * ldc + n] : 0.f;
        for (int64_t k = 0; k < K; ++k) s += A[m * lda + k] * B[k * ldb + n];
        C[m * ldc + n] = s;
      }
  }
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < N; ++n) {
      float s = acc ? C[m * ldc + n] : 0.f;
      for (int64_t k = 0; k < K; ++k) s += A[m * lda + k] * B[k * ldb + n];
      C[m * ldc + n] = s;
    }
}

// Forward substitution, rows in place: X_i ← X_i − Σ_{j<i} A_ij X_j for i = 0 … M−1 (X [M, R], A [M, lda]), each
// row's 64-column blocks accumulated in registers (one store per block, not one per j; eight independent FMA
// chains, enough to cover the FMA latency).
void forward_subst(int64_t M, int64_t R, const float* A, int64_t lda, float* X) {
  int64_t c0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; c0 + 64 <= R; c0 += 64)
    for (int64_t i = 1; i < M; ++i) {
      float* x = X + i * R + c0;
      __m256 acc[8];
      for (int h = 0; h < 8; ++h) acc[h] = _mm256_loadu_ps(x + 8 * h);
      for (int64_t j = 0; j < i; ++j) {
        const __m256 a = _mm256_set1_ps(-A[i * lda + j]);
        const float* xj = X + j * R + c0;
        for (int h = 0; h < 8; ++h) acc[h] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xj + 8 * h), acc[h]);
      }
      for (int h = 0; h < 8; ++h) _mm256_storeu_ps(x + 8 * h, acc[h]);
    }
#endif
  for (int64_t i = 1; i < M; ++i)
    for (int64_t j = 0; j < i; ++j)
      for (int64_t c = c0; c < R; ++c) X[i * R + c] -= A[i * lda + j] * X[j * R + c];
}

template <typename T>
void load_normalized(const T* src, int64_t stride, int64_t T_, int64_t D, float scale, bool norm, float* dst) {
  for (int64_t t = 0; t < T_; ++t) {
    float* d = dst + t * D;
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) d[i] = static_cast<float>(src[t * stride + i]), ss += d[i] * d[i];
    const float r = norm ? scale / std::sqrt(ss + 1e-6f) : 1.f;
    for (int64_t i = 0; i < D; ++i) d[i] *= r;
  }
}

// One (sequence, value head): q, k [Tp, Dk] and v [Tp, Dv] already fp32 (normalised, zero past T), g and β [Tp];
// S [Dk, Dv] in place; o [Tp, Dv].
void head(const float* q, const float* k, const float* v, const float* g, const float* beta, int64_t Tp, int64_t Dk,
          int64_t Dv, float* S, float* o) {
  const int64_t R = Dv + Dk;
  std::vector<float> gc(CH), e(CH), qk(2 * CH * CH), X(CH * R), kT(Dk * CH), vn(CH * Dv), kb(CH * Dk), QW(2 * CH * Dk),
      QS(2 * CH * Dv);
  float* A = qk.data();         // rows 0…C−1: β_i k_i·k_j → A;  rows C…2C−1: q_i·k_j → intra
  float* I = qk.data() + CH * CH;
  for (int64_t c0 = 0; c0 < Tp; c0 += CH) {
    const float *qc = q + c0 * Dk, *kc = k + c0 * Dk, *vc = v + c0 * Dv;
    float acc = 0.f;
    for (int64_t i = 0; i < CH; ++i) acc += g[c0 + i], gc[i] = acc, e[i] = std::exp(acc);
    for (int64_t i = 0; i < CH; ++i)
      for (int64_t d = 0; d < Dk; ++d) kT[d * CH + i] = kc[i * Dk + d], kb[i * Dk + d] = beta[c0 + i] * kc[i * Dk + d];
    // [kβ; q] · kᵀ in one product, then the decay mask
    for (int64_t i = 0; i < CH; ++i)
      for (int64_t d = 0; d < Dk; ++d) QW[i * Dk + d] = kb[i * Dk + d], QW[(CH + i) * Dk + d] = qc[i * Dk + d];
    mm(2 * CH, CH, Dk, QW.data(), Dk, kT.data(), CH, qk.data(), CH, false);
    for (int64_t i = 0; i < CH; ++i)
      for (int64_t j = 0; j < CH; ++j) {
        const float dec = j <= i ? std::exp(gc[i] - gc[j]) : 0.f;
        A[i * CH + j] = j < i ? A[i * CH + j] * dec : 0.f;
        I[i * CH + j] *= dec;
      }
    // [U | W] by forward substitution: X_i = [β v_i | β e_i k_i] − Σ_{j<i} A_ij X_j
    for (int64_t i = 0; i < CH; ++i) {
      float* x = X.data() + i * R;
      for (int64_t d = 0; d < Dv; ++d) x[d] = beta[c0 + i] * vc[i * Dv + d];
      for (int64_t d = 0; d < Dk; ++d) x[Dv + d] = e[i] * kb[i * Dk + d];
    }
    forward_subst(CH, R, A, CH, X.data());
    // [W; e·q] · S in one product: v' = U − W S, o = e q S + intra · v'
    for (int64_t i = 0; i < CH; ++i)
      for (int64_t d = 0; d < Dk; ++d) QW[i * Dk + d] = X[i * R + Dv + d], QW[(CH + i) * Dk + d] = e[i] * qc[i * Dk + d];
    mm(2 * CH, Dv, Dk, QW.data(), Dk, S, Dv, QS.data(), Dv, false);
    for (int64_t i = 0; i < CH; ++i)
      for (int64_t d = 0; d < Dv; ++d) vn[i * Dv + d] = X[i * R + d] - QS[i * Dv + d];
    float* oc = o + c0 * Dv;
    for (int64_t i = 0; i < CH; ++i)
      for (int64_t d = 0; d < Dv; ++d) oc[i * Dv + d] = QS[(CH + i) * Dv + d];
    mm(CH, Dv, CH, I, CH, vn.data(), Dv, oc, Dv, true);
    // S ← e_C S + (e_C / e_j · k_j)ᵀ v'
    const float last = gc[CH - 1];
    for (int64_t j = 0; j < CH; ++j) e[j] = std::exp(last - gc[j]);  // e is free again
    for (int64_t d = 0; d < Dk; ++d)
      for (int64_t j = 0; j < CH; ++j) kT[d * CH + j] *= e[j];
    const float ec = std::exp(last);
    for (int64_t i = 0; i < Dk * Dv; ++i) S[i] *= ec;
    mm(Dk, Dv, CH, kT.data(), CH, vn.data(), Dv, S, Dv, true);
  }
}

}  // namespace

// q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] (same float dtype), g, beta [B, T, Hv], state [B, Hv, Dk, Dv] (read only)
// → (o [B, T, Hv, Dv] in v's dtype, new state [B, Hv, Dk, Dv] fp32). Hv a multiple of Hk: q/k head h·Hk/Hv.
std::tuple<at::Tensor, at::Tensor> gdn_chunk_prefill(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const at::Tensor& g_in,
                                                     const at::Tensor& beta_in, const at::Tensor& state_in) {
  TORCH_CHECK(q_in.device().is_cpu() && q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.dim() == 4,
              "gdn_chunk_prefill: CPU q, k [B, T, Hk, Dk], v [B, T, Hv, Dv]");
  const int64_t B = q_in.size(0), T = q_in.size(1), Hk = q_in.size(2), Dk = q_in.size(3);
  const int64_t Hv = v_in.size(2), Dv = v_in.size(3);
  TORCH_CHECK(v_in.size(0) == B && v_in.size(1) == T && Hv % Hk == 0, "gdn_chunk_prefill: v [B, T, Hv, Dv]");
  TORCH_CHECK(q_in.scalar_type() == v_in.scalar_type() && k_in.scalar_type() == v_in.scalar_type(),
              "gdn_chunk_prefill: q, k, v of one dtype");
  const at::Tensor g = g_in.to(at::kFloat).contiguous(), beta = beta_in.to(at::kFloat).contiguous();
  TORCH_CHECK(g.sizes() == beta.sizes() && g.dim() == 3 && g.size(0) == B && g.size(1) == T && g.size(2) == Hv,
              "gdn_chunk_prefill: g, beta [B, T, Hv]");
  TORCH_CHECK(state_in.dim() == 4 && state_in.size(0) == B && state_in.size(1) == Hv && state_in.size(2) == Dk &&
              state_in.size(3) == Dv, "gdn_chunk_prefill: state [B, Hv, Dk, Dv]");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor state = state_in.to(at::kFloat).clone(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({B, T, Hv, Dv}, v.options());
  const int64_t Tp = (T + CH - 1) / CH * CH;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "gdn_chunk_prefill", [&] {
    const scalar_t *Q = q.data_ptr<scalar_t>(), *K = k.data_ptr<scalar_t>(), *V = v.data_ptr<scalar_t>();
    const float *G = g.data_ptr<float>(), *BT = beta.data_ptr<float>();
    float* S = state.data_ptr<float>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hv, 1, [&](int64_t a, int64_t z) {
      std::vector<float> qf(Tp * Dk, 0.f), kf(Tp * Dk, 0.f), vf(Tp * Dv, 0.f), gf(Tp, 0.f), bf(Tp, 0.f), of(Tp * Dv);
      for (int64_t task = a; task < z; ++task) {
        const int64_t b = task / Hv, h = task % Hv, hk = h / (Hv / Hk);
        load_normalized(Q + (b * T * Hk + hk) * Dk, Hk * Dk, T, Dk, 1.f / std::sqrt(static_cast<float>(Dk)), true, qf.data());
        load_normalized(K + (b * T * Hk + hk) * Dk, Hk * Dk, T, Dk, 1.f, true, kf.data());
        load_normalized(V + (b * T * Hv + h) * Dv, Hv * Dv, T, Dv, 1.f, false, vf.data());
        for (int64_t t = 0; t < T; ++t) gf[t] = G[(b * T + t) * Hv + h], bf[t] = BT[(b * T + t) * Hv + h];
        head(qf.data(), kf.data(), vf.data(), gf.data(), bf.data(), Tp, Dk, Dv, S + task * Dk * Dv, of.data());
        for (int64_t t = 0; t < T; ++t)
          for (int64_t d = 0; d < Dv; ++d) O[((b * T + t) * Hv + h) * Dv + d] = static_cast<scalar_t>(of[t * Dv + d]);
      }
    });
  });
  return {out, state};
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("gdn_chunk_prefill(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) { m.impl("gdn_chunk_prefill", &gdn_chunk_prefill); }
