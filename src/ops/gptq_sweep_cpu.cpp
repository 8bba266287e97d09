// duquant::_gptq_sweep_block: the operator (definition, CPU kernel, C++ entry point of
// include/duquant/ops.h) for one lazy batch of GPTQ rounding; its arithmetic and data layout are
// those of gptq_sweep.h, its CUDA kernel is in gptq_sweep_cuda.cu. One call per batch of columns
// replaces a dozen tensor operations per column, which on a GPU were a kernel launch each.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "duquant/ops.h"
#include "gptq_sweep.h"

namespace duquant::ops {
namespace {

std::tuple<torch::Tensor, torch::Tensor> gptq_sweep_block_cpu(const torch::Tensor& block_weight,
                                                              const torch::Tensor& scale_in,
                                                              const torch::Tensor& zero_in,
                                                              const torch::Tensor& upper_in, int64_t max_level) {
  gptq::check_sweep_arguments(block_weight, scale_in, zero_in, upper_in, max_level);
  const auto block = gptq::with_unit_column_stride(block_weight), scale = gptq::with_unit_column_stride(scale_in),
             zero = gptq::with_unit_column_stride(zero_in), upper = gptq::with_unit_column_stride(upper_in);
  const int64_t rows = block.size(0), columns = block.size(1);
  auto levels = torch::empty({rows, columns}, block.options());
  auto errors = torch::empty({rows, columns}, block.options());
  const float* w = block.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  const float* z = zero.data_ptr<float>();
  const float* u = upper.data_ptr<float>();
  float* level_out = levels.data_ptr<float>();
  float* error_out = errors.data_ptr<float>();
  const int64_t w_stride = block.stride(0), s_stride = scale.stride(0), z_stride = zero.stride(0),
                u_stride = upper.stride(0);
  const float top = static_cast<float>(max_level);
  // A row costs about B^2 / 2 multiply-subtracts.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, columns * columns / 2));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(columns));
    for (int64_t n = begin; n < end; ++n) {
      std::copy(w + n * w_stride, w + n * w_stride + columns, row.begin());
      for (int64_t i = 0; i < columns; ++i) {
        const float level = gptq::level_of(row[i], s[n * s_stride + i], z[n * z_stride + i], top);
        const float error =
            gptq::scaled_error_of(row[i], level, s[n * s_stride + i], z[n * z_stride + i], u[i * u_stride + i]);
        level_out[n * columns + i] = level;
        error_out[n * columns + i] = error;
        const float* u_row = u + i * u_stride;
        for (int64_t j = i + 1; j < columns; ++j) row[j] = gptq::updated_by(row[j], error, u_row[j]);
      }
    }
  });
  return {levels, errors};
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> gptq_sweep_block(const torch::Tensor& block, const torch::Tensor& scale,
                                                          const torch::Tensor& zero, const torch::Tensor& upper,
                                                          int64_t max_level) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("duquant::_gptq_sweep_block", "")
                             .typed<std::tuple<torch::Tensor, torch::Tensor>(
                                 const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                 const torch::Tensor&, int64_t)>();
  return op.call(block, scale, zero, upper, max_level);
}

}  // namespace duquant::ops

TORCH_LIBRARY_FRAGMENT(duquant, m) {
  // Quantize time, not inference: one lazy batch of GPTQ rounding (gptq_sweep.h).
  m.def("_gptq_sweep_block(Tensor block, Tensor scale, Tensor zero, Tensor upper, int max_level) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(duquant, CPU, m) {
  m.impl("_gptq_sweep_block", TORCH_FN(duquant::ops::gptq_sweep_block_cpu));
}
