// Scans by magnitude (include/duquant/magnitude_scan.h). An IEEE float without its sign bit
// orders like its magnitude when read as an unsigned integer, infinity above every finite value
// and NaN above infinity. So the largest |x| and the finiteness test are both an unsigned-integer
// maximum, which the compiler vectorizes (a float maximum it may not reorder, and a NaN would
// stop it).
#include "duquant/magnitude_scan.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace duquant {
namespace {

// Entries scanned by one task: large enough that scheduling is negligible, small enough that
// both cores share the tensors of the greedy step (~1 MB).
constexpr int64_t kChunk = int64_t{1} << 14;

// The bits of a stored float of `Bits`' width, sign cleared.
template <typename Bits>
Bits magnitude_bits(const void* entry) {
  Bits bits;
  std::memcpy(&bits, entry, sizeof bits);
  return bits & static_cast<Bits>(static_cast<Bits>(~Bits{0}) >> 1);
}

template <typename Bits>
Bits max_magnitude_bits_of(const unsigned char* data, int64_t count) {
  Bits result = 0;
  for (int64_t i = 0; i < count; ++i) result = std::max(result, magnitude_bits<Bits>(data + i * sizeof(Bits)));
  return result;
}

// One per float width, compiled for AVX-512, AVX2 and the baseline; the loader picks the best
// the CPU has.
__attribute__((target_clones("avx512f", "avx2", "default"))) uint32_t max_magnitude_bits32(const unsigned char* data,
                                                                                           int64_t count) {
  return max_magnitude_bits_of<uint32_t>(data, count);
}
__attribute__((target_clones("avx512f", "avx2", "default"))) uint16_t max_magnitude_bits16(const unsigned char* data,
                                                                                           int64_t count) {
  return max_magnitude_bits_of<uint16_t>(data, count);
}

// The largest magnitude bits of every kChunk entries of a contiguous CPU tensor, in parallel.
template <typename Bits>
std::vector<Bits> chunk_maxima(const torch::Tensor& contiguous) {
  const auto* data = static_cast<const unsigned char*>(contiguous.data_ptr());
  const int64_t count = contiguous.numel();
  std::vector<Bits> maxima(static_cast<size_t>((count + kChunk - 1) / kChunk));
  at::parallel_for(0, static_cast<int64_t>(maxima.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const unsigned char* first = data + chunk * kChunk * static_cast<int64_t>(sizeof(Bits));
      const int64_t length = std::min(kChunk, count - chunk * kChunk);
      if constexpr (sizeof(Bits) == 4) {
        maxima[static_cast<size_t>(chunk)] = max_magnitude_bits32(first, length);
      } else {
        maxima[static_cast<size_t>(chunk)] = max_magnitude_bits16(first, length);
      }
    }
  });
  return maxima;
}

// The magnitude bits of +infinity: exponent all ones, mantissa zero.
constexpr uint32_t kFloatInfinityBits = 0x7f800000u;
constexpr uint16_t kBFloat16InfinityBits = 0x7f80u;
constexpr uint16_t kHalfInfinityBits = 0x7c00u;

}  // namespace

PeakEntry peak_entry(const torch::Tensor& values) {
  TORCH_CHECK(values.numel() > 0, "duquant: peak_entry of an empty tensor");
  if (!values.device().is_cpu() || values.scalar_type() != torch::kFloat) {
    const auto magnitudes = values.abs().flatten();
    const int64_t index = magnitudes.argmax().item<int64_t>();
    return {magnitudes[index].item<double>(), index};
  }
  // The first index of the first chunk that holds the overall maximum is the first maximal
  // element of the whole tensor, as argmax returns it.
  const auto contiguous = values.contiguous();
  const auto maxima = chunk_maxima<uint32_t>(contiguous);
  const auto first_maximal_chunk = std::max_element(maxima.begin(), maxima.end());
  const uint32_t peak_bits = *first_maximal_chunk;
  const float* data = contiguous.data_ptr<float>();
  int64_t index = (first_maximal_chunk - maxima.begin()) * kChunk;
  while (magnitude_bits<uint32_t>(data + index) != peak_bits) ++index;
  float peak;
  std::memcpy(&peak, &peak_bits, sizeof peak);
  return {static_cast<double>(peak), index};
}

