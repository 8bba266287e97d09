// The reusing CPU allocator of include/duquant/large_block_cache.h.
#include "duquant/large_block_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <iterator>

namespace duquant {
namespace {

// The cache that `release` returns blocks to: the installed one, or the one a test allocated
// from (every DataPtr of a LargeBlockCache carries the cache as its deleter's owner through this
// table, since c10's raw deleter receives the data pointer alone).
std::mutex owners_mutex;
std::unordered_map<void*, LargeBlockCache*>& owners() {
  static auto* table = new std::unordered_map<void*, LargeBlockCache*>();
  return *table;
}

}  // namespace

c10::DataPtr LargeBlockCache::allocate(std::size_t bytes) {
  const c10::Device cpu(c10::DeviceType::CPU);
  if (bytes < kLargeBlockBytes) {
    // Never kept, so freed straight away; a small block freed through the raw deleter finds no
    // owner and goes the same way.
    void* data = c10::alloc_cpu(bytes);
    return {data, data, &c10::free_cpu, cpu};
  }
  void* data = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto kept = kept_by_size_.find(bytes);
    if (kept != kept_by_size_.end()) {
      data = *kept->second;
      kept_oldest_first_.erase(kept->second);
      kept_by_size_.erase(kept);
      kept_size_.erase(data);
      stats_.kept_bytes -= bytes;
      ++stats_.reused;
    } else {
      give_back_until_fits(bytes);
      ++stats_.mapped;
    }
  }
  if (data == nullptr) data = c10::alloc_cpu(bytes);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_.emplace(data, bytes);
    stats_.in_use_bytes += bytes;
    stats_.high_water_bytes = std::max(stats_.high_water_bytes, stats_.in_use_bytes);
  }
  {
    std::lock_guard<std::mutex> lock(owners_mutex);
    owners()[data] = this;
  }
  return {data, data, &release, cpu};
}

void LargeBlockCache::give_back_until_fits(std::size_t bytes) {
  // A new block may bring the resident total up to the high-water mark that this allocation
  // itself sets, never past it.
  const std::size_t limit = std::max(stats_.high_water_bytes, stats_.in_use_bytes + bytes);
  while (!kept_oldest_first_.empty() && stats_.in_use_bytes + stats_.kept_bytes + bytes > limit) {
    void* oldest = kept_oldest_first_.front();
    const std::size_t size = kept_size_.at(oldest);
    auto range = kept_by_size_.equal_range(size);
    for (auto it = range.first; it != range.second; ++it) {
      if (*it->second == oldest) {
        kept_by_size_.erase(it);
        break;
      }
    }
    kept_oldest_first_.pop_front();
    kept_size_.erase(oldest);
    stats_.kept_bytes -= size;
    c10::free_cpu(oldest);
  }
}

void LargeBlockCache::release(void* data) {
  if (data == nullptr) return;
  LargeBlockCache* owner = nullptr;
  {
    std::lock_guard<std::mutex> lock(owners_mutex);
    const auto found = owners().find(data);
    if (found != owners().end()) {
      owner = found->second;
      owners().erase(found);
    }
  }
  if (owner == nullptr) {
    c10::free_cpu(data);  // a small block, from raw_allocate
    return;
  }
  owner->release_block(data);
}

void LargeBlockCache::release_block(void* data) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto found = in_use_.find(data);
  const std::size_t bytes = found->second;
  in_use_.erase(found);
  stats_.in_use_bytes -= bytes;
  // Keeping it leaves the resident total unchanged, so it never passes the mark.
  kept_oldest_first_.push_back(data);
  kept_by_size_.emplace(bytes, std::prev(kept_oldest_first_.end()));
  kept_size_.emplace(data, bytes);
  stats_.kept_bytes += bytes;
}

LargeBlockCacheStats LargeBlockCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void LargeBlockCache::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (void* data : kept_oldest_first_) c10::free_cpu(data);
  kept_oldest_first_.clear();
  kept_by_size_.clear();
  kept_size_.clear();
  stats_.kept_bytes = 0;
}

void install_large_block_cache() {
  // Never destroyed: tensors may outlive any scope, and c10 keeps the pointer.
  static auto* cache = new LargeBlockCache();
  // Priority above c10's default allocator (0), so that later registrations of the default
  // cannot displace it.
  c10::SetCPUAllocator(cache, 1);
}

}  // namespace duquant
