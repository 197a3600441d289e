// Prefill-side dequantization on the CPU: a range of rows of an int8 or int4 weight to fp32 in one pass,
// and the load-time repack of stored int4 bytes into the layout the int4 kernels read.
// for the fp32 (or bf16) GEMM that multiplies a prefill chunk by them. The torch expression it replaces
// (ops/quant.py `QuantLinear.row_block`'s reference path) takes 6–8 passes over fp32 temporaries: with a
// 512-token chunk that was ~15% of an int4 prefill. Same arithmetic, element for element: int8 float(q)·s,
// int4 (q − 8)·scale + zero in fp32 (tests/test_quant.py compares bit for bit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

// Where torch's byte (k, j) of a row block sits in the block's byte order (gemv.cpp `int4_order`): 0 as torch; 1 the
// AVX2 kernel's column pairs (gemv_avx2.h): byte 16L + 2i + c of the 32 of columns (k − c, k − c + 1), for
// j = 8L + i, c = k mod 2; 2 the AVX-512 quads (gemv_kernels.h, h = 32): byte 64·(j / 16) + 4·(j mod 16) + c
// of the 128 of columns k − c … k − c + 3, c = k mod 4.
inline int64_t byte_at(int64_t k, int64_t j, int64_t h, int64_t order) {
  if (order == 1) return (k - (k & 1)) * h + (j >> 3) * 16 + (j & 7) * 2 + (k & 1);
  if (order == 2) return (k >> 2) * 128 + (j >> 4) * 64 + (j & 15) * 4 + (k & 3);
  return k * h + j;
}

template <typename T>
void int4_rows(const uint8_t* P, const T* SZ, int64_t g, int64_t block, int64_t K, int64_t N, int64_t start,
               int64_t end, int64_t order, float* O) {
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
            const float t = static_cast<float>(((pb[byte_at(k, col, h, order)] >> shift) & 15) - 8) * scale;  // rounded,
            o[k] = t + zero;  // then the add: as torch
          }
        }
      }
    }
  });
}

// Stored bytes c of rows j (low nibble) and h + j (high nibble) of a row block, written to torch's CPU layout
// (bytes of columns 2c and 2c + 1) in the block order `order` (byte_at). The plain version of `repack_tile`.
inline void repack_scalar(const uint8_t* P, uint8_t* ob, int64_t half, int64_t h, int64_t c_from, int64_t order) {
  for (int64_t j = 0; j < h; ++j) {
    const uint8_t* lo = P + j * half;
    const uint8_t* hi = P + (h + j) * half;
    for (int64_t c = c_from; c < half; ++c) {
      ob[byte_at(2 * c, j, h, order)] = static_cast<uint8_t>((lo[c] & 15) | (hi[c] << 4));
      ob[byte_at(2 * c + 1, j, h, order)] = static_cast<uint8_t>((lo[c] >> 4) | (hi[c] & 0xF0));
    }
  }
}

