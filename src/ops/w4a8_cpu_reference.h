// The CPU reference kernel of duquant::w4a8_linear (semantics: include/duquant/ops.h) and its
// pieces. The pieces are exposed so that the CUDA kernels' tests can compare intermediate results
// (quantized activations, integer accumulators) and not only the final output, and so that every
// kernel validates its arguments with the same checks and messages.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace duquant::ops::cpu_reference {

// Sizes of one w4a8_linear call, derived from its validated arguments.
struct W4A8LinearShape {
  int64_t tokens = 0;              // T: product of x's leading dimensions
  int64_t in_features = 0;         // x.size(-1)
  int64_t padded_in_features = 0;  // K = 2 * packed_weight.size(1)
  int64_t out_features = 0;        // N = packed_weight.size(0)
  int64_t groups = 0;              // G: 1 (per output channel) or K / group_size
  int64_t group_size = 0;          // K / G: the k range of one integer accumulator
};

// TORCH_CHECKs every argument against ops.h (dtypes, shapes, group_size dividing K, permutation
// length, rotation blocks dividing K, act_bits range) with messages naming the offending
// argument; returns the derived sizes. Device-agnostic: it reads only metadata.
W4A8LinearShape check_w4a8_linear_arguments(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                                            const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                            const torch::Tensor& rotation2, const torch::Tensor& packed_weight,
                                            const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                                            const torch::Tensor& bias, int64_t in_features, int64_t group_size,
                                            int64_t act_bits, double act_clip);

// Step 6 of ops.h, activation side: per-token symmetric quantization of the transformed
// activations.
struct QuantizedActivations {
  torch::Tensor values;     // int8 [T, K]: q = clamp(round_half_even(x / scale), -qmax, qmax)
  torch::Tensor scale;      // float32 [T]: fp32(fp32(act_clip) * max_k |x_tk|) / qmax; 1 for an all-zero row
  torch::Tensor group_sum;  // int32 [T, G]: sum of q over each group of group_size consecutive k
};
// `transformed` is [T, K] (any float dtype, quantized in fp32); group_size <= 0 means one group
// of K (per output channel weights), else group_size must divide K.
QuantizedActivations quantize_activations(const torch::Tensor& transformed, int64_t act_bits, double act_clip,
                                          int64_t group_size);

// The integer part of step 6: int32 [T, N, G] with entry (t, n, g) = sum_{k in group g} q[t,k] w[n,k],
// computed exactly (see the comment at the top of w4a8_linear_cpu.cpp). `quantized` is int8
// [T, K] (values of quantize_activations), `packed_weight` uint8 [N, K / 2]. It materialises
// T * N * G int32 values: meant for tests, the kernel itself works in column tiles.
torch::Tensor integer_group_dot_products(const torch::Tensor& quantized, const torch::Tensor& packed_weight,
                                         int64_t group_size);

// The CPU kernel registered for duquant::w4a8_linear (src/ops/register_ops.cpp). Call it
// directly only to bypass the dispatcher (tests); the model-facing entry point is
// duquant::ops::w4a8_linear.
torch::Tensor w4a8_linear_cpu(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                              const torch::Tensor& rotation1, const torch::Tensor& permutation,
                              const torch::Tensor& rotation2, const torch::Tensor& packed_weight,
                              const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                              const torch::Tensor& bias, int64_t in_features, int64_t group_size,
                              int64_t act_bits, double act_clip);

}  // namespace duquant::ops::cpu_reference
