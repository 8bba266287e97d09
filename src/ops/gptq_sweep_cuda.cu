// CUDA kernel of duquant::_gptq_sweep_block (operator and CPU kernel: gptq_sweep_cpu.cpp; data
// layout and arithmetic: gptq_sweep.h).
//
// One warp per weight row, kRowsPerBlock rows per thread block. Lane l holds the row's columns
// l, l + 32, l + 64, ... in registers (at most kMaxColumnsPerLane of them, so B <= 256). For each
// column i in order, its owner lane broadcasts the current value by a shuffle; every lane computes
// the same level and scaled error from it (the same float operations, so the same bits), lane
// i % 32 writes them, and each lane moves its own later columns by error * U[i][j], reading the
// row i of U with coalesced loads. A batch of B columns is one launch instead of a dozen tensor
// operations per column.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "gptq_sweep.h"

namespace duquant::ops::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kMaxColumnsPerLane = 8;

struct SweepParams {
  const float* block;
  const float* scale;
  const float* zero;
  const float* upper;
  int64_t block_stride, scale_stride, zero_stride, upper_stride;
  int64_t rows;
  int columns;
  float max_level;
  float* levels;  // contiguous [rows, columns]
  float* errors;  // contiguous [rows, columns]
};

__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize) gptq_sweep_kernel(const SweepParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.rows) return;  // a whole warp: the row is the warp's
  const float* w = p.block + row * p.block_stride;
  const float* s = p.scale + row * p.scale_stride;
  const float* z = p.zero + row * p.zero_stride;
  float value[kMaxColumnsPerLane];
#pragma unroll
  for (int slot = 0; slot < kMaxColumnsPerLane; ++slot) {
    const int column = slot * kWarpSize + lane;
    value[slot] = column < p.columns ? w[column] : 0.0f;
  }
#pragma unroll
  for (int slot = 0; slot < kMaxColumnsPerLane; ++slot) {
    if (slot * kWarpSize >= p.columns) break;
    for (int owner = 0; owner < kWarpSize; ++owner) {
      const int i = slot * kWarpSize + owner;
      if (i >= p.columns) break;
      const float current = __shfl_sync(0xffffffffu, value[slot], owner);
      const float level = gptq::level_of(current, s[i], z[i], p.max_level);
      const float error = gptq::scaled_error_of(current, level, s[i], z[i], p.upper[i * p.upper_stride + i]);
      if (lane == owner) {
        p.levels[row * p.columns + i] = level;
        p.errors[row * p.columns + i] = error;
      }
      const float* u = p.upper + i * p.upper_stride;
#pragma unroll
      for (int later = 0; later < kMaxColumnsPerLane; ++later) {
        const int j = later * kWarpSize + lane;
        if (later >= slot && j > i && j < p.columns) value[later] = gptq::updated_by(value[later], error, u[j]);
      }
    }
  }
}

std::tuple<torch::Tensor, torch::Tensor> gptq_sweep_block_cuda(const torch::Tensor& block_weight,
                                                               const torch::Tensor& scale_in,
                                                               const torch::Tensor& zero_in,
                                                               const torch::Tensor& upper_in, int64_t max_level) {
  gptq::check_sweep_arguments(block_weight, scale_in, zero_in, upper_in, max_level);
  TORCH_CHECK(block_weight.size(1) <= kWarpSize * kMaxColumnsPerLane, "duquant::_gptq_sweep_block: the CUDA kernel "
              "takes batches of at most ", kWarpSize * kMaxColumnsPerLane, " columns, got ", block_weight.size(1));
  const c10::cuda::CUDAGuard guard(block_weight.device());
  const auto block = gptq::with_unit_column_stride(block_weight), scale = gptq::with_unit_column_stride(scale_in),
             zero = gptq::with_unit_column_stride(zero_in), upper = gptq::with_unit_column_stride(upper_in);
  const int64_t rows = block.size(0);
  auto levels = torch::empty({rows, block.size(1)}, block.options());
  auto errors = torch::empty({rows, block.size(1)}, block.options());
  if (rows == 0 || block.size(1) == 0) return {levels, errors};
  const SweepParams params{block.data_ptr<float>(),  scale.data_ptr<float>(), zero.data_ptr<float>(),
                           upper.data_ptr<float>(),  block.stride(0),         scale.stride(0),
                           zero.stride(0),           upper.stride(0),         rows,
                           static_cast<int>(block.size(1)), static_cast<float>(max_level),
                           levels.data_ptr<float>(), errors.data_ptr<float>()};
  const auto blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  gptq_sweep_kernel<<<blocks, kRowsPerBlock * kWarpSize, 0, at::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {levels, errors};
}

}  // namespace
}  // namespace duquant::ops::cuda

TORCH_LIBRARY_IMPL(duquant, CUDA, m) {
  m.impl("_gptq_sweep_block", TORCH_FN(duquant::ops::cuda::gptq_sweep_block_cuda));
}
