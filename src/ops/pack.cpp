// Packing of unsigned int4 weight levels into the layout of w4a8_layout.h.
#include <ATen/Parallel.h>

#include <algorithm>

#include "duquant/ops.h"
#include "w4a8_layout.h"

namespace duquant::ops {

torch::Tensor pack_int4(const torch::Tensor& levels) {
  TORCH_CHECK(levels.dim() == 2 && levels.scalar_type() == torch::kUInt8,
              "duquant: pack_int4 expects uint8 [N, K] levels, got ", levels.scalar_type(), " ", levels.sizes());
  const int64_t n_rows = levels.size(0), k = levels.size(1);
  TORCH_CHECK(k % layout::kWeightsPerByte == 0, "duquant: pack_int4 needs an even K, got ", k);
  TORCH_CHECK(levels.numel() == 0 || levels.max().item<int>() <= layout::kWeightMaxLevel,
              "duquant: pack_int4 levels exceed ", layout::kWeightMaxLevel);
  // Packed on the host (a byte shuffle, a small part of a layer's quantization) and returned on
  // the levels' device, where GPTQ computes them.
  const auto src = levels.contiguous().cpu();
  auto packed = torch::zeros({n_rows, layout::packed_row_bytes(k)}, torch::kUInt8);
  const uint8_t* in = src.data_ptr<uint8_t>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  // Rows are independent: each writes only its own packed row.
  at::parallel_for(0, n_rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(k, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t n = begin; n < end; ++n) {
                       for (int64_t j = 0; j < k; ++j) {
                         out[layout::packed_byte_index(n, j, k)] |=
                             static_cast<uint8_t>(in[n * k + j] << layout::nibble_shift(j));
                       }
                     }
                   });
  return packed.to(levels.device());
}

torch::Tensor unpack_int4(const torch::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kUInt8,
              "duquant: unpack_int4 expects uint8 [N, K/2], got ", packed.scalar_type(), " ", packed.sizes());
  auto src = packed.contiguous().cpu();
  const int64_t n_rows = src.size(0), k = src.size(1) * layout::kWeightsPerByte;
  auto levels = torch::empty({n_rows, k}, torch::kUInt8);
  const uint8_t* in = src.data_ptr<uint8_t>();
  uint8_t* out = levels.data_ptr<uint8_t>();
  at::parallel_for(0, n_rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(k, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t n = begin; n < end; ++n) {
                       for (int64_t j = 0; j < k; ++j) {
                         out[n * k + j] =
                             static_cast<uint8_t>(layout::unpack_level(in[layout::packed_byte_index(n, j, k)], j));
                       }
                     }
                   });
  return levels;
}

}  // namespace duquant::ops