#if defined(__SSE2__)
// 16×16 bytes: r[i] holds row i on entry and column i on return (unpacks of 8, 16, 32 and 64 bits).
inline void transpose16(__m128i* r) {
  __m128i a[16], b[16], c[16];
  for (int i = 0; i < 8; ++i) {  // a[8h + i]: rows 2i, 2i + 1; 16-bit unit u = column 8h + u
    a[i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    a[i + 8] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h)  // b[4q + i]: rows 4i … 4i + 3; 32-bit unit u = column 4q + u
    for (int i = 0; i < 4; ++i) {
      b[h * 8 + i] = _mm_unpacklo_epi16(a[h * 8 + 2 * i], a[h * 8 + 2 * i + 1]);
      b[h * 8 + 4 + i] = _mm_unpackhi_epi16(a[h * 8 + 2 * i], a[h * 8 + 2 * i + 1]);
    }
  for (int q = 0; q < 4; ++q)  // c[4q + 2i + s]: rows 8i … 8i + 7; 64-bit unit u = column 4q + 2s + u
    for (int i = 0; i < 2; ++i) {
      c[q * 4 + 2 * i] = _mm_unpacklo_epi32(b[q * 4 + 2 * i], b[q * 4 + 2 * i + 1]);
      c[q * 4 + 2 * i + 1] = _mm_unpackhi_epi32(b[q * 4 + 2 * i], b[q * 4 + 2 * i + 1]);
    }
  for (int q = 0; q < 4; ++q)
    for (int s = 0; s < 2; ++s) {
      r[q * 4 + 2 * s] = _mm_unpacklo_epi64(c[q * 4 + s], c[q * 4 + 2 + s]);
      r[q * 4 + 2 * s + 1] = _mm_unpackhi_epi64(c[q * 4 + s], c[q * 4 + 2 + s]);
    }
}

// `repack_scalar` for stored bytes c0 … c0 + 15 (columns 2c0 … 2c0 + 31) of a row block with h = 16 or 32:
// the nibbles are regrouped per row, then 16×16 transposes turn rows into the layout's columns.
inline void repack_tile(const uint8_t* P, uint8_t* ob, int64_t half, int64_t h, int64_t c0, int64_t order) {
  const __m128i low = _mm_set1_epi8(0x0F), high = _mm_set1_epi8(static_cast<char>(0xF0));
  __m128i cols[2][32];  // [columns 0–15 | 16–31 of the tile][row j]
  for (int64_t j = 0; j < h; ++j) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(P + j * half + c0));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(P + (h + j) * half + c0));
    const __m128i even = _mm_or_si128(_mm_and_si128(lo, low), _mm_and_si128(_mm_slli_epi16(hi, 4), high));
    const __m128i odd = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(lo, 4), low), _mm_and_si128(hi, high));
    cols[0][j] = _mm_unpacklo_epi8(even, odd);  // byte k: column 2c0 + k
    cols[1][j] = _mm_unpackhi_epi8(even, odd);  // column 2c0 + 16 + k
  }
  for (int half16 = 0; half16 < 2; ++half16)
    for (int64_t j0 = 0; j0 < h; j0 += 16) {
      __m128i* r = cols[half16] + j0;
      transpose16(r);  // r[k]: rows j0 … j0 + 15 of column 2c0 + 16·half16 + k
      if (order == 2) {  // h = 32: 4 columns' 16 rows interleaved into 16 lanes of 4 bytes
        uint8_t* dq = ob + (2 * c0 + 16 * half16) / 4 * 128 + (j0 / 16) * 64;
        for (int k = 0; k < 16; k += 4) {
          const __m128i a = _mm_unpacklo_epi8(r[k], r[k + 1]), b = _mm_unpackhi_epi8(r[k], r[k + 1]);
          const __m128i c = _mm_unpacklo_epi8(r[k + 2], r[k + 3]), d = _mm_unpackhi_epi8(r[k + 2], r[k + 3]);
          uint8_t* o = dq + (k / 4) * 128;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(a, c));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi16(a, c));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), _mm_unpacklo_epi16(b, d));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 48), _mm_unpackhi_epi16(b, d));
        }
        continue;
      }
      uint8_t* dst = ob + (2 * c0 + 16 * half16) * h + j0;
      for (int k = 0; k < 16; k += 2) {
        if (order == 1) {  // h = 16: a column pair's 32 bytes hold rows j < 8 interleaved, then rows j ≥ 8
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k * h), _mm_unpacklo_epi8(r[k], r[k + 1]));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k * h + 16), _mm_unpackhi_epi8(r[k], r[k + 1]));
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k * h), r[k]);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k + 1) * h), r[k + 1]);
        }
      }
    }
}
#endif

}  // namespace

