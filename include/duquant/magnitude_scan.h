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

// The peak of float32 rows [n, b] that are rows row_numbers[i] (int64 [n], distinct, below
// row_count) of a larger [row_count, b] tensor: the largest |entry|, among equal ones the lowest
// row number, then the first column, and its index row_number * b + column; so when the other
// rows of the larger tensor hold nothing larger, what peak_entry returns for it. Computed with
// tensor ops where the rows are: one int64 key per row (the magnitude's float bits above the
// complement of the row number above the column of the row's first maximal entry), the largest
// key read back, 8 bytes, in one device-to-host copy (the greedy rotation's peak on a GPU). Needs
// row_count <= 2^20 and b <= 4096 (row_peak_keys_fit); finite entries.
bool row_peak_keys_fit(int64_t row_count, int64_t b);
PeakEntry peak_entry_of_rows(const torch::Tensor& rows, const torch::Tensor& row_numbers, int64_t row_count);

// max_j |x_ij| of every row of a 2-D tensor, float32 [rows]: rows.abs().amax(1) without the
// full-size |x| temporary on the CPU (the greedy rotation reads it after every step).
torch::Tensor row_absmax(const torch::Tensor& rows);

// torch::isfinite(values).all(): no NaN and no infinity. Any dtype (integer tensors are finite).
bool all_finite(const torch::Tensor& values);

}  // namespace duquant
