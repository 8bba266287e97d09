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

// The key reduction the greedy rotation runs on a GPU, checked on the CPU against peak_entry:
// small integers tie everywhere (within rows and across rows), so the lowest row, then the first
// column, must win; rows given out of order carry their row numbers.
TEST(PeakEntryOfRows, IsPeakEntryOfTheNumberedRowsTiesIncluded) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(41);
  for (const auto& [rows, b] : {std::pair<int64_t, int64_t>{300, 16}, {7, 2}, {2000, 128}, {1, 4096}}) {
    const auto values = torch::randint(-3, 4, {rows, b}, generator, torch::kFloat);
    const PeakEntry expected = peak_entry(values);
    const PeakEntry in_order = peak_entry_of_rows(values, torch::arange(rows, torch::kLong), rows);
    EXPECT_EQ(in_order.magnitude, expected.magnitude) << rows << " x " << b;
    EXPECT_EQ(in_order.index, expected.index) << rows << " x " << b;
    const auto order = torch::randperm(rows, generator, torch::kLong);
    const PeakEntry shuffled = peak_entry_of_rows(values.index_select(0, order), order, rows);
    EXPECT_EQ(shuffled.magnitude, expected.magnitude) << rows << " x " << b << " shuffled";
    EXPECT_EQ(shuffled.index, expected.index) << rows << " x " << b << " shuffled";
  }
  // Real-valued rows (one peak) and a sub-range of the row numbers.
  const auto values = torch::randn({500, 128}, generator, torch::kFloat);
  const PeakEntry expected = peak_entry(values.slice(0, 100, 400));
  const PeakEntry found = peak_entry_of_rows(values.slice(0, 100, 400), torch::arange(300, torch::kLong), 300);
  EXPECT_EQ(found.magnitude, expected.magnitude);
  EXPECT_EQ(found.index, expected.index);
}

TEST(PeakEntryOfRows, StatesWhatItTakes) {
  EXPECT_TRUE(row_peak_keys_fit(int64_t{1} << 20, 4096));
  EXPECT_FALSE(row_peak_keys_fit((int64_t{1} << 20) + 1, 128));
  EXPECT_FALSE(row_peak_keys_fit(100, 4097));
  const auto two_rows = torch::arange(2, torch::kLong);
  EXPECT_NO_THROW(peak_entry_of_rows(torch::ones({2, 8}), two_rows, int64_t{1} << 20));
  EXPECT_THROW(peak_entry_of_rows(torch::ones({2, 8}), two_rows, (int64_t{1} << 20) + 1), c10::Error);
  EXPECT_THROW(peak_entry_of_rows(torch::ones({2, 4097}), two_rows, 2), c10::Error);
  EXPECT_THROW(peak_entry_of_rows(torch::ones({2, 8}), torch::arange(3, torch::kLong), 3), c10::Error);
  EXPECT_THROW(peak_entry_of_rows(torch::ones({2, 8}, torch::kDouble), two_rows, 2), c10::Error);
  EXPECT_THROW(peak_entry_of_rows(torch::ones({2, 8}), two_rows.to(torch::kInt), 2), c10::Error);
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
