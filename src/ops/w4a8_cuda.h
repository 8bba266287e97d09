// Internal entry points of the CUDA kernels of duquant::w4a8_linear (src/ops/w4a8_linear_cuda.cu),
// for the GPU tests and the benchmark: the pre-kernel and the GEMM can be called (and timed) on
// their own. They are operators of the duquant namespace with a CUDA kernel only, reached through
// the dispatcher, so that code including this header links against a CPU-only build of
// libduquant_ops too; cuda_kernels_available() says whether the kernels are there.
//
//   duquant::_fused_quantize_activations(Tensor x, Tensor smooth_inv, Tensor rotation1,
//       Tensor permutation, Tensor rotation2, int padded_in_features, int group_size, int act_bits,
//       float act_clip) -> (Tensor values, Tensor scale, Tensor group_sum)
//     Steps 1-6 (activation side) of include/duquant/ops.h in one kernel: x [..., in_features] of
//     any float dtype -> int8 [T, K], float32 scale [T], int32 group_sum [T, G] (G = 1 when
//     group_size <= 0), bit-compatible with cpu_reference::quantize_activations of
//     apply_online_transform up to rounding ties of the rotations (w4a8_cpu_reference.h).
//
//   duquant::_w4a8_gemm(Tensor values, Tensor scale, Tensor group_sum, Tensor packed_weight,
//       Tensor weight_scale, Tensor weight_zero, Tensor bias, int group_size, ScalarType out_dtype)
//       -> Tensor
//     Steps 6-7, weight side: y [T, N] = scale_t * sum_g s[n,g] (acc - z[n,g] * group_sum[t,g]) + bias.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <tuple>

#include "w4a8_cpu_reference.h"

namespace duquant::ops::cuda {

inline constexpr const char* kFusedQuantizeOp = "duquant::_fused_quantize_activations";
inline constexpr const char* kGemmOp = "duquant::_w4a8_gemm";

// int8 values [T, K], float32 scale [T], int32 group_sum [T, G]: the CPU reference's type.
using QuantizedActivations = cpu_reference::QuantizedActivations;

// True when libduquant_ops was built with its CUDA kernels (a GPU may still be absent).
inline bool cuda_kernels_available() {
  const auto handle = c10::Dispatcher::singleton().findSchema({kGemmOp, ""});
  return handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

inline QuantizedActivations fused_quantize_activations(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                                                       const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                                       const torch::Tensor& rotation2, int64_t padded_in_features,
                                                       int64_t group_size, int64_t act_bits, double act_clip) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(kFusedQuantizeOp, "")
                             .typed<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>(
                                 const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                 const torch::Tensor&, int64_t, int64_t, int64_t, double)>();
  auto [values, scale, group_sum] = op.call(x, smooth_inv, rotation1, permutation, rotation2, padded_in_features,
                                            group_size, act_bits, act_clip);
  return {values, scale, group_sum};
}

inline torch::Tensor w4a8_gemm(const QuantizedActivations& activations, const torch::Tensor& packed_weight,
                               const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                               const torch::Tensor& bias, int64_t group_size, c10::ScalarType out_dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(kGemmOp, "")
                             .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                                  const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                                  const torch::Tensor&, int64_t, c10::ScalarType)>();
  return op.call(activations.values, activations.scale, activations.group_sum, packed_weight, weight_scale,
                 weight_zero, bias, group_size, out_dtype);
}

}  // namespace duquant::ops::cuda
