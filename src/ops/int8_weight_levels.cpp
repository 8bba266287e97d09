// int8 copies of packed int4 weights (int8_weight_levels.h).
#include "int8_weight_levels.h"

#include <c10/util/intrusive_ptr.h>

#include <mutex>
#include <unordered_map>

#include "w4a8_layout.h"

namespace duquant::ops {
namespace {

using WeakTensorImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct CachedLevels {
  WeakTensorImpl packed;
  uint32_t version = 0;
  torch::Tensor levels;
};

struct LevelsCache {
  std::mutex mutex;
  std::unordered_map<const c10::TensorImpl*, CachedLevels> entries;
};

LevelsCache& levels_cache() {
  static LevelsCache cache;
  return cache;
}

uint32_t version_of(const torch::Tensor& tensor) { return tensor.is_inference() ? 0 : tensor._version(); }

// The current entry for `packed`, or null. The cache's lock is held.
const CachedLevels* current_entry(const LevelsCache& cache, const torch::Tensor& packed) {
  const auto found = cache.entries.find(packed.unsafeGetTensorImpl());
  if (found == cache.entries.end() || found->second.packed.expired() || found->second.version != version_of(packed)) {
    return nullptr;
  }
  return &found->second;
}

void drop_freed(LevelsCache& cache) {
  for (auto it = cache.entries.begin(); it != cache.entries.end();) {
    it = it->second.packed.expired() ? cache.entries.erase(it) : std::next(it);
  }
}

}  // namespace

torch::Tensor unpack_int4_to_int8(const torch::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kUInt8,
              "duquant: unpack_int4_to_int8 expects uint8 [N, K/2], got ", packed.scalar_type(), " ", packed.sizes());
  const auto bytes = packed.contiguous();
  // Byte k/2 holds level k (k even) in its low nibble and level k+1 in its high nibble
  // (w4a8_layout.h): the two nibbles side by side along a new last axis, then flattened.
  return torch::stack({torch::bitwise_and(bytes, layout::kWeightMaxLevel),
                       torch::bitwise_right_shift(bytes, layout::kWeightBits)},
                      /*dim=*/2)
      .view({bytes.size(0), bytes.size(1) * layout::kWeightsPerByte})
      .to(torch::kChar);
}

torch::Tensor cached_int8_levels(const torch::Tensor& packed, const std::function<void()>& after_unpack) {
  auto& cache = levels_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  if (const CachedLevels* entry = current_entry(cache, packed)) return entry->levels;
  drop_freed(cache);
  CachedLevels entry{WeakTensorImpl(packed.getIntrusivePtr()), version_of(packed), unpack_int4_to_int8(packed)};
  if (after_unpack) after_unpack();
  const auto levels = entry.levels;
  cache.entries.insert_or_assign(packed.unsafeGetTensorImpl(), std::move(entry));
  return levels;
}

torch::Tensor find_cached_int8_levels(const torch::Tensor& packed) {
  auto& cache = levels_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const CachedLevels* entry = current_entry(cache, packed);
  return entry != nullptr ? entry->levels : torch::Tensor();
}

void forget_freed_int8_levels() {
  auto& cache = levels_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  drop_freed(cache);
}

int64_t cached_int8_levels_entries() {
  auto& cache = levels_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  return static_cast<int64_t>(cache.entries.size());
}

void forget_cached_int8_levels() {
  auto& cache = levels_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  cache.entries.clear();
}

}  // namespace duquant::ops
