// GGUF blocks to our quantized rows on the CPU, in one pass each.
// int8: a Q6_K or Q8_0 row is dequantized into a row buffer, then requantized per row (ops/quant.py
// `quantize_int8`: scale = bf16(max(max|w| / 127, 1e-12)), q = round half to even of w / scale, clamped to
// ±127; a damaged file's NaN values become 0 rather than an undefined conversion). The reference is
// weights/gguf.py's path, gguf-py's numpy dequantize (Q6_K) or `q8_0_values`, then quantize_int8: the same
// fp32 operations in the same order, so tests/test_gguf.py compares bit for bit. For a 248K-row Q6_K
// embedding that path took ~3.9 s of a cold start.
// int4: Q4_0 blocks are already our int4 (one scale per 32 values, zero 0): only the nibbles move, into the
// portable order of ops/quant.py `pack_int4` (even columns low), the reference being weights/gguf_file.py
// `int4_blocks` + pack_int4 (~1 s of numpy for the 0.8B model).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// One Q6_K block (256 values, 210 bytes: ql[128] low nibbles, qh[64] high bit pairs, scales[16] int8, d f16)
// → w[256] = (d · scale) · (q − 32), as gguf-py's numpy does it. Value e = 128h + 32·quarter + 16·half + l takes
// its low nibble from ql[64h + 32·(quarter mod 2) + 16·half + l] (high nibble for quarter ≥ 2), its high bits
// from qh[32h + 16·half + l] >> 2·quarter and scale 16 of e / 16: loops of 16 the compiler vectorizes.
void q6_k_block(const uint8_t* b, float* w) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int h = 0; h < 2; ++h)
    for (int quarter = 0; quarter < 4; ++quarter)
      for (int half = 0; half < 2; ++half) {
        const float ds = d * static_cast<float>(sc[h * 8 + quarter * 2 + half]);
        const uint8_t* lo_at = ql + h * 64 + (quarter & 1) * 32 + half * 16;
        const uint8_t* hi_at = qh + h * 32 + half * 16;
        float* o = w + h * 128 + quarter * 32 + half * 16;
        const int lo_shift = 4 * (quarter >> 1), hi_shift = 2 * quarter;
        for (int l = 0; l < 16; ++l) {
          const int lo = (lo_at[l] >> lo_shift) & 15, hi = (hi_at[l] >> hi_shift) & 3;
          o[l] = ds * static_cast<float>((lo | (hi << 4)) - 32);
        }
      }
}

// max |w[k]| over the values that are not NaN (std::max(amax, |w|) skips NaN), on the bit patterns: non-negative
// floats order as their bits, and an integer max reduction vectorizes where a float one does not.
typedef int32_t __attribute__((may_alias)) float_bits;  // read a float's bits without breaking aliasing rules

float abs_max(const float* w, int K) {
  const float_bits* bits = reinterpret_cast<const float_bits*>(w);
  int32_t m = 0;
  for (int k = 0; k < K; ++k) {
    const int32_t u = bits[k] & 0x7fffffff;
    m = std::max(m, u > 0x7f800000 ? 0 : u);
  }
  float out;
  std::memcpy(&out, &m, 4);
  return out;
}

// One Q8_0 block (32 values, 34 bytes: d f16, then 32 int8) → w = q · d.
void q8_0_block(const uint8_t* b, float* w) {
  const float d = f16_at(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) w[i] = static_cast<float>(q[i]) * d;
}

// q = round half to even of w / s, clamped to ±127 (NaN → 0): a loop of its own, which the compiler vectorizes
// (inside the row loop it did not: 7 cycles a value).
void quantize_row(const float* __restrict w, int K, float s, int8_t* __restrict q) {
  for (int k = 0; k < K; ++k) {
    const float v = std::nearbyint(w[k] / s);
    q[k] = std::isnan(v) ? 0 : static_cast<int8_t>(std::clamp(v, -127.f, 127.f));
  }
}

}  // namespace

// blocks uint8 [N, bytes per row] of type "Q6_K" or "Q8_0" (K values per row) → q int8 [N, K], written into the
// caller's buffer (ops/memory.py: on 2 MB pages), and scales fp32 [N], returned.
at::Tensor gguf_to_int8_into(const at::Tensor& blocks, const std::string& type, int64_t K, const at::Tensor& q) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
              blocks.is_contiguous(), "gguf_to_int8: blocks uint8 [N, bytes per row]");
  const bool q6 = type == "Q6_K";
  TORCH_CHECK(q6 || type == "Q8_0", "gguf_to_int8: Q6_K or Q8_0, not ", type);
  const int64_t qk = q6 ? 256 : 32, size = q6 ? 210 : 34;
  TORCH_CHECK(K > 0 && K % qk == 0 && blocks.size(1) == K / qk * size, "gguf_to_int8: rows of ", K, " values");
  const int64_t N = blocks.size(0);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.device().is_cpu() && q.dim() == 2 &&
              q.size(0) == N && q.size(1) == K, "gguf_to_int8: q int8 [N, K], contiguous");
  at::Tensor scales = at::empty({N}, blocks.options().dtype(at::kFloat));
  const uint8_t* B = blocks.data_ptr<uint8_t>();
  int8_t* Q = q.data_ptr<int8_t>();
  float* S = scales.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t a, int64_t e) {
    std::vector<float> w(K);
    for (int64_t n = a; n < e; ++n) {
      const uint8_t* row = B + n * blocks.size(1);
      for (int64_t i = 0; i < K / qk; ++i) (q6 ? q6_k_block : q8_0_block)(row + i * size, w.data() + i * qk);
      const float amax = abs_max(w.data(), static_cast<int>(K));
      const float s = static_cast<float>(c10::BFloat16(std::max(amax / 127.f, 1e-12f)));
      S[n] = s;
      quantize_row(w.data(), static_cast<int>(K), s, Q + n * K);
    }
  });
  return scales;
}