namespace {

// The fields of a row peak key (peak_entry_of_rows), low bits first: column, complemented row
// number, magnitude bits (a non-negative float orders as its bits).
constexpr int64_t kKeyColumnBits = 12;
constexpr int64_t kKeyRowBits = 20;
constexpr int64_t kKeyRowMask = (int64_t{1} << kKeyRowBits) - 1;
constexpr int64_t kKeyColumnMask = (int64_t{1} << kKeyColumnBits) - 1;
constexpr int64_t kKeyMagnitudeShift = kKeyColumnBits + kKeyRowBits;

}  // namespace

bool row_peak_keys_fit(int64_t row_count, int64_t b) {
  return row_count <= kKeyRowMask + 1 && b >= 1 && b <= kKeyColumnMask + 1;
}

PeakEntry peak_entry_of_rows(const torch::Tensor& rows, const torch::Tensor& row_numbers, int64_t row_count) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) > 0 && rows.scalar_type() == torch::kFloat,
              "duquant: peak_entry_of_rows expects non-empty float32 [n, b] rows, got ", rows.scalar_type(), " ",
              rows.sizes());
  TORCH_CHECK(row_numbers.dim() == 1 && row_numbers.size(0) == rows.size(0) && row_numbers.scalar_type() == torch::kLong,
              "duquant: peak_entry_of_rows needs one int64 row number per row, got ", row_numbers.scalar_type(), " ",
              row_numbers.sizes());
  const int64_t b = rows.size(1);
  TORCH_CHECK(row_peak_keys_fit(row_count, b), "duquant: peak_entry_of_rows takes up to ", kKeyRowMask + 1,
              " rows of up to ", kKeyColumnMask + 1, " entries, got ", row_count, " x ", b);
  // max over a dimension returns the first maximal index.
  const auto [maxima, columns] = rows.abs().max(1);
  const auto keys = torch::bitwise_left_shift(maxima.view(torch::kInt).to(torch::kLong), kKeyMagnitudeShift) |
                    torch::bitwise_left_shift(kKeyRowMask - row_numbers.to(rows.device()), kKeyColumnBits) | columns;
  const int64_t key = keys.max().item<int64_t>();
  const int64_t row = kKeyRowMask - ((key >> kKeyColumnBits) & kKeyRowMask);
  const auto magnitude_bits = static_cast<uint32_t>(key >> kKeyMagnitudeShift);
  float magnitude;
  std::memcpy(&magnitude, &magnitude_bits, sizeof magnitude);
  return {static_cast<double>(magnitude), row * b + (key & kKeyColumnMask)};
}

torch::Tensor row_absmax(const torch::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2, "duquant: row_absmax expects a 2-D tensor, got ", rows.sizes());
  if (!rows.device().is_cpu() || rows.scalar_type() != torch::kFloat || rows.size(1) == 0) {
    return rows.abs().amax(1).to(torch::kFloat);
  }
  const auto contiguous = rows.contiguous();
  const int64_t count = contiguous.size(0), length = contiguous.size(1);
  auto maxima = torch::empty({count}, torch::kFloat);
  const auto* data = static_cast<const unsigned char*>(contiguous.data_ptr());
  auto* out = maxima.data_ptr<float>();
  at::parallel_for(0, count, std::max<int64_t>(1, kChunk / length), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint32_t bits = max_magnitude_bits32(data + row * length * static_cast<int64_t>(sizeof(float)), length);
      std::memcpy(out + row, &bits, sizeof bits);
    }
  });
  return maxima;
}

bool all_finite(const torch::Tensor& values) {
  if (values.numel() == 0 || !values.is_floating_point()) return true;
  if (!values.device().is_cpu()) return torch::isfinite(values).all().item<bool>();
  const auto contiguous = values.contiguous();
  const auto below = [](const auto& maxima, auto infinity_bits) {
    return std::all_of(maxima.begin(), maxima.end(), [&](auto bits) { return bits < infinity_bits; });
  };
  switch (values.scalar_type()) {
    case torch::kFloat:
      return below(chunk_maxima<uint32_t>(contiguous), kFloatInfinityBits);
    case torch::kBFloat16:
      return below(chunk_maxima<uint16_t>(contiguous), kBFloat16InfinityBits);
    case torch::kHalf:
      return below(chunk_maxima<uint16_t>(contiguous), kHalfInfinityBits);
    default:
      return torch::isfinite(values).all().item<bool>();
  }
}

}  // namespace duquant
