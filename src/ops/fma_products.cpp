// The public entry points of the FMA-chain products (include/duquant/ops.h): the CPU kernels of
// fma_kernels_cpu.h where they apply, at::mm elsewhere.
#include "duquant/ops.h"
#include "fma_kernels_cpu.h"

namespace duquant::ops {
namespace {

bool is_cpu_float(const torch::Tensor& tensor) {
  return tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat;
}

}  // namespace

void rotate_rows_out(const torch::Tensor& out, const torch::Tensor& rows, const torch::Tensor& rotation) {
  TORCH_CHECK(rows.dim() == 2 && rotation.dim() == 2 && rotation.size(0) == rotation.size(1) &&
                  rows.size(1) == rotation.size(0),
              "duquant: rotate_rows expects [n, b] rows and a [b, b] rotation, got ", rows.sizes(), " and ",
              rotation.sizes());
  TORCH_CHECK(out.sizes() == rows.sizes() && out.is_contiguous() && out.scalar_type() == rows.scalar_type() &&
                  out.device() == rows.device(),
              "duquant: rotate_rows needs a contiguous ", rows.sizes(), " output of the rows' dtype and device");
  if (is_cpu_float(rows) && is_cpu_float(rotation)) {
    const auto input = rows.contiguous();
    const auto matrix = rotation.contiguous();
    if (cpu::rotate_rows(out.data_ptr<float>(), input.data_ptr<float>(), input.size(0), matrix.data_ptr<float>(),
                         matrix.size(0), cpu::best_vector_isa())) {
      return;
    }
  }
  auto result = out;
  at::mm_out(result, rows, rotation);
}

torch::Tensor rotate_rows(const torch::Tensor& rows, const torch::Tensor& rotation) {
  auto out = torch::empty_like(rows, at::MemoryFormat::Contiguous);
  rotate_rows_out(out, rows, rotation);
  return out;
}

torch::Tensor multiply_by_transpose(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "duquant: multiply_by_transpose expects [T, K] and [N, K], got ", x.sizes(), " and ", weight.sizes());
  if (is_cpu_float(x) && is_cpu_float(weight)) {
    const auto left = x.contiguous(), right = weight.contiguous();
    auto out = torch::empty({left.size(0), right.size(0)}, left.options());
    if (cpu::multiply_by_transpose(out.data_ptr<float>(), left.data_ptr<float>(), left.size(0),
                                   right.data_ptr<float>(), right.size(0), left.size(1), cpu::best_vector_isa())) {
      return out;
    }
  }
  return x.matmul(weight.t());
}

}  // namespace duquant::ops