// blocks uint8 [N, K/32·18] Q4_0 → (packed uint8 [N, K/2], value j of a group in the low nibble of byte j/2
// when j is even; scales fp32 [N, K/32], the blocks' f16 d). Value j of a block: qs[j] & 15 for j < 16, else
// qs[j − 16] >> 4.
std::tuple<at::Tensor, at::Tensor> gguf_q4_0_rows(const at::Tensor& blocks, int64_t K) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
              blocks.is_contiguous() && K > 0 && K % 32 == 0 && blocks.size(1) == K / 32 * 18,
              "gguf_q4_0_rows: blocks uint8 [N, K/32·18]");
  const int64_t N = blocks.size(0), G = K / 32;
  at::Tensor packed = at::empty({N, K / 2}, blocks.options());
  at::Tensor scales = at::empty({N, G}, blocks.options().dtype(at::kFloat));
  const uint8_t* B = blocks.data_ptr<uint8_t>();
  uint8_t* P = packed.data_ptr<uint8_t>();
  float* S = scales.data_ptr<float>();
  at::parallel_for(0, N * G, 4096, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      const uint8_t* b = B + i * 18;
      S[i] = f16_at(b);
      const uint8_t* qs = b + 2;
      auto value = [&](int j) { return j < 16 ? qs[j] & 15 : qs[j - 16] >> 4; };
      uint8_t* p = P + i * 16;
      for (int j = 0; j < 16; ++j) p[j] = static_cast<uint8_t>(value(2 * j) | (value(2 * j + 1) << 4));
    }
  });
  return {packed, scales};
}

// blocks uint8 [N, K/256·144] Q4_K → (packed uint8 [N, K/2] as above, scales and zeros fp32 [N, K/32]) with
// w = (q − 8)·scale + zero for each 32-value sub-block: scale = d·sc, zero = 8·scale − dmin·m (d, dmin the block's
// f16 pair; sc, m its 6-bit pair for the sub-block). Sub-block 2i holds the low nibbles of the i-th 32 quant bytes,
// 2i + 1 their high nibbles. The reference is weights/gguf_file.py `int4_blocks` + pack_int4 (0.7 s of numpy for
// the 0.8B Q4_K_M file); the same fp32 operations, so tests/test_gguf.py compares bit for bit.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gguf_q4_k_rows(const at::Tensor& blocks, int64_t K) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
              blocks.is_contiguous() && K > 0 && K % 256 == 0 && blocks.size(1) == K / 256 * 144,
              "gguf_q4_k_rows: blocks uint8 [N, K/256·144]");
  const int64_t N = blocks.size(0), G = K / 32;
  at::Tensor packed = at::empty({N, K / 2}, blocks.options());
  at::Tensor scales = at::empty({N, G}, blocks.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({N, G}, blocks.options().dtype(at::kFloat));
  const uint8_t* B = blocks.data_ptr<uint8_t>();
  uint8_t* P = packed.data_ptr<uint8_t>();
  float *S = scales.data_ptr<float>(), *Z = zeros.data_ptr<float>();
  at::parallel_for(0, N * K / 256, 512, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {  // super-block i: sub-blocks 8i … 8i + 7 of the row-major groups
      const uint8_t* b = B + i * 144;
      const float d = f16_at(b), dmin = f16_at(b + 2);
      const uint8_t *lo = b + 4, *hi = b + 8, *mix = b + 12, *qs = b + 16;
      for (int j = 0; j < 8; ++j) {
        const int sc = j < 4 ? lo[j] & 63 : (mix[j - 4] & 15) | ((lo[j - 4] >> 2) & 48);
        const int mn = j < 4 ? hi[j] & 63 : (mix[j - 4] >> 4) | ((hi[j - 4] >> 2) & 48);
        const float scale = d * static_cast<float>(sc);
        const float eight = 8.f * scale, low = dmin * static_cast<float>(mn);
        S[i * 8 + j] = scale;
        Z[i * 8 + j] = eight - low;
        const uint8_t* q = qs + (j / 2) * 32;
        uint8_t* p = P + i * 128 + j * 16;
        if (j % 2 == 0)
          for (int c = 0; c < 16; ++c) p[c] = static_cast<uint8_t>((q[2 * c] & 15) | ((q[2 * c + 1] & 15) << 4));
        else
          for (int c = 0; c < 16; ++c) p[c] = static_cast<uint8_t>((q[2 * c] >> 4) | (q[2 * c + 1] & 0xF0));
      }
    }
  });
  return {packed, scales, zeros};
}

TORCH_LIBRARY_FRAGMENT(deltarun, m) {
  m.def("gguf_to_int8_into(Tensor blocks, str type, int K, Tensor(a!) q) -> Tensor");
  m.def("gguf_q4_0_rows(Tensor blocks, int K) -> (Tensor, Tensor)");
  m.def("gguf_q4_k_rows(Tensor blocks, int K) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deltarun, CPU, m) {
  m.impl("gguf_to_int8_into", &gguf_to_int8_into);
  m.impl("gguf_q4_0_rows", &gguf_q4_0_rows);
  m.impl("gguf_q4_k_rows", &gguf_q4_k_rows);
}
