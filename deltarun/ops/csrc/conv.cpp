// Causal depthwise conv1d + SiLU over a prompt on the CPU (the short convolution in front of Gated DeltaNet),
// in the activations' own [B, T, C] layout: torch's route (ops/conv1d.py) transposes to [B, C, T], widens to
// fp32 and makes K + 3 passes over a [C, T + K − 1] window — ~20 ms a layer at C = 6,144, T = 512, for 12 M
// multiply-adds. Here one pass: each output is Σᵢ w[c, i]·x[t − K + 1 + i, c] in fp32 (i ascending, as the
// reference sums), SiLU, rounded once to x's dtype; positions before the prompt read the carried state.
// Not here: the decode step (gdn.cpp). Reference: ops/conv1d.py `causal_conv1d_reference` (tests/test_gdn_ops.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "gemv_kernels.h"
#include "gemv_avx2.h"

namespace {

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

#if defined(__AVX2__) && defined(__FMA__)
// e^x for 8 floats, within ~2 ulp: 2^n · e^r with n = round(x·log2 e), r = x − n·ln 2 (two-part ln 2, |r| ≤ 0.35),
// e^r by its degree-6 Taylor polynomial (truncation < r⁷/7! ≈ 1.3e-7 relative). Inputs clamped to ±87.3, where
// e^x is still a normal float (SiLU's −v saturates there anyway: v / (1 + e^87) is 0 to fp32 precision).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 = 0.693359375 − 2.12194440e-4
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) { return bf16x8(reinterpret_cast<const uint16_t*>(p)); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16x8_round(v)); }
template <typename T> constexpr bool vec8 = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
#endif

// Input position j of channel c: x's row j, or for j < 0 the state's column K − 1 + j.
template <typename T>
inline T tap(const T* x, const T* state, int64_t j, int64_t C, int64_t K, int64_t c) {
  return j >= 0 ? x[j * C + c] : state[c * (K - 1) + K - 1 + j];
}

template <typename T>
void conv_rows(const T* x, const T* state, const float* wt, int64_t t0, int64_t t1, int64_t C, int64_t K, T* y) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (vec8<T>) {
      if (t >= K - 1)  // the whole window inside the prompt: 8 channels a step
        for (; c + 8 <= C; c += 8) {
          __m256 acc = _mm256_mul_ps(load8(x + (t - K + 1) * C + c), _mm256_loadu_ps(wt + c));
          for (int64_t i = 1; i < K; ++i)  // separate multiply and add: the reference's addcmul rounding
            acc = _mm256_add_ps(acc, _mm256_mul_ps(load8(x + (t - K + 1 + i) * C + c), _mm256_loadu_ps(wt + i * C + c)));
          const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), acc));
          store8(y + t * C + c, _mm256_div_ps(acc, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
        }
    }
#endif
    for (; c < C; ++c) {
      float acc = 0.f;
      for (int64_t i = 0; i < K; ++i) {
        const float v = static_cast<float>(tap(x, state, t - (K - 1) + i, C, K, c));
        acc = i ? acc + v * wt[i * C + c] : v * wt[c];
      }
      y[t * C + c] = static_cast<T>(silu(acc));
    }
  }
}

}  // namespace

// x [B, T, C] (bf16/fp16/fp32), weight [C, K], state [B, C, K − 1] (any float dtype, rounded to x's first, as
// the reference's window) → (silu(conv(x)) [B, T, C] in x's dtype, new state [B, C, K − 1] in x's dtype: the
// last K − 1 inputs, older state columns where T < K − 1)
std::tuple<at::Tensor, at::Tensor> causal_conv1d_silu(const at::Tensor& x_in, const at::Tensor& weight,
                                                      const at::Tensor& state_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 3, "causal_conv1d_silu: CPU x [B, T, C]");
  const int64_t B = x_in.size(0), T = x_in.size(1), C = x_in.size(2), K = weight.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && K >= 1, "causal_conv1d_silu: weight [C, K]");
  TORCH_CHECK(state_in.dim() == 3 && state_in.size(0) == B && state_in.size(1) == C && state_in.size(2) == K - 1,
              "causal_conv1d_silu: state [B, C, K - 1]");
  const at::Tensor x = x_in.contiguous(), state = state_in.to(x.scalar_type()).contiguous();
  const at::Tensor wt = weight.to(at::kFloat).t().contiguous();  // [K, C]: a tap's weights along the channels
  at::Tensor y = at::empty_like(x);
  at::Tensor new_state = at::empty_like(state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_conv1d_silu", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *S = state.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    const float* W = wt.data_ptr<float>();
    scalar_t* NS = new_state.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)  // window [state | x] position T + i, for the K − 1 newest
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < K - 1; ++i) {
          const int64_t p = T + i;
          NS[(b * C + c) * (K - 1) + i] = p < K - 1 ? S[(b * C + c) * (K - 1) + p] : X[(b * T + p - (K - 1)) * C + c];
        }
    for (int64_t b = 0; b < B; ++b)
      at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
        conv_rows<scalar_t>(X + b * T * C, S + b * C * (K - 1), W, t0, t1, C, K, Y + b * T * C);
      });
  });
  return {y, new_state};
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("causal_conv1d_silu(Tensor x, Tensor weight, Tensor state) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) { m.impl("causal_conv1d_silu", &causal_conv1d_silu); }
