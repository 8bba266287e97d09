// A CPU allocator for the command-line tool that reuses freed large blocks without letting the
// process hold more memory than it once had in use.
//
// Why: every block of 128 KiB or more is its own mapping (apps/duquant.cpp fixes glibc's mmap
// threshold there so that freed blocks leave the process), so every large tensor the pipeline
// creates is paid again in page faults: a fresh 128 MiB buffer costs ~30 ms of faults and zeroing
// on this CPU before a 12 ms elementwise pass can write it, and the quantizer makes a dozen such
// per full-size layer (transform, clip search, rounding, the layer check).
//
// Policy: a freed large block is kept, and handed to the next allocation of exactly its size
// (the pipeline's temporaries repeat their shapes layer after layer), as long as the large blocks
// resident -- in use plus kept -- stay within the most ever in use at once (the high-water mark).
// A kept block is only given back (oldest first) when a new mapping would push the resident total
// past that mark. So the peak resident memory is the peak without the cache; only the memory
// between peaks stays mapped.
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

namespace duquant {

// Blocks at least this large are kept for reuse; smaller ones go straight to c10's CPU allocation
// (glibc keeps those in its heap anyway).
inline constexpr std::size_t kLargeBlockBytes = std::size_t{128} * 1024;

struct LargeBlockCacheStats {
  int64_t reused = 0;           // allocations served by a kept block
  int64_t mapped = 0;           // large allocations that needed a new block
  std::size_t in_use_bytes = 0;  // large blocks in use now
  std::size_t kept_bytes = 0;    // freed large blocks kept for reuse
  std::size_t high_water_bytes = 0;  // the most large-block bytes ever in use at once
};

class LargeBlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t bytes) override;
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* destination, const void* source, std::size_t count) const override {
    default_copy_data(destination, source, count);
  }
  LargeBlockCacheStats stats() const;
  // Gives every kept block back to the system.
  void clear();

 private:
  static void release(void* data);
  void release_block(void* data);
  void give_back_until_fits(std::size_t bytes);  // requires mutex_

  mutable std::mutex mutex_;
  std::unordered_map<void*, std::size_t> in_use_;  // large blocks handed out, by address
  std::multimap<std::size_t, std::list<void*>::iterator> kept_by_size_;
  std::list<void*> kept_oldest_first_;
  std::unordered_map<void*, std::size_t> kept_size_;
  LargeBlockCacheStats stats_;
};

// Makes one process-wide LargeBlockCache the CPU allocator of every tensor created after the
// call (the command-line tool calls it first thing; a library user may too).
void install_large_block_cache();

}  // namespace duquant
