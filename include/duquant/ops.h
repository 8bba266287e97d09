// C++ API of the operator library (libduquant_ops.so). The TorchScript-visible operator is
//
//   duquant::w4a8_linear(Tensor x, Tensor smooth_inv, Tensor rotation1, Tensor permutation,
//                        Tensor rotation2, Tensor packed_weight, Tensor weight_scale,
//                        Tensor weight_zero, Tensor bias, int in_features, int group_size,
//                        int act_bits, float act_clip) -> Tensor
//
// computing, for x of shape [..., in_features] (any float dtype; output has x's dtype):
//   1. x <- x * smooth_inv                          (skipped when smooth_inv is empty)
//   2. zero-pad to K = 2 * packed_weight.size(1) columns
//   3. each block of b = rotation1.size(0) columns <- block @ rotation1      (skipped if empty)
//   4. x <- x[:, permutation]                                                (skipped if empty)
//   5. each block <- block @ rotation2                                       (skipped if empty)
//   6. act_bits > 0: per-token symmetric quantization, scale_t = act_clip * max_k |x_tk| / qmax,
//      q = clamp(round(x / scale_t), -qmax, qmax), qmax = 2^(act_bits-1) - 1; then
//      y[t,n] = scale_t * sum_g weight_scale[n,g] * (sum_{k in g} q[t,k] w[n,k]
//                                                   - weight_zero[n,g] * sum_{k in g} q[t,k])
//      with the integer sums in int32 (w in 0..15 unpacked from packed_weight, w4a8_layout.h).
//      act_bits <= 0: y = x @ (weight_scale * (w - weight_zero))^T in fp32.
//   7. y += bias (skipped when empty).
// weight_scale and weight_zero are float32 [N, G]; G = 1 (per output channel) when group_size
// <= 0, else K / group_size groups of group_size consecutive k.
#pragma once

#include <torch/torch.h>

#include <tuple>

namespace duquant::ops {

// Steps 1-5 above on a 2-D [T, in_features] tensor; returns float32 [T, padded_in_features].
// The quantizer applies the same function to calibration activations, so that the offline and
// online transforms cannot disagree.
torch::Tensor apply_online_transform(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                                     const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                     const torch::Tensor& rotation2, int64_t padded_in_features);

// rows [n, b] @ rotation [b, b]: every row times the same rotation block (steps 3 and 5 above,
// and every greedy step of the quantizer). float32 CPU tensors with b a multiple of 32 on an
// AVX2 or AVX-512 CPU go through the kernel of src/ops/fma_kernels_cpu.h, which computes each
// entry as one FMA chain in k order, so a row's result never depends on the other rows of the
// call; anything else is at::mm. `out` must be a contiguous [n, b] tensor of rows' dtype and
// device that does not overlap `rows`.
torch::Tensor rotate_rows(const torch::Tensor& rows, const torch::Tensor& rotation);
void rotate_rows_out(const torch::Tensor& out, const torch::Tensor& rows, const torch::Tensor& rotation);

// x [T, K] @ weight [N, K]^T, a linear layer's output without its bias (the quantizer's clip
// search). float32 CPU tensors on an AVX2 or AVX-512 CPU go through the kernel of
// src/ops/fma_kernels_cpu.h (k summed in fixed blocks, each one FMA chain); anything else is
// matmul.
torch::Tensor multiply_by_transpose(const torch::Tensor& x, const torch::Tensor& weight);

// One lazy batch of GPTQ rounding (data layout and arithmetic in src/ops/gptq_sweep.h), on the CPU
// or the GPU by the block's device: block, scale, zero float32 [N, B], upper float32 [B, B] (the
// batch's diagonal block of U, the upper Cholesky factor of H^-1). Returns the levels and the
// scaled errors, float32 [N, B] each; the same on either device.
std::tuple<torch::Tensor, torch::Tensor> gptq_sweep_block(const torch::Tensor& block, const torch::Tensor& scale,
                                                          const torch::Tensor& zero, const torch::Tensor& upper,
                                                          int64_t max_level);

// uint8 [N, K] levels in 0..15 -> packed uint8 [N, K / 2] (layout of w4a8_layout.h), on the levels'
// device, and back (unpacked on the CPU).
torch::Tensor pack_int4(const torch::Tensor& levels);
torch::Tensor unpack_int4(const torch::Tensor& packed);

// Layers that share their input and transform (q/k/v, gate/up) share their int8 activations: a
// w4a8_linear call reuses those of the previous call on the same thread when x is the same tensor,
// unchanged, and the transform tensors are the same (src/ops/activation_reuse.h has the rule;
// DUQUANT_REUSE_ACTIVATIONS=0 turns it off). Counts of this thread's calls that reused or computed
// their activations:
struct ActivationReuseStats {
  int64_t reused = 0;
  int64_t computed = 0;
};
ActivationReuseStats activation_reuse_stats();
// Drops this thread's remembered activations and the references they hold (the CUDA-graph runner
// calls it after a capture, so that the graph's memory pool is not held by them).
void forget_reusable_activations();

// Calls the registered operator (dispatches to the CPU or CUDA kernel by x's device).
torch::Tensor w4a8_linear(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                          const torch::Tensor& rotation1, const torch::Tensor& permutation,
                          const torch::Tensor& rotation2, const torch::Tensor& packed_weight,
                          const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                          const torch::Tensor& bias, int64_t in_features, int64_t group_size,
                          int64_t act_bits, double act_clip);

}  // namespace duquant::ops
