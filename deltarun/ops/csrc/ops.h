// The extension's ops as C++ functions (defined in gemv.cpp, gdn.cpp, norm.cpp, lora.cpp, dequant.cpp), for code that chains
// them without a trip through Python and torch's dispatcher (layer.cpp). Shapes and contracts: at their
// definitions.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, bool cast);
at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w);
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, bool cast);
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& packed, int64_t g, const at::Tensor& sz, bool cast);
at::Tensor gdn_decode_(const at::Tensor& mixed, const at::Tensor& conv_pool, const at::Tensor& conv_w,
                       const at::Tensor& a, const at::Tensor& b, const at::Tensor& A_log, const at::Tensor& dt_bias,
                       const at::Tensor& rec_pool, const at::Tensor& slots, int64_t hk, const at::Tensor& z,
                       const at::Tensor& norm_w, double eps, const std::optional<at::Tensor>& snap);
at::Tensor dequant_int4_rows(const at::Tensor& packed, const at::Tensor& sz, int64_t g, int64_t block, int64_t start,
                             int64_t end, int64_t order);
at::Tensor lora_expand(const at::Tensor& t, const at::Tensor& mask, const at::Tensor& bt);
at::Tensor rms_norm_zc(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_zc(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w,
                                                   double eps);
