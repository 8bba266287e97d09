// The DuQuant transform of one layer (or of layers sharing one input: q/k/v, gate/up).
// Paper: Lin et al., "DuQuant: Distributing Outliers via Dual Transformation", NeurIPS 2024,
// arXiv 2406.01721, section 3; the steps are DESIGN.md section 4.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "duquant/stage_times.h"

namespace duquant {

enum class Method { Rtn, Smooth, DuQuant };
Method parse_method(const std::string& name);  // "rtn" | "smooth" | "duquant"; throws otherwise
std::string method_name(Method method);

struct TransformOptions {
  Method method = Method::DuQuant;
  int64_t block_size = 128;      // rotation block b (power of two)
  int64_t rotation_steps = 256;  // greedy steps N per rotation
  bool permute = true;           // zigzag permutation between the two rotations
  double alpha = 0.6;            // smoothing strength
  uint64_t seed = 0;             // seeds the random orthogonal Q' of each rotation
};

// Online-transform tensors of one layer, in the argument order of duquant::w4a8_linear
// (include/duquant/ops.h). Empty tensors mean "step skipped".
struct LayerTransform {
  torch::Tensor smooth_inv;   // float32 [in_features]: 1 / s
  torch::Tensor smooth;       // float32 [in_features]: s (applied to the weight columns)
  torch::Tensor rotation1;    // float32 [b, b]; empty when no greedy step improved (the identity)
  torch::Tensor permutation;  // int64 [padded_in_features]
  torch::Tensor rotation2;    // float32 [b, b]; likewise
  int64_t in_features = 0;
  int64_t padded_in_features = 0;
  int64_t rotation1_steps = 0;  // greedy steps kept (0: the identity, left out as empty)
  int64_t rotation2_steps = 0;
  // max_j max_t |x_tj| / mean_j max_t |x_tj| of the calibration sample, before and after.
  double peak_to_mean_before = 0;
  double peak_to_mean_after = 0;
  StageTimes times;  // RotationSearch and Permutation
};

// Smoothing factors s_j = clamp(max|X_j|^alpha / max|W_:,j|^(1-alpha), 1e-5) (section 4 step 1).
torch::Tensor smoothing_scales(const torch::Tensor& activation_absmax, const torch::Tensor& weight_absmax,
                               double alpha);

// R~ of step 2: blockdiag(1, Q') times an orthogonal b x b matrix whose first row is all 1/sqrt(b),
// Q' random orthogonal from `seed`, float64. Q' multiplies from the left so that row 0 stays
// uniform: the outlier channel moved to row 0 is spread evenly over the block (multiplying from
// the right would mix that row too).
torch::Tensor base_rotation(int64_t block_size, uint64_t seed);

struct GreedyRotation {
  torch::Tensor rotation;  // float64 [b, b], orthogonal; identity when steps == 0
  int64_t steps = 0;       // prefix of greedy steps kept
  // Rows the search rotated: those whose norm reached the peak of some step (the others cannot
  // hold it, so they are left alone), at least min(rows, 128).
  int64_t rotated_rows = 0;
};
// How a greedy step finds the peak of the rotated rows; every choice gives bitwise the same result.
//   kHost       the rows' maxima scanned on the CPU (read back from the device first);
//   kTensorOps  reduced where the rows are, one int64 key per row (magnitude, then the lower row,
//               then the row's first maximal column), one number read back per step, and the step
//               rotations indexed from all of them made at once; on a GPU one host round trip per
//               step instead of three. Up to 2^20 rows and 4096-wide blocks (else kHost).
//   kAuto       kHost for rows on the CPU, kTensorOps elsewhere.
enum class PeakSearch { kAuto, kHost, kTensorOps };

// Step 2: greedy outlier-spreading rotation learnt from `blocks` ([rows, b], the activation
// blocks stacked as rows). Picks the outlier *column* at each step.
GreedyRotation greedy_block_rotation(const torch::Tensor& blocks, int64_t max_steps, uint64_t seed,
                                     PeakSearch search = PeakSearch::kAuto);

// Step 3: zigzag permutation of channels by their max |x|: perm[i] = old column of new column i.
struct ZigzagPermutation {
  static torch::Tensor compute(const torch::Tensor& channel_absmax, int64_t block_size);
};

// The whole transform for layers sharing one input. `activation_absmax` [C] and
// `activation_sample` [T, C] come from calibration; `weights` are the [O_i, C] weights of the
// layers that share the input (their column maxima drive smoothing).
LayerTransform compute_transform(const torch::Tensor& activation_absmax, const torch::Tensor& activation_sample,
                                 const std::vector<torch::Tensor>& weights, const TransformOptions& options);

// W~ = W diag(s) (I kron R1) P (I kron R2), float32 [O, padded_in_features] (section 4 step 5):
// x W^T == apply_online_transform(x) W~^T up to rounding.
torch::Tensor transform_weight(const torch::Tensor& weight, const LayerTransform& transform);

}  // namespace duquant
