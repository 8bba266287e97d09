// Weight quantization of the transformed weight W~ (DESIGN.md section 4 step 6): asymmetric
// unsigned levels per output channel or per group of consecutive k, the clipping ratio chosen
// per output channel by the output error on the transformed calibration sample, then packed once
// into the kernels' int4 layout (src/ops/w4a8_layout.h, duquant::ops::pack_int4).
#include "duquant/quantize.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "duquant/ops.h"
#include "w4a8_layout.h"

namespace duquant {
namespace {

// Rows of W~ handled at once: bounds the float temporaries of the clip search (a few
// [rows, K] tensors per ratio) for the 16384-wide layers of the full-size model.
constexpr int64_t kElementsPerChunk = int64_t{1} << 24;

struct GroupQuantization {
  torch::Tensor levels;  // uint8 [rows, G, group]
  torch::Tensor scale;   // float32 [rows, G]
  torch::Tensor zero;    // float32 [rows, G], integer-valued
};

// Asymmetric quantization of `grouped` [rows, G, group] to 0..max_level with the range
// [ratio * min, ratio * max]. The range is widened to contain 0 so that the integer zero point
// lies in [0, max_level]: a group of one sign would otherwise clamp its zero point and lose
// its whole range (e.g. all-positive weights collapsing onto the top level).
GroupQuantization quantize_groups(const torch::Tensor& grouped, const torch::Tensor& group_max,
                                  const torch::Tensor& group_min, double ratio, int64_t max_level) {
  const auto upper = (group_max * ratio).clamp_min(0);
  const auto lower = (group_min * ratio).clamp_max(0);
  const auto range = upper - lower;
  // An all-zero group has no range; any positive scale represents it exactly.
  auto scale = torch::where(range > 0, range / static_cast<double>(max_level), torch::ones_like(range));
  auto zero = torch::round(-lower / scale).clamp(0, max_level);
  auto levels = round_to_grid(grouped, scale.unsqueeze(2), zero.unsqueeze(2), max_level);
  return {levels.to(torch::kUInt8), scale, zero};
}

torch::Tensor dequantize_groups(const torch::Tensor& levels, const torch::Tensor& scale, const torch::Tensor& zero) {
  return grid_values(levels, scale.unsqueeze(2), zero.unsqueeze(2));
}

}  // namespace

torch::Tensor round_to_grid(const torch::Tensor& values, const torch::Tensor& scale, const torch::Tensor& zero,
                            int64_t max_level) {
  return (torch::round(values / scale) + zero).clamp(0, max_level);
}

torch::Tensor grid_values(const torch::Tensor& levels, const torch::Tensor& scale, const torch::Tensor& zero) {
  return (levels.to(torch::kFloat) - zero) * scale;
}

QuantizedWeight quantize_weight(const torch::Tensor& weight, const torch::Tensor& sample,
                                const WeightQuantOptions& options) {
  TORCH_CHECK(weight.dim() == 2, "duquant: quantize_weight expects a [N, K] weight, got ", weight.sizes());
  TORCH_CHECK(options.bits >= 1 && options.bits <= layout::kWeightBits, "duquant: weight bits must lie in 1..",
              layout::kWeightBits, ", got ", options.bits);
  TORCH_CHECK(!options.clip_ratios.empty(), "duquant: no clipping ratio given");
  for (double ratio : options.clip_ratios) {
    TORCH_CHECK(ratio > 0.0 && ratio <= 1.0, "duquant: clipping ratios must lie in (0, 1], got ", ratio);
  }
  const int64_t rows = weight.size(0), k = weight.size(1);
  const int64_t group = options.group_size > 0 ? options.group_size : k;
  TORCH_CHECK(k > 0 && k % group == 0, "duquant: group_size ", options.group_size,
              " does not divide the (padded) in_features ", k);
  const int64_t groups = k / group;
  const int64_t max_level = max_weight_level(options.bits);

  const bool searched = sample.defined() && sample.numel() > 0;
  torch::Tensor activations;
  if (searched) {
    TORCH_CHECK(sample.dim() == 2 && sample.size(1) == k, "duquant: calibration sample of shape ", sample.sizes(),
                " does not match the weight's ", k, " input features");
    activations = sample.detach().to(torch::kFloat).contiguous();
  }
  const std::vector<double> ratios =
      searched ? options.clip_ratios : std::vector<double>{options.clip_ratios.front()};

  auto full = weight.detach().to(torch::kFloat).contiguous();
  TORCH_CHECK(torch::isfinite(full).all().item<bool>(), "duquant: weight to quantize has non-finite entries");
  auto levels = torch::empty({rows, groups, group}, torch::kUInt8);
  auto scale = torch::empty({rows, groups}, torch::kFloat);
  auto zero = torch::empty({rows, groups}, torch::kFloat);
  auto chosen_ratio = torch::empty({rows}, torch::kDouble);
  auto chosen_error = torch::zeros({rows}, torch::kDouble);
  double reference_energy = 0.0;

  const int64_t chunk_rows = std::max<int64_t>(1, kElementsPerChunk / k);
  for (int64_t begin = 0; begin < rows; begin += chunk_rows) {
    const int64_t end = std::min(rows, begin + chunk_rows);
    const auto chunk = full.slice(0, begin, end);
    const auto grouped = chunk.view({end - begin, groups, group});
    const auto group_max = grouped.amax(2);
    const auto group_min = grouped.amin(2);
    auto best_levels = levels.slice(0, begin, end);
    auto best_scale = scale.slice(0, begin, end);
    auto best_zero = zero.slice(0, begin, end);
    auto best_ratio = chosen_ratio.slice(0, begin, end);
    auto best_error = chosen_error.slice(0, begin, end);
    best_error.fill_(std::numeric_limits<double>::infinity());
    if (searched) reference_energy += activations.matmul(chunk.t()).to(torch::kDouble).pow(2).sum().item<double>();

    for (double ratio : ratios) {
      auto candidate = quantize_groups(grouped, group_max, group_min, ratio, max_level);
      torch::Tensor improved;
      if (searched) {
        // Output error of each channel on the sample, ||X (w_n - deq_n)||^2: the error the layer
        // makes, not the weight MSE (output-error clipping search, DESIGN.md section 4 step 6).
        // All groups of a channel share its ratio, chosen on their joint output error.
        auto residual = chunk - dequantize_groups(candidate.levels, candidate.scale, candidate.zero).view({-1, k});
        auto error = activations.matmul(residual.t()).to(torch::kDouble).pow(2).sum(0);
        // Strictly smaller only: on ties the earlier ratio (the first is the default) is kept.
        improved = error < best_error;
        best_error.copy_(torch::where(improved, error, best_error));
      } else {
        improved = torch::ones({end - begin}, torch::kBool);
        best_error.fill_(std::numeric_limits<double>::quiet_NaN());
      }
      best_levels.copy_(torch::where(improved.view({-1, 1, 1}), candidate.levels, best_levels));
      best_scale.copy_(torch::where(improved.view({-1, 1}), candidate.scale, best_scale));
      best_zero.copy_(torch::where(improved.view({-1, 1}), candidate.zero, best_zero));
      best_ratio.masked_fill_(improved, ratio);
    }
  }

  QuantizedWeight result;
  result.packed = ops::pack_int4(levels.view({rows, k}));
  result.scale = scale;
  result.zero = zero;
  result.group_size = options.group_size > 0 ? options.group_size : -1;
  result.mean_clip_ratio = rows > 0 ? chosen_ratio.mean().item<double>() : options.clip_ratios.front();
  if (!searched) {
    result.output_relative_error = std::numeric_limits<double>::quiet_NaN();
  } else {
    // Summed from the per-channel errors the search minimised, so a searched result can never
    // report more error than the first ratio alone would have.
    const double error_energy = chosen_error.sum().item<double>();
    result.output_relative_error = reference_energy > 0   ? std::sqrt(error_energy / reference_energy)
                                   : error_energy == 0.0 ? 0.0
                                                         : std::numeric_limits<double>::infinity();
  }
  return result;
}

torch::Tensor dequantize_weight(const QuantizedWeight& weight) {
  TORCH_CHECK(weight.packed.defined() && weight.scale.defined() && weight.zero.defined(),
              "duquant: dequantize_weight of an empty QuantizedWeight");
  const auto levels = ops::unpack_int4(weight.packed);
  const int64_t rows = levels.size(0), k = levels.size(1), groups = weight.scale.size(1);
  TORCH_CHECK(weight.scale.size(0) == rows && groups > 0 && k % groups == 0 && weight.zero.sizes() == weight.scale.sizes(),
              "duquant: scale ", weight.scale.sizes(), " / zero ", weight.zero.sizes(), " do not fit a packed [",
              rows, ", ", k, "] weight");
  return dequantize_groups(levels.view({rows, groups, k / groups}), weight.scale.to(torch::kFloat),
                           weight.zero.to(torch::kFloat))
      .view({rows, k});
}

}  // namespace duquant
