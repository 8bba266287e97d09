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

// Rows of W~ handled at once: bounds the float temporaries of the clip search (one [rows, K]
// buffer and the [T, rows] products) for the 16384-wide layers of the full-size model.
constexpr int64_t kElementsPerChunk = int64_t{1} << 22;

// The asymmetric grid of every group for per-row clipping ratios `ratio` ([rows, 1, 1] or a
// scalar tensor): levels 0..max_level over [ratio * min, ratio * max]. The range is widened to
// contain 0 so that the integer zero point lies in [0, max_level]: a group of one sign would
// otherwise clamp its zero point and lose its whole range (all-positive weights collapsing onto
// the top level).
QuantizationGrid grid_for_ratio(const torch::Tensor& group_max, const torch::Tensor& group_min,
                                const torch::Tensor& ratio, int64_t max_level) {
  const auto upper = (group_max * ratio).clamp_min(0);
  const auto lower = (group_min * ratio).clamp_max(0);
  const auto range = upper - lower;
  // An all-zero group has no range; any positive scale represents it exactly.
  auto scale = torch::where(range > 0, range / static_cast<double>(max_level), torch::ones_like(range));
  auto zero = torch::round(-lower / scale).clamp(0, max_level);
  return {scale, zero};
}

}  // namespace

// The one rounding formula of the clip search, the final levels, GPTQ and dequantize_weight's
// inverse (in-place after the division: the clip search runs it on every ratio).
torch::Tensor round_to_grid(const torch::Tensor& values, const torch::Tensor& scale, const torch::Tensor& zero,
                            int64_t max_level) {
  return values.div(scale).round_().add_(zero).clamp_(0, max_level);
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
  const auto device = weight.device();
  const auto float_options = torch::TensorOptions().dtype(torch::kFloat).device(device);

  const bool searched = sample.defined() && sample.numel() > 0;
  torch::Tensor activations;
  if (searched) {
    TORCH_CHECK(sample.dim() == 2 && sample.size(1) == k, "duquant: calibration sample of shape ", sample.sizes(),
                " does not match the weight's ", k, " input features");
    activations = sample.detach().to(float_options).contiguous();
  }
  const std::vector<double> ratios =
      searched ? options.clip_ratios : std::vector<double>{options.clip_ratios.front()};

  auto full = weight.detach().to(float_options).contiguous();
  TORCH_CHECK(torch::isfinite(full).all().item<bool>(), "duquant: weight to quantize has non-finite entries");
  const auto grouped_all = full.view({rows, groups, group});
  const auto group_max = grouped_all.amax(2, /*keepdim=*/true);
  const auto group_min = grouped_all.amin(2, /*keepdim=*/true);

  QuantizedWeight result;
  // Clip search (DESIGN.md section 4 step 6): for each ratio, the output error of every channel on
  // the transformed calibration sample, ||X~ (w_n - deq_n)||^2, the error the layer makes rather
  // than the weight MSE. All groups of a channel share its ratio, chosen on their joint error. On
  // ties the earlier ratio (the first is the default) is kept.
  // The ratios are kept in double for the report; the grids use them as float32, exactly as the
  // search evaluated them.
  auto chosen_ratio = torch::full({rows}, ratios.front(), float_options.dtype(torch::kDouble));
  auto chosen_error = torch::zeros({rows}, float_options.dtype(torch::kDouble));
  double reference_energy = 0.0;
  if (searched) {
    StageTimer timer(result.times, Stage::ClipSearch);
    chosen_error.fill_(std::numeric_limits<double>::infinity());
    const int64_t chunk_rows = std::max<int64_t>(1, kElementsPerChunk / k);
    for (int64_t begin = 0; begin < rows; begin += chunk_rows) {
      const int64_t end = std::min(rows, begin + chunk_rows);
      const auto chunk = grouped_all.slice(0, begin, end);
      const auto chunk_max = group_max.slice(0, begin, end), chunk_min = group_min.slice(0, begin, end);
      // X~ W~^T of these channels once: each ratio's error is ||reference - X~ deq^T||^2.
      const auto reference = activations.matmul(chunk.view({end - begin, k}).t());
      reference_energy += reference.to(torch::kDouble).pow(2).sum().item<double>();
      auto best_error = chosen_error.slice(0, begin, end);
      auto best_ratio = chosen_ratio.slice(0, begin, end);
      for (double ratio : ratios) {
        const auto grid = grid_for_ratio(chunk_max, chunk_min, torch::scalar_tensor(ratio, float_options), max_level);
        const auto dequantized = round_to_grid(chunk, grid.scale, grid.zero, max_level).sub_(grid.zero).mul_(grid.scale);
        const auto error = (reference - activations.matmul(dequantized.view({end - begin, k}).t()))
                               .pow_(2)
                               .sum(0)
                               .to(torch::kDouble);
        const auto improved = error < best_error;
        best_error.copy_(torch::where(improved, error, best_error));
        best_ratio.masked_fill_(improved, ratio);
      }
    }
  }

  torch::Tensor levels;
  {
    StageTimer timer(result.times, Stage::Rounding);
    const auto grid =
        grid_for_ratio(group_max, group_min, chosen_ratio.to(torch::kFloat).view({rows, 1, 1}), max_level);
    levels = round_to_grid(grouped_all, grid.scale, grid.zero, max_level).to(torch::kUInt8).view({rows, k});
    result.scale = grid.scale.view({rows, groups});
    result.zero = grid.zero.view({rows, groups});
  }
  {
    StageTimer timer(result.times, Stage::Packing);
    result.packed = ops::pack_int4(levels.cpu());
  }
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
  result.packed = result.packed.to(device);
  return result;
}

torch::Tensor dequantize_weight(const QuantizedWeight& weight) {
  TORCH_CHECK(weight.packed.defined() && weight.scale.defined() && weight.zero.defined(),
              "duquant: dequantize_weight of an empty QuantizedWeight");
  const auto levels = ops::unpack_int4(weight.packed.cpu());
  const int64_t rows = levels.size(0), k = levels.size(1), groups = weight.scale.size(1);
  TORCH_CHECK(weight.scale.size(0) == rows && groups > 0 && k % groups == 0 && weight.zero.sizes() == weight.scale.sizes(),
              "duquant: scale ", weight.scale.sizes(), " / zero ", weight.zero.sizes(), " do not fit a packed [",
              rows, ", ", k, "] weight");
  return grid_values(levels.view({rows, groups, k / groups}), weight.scale.cpu().to(torch::kFloat).unsqueeze(2),
                     weight.zero.cpu().to(torch::kFloat).unsqueeze(2))
      .view({rows, k});
}

}  // namespace duquant
