// One-pass scans of floating-point tensors by the magnitude of their entries: the peak that the
// greedy rotation reads after every step, and the finiteness check that guards every weight and
// statistic. On the CPU both read the data once with vector instructions and allocate nothing;
// the tensor-op equivalents (abs().argmax(), isfinite().all()) write one or more full-size
// temporaries first, which cost more than the GEMMs they guard.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace duquant {

// The largest |entry| of a tensor and its first flat (row-major) index: what
// abs().flatten().argmax() returns. The greedy step reads it after every rotation, so ties must
// go to the first index for the path to be deterministic whatever the thread count.
struct PeakEntry {
  double magnitude = 0;
  int64_t index = 0;
};
PeakEntry peak_entry(const torch::Tensor& values);

// max_j |x_ij| of every row of a 2-D tensor, float32 [rows]: rows.abs().amax(1) without the
// full-size |x| temporary on the CPU (the greedy rotation reads it after every step).
torch::Tensor row_absmax(const torch::Tensor& rows);

// torch::isfinite(values).all(): no NaN and no infinity. Any dtype (integer tensors are finite).
bool all_finite(const torch::Tensor& values);

}  // namespace duquant
