// Tests of weight quantization and packing (src/quantize.cpp; DESIGN.md section 4 step 6), and
// of the whole per-layer pipeline (transform + W4 + per-token A8) against RTN and smoothing.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "duquant/ops.h"
#include "duquant/quantize.h"
#include "duquant/transform.h"
#include "w4a8_layout.h"

namespace duquant {
namespace {

torch::Tensor gaussian(std::vector<int64_t> shape, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn(shape, generator, torch::kFloat);
}

WeightQuantOptions fixed_ratio(double ratio, int64_t group_size = -1) {
  WeightQuantOptions options;
  options.group_size = group_size;
  options.clip_ratios = {ratio};
  return options;
}

// Scale and zero of every element, expanded from [N, G] to [N, K].
torch::Tensor per_element(const torch::Tensor& per_group, int64_t k) {
  return per_group.repeat_interleave(k / per_group.size(1), 1);
}

double output_relative_error(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& w_hat) {
  auto reference = x.to(torch::kDouble).matmul(w.to(torch::kDouble).t());
  auto approx = x.to(torch::kDouble).matmul(w_hat.to(torch::kDouble).t());
  return ((approx - reference).norm() / reference.norm()).item<double>();
}

TEST(QuantizeWeight, PerChannelLevelsScalesAndPackedLayout) {
  const int64_t n = 64, k = 256;
  auto w = gaussian({n, k}, 1);
  auto q = quantize_weight(w, torch::Tensor(), fixed_ratio(1.0));
  ASSERT_EQ(q.packed.scalar_type(), torch::kUInt8);
  ASSERT_EQ(q.packed.sizes(), (std::vector<int64_t>{n, layout::packed_row_bytes(k)}));
  ASSERT_EQ(q.scale.sizes(), (std::vector<int64_t>{n, 1}));
  ASSERT_EQ(q.zero.sizes(), (std::vector<int64_t>{n, 1}));
  EXPECT_EQ(q.group_size, -1);
  // Asymmetric range [min, max] of each row (it straddles 0 for Gaussian rows), 15 steps.
  auto expected_scale = (w.amax(1, true) - w.amin(1, true)) / layout::kWeightMaxLevel;
  EXPECT_TRUE(torch::allclose(q.scale, expected_scale, 1e-6, 0));
  EXPECT_TRUE(torch::equal(q.zero, torch::round(-w.amin(1, true) / q.scale)));
  EXPECT_TRUE(((q.zero >= 0) & (q.zero <= layout::kWeightMaxLevel)).all().item<bool>());

  // The packed nibbles are exactly the levels implied by scale and zero.
  auto levels = ops::unpack_int4(q.packed);
  auto expected_levels = (torch::round(w / q.scale) + q.zero).clamp(0, layout::kWeightMaxLevel).to(torch::kUInt8);
  EXPECT_TRUE(torch::equal(levels, expected_levels));
  EXPECT_LE(levels.max().item<int>(), layout::kWeightMaxLevel);
  EXPECT_EQ(levels.min().item<int>(), 0);  // the row minimum maps to level 0 at ratio 1

  // Round trip: without clipping every element is within half a step.
  auto deq = dequantize_weight(q);
  ASSERT_EQ(deq.sizes(), w.sizes());
  auto bound = per_element(q.scale, k) * (0.5 + 1e-5);
  EXPECT_TRUE(((deq - w).abs() <= bound).all().item<bool>());
  EXPECT_TRUE(std::isnan(q.output_relative_error));
  EXPECT_DOUBLE_EQ(q.mean_clip_ratio, 1.0);
}

TEST(QuantizeWeight, OneSignedRowsKeepTheirRange) {
  // All-positive and all-negative rows: the range is widened to contain 0, so the zero point
  // stays representable and the round trip still holds to half a step.
  auto w = torch::cat({gaussian({4, 64}, 2).abs() + 1.0, -(gaussian({4, 64}, 3).abs() + 1.0)}, 0);
  auto q = quantize_weight(w, torch::Tensor(), fixed_ratio(1.0));
  auto deq = dequantize_weight(q);
  EXPECT_TRUE(((deq - w).abs() <= per_element(q.scale, 64) * (0.5 + 1e-5)).all().item<bool>());
}

TEST(QuantizeWeight, AllZeroRowIsExact) {
  auto w = torch::zeros({2, 32});
  w[1] = gaussian({32}, 4);
  auto q = quantize_weight(w, torch::Tensor(), fixed_ratio(1.0));
  EXPECT_TRUE(torch::equal(dequantize_weight(q)[0], torch::zeros({32})));
}

TEST(QuantizeWeight, FewerBitsUseFewerLevels) {
  auto w = gaussian({16, 128}, 5);
  auto options = fixed_ratio(1.0);
  options.bits = 3;
  auto q = quantize_weight(w, torch::Tensor(), options);
  EXPECT_EQ(ops::unpack_int4(q.packed).max().item<int>(), 7);
  EXPECT_TRUE(torch::allclose(q.scale, (w.amax(1, true) - w.amin(1, true)) / 7.0, 1e-6, 0));
  options.bits = 5;
  EXPECT_ANY_THROW(quantize_weight(w, torch::Tensor(), options));
}

TEST(QuantizeWeight, GroupsOf32HaveTheirOwnScales) {
  const int64_t n = 32, k = 256, group = 32;
  // Magnitudes vary along k, the case groups are for.
  auto w = gaussian({n, k}, 6) * torch::linspace(0.05, 2.0, k).unsqueeze(0);
  auto grouped = quantize_weight(w, torch::Tensor(), fixed_ratio(1.0, group));
  auto channel = quantize_weight(w, torch::Tensor(), fixed_ratio(1.0));
  ASSERT_EQ(grouped.scale.sizes(), (std::vector<int64_t>{n, k / group}));
  EXPECT_EQ(grouped.group_size, group);
  auto view = w.view({n, k / group, group});
  auto expected_scale = (view.amax(2) - view.amin(2)) / layout::kWeightMaxLevel;
  EXPECT_TRUE(torch::allclose(grouped.scale, expected_scale, 1e-6, 0));
  auto deq = dequantize_weight(grouped);
  EXPECT_TRUE(((deq - w).abs() <= per_element(grouped.scale, k) * (0.5 + 1e-5)).all().item<bool>());
  auto levels = ops::unpack_int4(grouped.packed);
  auto expected_levels = (torch::round(w / per_element(grouped.scale, k)) + per_element(grouped.zero, k))
                             .clamp(0, layout::kWeightMaxLevel)
                             .to(torch::kUInt8);
  EXPECT_TRUE(torch::equal(levels, expected_levels));
  const double grouped_mse = (deq - w).pow(2).mean().item<double>();
  const double channel_mse = (dequantize_weight(channel) - w).pow(2).mean().item<double>();
  EXPECT_LT(grouped_mse, channel_mse);
}

TEST(QuantizeWeight, GroupSizeMustDivideK) {
  auto w = gaussian({8, 256}, 7);
  EXPECT_ANY_THROW(quantize_weight(w, torch::Tensor(), fixed_ratio(1.0, 48)));
  EXPECT_NO_THROW(quantize_weight(w, torch::Tensor(), fixed_ratio(1.0, 64)));
}

TEST(QuantizeWeight, ClipSearchNeverLosesToRatioOne) {
  const int64_t n = 128, k = 512;
  auto x = gaussian({128, k}, 8);
  // Heavy-tailed rows (a few large weights), where clipping pays off.
  auto w = gaussian({n, k}, 9);
  w.index_put_({torch::arange(n), torch::randint(k, {n}, at::make_generator<at::CPUGeneratorImpl>(10))},
               w.index({torch::arange(n), torch::zeros({n}, torch::kLong)}) * 8.0);
  WeightQuantOptions search;
  auto searched = quantize_weight(w, x, search);
  auto unclipped = quantize_weight(w, x, fixed_ratio(1.0));
  std::printf("output relative error: ratio 1.0 %.5f, searched %.5f (mean ratio %.3f)\n",
              unclipped.output_relative_error, searched.output_relative_error, searched.mean_clip_ratio);
  EXPECT_LE(searched.output_relative_error, unclipped.output_relative_error);
  EXPECT_LT(searched.mean_clip_ratio, 1.0);
  EXPECT_GE(searched.mean_clip_ratio, 0.7);
  EXPECT_DOUBLE_EQ(unclipped.mean_clip_ratio, 1.0);
  // The reported figure is the output error of the packed weight.
  EXPECT_NEAR(searched.output_relative_error, output_relative_error(x, w, dequantize_weight(searched)), 1e-4);
  EXPECT_NEAR(unclipped.output_relative_error, output_relative_error(x, w, dequantize_weight(unclipped)), 1e-4);
  // Per group too.
  search.group_size = 64;
  auto searched_groups = quantize_weight(w, x, search);
  auto unclipped_groups = quantize_weight(w, x, fixed_ratio(1.0, 64));
  EXPECT_LE(searched_groups.output_relative_error, unclipped_groups.output_relative_error);
  EXPECT_LT(searched_groups.output_relative_error, searched.output_relative_error);
}

// The clip search's one-pass round trip must be the two tensor steps, bit for bit: values on
// exact half-steps (round half to even), values clamped at both ends, a zero scale guard of 1,
// and per-group grids of several rows.
TEST(RoundTripToGrid, IsBitwiseRoundToGridThenGridValues) {
  const int64_t rows = 37, groups = 3, group = 200;
  auto values = gaussian({rows, groups, group}, 41) * 3.0;
  auto scale = gaussian({rows, groups, 1}, 42).abs().add_(0.05);
  auto zero = torch::randint(0, 16, {rows, groups, 1}, torch::kLong).to(torch::kFloat);
  // Exact half-steps: (level + 0.5 - zero) * scale for a few entries of every row.
  values.select(2, 0).copy_((torch::arange(rows * groups).view({rows, groups}) % 15 + 0.5 - zero.squeeze(2)) *
                            scale.squeeze(2));
  values.select(2, 1).fill_(1e6);
  values.select(2, 2).fill_(-1e6);
  scale[0][0][0] = 1.0;
  const auto fused = round_trip_to_grid(values, scale, zero, 15);
  const auto two_steps = grid_values(round_to_grid(values, scale, zero, 15), scale, zero);
  EXPECT_TRUE(torch::equal(fused, two_steps));
  // Fewer bits clamp at a lower top level.
  EXPECT_TRUE(torch::equal(round_trip_to_grid(values, scale, zero, 3),
                           grid_values(round_to_grid(values, scale, zero, 3), scale, zero)));
  // A non-contiguous input takes the same values.
  const auto transposed = values.transpose(0, 1).contiguous().transpose(0, 1);
  EXPECT_TRUE(torch::equal(round_trip_to_grid(transposed, scale, zero, 15), two_steps));
}

// The one-pass dequantization is grid_values of the unpacked levels, bit for bit, per channel
// and per group.
TEST(DequantizeWeight, IsGridValuesOfTheUnpackedLevels) {
  const auto w = gaussian({24, 256}, 43);
  for (int64_t group_size : {int64_t{0}, int64_t{64}}) {
    WeightQuantOptions options;
    options.group_size = group_size;
    const auto q = quantize_weight(w, torch::Tensor(), options);
    const int64_t groups = q.scale.size(1);
    const auto levels = ops::unpack_int4(q.packed).view({24, groups, 256 / groups});
    const auto expected = grid_values(levels, q.scale.unsqueeze(2), q.zero.unsqueeze(2)).view({24, 256});
    EXPECT_TRUE(torch::equal(dequantize_weight(q), expected)) << "group size " << group_size;
  }
}

TEST(QuantizeWeight, WithoutSampleUsesTheFirstRatio) {
  auto w = gaussian({8, 64}, 11);
  WeightQuantOptions options;
  options.clip_ratios = {0.9, 1.0};
  auto q = quantize_weight(w, torch::Tensor(), options);
  EXPECT_DOUBLE_EQ(q.mean_clip_ratio, 0.9);
  EXPECT_TRUE(std::isnan(q.output_relative_error));
  EXPECT_TRUE(torch::allclose(q.scale, 0.9 * (w.amax(1, true) - w.amin(1, true)) / 15.0, 1e-6, 0));
}

// Per-token symmetric int8 fake quantization (the activation side of duquant::w4a8_linear).
torch::Tensor fake_quantize_per_token(const torch::Tensor& x) {
  const double max_level = layout::activation_max_level(layout::kActivationBits);
  auto scale = (x.abs().amax(1, true) / max_level).clamp_min(1e-12);
  return torch::round(x / scale).clamp(-max_level, max_level) * scale;
}

struct LayerError {
  double w4a8 = 0;        // relative output error of int8 activations x int4 weights
  double weight_only = 0;  // the int4 weights' share (float activations)
};

// The deployed computation of one method: transform, quantize the weight with the transformed
// sample, quantize activations per token, compare with the float layer.
LayerError simulate_w4a8(const torch::Tensor& x, const torch::Tensor& w, Method method) {
  TransformOptions options;
  options.method = method;
  auto t = compute_transform(x.abs().amax(0), x, {w}, options);
  auto xt = ops::apply_online_transform(x, t.smooth_inv, t.rotation1, t.permutation, t.rotation2,
                                        t.padded_in_features);
  auto q = quantize_weight(transform_weight(w, t), xt, WeightQuantOptions{});
  auto deq = dequantize_weight(q);
  auto reference = x.to(torch::kDouble).matmul(w.to(torch::kDouble).t());
  auto relative = [&](const torch::Tensor& y) {
    return ((y.to(torch::kDouble) - reference).norm() / reference.norm()).item<double>();
  };
  return {relative(fake_quantize_per_token(xt).matmul(deq.t())), relative(xt.matmul(deq.t()))};
}

TEST(LayerError, DuQuantBeatsRtnAndSmoothingOnOutlierActivations) {
  const int64_t tokens = 256, channels = 1024, outputs = 1024;
  auto x = gaussian({tokens, channels}, 20);
  for (int64_t channel : {17, 300, 555, 1000}) x.select(1, channel).mul_(60.0);
  auto w = gaussian({outputs, channels}, 21) * 0.02;
  const auto rtn = simulate_w4a8(x, w, Method::Rtn);
  const auto smooth = simulate_w4a8(x, w, Method::Smooth);
  const auto duquant = simulate_w4a8(x, w, Method::DuQuant);
  std::printf("W4A8 relative output error (weight-only share): rtn %.4f (%.4f), smooth %.4f (%.4f), "
              "duquant %.4f (%.4f)\n",
              rtn.w4a8, rtn.weight_only, smooth.w4a8, smooth.weight_only, duquant.w4a8, duquant.weight_only);
  EXPECT_LE(duquant.w4a8, 0.5 * rtn.w4a8);
  EXPECT_LT(duquant.w4a8, smooth.w4a8);
}

}  // namespace
}  // namespace duquant
