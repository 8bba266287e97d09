// Weight quantization and packing (DESIGN.md section 4 step 6): asymmetric unsigned int4 per
// output channel or per group along K, clipping ratio chosen per output channel by the output
// error on the calibration sample, packed once in the kernels' layout (src/ops/w4a8_layout.h).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "duquant/stage_times.h"

namespace duquant {

struct WeightQuantOptions {
  int64_t bits = 4;          // <= 4; levels 0..2^bits-1, always stored in 4-bit nibbles
  int64_t group_size = -1;   // <= 0: one scale/zero per output channel
  // Clipping ratios tried per output channel; with no calibration sample only the first is used.
  std::vector<double> clip_ratios = {1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7};
};

// Scale and integer-valued zero point of every quantization group (float32, shaped like the
// groups they describe).
struct QuantizationGrid {
  torch::Tensor scale;
  torch::Tensor zero;
};

struct QuantizedWeight {
  torch::Tensor packed;  // uint8 [N, K / 2]
  torch::Tensor scale;   // float32 [N, G]
  torch::Tensor zero;    // float32 [N, G] (integer-valued zero points)
  int64_t group_size = -1;
  // ||X~ (W~ - deq(W~))^T|| / ||X~ W~^T|| on the calibration sample (NaN without one).
  double output_relative_error = 0;
  double mean_clip_ratio = 1.0;
  StageTimes times;  // ClipSearch, Rounding, Packing
};

// `weight` is the transformed float weight W~ [N, K] (K padded); `sample` is the transformed
// calibration activation [T, K] or an undefined tensor (data-free: fixed first clip ratio).
QuantizedWeight quantize_weight(const torch::Tensor& weight, const torch::Tensor& sample,
                                const WeightQuantOptions& options);

// deq(W~) = scale * (levels - zero), float32 [N, K]: what the integer kernels compute with.
torch::Tensor dequantize_weight(const QuantizedWeight& weight);

// The rounding rule of the asymmetric grid, shared by nearest rounding and GPTQ (src/gptq.cpp):
// levels = clamp(round(w / scale) + zero, 0, max_level) and their values (levels - zero) * scale,
// with scale and zero broadcast against w.
inline int64_t max_weight_level(int64_t bits) { return (int64_t{1} << bits) - 1; }
torch::Tensor round_to_grid(const torch::Tensor& values, const torch::Tensor& scale, const torch::Tensor& zero,
                            int64_t max_level);
torch::Tensor grid_values(const torch::Tensor& levels, const torch::Tensor& scale, const torch::Tensor& zero);
// grid_values(round_to_grid(values, ...)): the value each entry rounds to, bitwise equal to the two
// steps. For float32 CPU values [..., n] with one scale and zero per row ([..., 1]) it is one pass
// with no temporaries (the clip search evaluates it once per ratio on every weight).
torch::Tensor round_trip_to_grid(const torch::Tensor& values, const torch::Tensor& scale, const torch::Tensor& zero,
                                 int64_t max_level);

}  // namespace duquant