// portable int4 bytes [N, K/2] (ops/quant.py `pack_int4`: column 2c in the low nibble of byte c) → torch's CPU
// layout [N/B, K, B/2] (returned as [N, K/2], as torch's packing op does), with each column pair in the AVX2
// kernel's order for `order` 1 (pairs) or 2 (quads). The reference is ops/int4_layout.py `cpu_layout_from_portable`
// (+ `int4_reorder`):
// ~8 torch ops over the weight, ~0.15 s for a 248K-row lm_head on a 2-core Zen 4, most of a saved int4
// folder's load. Here one read and one write, 16×16 byte transposes in SSE2 registers.
at::Tensor repack_int4(const at::Tensor& portable, int64_t block, int64_t order) {
  TORCH_CHECK(portable.device().is_cpu() && portable.scalar_type() == at::kByte && portable.dim() == 2 &&
              portable.is_contiguous(), "repack_int4: portable uint8 [N, K/2]");
  const int64_t N = portable.size(0), half = portable.size(1), K = half * 2, h = block / 2;
  TORCH_CHECK(block > 0 && block % 2 == 0 && N % block == 0, "repack_int4: N must be a multiple of the block");
  TORCH_CHECK(order >= 0 && order <= 2, "repack_int4: order 0 (torch), 1 (pairs) or 2 (quads)");
  TORCH_CHECK(order != 1 || block == 32, "repack_int4: column pairs are a 32-row layout");
  TORCH_CHECK(order != 2 || (block == 64 && half % 2 == 0), "repack_int4: quads are a 64-row layout, K % 4 == 0");
  at::Tensor out = at::empty({N, half}, portable.options());
  const uint8_t* P = portable.data_ptr<uint8_t>();
  uint8_t* O = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / block, 1, [&](int64_t a, int64_t b) {
    for (int64_t bb = a; bb < b; ++bb) {
      const uint8_t* pb = P + bb * block * half;
      uint8_t* ob = O + bb * K * h;
      int64_t c0 = 0;
#if defined(__SSE2__)
      if (h == 16 || h == 32)
        for (; c0 + 16 <= half; c0 += 16) repack_tile(pb, ob, half, h, c0, order);
#endif
      repack_scalar(pb, ob, half, h, c0, order);
    }
  });
  return out;
}

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
// of B) as fp32 [end−start, K]; order: the bytes within a block as byte_at reads them (1: B = 32, 2: B = 64)
at::Tensor dequant_int4_rows(const at::Tensor& packed, const at::Tensor& sz, int64_t g, int64_t block, int64_t start,
                             int64_t end, int64_t order) {
  TORCH_CHECK((sz.scalar_type() == at::kBFloat16 || sz.scalar_type() == at::kFloat) && sz.dim() == 3 &&
              sz.size(2) == 2 && sz.is_contiguous() && g > 0, "dequant_int4_rows: sz [K/g, N, 2] bf16 or fp32");
  const int64_t K = sz.size(0) * g, N = sz.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && block > 0 && block % 2 == 0 &&
              packed.numel() * 2 == N * K && N % block == 0, "dequant_int4_rows: packed [N/B, K, B/2] uint8");
  TORCH_CHECK(0 <= start && start <= end && end <= N && start % block == 0 && end % block == 0,
              "dequant_int4_rows: rows must be whole blocks");
  TORCH_CHECK(order >= 0 && order <= 2, "dequant_int4_rows: order 0 (torch), 1 (pairs) or 2 (quads)");
  TORCH_CHECK(order != 1 || (block == 32 && K % 2 == 0), "dequant_int4_rows: column pairs are a 32-row layout");
  TORCH_CHECK(order != 2 || (block == 64 && K % 4 == 0), "dequant_int4_rows: quads are a 64-row layout, K % 4 == 0");
  at::Tensor out = at::empty({end - start, K}, sz.options().dtype(at::kFloat));
  const uint8_t* P = packed.data_ptr<uint8_t>();
  if (sz.scalar_type() == at::kFloat)
    int4_rows(P, sz.data_ptr<float>(), g, block, K, N, start, end, order, out.data_ptr<float>());
  else
    int4_rows(P, sz.data_ptr<at::BFloat16>(), g, block, K, N, start, end, order, out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("dequant_int8_rows(Tensor q, Tensor scales, int start, int end) -> Tensor");
  m.def("dequant_int4_rows(Tensor packed, Tensor sz, int group, int block, int start, int end, int order=0) -> Tensor");
  m.def("repack_int4(Tensor portable, int block, int order=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("dequant_int8_rows", &dequant_int8_rows);
  m.impl("dequant_int4_rows", &dequant_int4_rows);
  m.impl("repack_int4", &repack_int4);
}
