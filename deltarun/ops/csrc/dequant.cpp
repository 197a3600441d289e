// Prefill-side dequantization on the CPU: a range of rows of an int8 or int4 weight to fp32 in one pass,
// for the fp32 (or bf16) GEMM that multiplies a prefill chunk by them. The torch expression it replaces
// (ops/quant.py `QuantLinear.row_block`'s reference path) takes 6–8 passes over fp32 temporaries: with a
// 512-token chunk that was ~15% of an int4 prefill. Same arithmetic, element for element: int8 float(q)·s,
// int4 (q − 8)·scale + zero in fp32 (tests/test_quant.py compares bit for bit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace {

// Where torch's byte (k, j) of a row block sits in the column-pair order of the AVX2 kernel (`pairs`,
// gemv_avx2.h): byte 16L + 2i + c of the 32 of columns (k − c, k − c + 1), for j = 8L + i, c = k mod 2.
inline int64_t byte_at(int64_t k, int64_t j, int64_t h, bool pairs) {
  return pairs ? (k - (k & 1)) * h + (j >> 3) * 16 + (j & 7) * 2 + (k & 1) : k * h + j;
}

template <typename T>
void int4_rows(const uint8_t* P, const T* SZ, int64_t g, int64_t block, int64_t K, int64_t N, int64_t start,
               int64_t end, bool pairs, float* O) {
  const int64_t h = block / 2;
  at::parallel_for(start / block, end / block, 1, [&](int64_t a, int64_t b) {
    for (int64_t bb = a; bb < b; ++bb) {
      const uint8_t* pb = P + bb * K * h;
      for (int64_t j = 0; j < block; ++j) {  // one output row at a time: sequential writes
        const int64_t n = bb * block + j, shift = j < h ? 0 : 4, col = j % h;
        float* o = O + (n - start) * K;
        for (int64_t gi = 0; gi < K / g; ++gi) {
          const T* pair = SZ + (gi * N + n) * 2;  // (scale, zero)
          const float scale = static_cast<float>(pair[0]), zero = static_cast<float>(pair[1]);
          for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
            const float t = static_cast<float>(((pb[byte_at(k, col, h, pairs)] >> shift) & 15) - 8) * scale;  // rounded,
            o[k] = t + zero;  // then the add: as torch
          }
        }
      }
    }
  });
}

}  // namespace

// q [N, K] int8, scales [N] (any float dtype) → rows start … end−1 as fp32 [end−start, K]
at::Tensor dequant_int8_rows(const at::Tensor& q, const at::Tensor& scales, int64_t start, int64_t end) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous() && q.device().is_cpu(),
              "dequant_int8_rows: q [N, K] int8");
  TORCH_CHECK(0 <= start && start <= end && end <= q.size(0) && scales.numel() == q.size(0),
              "dequant_int8_rows: rows out of range");
  const int64_t K = q.size(1);
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({end - start, K}, q.options().dtype(at::kFloat));
  const int8_t* Q = q.data_ptr<int8_t>();
  const float* S = s.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(start, end, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const int8_t* qr = Q + n * K;
      float* o = O + (n - start) * K;
      for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(qr[k]) * S[n];
    }
  });
  return out;
}

// packed [N/B, K, B/2] uint8 in torch's CPU int4 layout (row bb·B + j in the low nibble of byte (bb, k, j),
// row bb·B + B/2 + j in the high one), sz [K/g, N, 2] bf16/fp32 (scale, zero) → rows start … end−1 (multiples
// of B) as fp32 [end−start, K]; pairs: the bytes of each column pair are in the AVX2 kernel's order (B = 32)
at::Tensor dequant_int4_rows(const at::Tensor& packed, const at::Tensor& sz, int64_t g, int64_t block, int64_t start,
                             int64_t end, bool pairs) {
  TORCH_CHECK((sz.scalar_type() == at::kBFloat16 || sz.scalar_type() == at::kFloat) && sz.dim() == 3 &&
              sz.size(2) == 2 && sz.is_contiguous() && g > 0, "dequant_int4_rows: sz [K/g, N, 2] bf16 or fp32");
  const int64_t K = sz.size(0) * g, N = sz.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && block > 0 && block % 2 == 0 &&
              packed.numel() * 2 == N * K && N % block == 0, "dequant_int4_rows: packed [N/B, K, B/2] uint8");
  TORCH_CHECK(0 <= start && start <= end && end <= N && start % block == 0 && end % block == 0,
              "dequant_int4_rows: rows must be whole blocks");
  TORCH_CHECK(!pairs || (block == 32 && K % 2 == 0), "dequant_int4_rows: column pairs are a 32-row layout");
  at::Tensor out = at::empty({end - start, K}, sz.options().dtype(at::kFloat));
  const uint8_t* P = packed.data_ptr<uint8_t>();
  if (sz.scalar_type() == at::kFloat)
    int4_rows(P, sz.data_ptr<float>(), g, block, K, N, start, end, pairs, out.data_ptr<float>());
  else
    int4_rows(P, sz.data_ptr<at::BFloat16>(), g, block, K, N, start, end, pairs, out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("dequant_int8_rows(Tensor q, Tensor scales, int start, int end) -> Tensor");
  m.def("dequant_int4_rows(Tensor packed, Tensor sz, int group, int block, int start, int end, bool pairs=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("dequant_int8_rows", &dequant_int8_rows);
  m.impl("dequant_int4_rows", &dequant_int4_rows);
}
