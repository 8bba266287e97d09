// Tests of the reusing CPU allocator (src/large_block_cache.cpp).
#include <gtest/gtest.h>
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#include <random>
#include <vector>

#include "duquant/large_block_cache.h"

namespace duquant {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

TEST(LargeBlockCache, HandsAFreedLargeBlockToTheNextAllocationOfItsSize) {
  LargeBlockCache cache;
  void* first = nullptr;
  {
    auto block = cache.allocate(3 * kMiB);
    first = block.get();
  }
  EXPECT_EQ(cache.stats().kept_bytes, 3 * kMiB);
  auto again = cache.allocate(3 * kMiB);
  EXPECT_EQ(again.get(), first);
  auto other = cache.allocate(2 * kMiB);  // another size needs its own block
  EXPECT_NE(other.get(), first);
  const auto stats = cache.stats();
  EXPECT_EQ(stats.reused, 1);
  EXPECT_EQ(stats.mapped, 2);
  EXPECT_EQ(stats.in_use_bytes, 5 * kMiB);
  EXPECT_EQ(stats.kept_bytes, 0u);
}

TEST(LargeBlockCache, KeepsNoSmallBlock) {
  LargeBlockCache cache;
  { auto block = cache.allocate(kLargeBlockBytes - 1); }
  EXPECT_EQ(cache.stats().kept_bytes, 0u);
  EXPECT_EQ(cache.stats().mapped, 0);
}

// The guarantee: large blocks in use plus kept never exceed the most ever in use at once, so the
// cache cannot raise the peak memory; a new size gives kept blocks back, oldest first.
TEST(LargeBlockCache, NeverHoldsMoreThanTheMostEverInUse) {
  LargeBlockCache cache;
  {
    auto a = cache.allocate(4 * kMiB);
    auto b = cache.allocate(4 * kMiB);
  }
  EXPECT_EQ(cache.stats().kept_bytes, 8 * kMiB);
  auto c = cache.allocate(6 * kMiB);
  auto stats = cache.stats();
  EXPECT_EQ(stats.high_water_bytes, 8 * kMiB);
  EXPECT_EQ(stats.in_use_bytes + stats.kept_bytes, 6 * kMiB);  // both 4 MiB blocks given back

  std::mt19937 random(7);
  std::vector<c10::DataPtr> live;
  for (int step = 0; step < 2000; ++step) {
    if (!live.empty() && random() % 2 == 0) {
      live.erase(live.begin() + static_cast<long>(random() % live.size()));
    } else {
      live.push_back(cache.allocate((1 + random() % 5) * kMiB));
    }
    stats = cache.stats();
    ASSERT_LE(stats.in_use_bytes + stats.kept_bytes, stats.high_water_bytes) << "step " << step;
  }
  EXPECT_GT(stats.reused, stats.mapped);  // five sizes: most allocations find a kept block
  live.clear();
  cache.clear();
  EXPECT_EQ(cache.stats().kept_bytes, 0u);
}

// Installed, it serves every CPU tensor; the data is the tensor's own.
TEST(LargeBlockCache, ServesCpuTensorsOnceInstalled) {
  install_large_block_cache();
  auto* cache = dynamic_cast<LargeBlockCache*>(c10::GetCPUAllocator());
  ASSERT_NE(cache, nullptr);
  const auto before = cache->stats();
  void* first = nullptr;
  {
    auto x = torch::full({1024, 1024}, 2.0f);
    first = x.data_ptr();
  }
  auto y = torch::arange(1024 * 1024, torch::kFloat).view({1024, 1024});
  EXPECT_EQ(y.data_ptr(), first);
  EXPECT_EQ(y[1023][1023].item<float>(), 1024.0f * 1024 - 1);
  EXPECT_EQ(cache->stats().reused, before.reused + 1);
  auto small = torch::ones({10});
  EXPECT_EQ(small.sum().item<float>(), 10.0f);
}

}  // namespace
}  // namespace duquant
