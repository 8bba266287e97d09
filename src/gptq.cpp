// GPTQ rounding (arXiv 2210.17323, Algorithm 1) of the DuQuant-transformed weight on the grids
// the clipping search chose. Tensor ops and one operator per batch of columns, everything on the
// weight's device, so the same code runs wherever the pipeline puts the layer; the factorisation
// is float32 (as the paper's reference), with the dampening raised tenfold until the Cholesky
// factorisation succeeds.
#include "duquant/gptq.h"

#include <algorithm>

#include "duquant/ops.h"

namespace duquant {
namespace {

// Raising lambda tenfold at most this often: from 1e-2 that reaches 1e4 * mean(diag H), far
// beyond any rounding trouble of a positive semi-definite H.
constexpr int kDampeningAttempts = 6;

}  // namespace

GptqFactor gptq_factor(const torch::Tensor& rows, const GptqOptions& options) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) > 0, "duquant: GPTQ needs [T, K] calibration rows, got ", rows.sizes());
  const auto x = rows.detach().to(torch::kFloat);
  return gptq_factor_of_hessian(x.t().matmul(x), options);
}

GptqFactor gptq_factor_of_hessian(torch::Tensor hessian, const GptqOptions& options) {
  TORCH_CHECK(hessian.dim() == 2 && hessian.size(0) == hessian.size(1) && hessian.scalar_type() == torch::kFloat,
              "duquant: GPTQ needs a square float32 Hessian, got ", hessian.sizes(), " ", hessian.scalar_type());
  TORCH_CHECK(options.dampening > 0, "duquant: GPTQ dampening must be positive, got ", options.dampening);
  const int64_t k = hessian.size(0);
  auto diagonal = hessian.diagonal();
  // A column no row ever touches (zero padding without rotation, a dead channel) has no
  // curvature: a unit diagonal keeps H invertible and makes that column round to nearest
  // without pushing error anywhere (the paper's "dead" columns; the weight is kept as it is).
  const auto dead = diagonal == 0;
  diagonal.masked_fill_(dead, 1.0);

  GptqFactor factor;
  if (options.activation_order) {
    factor.order = std::get<1>(diagonal.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
    hessian = hessian.index_select(0, factor.order).index_select(1, factor.order);
  } else {
    factor.order = torch::arange(k, hessian.options().dtype(torch::kLong));
  }
  // Dampening goes onto the diagonal in place: for a 16384-wide input H is 1 GiB in float32, and
  // no second K x K matrix (an identity, a dampened copy) is made next to it.
  const auto undampened = hessian.diagonal().clone();
  const auto mean_diagonal = undampened.mean();
  double dampening = options.dampening;
  for (int attempt = 0; attempt < kDampeningAttempts; ++attempt, dampening *= 10) {
    hessian.diagonal().copy_(undampened + mean_diagonal * dampening);
    auto [lower, info] = torch::linalg_cholesky_ex(hessian);
    if (info.item<int>() != 0) continue;
    // H^-1 from its Cholesky factor, then the upper factor of H^-1: row i of U holds how the
    // error of column i moves the columns after it (section 4, "Cholesky reformulation").
    // At most two K x K matrices are alive at any point.
    hessian = torch::Tensor();
    auto inverse = torch::cholesky_inverse(lower);
    lower = torch::Tensor();
    auto [upper, inverse_info] = torch::linalg_cholesky_ex(inverse, /*upper=*/true);
    TORCH_CHECK(inverse_info.item<int>() == 0, "duquant: the inverse GPTQ Hessian lost positive definiteness at "
                "dampening ", dampening, "; use nearest rounding (--weight-rounding nearest)");
    factor.inverse_cholesky = upper;
    factor.dampening = dampening;
    return factor;
  }
  TORCH_CHECK(false, "duquant: the GPTQ Hessian is not positive definite even with dampening ", dampening,
              "; use nearest rounding (--weight-rounding nearest)");
}

QuantizedWeight gptq_round(const torch::Tensor& weight, const QuantizedWeight& grid, int64_t bits,
                           const GptqFactor& factor, const GptqOptions& options) {
  TORCH_CHECK(weight.dim() == 2, "duquant: GPTQ expects a [N, K] weight, got ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(factor.inverse_cholesky.defined() && factor.inverse_cholesky.size(0) == k,
              "duquant: GPTQ factor does not fit a weight of ", k, " input features");
  TORCH_CHECK(grid.scale.defined() && grid.scale.size(0) == n && grid.zero.sizes() == grid.scale.sizes(),
              "duquant: GPTQ grid of shape ", grid.scale.sizes(), " does not fit a [", n, ", ", k, "] weight");
  const int64_t groups = grid.scale.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0, "duquant: ", groups, " groups do not divide ", k, " columns");
  const int64_t group_columns = k / groups;
  const int64_t max_level = max_weight_level(bits);
  const auto device = weight.device();

  // Everything in processing order: column i of `work` is original column order[i], rounded on
  // the grid of the group that original column belongs to (static groups: the grids were fixed
  // by the clipping search before any rounding, so activation order cannot move a column's grid).
  const auto order = factor.order.to(device);
  auto work = weight.detach().to(torch::kFloat).index_select(1, order).contiguous();
  const auto column_group = torch::div(order, group_columns, "floor");
  const auto scale = grid.scale.to(device, torch::kFloat).index_select(1, column_group);  // [N, K]
  const auto zero = grid.zero.to(device, torch::kFloat).index_select(1, column_group);
  const auto upper = factor.inverse_cholesky.to(device, torch::kFloat);
  auto levels = torch::empty({n, k}, work.options());

  const int64_t block = std::max<int64_t>(1, options.block_columns);
  for (int64_t begin = 0; begin < k; begin += block) {
    const int64_t end = std::min(k, begin + block);
    // Algorithm 1 inside the batch, one operator call (src/ops/gptq_sweep.h): each column is
    // rounded, err = (w - q) / [H^-1]_ii, and the later columns of the batch move by err * U_i.
    const auto [block_levels, block_error] =
        ops::gptq_sweep_block(work.slice(1, begin, end), scale.slice(1, begin, end), zero.slice(1, begin, end),
                              upper.slice(0, begin, end).slice(1, begin, end), max_level);
    levels.slice(1, begin, end).copy_(block_levels);
    // Lazy batch update of the columns after the block.
    if (end < k) work.slice(1, end).sub_(block_error.matmul(upper.slice(0, begin, end).slice(1, end)));
  }

  // Back to the original column order and the kernels' packed layout.
  const auto inverse_order = torch::argsort(order);
  QuantizedWeight result = grid;
  result.packed = ops::pack_int4(levels.index_select(1, inverse_order).to(torch::kUInt8).contiguous());
  return result;
}

QuantizedWeight gptq_quantize(const torch::Tensor& weight, const torch::Tensor& rows, const QuantizedWeight& grid,
                              int64_t bits, const GptqOptions& options) {
  return gptq_round(weight, grid, bits, gptq_factor(rows.to(weight.device()), options), options);
}

}  // namespace duquant
