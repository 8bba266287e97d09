// One lazy batch of GPTQ rounding (arXiv 2210.17323, Algorithm 1, the loop inside a block of
// columns), shared by the CPU loop (gptq_sweep_cpu.cpp) and the CUDA kernel (gptq_sweep_cuda.cu).
//
// Data layout: float32 row-major views, unit column stride, each with its own row stride:
//   block  [N, B]  the weight columns of the batch, after every earlier batch's update (read only)
//   scale, zero [N, B]  each entry's grid (static groups: fixed before any rounding)
//   upper  [B, B]  the batch's diagonal block of U, the upper Cholesky factor of H^-1
// and two contiguous float32 [N, B] results: the levels (0..max_level) and the scaled errors
// (w - deq) / U[i][i] that the caller pushes onto the later batches with one matrix product.
// Rows are independent: each sweeps its B columns in order, column i's error moving every later
// column j of the row by error * U[i][j].
//
// The three formulas below are the whole arithmetic. Each product is rounded on its own before
// the subtraction that follows it (no fused multiply-add, which nvcc would otherwise form), so
// the CPU and the GPU round every column alike, and alike to the tensor ops GPTQ was first
// written with (round_to_grid / grid_values of duquant/quantize.h).
#pragma once

#include <torch/torch.h>

#include <cmath>

#include "w4a8_layout.h"

namespace duquant::gptq {

// a * b rounded to float32 by itself.
DUQUANT_HOST_DEVICE inline float separately_rounded_product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// round_to_grid: clamp(round_half_even(w / scale) + zero, 0, max_level).
DUQUANT_HOST_DEVICE inline float level_of(float value, float scale, float zero, float max_level) {
  return fminf(fmaxf(nearbyintf(value / scale) + zero, 0.0f), max_level);
}

// (w - (level - zero) * scale) / U[i][i]: the rounding error in units of the column's curvature.
DUQUANT_HOST_DEVICE inline float scaled_error_of(float value, float level, float scale, float zero, float diagonal) {
  return (value - separately_rounded_product(level - zero, scale)) / diagonal;
}

// A later column j of the same row: w_j - error * U[i][j].
DUQUANT_HOST_DEVICE inline float updated_by(float value, float error, float upper) {
  return value - separately_rounded_product(error, upper);
}

// Host side, for both kernels: the operator's argument checks and the layout above.
inline void check_sweep_arguments(const torch::Tensor& block, const torch::Tensor& scale, const torch::Tensor& zero,
                                  const torch::Tensor& upper, int64_t max_level) {
  TORCH_CHECK(block.dim() == 2, "duquant::_gptq_sweep_block: block must be [N, B], got ", block.sizes());
  const int64_t columns = block.size(1);
  TORCH_CHECK(scale.sizes() == block.sizes() && zero.sizes() == block.sizes(), "duquant::_gptq_sweep_block: scale ",
              scale.sizes(), " and zero ", zero.sizes(), " must have the block's shape ", block.sizes());
  TORCH_CHECK(upper.dim() == 2 && upper.size(0) == columns && upper.size(1) == columns,
              "duquant::_gptq_sweep_block: upper must be [B, B] for B = ", columns, ", got ", upper.sizes());
  for (const auto* tensor : {&block, &scale, &zero, &upper}) {
    TORCH_CHECK(tensor->scalar_type() == torch::kFloat && tensor->device() == block.device(),
                "duquant::_gptq_sweep_block: every tensor must be float32 on the block's device");
  }
  TORCH_CHECK(max_level > 0, "duquant::_gptq_sweep_block: max_level must be positive, got ", max_level);
}

// Unit column stride (a column slice of a row-major matrix keeps it).
inline torch::Tensor with_unit_column_stride(const torch::Tensor& tensor) {
  return tensor.size(1) <= 1 || tensor.stride(1) == 1 ? tensor : tensor.contiguous();
}

}  // namespace duquant::gptq
