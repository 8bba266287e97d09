// GPTQ rounding of the transformed weight (src/gptq.cpp; arXiv 2210.17323): what it must reproduce
// (nearest rounding when H is the identity), what it must improve (the output error on the rows its
// Hessian came from), and the synthetic outlier layer, nearest vs GPTQ, on held-out rows.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <vector>

#include "duquant/gptq.h"
#include "duquant/ops.h"
#include "duquant/quantize.h"
#include "duquant/transform.h"

namespace duquant {
namespace {

torch::Tensor gaussian(std::vector<int64_t> shape, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn(shape, generator, torch::kFloat);
}

WeightQuantOptions with_ratio(double ratio, int64_t group_size) {
  WeightQuantOptions options;
  options.group_size = group_size;
  options.clip_ratios = {ratio};
  return options;
}

double output_error(const torch::Tensor& rows, const torch::Tensor& weight, const QuantizedWeight& quantized) {
  const auto x = rows.to(torch::kDouble);
  const auto reference = x.matmul(weight.to(torch::kDouble).t());
  return ((x.matmul(dequantize_weight(quantized).to(torch::kDouble).t()) - reference).norm() / reference.norm())
      .item<double>();
}

// Rows with correlated channels (a random mixing of a few strong directions), as real layer
// inputs are: the case where pushing rounding error onto later columns pays off.
torch::Tensor correlated_rows(int64_t rows, int64_t k, uint64_t seed) {
  return gaussian({rows, k / 4}, seed).matmul(gaussian({k / 4, k}, seed + 1)) + 0.1 * gaussian({rows, k}, seed + 2);
}

struct GridCase {
  const char* name;
  int64_t group_size;
  bool activation_order;
};

class GptqGrid : public ::testing::TestWithParam<GridCase> {};

// With X = I the Hessian is (1 + lambda) I: no column's error reaches another column, so every
// column rounds to its nearest level on the clipping search's grid.
TEST_P(GptqGrid, IdentityHessianReproducesNearestRounding) {
  const int64_t n = 48, k = 256;
  const auto weight = gaussian({n, k}, 1);
  const auto nearest = quantize_weight(weight, torch::Tensor(), with_ratio(0.9, GetParam().group_size));
  GptqOptions options;
  options.activation_order = GetParam().activation_order;
  const auto rounded = gptq_quantize(weight, torch::eye(k), nearest, 4, options);
  EXPECT_TRUE(torch::equal(rounded.packed, nearest.packed));
  EXPECT_TRUE(torch::equal(rounded.scale, nearest.scale));
  EXPECT_TRUE(torch::equal(rounded.zero, nearest.zero));
  EXPECT_EQ(rounded.group_size, nearest.group_size);
}

// On the rows H was built from, GPTQ's output error is well below nearest rounding's, on the same
// grids; and the levels stay on the grid (0..15) with scale and zero untouched.
TEST_P(GptqGrid, FitRowOutputErrorIsBelowNearest) {
  const int64_t n = 64, k = 256;
  const auto rows = correlated_rows(1024, k, 3);
  const auto weight = gaussian({n, k}, 4);
  WeightQuantOptions search;
  search.group_size = GetParam().group_size;
  const auto nearest = quantize_weight(weight, rows, search);
  GptqOptions options;
  options.activation_order = GetParam().activation_order;
  const auto rounded = gptq_quantize(weight, rows, nearest, 4, options);
  const double nearest_error = output_error(rows, weight, nearest);
  const double gptq_error = output_error(rows, weight, rounded);
  std::printf("[gptq] %s: fit-row output error nearest %.4f, gptq %.4f\n", GetParam().name, nearest_error, gptq_error);
  EXPECT_LT(gptq_error, 0.8 * nearest_error);
  EXPECT_TRUE(torch::equal(rounded.scale, nearest.scale));
  EXPECT_TRUE(torch::equal(rounded.zero, nearest.zero));
  EXPECT_LE(ops::unpack_int4(rounded.packed).max().item<int>(), 15);
}

INSTANTIATE_TEST_SUITE_P(Grids, GptqGrid,
                         ::testing::Values(GridCase{"PerChannel", -1, false}, GridCase{"PerChannelActOrder", -1, true},
                                           GridCase{"Groups64", 64, false}, GridCase{"Groups64ActOrder", 64, true}),
                         [](const ::testing::TestParamInfo<GridCase>& info) { return info.param.name; });

// Fewer bits: the grid has 8 levels and GPTQ never leaves it.
TEST(Gptq, ThreeBitLevelsStayOnTheirGrid) {
  const auto rows = correlated_rows(512, 128, 5);
  const auto weight = gaussian({32, 128}, 6);
  auto options = with_ratio(1.0, -1);
  options.bits = 3;
  const auto nearest = quantize_weight(weight, rows, options);
  const auto rounded = gptq_quantize(weight, rows, nearest, 3, GptqOptions{});
  EXPECT_LE(ops::unpack_int4(rounded.packed).max().item<int>(), 7);
  EXPECT_LT(output_error(rows, weight, rounded), output_error(rows, weight, nearest));
}

// A column no row touches (zero padding without rotation) keeps H invertible and rounds to nearest.
TEST(Gptq, DeadColumnsRoundToNearest) {
  auto rows = correlated_rows(256, 128, 7);
  rows.slice(1, 100).zero_();
  const auto weight = gaussian({16, 128}, 8);
  const auto nearest = quantize_weight(weight, rows, with_ratio(1.0, -1));
  const auto factor = gptq_factor(rows, GptqOptions{});
  EXPECT_NEAR(factor.dampening, 0.01, 1e-12);
  const auto rounded = gptq_round(weight, nearest, 4, factor, GptqOptions{});
  // H is block diagonal between live and dead columns, so no error is pushed onto the dead ones.
  EXPECT_TRUE(torch::equal(ops::unpack_int4(rounded.packed).slice(1, 100), ops::unpack_int4(nearest.packed).slice(1, 100)));
}

// The synthetic outlier layer of test_quantize.cpp (four 60x activation channels), DuQuant
// transform, then nearest vs GPTQ on the same grids, measured on held-out rows of the same
// distribution (every row used for fitting is excluded).
TEST(Gptq, OutlierLayerHeldOutErrorGptqVsNearest) {
  const int64_t tokens = 2048, channels = 1024, outputs = 1024;
  auto x = gaussian({tokens, channels}, 20);
  for (int64_t channel : {17, 300, 555, 1000}) x.select(1, channel).mul_(60.0);
  // Correlated on top (real activations are): a shared low-rank component.
  x += gaussian({tokens, 32}, 22).matmul(gaussian({32, channels}, 23)) * 0.5;
  const auto w = gaussian({outputs, channels}, 21) * 0.02;
  const auto fit = x.slice(0, 0, tokens * 7 / 8);
  const auto held_out = x.slice(0, tokens * 7 / 8);
  TransformOptions options;
  const auto transform = compute_transform(fit.abs().amax(0), fit.slice(0, 0, 256), {w}, options);
  auto online = [&](const torch::Tensor& rows) {
    return ops::apply_online_transform(rows, transform.smooth_inv, transform.rotation1, transform.permutation,
                                       transform.rotation2, transform.padded_in_features);
  };
  const auto weight = transform_weight(w, transform);
  const auto nearest = quantize_weight(weight, online(fit.slice(0, 0, 256)), WeightQuantOptions{});
  const auto rounded = gptq_quantize(weight, online(fit), nearest, 4, GptqOptions{});
  const double nearest_held_out = output_error(online(held_out), weight, nearest);
  const double gptq_held_out = output_error(online(held_out), weight, rounded);
  std::printf("[gptq] outlier layer, DuQuant W4 weight error on held-out rows: nearest %.4f, gptq %.4f (%.2fx)\n",
              nearest_held_out, gptq_held_out, gptq_held_out / nearest_held_out);
  EXPECT_LT(gptq_held_out, 0.9 * nearest_held_out);
}

// Algorithm 1 inside one batch of columns, written column by column with tensor operations (how
// src/gptq.cpp first computed it): the reference the sweep operator must match bit for bit.
std::pair<torch::Tensor, torch::Tensor> column_by_column_sweep(const torch::Tensor& block, const torch::Tensor& scale,
                                                               const torch::Tensor& zero, const torch::Tensor& upper,
                                                               int64_t max_level) {
  auto weight = block.clone();
  auto levels = torch::empty_like(weight), errors = torch::empty_like(weight);
  for (int64_t i = 0; i < weight.size(1); ++i) {
    const auto column = weight.select(1, i), column_scale = scale.select(1, i), column_zero = zero.select(1, i);
    const auto column_levels = round_to_grid(column, column_scale, column_zero, max_level);
    const auto error = (column - grid_values(column_levels, column_scale, column_zero)) / upper[i][i];
    weight.slice(1, i).sub_(error.unsqueeze(1) * upper.select(0, i).slice(0, i).unsqueeze(0));
    levels.select(1, i).copy_(column_levels);
    errors.select(1, i).copy_(error);
  }
  return {levels, errors};
}

struct SweepInputs {
  torch::Tensor block, scale, zero, upper;
};

// A batch cut out of wider [N, 300] matrices (row stride 300, as gptq_round passes its slices),
// with per-entry grids whose ranges are a third of the weights' (so clamping to 0 and max_level
// happens), and a well-conditioned upper factor.
SweepInputs sweep_inputs(int64_t rows, int64_t columns, uint64_t seed) {
  const auto wide = gaussian({rows, 300}, seed);
  const auto scale = (gaussian({rows, 300}, seed + 1).abs() * 0.05 + 0.02);
  const auto zero = torch::randint(0, 16, {rows, 300}, at::make_generator<at::CPUGeneratorImpl>(seed + 2)).to(torch::kFloat);
  const auto spread = gaussian({300, 300}, seed + 3) * 0.1;
  const auto upper = (spread.triu(1) + torch::diag(gaussian({300}, seed + 4).abs() + 0.5)).contiguous();
  return {wide.slice(1, 7, 7 + columns), scale.slice(1, 7, 7 + columns), zero.slice(1, 7, 7 + columns),
          upper.slice(0, 7, 7 + columns).slice(1, 7, 7 + columns)};
}

TEST(GptqSweep, RoundsEachColumnThenMovesTheLaterOnesBitwiseLikeTheColumnByColumnOps) {
  for (const int64_t columns : {1, 37, 128, 256}) {
    const auto inputs = sweep_inputs(61, columns, 40 + columns);
    const auto [levels, errors] = ops::gptq_sweep_block(inputs.block, inputs.scale, inputs.zero, inputs.upper, 15);
    const auto [expected_levels, expected_errors] =
        column_by_column_sweep(inputs.block, inputs.scale, inputs.zero, inputs.upper, 15);
    EXPECT_TRUE(torch::equal(levels, expected_levels)) << columns << " columns";
    EXPECT_TRUE(torch::equal(errors, expected_errors)) << columns << " columns";
    // The inputs reach both ends of the grid and the errors carry over: not a nearest rounding.
    EXPECT_GT((levels == 0).sum().item<int64_t>() + (levels == 15).sum().item<int64_t>(), 0);
    if (columns > 1) {
      const auto nearest = round_to_grid(inputs.block, inputs.scale, inputs.zero, 15);
      EXPECT_FALSE(torch::equal(levels, nearest)) << columns << " columns";
    }
  }
}

TEST(GptqSweep, RejectsMismatchedShapesAndDtypes) {
  const auto inputs = sweep_inputs(4, 8, 50);
  EXPECT_THROW(ops::gptq_sweep_block(inputs.block, inputs.scale.slice(1, 0, 7), inputs.zero, inputs.upper, 15),
               c10::Error);
  EXPECT_THROW(ops::gptq_sweep_block(inputs.block, inputs.scale, inputs.zero, inputs.upper.slice(0, 0, 7), 15),
               c10::Error);
  EXPECT_THROW(ops::gptq_sweep_block(inputs.block.to(torch::kDouble), inputs.scale, inputs.zero, inputs.upper, 15),
               c10::Error);
}

}  // namespace
}  // namespace duquant
