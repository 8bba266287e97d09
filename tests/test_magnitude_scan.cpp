// Tests of the one-pass magnitude scans (src/magnitude_scan.cpp) against the tensor ops they
// stand for.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <limits>
#include <vector>

#include "duquant/magnitude_scan.h"

namespace duquant {
namespace {

torch::Tensor gaussian(std::vector<int64_t> shape, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn(shape, generator, torch::kFloat);
}

double largest_finite(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return std::numeric_limits<float>::max();
    case torch::kBFloat16: return static_cast<float>(std::numeric_limits<c10::BFloat16>::max());
    case torch::kHalf: return static_cast<float>(std::numeric_limits<c10::Half>::max());
    default: return std::numeric_limits<double>::max();
  }
}

// peak_entry is abs().flatten().argmax(): the same magnitude and the same first index, also when
// equal peaks of either sign lie in different parallel chunks of the scan.
TEST(PeakEntry, IsTheFirstLargestMagnitudeLikeAbsArgmax) {
  for (int64_t rows : {1, 3, 700, 3000}) {
    auto values = gaussian({rows, 128}, 60 + static_cast<uint64_t>(rows));
    const int64_t count = values.numel();
    const auto expect_argmax_semantics = [&](const char* what) {
      const auto magnitudes = values.abs().flatten();
      const int64_t index = magnitudes.argmax().item<int64_t>();
      const auto peak = peak_entry(values);
      EXPECT_EQ(peak.index, index) << what << ", " << rows << " rows";
      EXPECT_EQ(peak.magnitude, magnitudes[index].item<double>()) << what << ", " << rows << " rows";
    };
    expect_argmax_semantics("gaussian");
    auto flat = values.view(-1);
    flat[count - 1] = -50.0;  // a negative peak in the last chunk
    expect_argmax_semantics("negative peak");
    flat[count / 2] = 50.0;  // the same magnitude earlier, positive
    expect_argmax_semantics("tie of opposite signs");
    flat[count / 3] = -50.0;
    expect_argmax_semantics("three-way tie");
  }
  EXPECT_EQ(peak_entry(torch::zeros({4, 8})).index, 0);
}

// row_absmax is abs().amax(1) on the CPU scan and on the tensor-op fallback (other dtypes), for
// rows of any length, negative peaks included.
TEST(RowAbsmax, IsTheLargestMagnitudeOfEveryRowLikeAbsAmax) {
  for (int64_t length : {1, 7, 128, 5000}) {
    auto values = gaussian({300, length}, 90 + static_cast<uint64_t>(length));
    values[17][length - 1] = -80.0;
    for (auto dtype : {torch::kFloat, torch::kDouble}) {
      const auto rows = values.to(dtype);
      const auto maxima = row_absmax(rows);
      EXPECT_EQ(maxima.scalar_type(), torch::kFloat);
      EXPECT_TRUE(torch::equal(maxima, rows.abs().amax(1).to(torch::kFloat))) << length << " columns, " << dtype;
    }
  }
}

// all_finite is isfinite().all() for every float width, wherever the bad entry lies (first,
// last, or a chunk in the middle of a multi-chunk scan), for either sign and for the largest
// finite value, which sits one step below infinity in the bits the scan compares.
TEST(AllFinite, FindsEveryNanAndInfinityInEveryFloatWidth) {
  const double infinity = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf, torch::kDouble}) {
    const auto clean = gaussian({300, 200}, 7).to(dtype);
    EXPECT_TRUE(all_finite(clean)) << dtype;
    const int64_t count = clean.numel();
    for (int64_t position : {int64_t{0}, count / 2, count - 1}) {
      for (double bad : {infinity, -infinity, nan, -nan}) {
        auto values = clean.clone();
        values.view(-1)[position] = bad;
        EXPECT_EQ(all_finite(values), torch::isfinite(values).all().item<bool>())
            << dtype << " holding " << bad << " at " << position;
        EXPECT_FALSE(all_finite(values)) << dtype << " holding " << bad << " at " << position;
      }
    }
    auto largest = clean.clone();
    largest.view(-1)[count / 3] = -largest_finite(dtype);
    largest.view(-1)[count / 4] = largest_finite(dtype);
    EXPECT_TRUE(all_finite(largest)) << dtype;
  }
  // A non-contiguous view is scanned by its values.
  auto transposed = gaussian({64, 48}, 9).t();
  EXPECT_TRUE(all_finite(transposed));
  transposed[5][7] = nan;
  EXPECT_FALSE(all_finite(transposed));
  EXPECT_TRUE(all_finite(torch::empty({0}, torch::kFloat)));
  EXPECT_TRUE(all_finite(torch::arange(10)));
}

}  // namespace
}  // namespace duquant
