// Weight quantization of the transformed weight W~ (DESIGN.md section 4 step 6): asymmetric
// unsigned levels per output channel or per group of consecutive k, the clipping ratio chosen
// per output channel by the output error on the transformed calibration sample, then packed once
// into the kernels' int4 layout (src/ops/w4a8_layout.h, duquant::ops::pack_int4).
#include "duquant/quantize.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "duquant/magnitude_scan.h"
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

namespace {

// round_to_grid then grid_values for one row sharing (scale, zero), with the same float
// operations in the same order as the tensor ops (division, round half to even, add, clamp,
// subtract, multiply), so the result is bitwise theirs. Compiled for AVX-512, AVX2 and the
// baseline; the loader picks the best the CPU has.
__attribute__((target_clones("avx512f", "avx2", "default"))) void round_trip_row(const float* values, float* out,
                                                                                int64_t count, float scale,
                                                                                float zero, float max_level) {
  for (int64_t i = 0; i < count; ++i) {
    const float level = std::min(std::max(std::nearbyint(values[i] / scale) + zero, 0.0f), max_level);
    out[i] = (level - zero) * scale;
  }
}

bool has_one_grid_per_row(const torch::Tensor& values, const torch::Tensor& grid) {
  if (grid.dim() != values.dim() || grid.size(-1) != 1) return false;
  for (int64_t d = 0; d + 1 < values.dim(); ++d) {
    if (grid.size(d) != values.size(d)) return false;
  }
  return true;
}

}  // namespace

torch::Tensor round_trip_to_grid(const torch::Tensor& values, const torch::Tensor& scale, const torch::Tensor& zero,
                                 int64_t max_level) {
  const bool fused = values.device().is_cpu() && values.scalar_type() == torch::kFloat && values.dim() >= 1 &&
                     scale.scalar_type() == torch::kFloat && zero.scalar_type() == torch::kFloat &&
                     scale.device().is_cpu() && zero.device().is_cpu() && has_one_grid_per_row(values, scale) &&
                     has_one_grid_per_row(values, zero);
  if (!fused) return grid_values(round_to_grid(values, scale, zero, max_level), scale, zero);
  const auto input = values.contiguous();
  const auto scales = scale.contiguous(), zeros = zero.contiguous();
  auto output = torch::empty_like(input);
  const int64_t row_length = input.size(-1), rows = row_length > 0 ? input.numel() / row_length : 0;
  const float* in = input.data_ptr<float>();
  const float* row_scale = scales.data_ptr<float>();
  const float* row_zero = zeros.data_ptr<float>();
  float* out = output.data_ptr<float>();
  const float top = static_cast<float>(max_level);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_length, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      round_trip_row(in + row * row_length, out + row * row_length, row_length, row_scale[row], row_zero[row], top);
    }
  });
  return output;
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
  TORCH_CHECK(all_finite(full), "duquant: weight to quantize has non-finite entries");
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
      const auto reference = ops::multiply_by_transpose(activations, chunk.view({end - begin, k}));
      reference_energy += reference.to(torch::kDouble).pow(2).sum().item<double>();
      auto best_error = chosen_error.slice(0, begin, end);
      auto best_ratio = chosen_ratio.slice(0, begin, end);
      for (double ratio : ratios) {
        const auto grid = grid_for_ratio(chunk_max, chunk_min, torch::scalar_tensor(ratio, float_options), max_level);
        const auto dequantized = round_trip_to_grid(chunk, grid.scale, grid.zero, max_level);
        const auto error = (reference - ops::multiply_by_transpose(activations, dequantized.view({end - begin, k})))
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
    result.packed = ops::pack_int4(levels);
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
  return result;
}

torch::Tensor dequantize_weight(const QuantizedWeight& weight) {
  TORCH_CHECK(weight.packed.defined() && weight.scale.defined() && weight.zero.defined(),
              "duquant: dequantize_weight of an empty QuantizedWeight");
  const auto packed = weight.packed.cpu().contiguous();
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kUInt8,
              "duquant: dequantize_weight expects uint8 [N, K/2] packed levels, got ", packed.scalar_type(), " ",
              packed.sizes());
  const int64_t rows = packed.size(0), k = packed.size(1) * layout::kWeightsPerByte, groups = weight.scale.size(1);
  TORCH_CHECK(weight.scale.size(0) == rows && groups > 0 && k % groups == 0 && weight.zero.sizes() == weight.scale.sizes(),
              "duquant: scale ", weight.scale.sizes(), " / zero ", weight.zero.sizes(), " do not fit a packed [",
              rows, ", ", k, "] weight");
  // grid_values of the unpacked levels, (level - zero) * scale in float32 with the same two
  // roundings, in one pass from the packed bytes (w4a8_layout.h) instead of three full-size
  // temporaries: the layer check dequantizes every weight.
  const auto scale = weight.scale.cpu().to(torch::kFloat).contiguous();
  const auto zero = weight.zero.cpu().to(torch::kFloat).contiguous();
  auto values = torch::empty({rows, k}, torch::kFloat);
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  const float* group_scale = scale.data_ptr<float>();
  const float* group_zero = zero.data_ptr<float>();
  float* out = values.data_ptr<float>();
  const int64_t group_length = k / groups;
  at::parallel_for(0, rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(k, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t n = begin; n < end; ++n) {
                       for (int64_t g = 0; g < groups; ++g) {
                         const float z = group_zero[n * groups + g], s = group_scale[n * groups + g];
                         for (int64_t j = g * group_length; j < (g + 1) * group_length; ++j) {
                           const auto level = layout::unpack_level(bytes[layout::packed_byte_index(n, j, k)], j);
                           out[n * k + j] = (static_cast<float>(level) - z) * s;
                         }
                       }
                     }
                   });
  return values;
}

}  // namespace duquant
