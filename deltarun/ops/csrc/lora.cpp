// LoRA's expand for a decode step's few rows (ops/lora.py `SlotDelta`, csrc/layer.cpp `lin`): the delta
// y [M, N] = (t ⊙ mask) [M, K] · bt [K, N], where t = x · Aᵀ over the stacked adapter slots (K = slots × rank,
// a few dozen) and the 0/1 mask keeps each row's own slot. A GEMV kernel over bt's N rows of K would end every
// output in a horizontal sum (slower than the product itself at K = 64); here each k adds a scaled row of bt to
// every row's accumulators, vectorized along N by the compiler, and a (row, k) the mask zeroes is skipped, so a
// row pays for its own adapter's rank only. Plain C++: the same source for every CPU level. Reference: the
// torch expression in `SlotDelta` (tests/test_lora_kernel.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ops.h"

namespace {

constexpr int64_t MAX_ROWS = 16;
constexpr int64_t NB = 256;       // output columns per block: 16 accumulator rows of 1 KB stay in L1
constexpr int64_t GRAIN = 2048;   // columns per parallel task: narrower outputs run on the calling thread

inline float widen(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t round_bf16(float f) {  // to nearest even, as Tensor.to(torch.bfloat16); branch-free: vectorizes
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t nearest = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;  // NaN stays NaN
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : nearest);
}

}  // namespace

// t [M ≤ 16, K] fp32, mask [M, K] fp32, bt [K, N] bf16 or fp32 (contiguous) → [M, N] in bt's dtype (fp32 sums,
// rounded once)
at::Tensor lora_expand(const at::Tensor& t_in, const at::Tensor& mask_in, const at::Tensor& bt) {
  TORCH_CHECK(t_in.dim() == 2 && bt.dim() == 2 && t_in.size(1) == bt.size(0) && t_in.size(0) <= MAX_ROWS,
              "lora_expand: t [M ≤ 16, K] and bt [K, N]");
  TORCH_CHECK(mask_in.sizes() == t_in.sizes(), "lora_expand: mask [M, K] like t");
  TORCH_CHECK(bt.is_contiguous() && (bt.scalar_type() == at::kBFloat16 || bt.scalar_type() == at::kFloat),
              "lora_expand: contiguous bf16 or fp32 bt");
  const at::Tensor t = t_in.to(at::kFloat).contiguous(), mask = mask_in.to(at::kFloat).contiguous();
  const int64_t M = t.size(0), K = t.size(1), N = bt.size(1);
  at::Tensor out = at::empty({M, N}, bt.options());
  const float *T = t.data_ptr<float>(), *Mk = mask.data_ptr<float>();
  const bool half = bt.scalar_type() == at::kBFloat16;
  const auto* B16 = half ? reinterpret_cast<const uint16_t*>(bt.data_ptr()) : nullptr;
  const float* B32 = half ? nullptr : bt.data_ptr<float>();
  auto* O16 = half ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
  float* O32 = half ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t a, int64_t b) {
    float acc[MAX_ROWS][NB], w[NB], s[MAX_ROWS];
    for (int64_t n0 = a; n0 < b; n0 += NB) {
      const int64_t nb = std::min(NB, b - n0);
      for (int64_t m = 0; m < M; ++m) std::fill(acc[m], acc[m] + nb, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        bool any = false;
        for (int64_t m = 0; m < M; ++m) any |= (s[m] = T[m * K + k] * Mk[m * K + k]) != 0.f;
        if (!any) continue;  // a slot no row of this step uses
        if (half) {
          const uint16_t* r = B16 + k * N + n0;
          for (int64_t j = 0; j < nb; ++j) w[j] = widen(r[j]);
        } else {
          std::memcpy(w, B32 + k * N + n0, nb * sizeof(float));
        }
        for (int64_t m = 0; m < M; ++m) {
          if (s[m] == 0.f) continue;
          float* am = acc[m];
          const float sm = s[m];
          for (int64_t j = 0; j < nb; ++j) am[j] += sm * w[j];
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        if (half) {
          for (int64_t j = 0; j < nb; ++j) O16[m * N + n0 + j] = round_bf16(acc[m][j]);
        } else {
          std::memcpy(O32 + m * N + n0, acc[m], nb * sizeof(float));
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) { m.def("lora_expand(Tensor t, Tensor mask, Tensor bt) -> Tensor"); }

TORCH_LIBRARY_IMPL(deltarun, CPU, m) { m.impl("lora_expand", &lora_expand); }
