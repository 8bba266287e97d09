// Registration of the duquant operator namespace (what TorchScript files of quantized models call
// as ops.duquant.<op>, DESIGN.md section 5) and its CPU kernels. The CUDA kernels register their
// own TORCH_LIBRARY_IMPL(duquant, CUDA, ...) in src/ops/w4a8_linear_cuda.cu.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "duquant/ops.h"
#include "w4a8_cpu_reference.h"

namespace duquant::ops {
namespace {

// duquant::online_transform: steps 1-5 of w4a8_linear for x of any leading dimensions; returns
// float32 (float64 for float64 x) [..., padded_in_features]. w4a8_linear(x, ...) quantizes exactly
// this tensor, so a kernel's fused pre-processing can be checked against it on its own.
torch::Tensor online_transform_cpu(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                                   const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                   const torch::Tensor& rotation2, int64_t padded_in_features) {
  TORCH_CHECK(x.dim() >= 1, "duquant::online_transform: x must be [..., in_features], got a scalar");
  const int64_t in_features = x.size(-1);
  auto output_sizes = x.sizes().vec();
  output_sizes.back() = padded_in_features;
  const auto tokens = x.reshape({-1, in_features});
  return apply_online_transform(tokens, smooth_inv, rotation1, permutation, rotation2, padded_in_features)
      .view(output_sizes);
}

// duquant::quantize_activations: step 6, activation side, on already transformed activations
// x [..., K] (any float dtype, quantized in fp32). Returns (int8 q [..., K], float32 scale [...],
// int32 row_sum [...]) with the formula of ops.h. The row sum is the per-token total over all K,
// i.e. the zero-point term of per-output-channel weights (G = 1); grouped weights need the sum per
// group, which is the sum of q over the group's k range (cpu_reference::quantize_activations
// returns those for any group_size).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_activations_cpu(const torch::Tensor& x,
                                                                                 int64_t act_bits, double act_clip) {
  TORCH_CHECK(x.dim() >= 1, "duquant::quantize_activations: x must be [..., K], got a scalar");
  const auto leading_sizes = x.sizes().slice(0, x.dim() - 1);
  auto quantized = cpu_reference::quantize_activations(x.reshape({-1, x.size(-1)}), act_bits, act_clip,
                                                       /*group_size=*/0);
  return {quantized.values.view(x.sizes()), quantized.scale.view(leading_sizes),
          quantized.group_sum.view(leading_sizes)};
}

}  // namespace

torch::Tensor w4a8_linear(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                          const torch::Tensor& rotation1, const torch::Tensor& permutation,
                          const torch::Tensor& rotation2, const torch::Tensor& packed_weight,
                          const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                          const torch::Tensor& bias, int64_t in_features, int64_t group_size,
                          int64_t act_bits, double act_clip) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("duquant::w4a8_linear", "")
          .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                               const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                               const torch::Tensor&, int64_t, int64_t, int64_t, double)>();
  return op.call(x, smooth_inv, rotation1, permutation, rotation2, packed_weight, weight_scale, weight_zero, bias,
                 in_features, group_size, act_bits, act_clip);
}

}  // namespace duquant::ops

TORCH_LIBRARY(duquant, m) {
  // The model-facing op (include/duquant/ops.h): steps 1-7 in one call, what W4A8Linear.forward calls.
  m.def(
      "w4a8_linear(Tensor x, Tensor smooth_inv, Tensor rotation1, Tensor permutation, Tensor rotation2, "
      "Tensor packed_weight, Tensor weight_scale, Tensor weight_zero, Tensor bias, int in_features, "
      "int group_size, int act_bits, float act_clip) -> Tensor");
  // Steps 1-5 of w4a8_linear alone (see online_transform_cpu).
  m.def(
      "online_transform(Tensor x, Tensor smooth_inv, Tensor rotation1, Tensor permutation, Tensor rotation2, "
      "int padded_in_features) -> Tensor");
  // Step 6, activation side, of w4a8_linear alone (see quantize_activations_cpu).
  m.def("quantize_activations(Tensor x, int act_bits, float act_clip) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(duquant, CPU, m) {
  m.impl("w4a8_linear", TORCH_FN(duquant::ops::cpu_reference::w4a8_linear_cpu));
  m.impl("online_transform", TORCH_FN(duquant::ops::online_transform_cpu));
  m.impl("quantize_activations", TORCH_FN(duquant::ops::quantize_activations_cpu));
}
