// GPTQ rounding of the transformed weight (Frantar et al., "GPTQ: Accurate Post-Training
// Quantization for Generative Pre-trained Transformers", arXiv 2210.17323, Algorithm 1): the
// columns of W~ are rounded one at a time on a fixed grid, and each column's rounding error is
// pushed onto the columns not yet rounded through the Cholesky factor of the inverse Hessian
// H = X~^T X~ of the layer's transformed calibration rows, which minimises ||X~ (W~ - deq)^T||.
// DuQuant (DESIGN.md section 4) decides the grid: the transform and the per-channel clipping
// search (src/quantize.cpp) come first, GPTQ then only chooses the levels on those grids.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "duquant/quantize.h"

namespace duquant {

struct GptqOptions {
  double dampening = 0.01;        // lambda = dampening * mean(diag H) added to the diagonal (section 4, "dampening")
  int64_t block_columns = 128;    // columns per lazy batch update (section 4, "lazy batch-updates")
  bool activation_order = true;   // round columns by decreasing diag(H) (the "act-order" heuristic; README: measured)
};

// What GPTQ needs from the rows: the upper Cholesky factor U of H^-1 (H dampened, in processing
// order) and the processing order. Layers sharing one input (q/k/v, gate/up) share it, so the
// K x K factorisation is done once per input (one 16384-wide factor is 1 GiB in float32).
struct GptqFactor {
  torch::Tensor inverse_cholesky;  // float32 [K, K], upper triangular, rows/columns in `order`
  torch::Tensor order;             // int64 [K]: order[i] = column rounded i-th
  double dampening = 0;            // relative dampening finally used (raised until H is positive definite)
};

// `rows` [T, K]: transformed calibration rows X~ (any float dtype), on the device the work runs on.
GptqFactor gptq_factor(const torch::Tensor& rows, const GptqOptions& options);
// From H = X~^T X~ itself (float32 [K, K], symmetric, on the device the work runs on), e.g. summed
// over every calibration token: only the ratio of the entries matters (dampening is relative),
// so any positive multiple gives the same factor. `hessian` is used as working memory.
GptqFactor gptq_factor_of_hessian(torch::Tensor hessian, const GptqOptions& options);

// Rounds `weight` W~ [N, K] on the grid of `grid` (its scale and zero [N, G], group_size; the
// levels of `grid` are ignored) and packs the levels like quantize_weight. The result has the
// same scale, zero and group size; output_relative_error and mean_clip_ratio are copied from
// `grid` (the caller measures the new error on the rows it chooses).
QuantizedWeight gptq_round(const torch::Tensor& weight, const QuantizedWeight& grid, int64_t bits,
                           const GptqFactor& factor, const GptqOptions& options);

// gptq_factor + gptq_round.
QuantizedWeight gptq_quantize(const torch::Tensor& weight, const torch::Tensor& rows, const QuantizedWeight& grid,
                              int64_t bits, const GptqOptions& options);

}  // namespace duquant
