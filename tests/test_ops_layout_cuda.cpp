// CPU tests of the index arithmetic of the CUDA kernels (src/ops/w4a8_kernel_layout.h): the very
// functions the kernels call, compiled here for the host. They run on every machine, GPU or not.
//
// The reference for the fragment maps is the PTX ISA, section 9.7.14.5 "Matrix Fragments for
// mma.m16n8k32" (multiplicand A and B with .s8, accumulators with .s32); its formulas are
// transcribed below in the ISA's own words (ptx_isa_* functions), independently of the header's
// bit arithmetic.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "w4a8_kernel_layout.h"
#include "w4a8_layout.h"

namespace duquant::layout::kernel {
namespace {

// PTX ISA 9.7.14.5, m16n8k32, .s8 A: "row = groupID for ai where 0 <= i < 4 || 8 <= i < 12,
// groupID + 8 otherwise; col = (threadID_in_group * 4) + (i & 0x3) for ai where i < 8,
// (threadID_in_group * 4) + (i & 0x3) + 16 for ai where i >= 8".
MatrixCoord ptx_isa_a(int lane, int i) {
  const int group_id = lane >> 2, thread_in_group = lane % 4;
  const int row = ((0 <= i && i < 4) || (8 <= i && i < 12)) ? group_id : group_id + 8;
  const int col = i < 8 ? thread_in_group * 4 + (i & 0x3) : thread_in_group * 4 + (i & 0x3) + 16;
  return {row, col};
}
// .s8 B: "row = (threadID_in_group * 4) + (i & 0x3) for bi where i < 4, ... + 16 for bi where
// i >= 4; col = groupID".
MatrixCoord ptx_isa_b(int lane, int i) {
  const int group_id = lane >> 2, thread_in_group = lane % 4;
  const int row = i < 4 ? thread_in_group * 4 + (i & 0x3) : thread_in_group * 4 + (i & 0x3) + 16;
  return {row, group_id};
}
// .s32 C/D: "row = groupID for ci where i < 2, groupID + 8 for ci where i >= 2;
// col = (threadID_in_group * 2) + (i & 0x1)".
MatrixCoord ptx_isa_c(int lane, int i) {
  const int group_id = lane >> 2, thread_in_group = lane % 4;
  return {i < 2 ? group_id : group_id + 8, thread_in_group * 2 + (i & 0x1)};
}

TEST(MmaFragments, MatchThePtxIsaFormulas) {
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int i = 0; i < kMmaAElementsPerThread; ++i) {
      EXPECT_EQ(mma_a_element(lane, i).row, ptx_isa_a(lane, i).row) << "lane " << lane << " a" << i;
      EXPECT_EQ(mma_a_element(lane, i).col, ptx_isa_a(lane, i).col) << "lane " << lane << " a" << i;
    }
    for (int i = 0; i < kMmaBElementsPerThread; ++i) {
      EXPECT_EQ(mma_b_element(lane, i).row, ptx_isa_b(lane, i).row) << "lane " << lane << " b" << i;
      EXPECT_EQ(mma_b_element(lane, i).col, ptx_isa_b(lane, i).col) << "lane " << lane << " b" << i;
    }
    for (int i = 0; i < kMmaCElementsPerThread; ++i) {
      EXPECT_EQ(mma_c_element(lane, i).row, ptx_isa_c(lane, i).row) << "lane " << lane << " c" << i;
      EXPECT_EQ(mma_c_element(lane, i).col, ptx_isa_c(lane, i).col) << "lane " << lane << " c" << i;
    }
  }
  // A few points read off the ISA's figures.
  EXPECT_EQ(mma_a_element(0, 0).row, 0);
  EXPECT_EQ(mma_a_element(0, 0).col, 0);
  EXPECT_EQ(mma_a_element(31, 15).row, 15);
  EXPECT_EQ(mma_a_element(31, 15).col, 31);
  EXPECT_EQ(mma_b_element(5, 4).row, 20);
  EXPECT_EQ(mma_b_element(5, 4).col, 1);
  EXPECT_EQ(mma_c_element(7, 3).row, 9);
  EXPECT_EQ(mma_c_element(7, 3).col, 7);
}

template <typename Element>
void expect_tile_covered_once(int rows, int cols, int elements_per_thread, Element element, const char* what) {
  std::vector<int> hits(rows * cols, 0);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int i = 0; i < elements_per_thread; ++i) {
      const MatrixCoord c = element(lane, i);
      ASSERT_GE(c.row, 0);
      ASSERT_LT(c.row, rows);
      ASSERT_GE(c.col, 0);
      ASSERT_LT(c.col, cols);
      ++hits[c.row * cols + c.col];
    }
  }
  for (int index = 0; index < rows * cols; ++index) {
    EXPECT_EQ(hits[index], 1) << what << " element (" << index / cols << ", " << index % cols << ")";
  }
}

TEST(MmaFragments, CoverEachTileExactlyOnce) {
  expect_tile_covered_once(kMmaM, kMmaK, kMmaAElementsPerThread, mma_a_element, "A");
  expect_tile_covered_once(kMmaK, kMmaN, kMmaBElementsPerThread, mma_b_element, "B");
  expect_tile_covered_once(kMmaM, kMmaN, kMmaCElementsPerThread, mma_c_element, "C");
}

TEST(KOrder, SlotToPhysicalKIsAPermutation) {
  std::set<int> physical;
  for (int slot = 0; slot < kMmaK; ++slot) {
    const int k = physical_k_of_slot(slot);
    EXPECT_GE(k, 0);
    EXPECT_LT(k, kMmaK);
    physical.insert(k);
  }
  EXPECT_EQ(physical.size(), static_cast<size_t>(kMmaK));
}

// The A registers the kernel fills from its 8-byte loads hold, in every slot, the physical k that
// physical_k_of_slot assigns to that slot; the same holds for the B registers from unpack.
TEST(KOrder, KernelLoadsPutThePermutedKInEverySlot) {
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int half = 0; half < 2; ++half) {
      for (int word = 0; word < 2; ++word) {
        const int reg = a_register_of_load(half, word);
        for (int byte = 0; byte < 4; ++byte) {
          const MatrixCoord slot = mma_a_element(lane, 4 * reg + byte);
          EXPECT_EQ(slot.row, mma_group_id(lane) + 8 * half);
          EXPECT_EQ(physical_k_of_slot(slot.col), a_fragment_byte_in_step(lane) + 4 * word + byte)
              << "lane " << lane << " register " << reg << " byte " << byte;
        }
      }
    }
    for (int reg = 0; reg < 2; ++reg) {
      for (int byte = 0; byte < 4; ++byte) {
        const MatrixCoord slot = mma_b_element(lane, 4 * reg + byte);
        // Byte 4t of a channel's packed step holds k 8t, 8t+1; the word holds k 8t..8t+7.
        const int word_first_k = b_fragment_byte_in_step(lane) * kWeightsPerByte;
        EXPECT_EQ(physical_k_of_slot(slot.row), word_first_k + 4 * reg + byte)
            << "lane " << lane << " register " << reg << " byte " << byte;
      }
    }
  }
}

TEST(Unpack, ByteRegistersHoldTheNibblesInKOrder) {
  std::mt19937 random(7);
  std::vector<uint32_t> words = {0u, 0xFFFFFFFFu, 0x76543210u, 0xFEDCBA98u, 0x0F0F0F0Fu, 0xF0F0F0F0u};
  for (int i = 0; i < 1000; ++i) words.push_back(random());
  for (const uint32_t word : words) {
    const UnpackedWeights unpacked = unpack_weight_word(word);
    for (int k = 0; k < 8; ++k) {
      const uint32_t expected = (word >> (4 * k)) & 0xFu;
      const uint32_t reg = k < 4 ? unpacked.first : unpacked.second;
      EXPECT_EQ((reg >> (8 * (k % 4))) & 0xFFu, expected) << std::hex << "word " << word << " k " << k;
    }
  }
  EXPECT_EQ(unpack_weight_word(0x76543210u).first, 0x03020100u);
  EXPECT_EQ(unpack_weight_word(0x76543210u).second, 0x07060504u);
}

TEST(Unpack, BytePermuteFollowsPrmtSemantics) {
  // prmt.b32 d, a, b, c: bytes of {b, a} numbered 0..7 from a's low byte; d's byte j = byte c[4j+2:4j].
  EXPECT_EQ(byte_permute(0x33221100u, 0x77665544u, 0x3210u), 0x33221100u);
  EXPECT_EQ(byte_permute(0x33221100u, 0x77665544u, 0x7654u), 0x77665544u);
  EXPECT_EQ(byte_permute(0x33221100u, 0x77665544u, 0x5140u), 0x55114400u);
  EXPECT_EQ(byte_permute(0x33221100u, 0x77665544u, 0x7362u), 0x77336622u);
}

// The whole k32 step as the kernel does it: int8 activations and packed int4 weights in memory,
// the kernel's loads and unpack into fragment registers, then the MMA as the PTX ISA defines it
// (D[row][n] = sum over slots of A[row][slot] * B[slot][n], element positions from the fragment
// maps). The result must be the plain dot product over physical k.
TEST(KOrder, EmulatedMmaEqualsThePlainProduct) {
  std::mt19937 random(11);
  std::uniform_int_distribution<int> activation(-127, 127), level(0, kWeightMaxLevel);
  int8_t a_memory[kMmaM][kMmaK];
  uint8_t w_levels[kMmaN][kMmaK];
  uint8_t b_memory[kMmaN][kMmaK / kWeightsPerByte] = {};
  for (auto& row : a_memory)
    for (auto& v : row) v = static_cast<int8_t>(activation(random));
  for (int n = 0; n < kMmaN; ++n) {
    for (int k = 0; k < kMmaK; ++k) {
      w_levels[n][k] = static_cast<uint8_t>(level(random));
      b_memory[n][packed_byte_index(0, k, kMmaK)] |= static_cast<uint8_t>(w_levels[n][k] << nibble_shift(k));
    }
  }
  // Slot-indexed operands, filled lane by lane from the registers the kernel forms.
  int a_slots[kMmaM][kMmaK] = {}, b_slots[kMmaK][kMmaN] = {};
  for (int lane = 0; lane < kWarpSize; ++lane) {
    uint32_t a[4] = {};
    for (int half = 0; half < 2; ++half) {
      const int row = mma_group_id(lane) + 8 * half;
      const int first = a_fragment_byte_in_step(lane);
      for (int word = 0; word < 2; ++word) {
        uint32_t value = 0;
        for (int byte = 0; byte < 4; ++byte) {
          value |= static_cast<uint32_t>(static_cast<uint8_t>(a_memory[row][first + 4 * word + byte])) << (8 * byte);
        }
        a[a_register_of_load(half, word)] = value;
      }
    }
    const int channel = mma_group_id(lane);
    uint32_t word = 0;
    for (int byte = 0; byte < 4; ++byte) {
      word |= static_cast<uint32_t>(b_memory[channel][b_fragment_byte_in_step(lane) + byte]) << (8 * byte);
    }
    const UnpackedWeights unpacked = unpack_weight_word(word);
    const uint32_t b[2] = {unpacked.first, unpacked.second};
    for (int i = 0; i < kMmaAElementsPerThread; ++i) {
      const MatrixCoord c = ptx_isa_a(lane, i);
      a_slots[c.row][c.col] = static_cast<int8_t>((a[i / 4] >> (8 * (i % 4))) & 0xFFu);
    }
    for (int i = 0; i < kMmaBElementsPerThread; ++i) {
      const MatrixCoord c = ptx_isa_b(lane, i);
      b_slots[c.row][c.col] = static_cast<int8_t>((b[i / 4] >> (8 * (i % 4))) & 0xFFu);
    }
  }
  int64_t d[kMmaM][kMmaN] = {};
  for (int row = 0; row < kMmaM; ++row)
    for (int n = 0; n < kMmaN; ++n)
      for (int slot = 0; slot < kMmaK; ++slot) d[row][n] += a_slots[row][slot] * b_slots[slot][n];
  for (int row = 0; row < kMmaM; ++row) {
    for (int n = 0; n < kMmaN; ++n) {
      int64_t expected = 0;
      for (int k = 0; k < kMmaK; ++k) expected += a_memory[row][k] * w_levels[n][k];
      EXPECT_EQ(d[row][n], expected) << "row " << row << " n " << n;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles.

TEST(SharedTiles, ATileOffsetsAreABijectionKeepingChunksContiguous) {
  for (const int tile_m : {16, 32, 64, 128}) {
    std::vector<int> hits(a_tile_bytes(tile_m), 0);
    for (int row = 0; row < tile_m; ++row) {
      for (int byte = 0; byte < kATileRowBytes; ++byte) {
        const int offset = a_tile_offset(row, byte);
        ASSERT_GE(offset, 0);
        ASSERT_LT(offset, a_tile_bytes(tile_m));
        ++hits[offset];
        if (byte % kCopyBytes != 0) EXPECT_EQ(offset, a_tile_offset(row, byte - 1) + 1);
        if (byte % kCopyBytes == 0) EXPECT_EQ(offset % kCopyBytes, 0) << "cp.async target must be 16-byte aligned";
      }
    }
    for (const int h : hits) EXPECT_EQ(h, 1);
  }
}

TEST(SharedTiles, BTileOffsetsAreABijectionKeepingChunksContiguous) {
  std::vector<int> hits(kBTileBytes, 0);
  for (int n = 0; n < kGemmTileN; ++n) {
    for (int byte = 0; byte < kBTileRowBytes; ++byte) {
      const int offset = b_tile_offset(n, byte);
      ASSERT_GE(offset, 0);
      ASSERT_LT(offset, kBTileBytes);
      ++hits[offset];
      if (byte % kCopyBytes != 0) EXPECT_EQ(offset, b_tile_offset(n, byte - 1) + 1);
    }
  }
  for (const int h : hits) EXPECT_EQ(h, 1);
}

// 64-bit shared loads are served per half-warp: conflict-free when its 16 lanes read 16 distinct
// 8-byte bank pairs. Checked for every warp row offset and k step the kernel uses.
TEST(SharedTiles, AFragmentLoadsAreBankConflictFree) {
  constexpr int kBankPairs = 16;  // 32 banks of 4 bytes
  for (const int tile_m : {16, 32, 64, 128}) {
    for (int m_tile_row0 = 0; m_tile_row0 < tile_m; m_tile_row0 += kMmaM) {
      for (int half = 0; half < 2; ++half) {
        for (int step = 0; step < kGemmStepsPerStage; ++step) {
          for (int half_warp = 0; half_warp < 2; ++half_warp) {
            std::set<int> pairs;
            for (int lane = 16 * half_warp; lane < 16 * half_warp + 16; ++lane) {
              const int row = m_tile_row0 + mma_group_id(lane) + 8 * half;
              const int offset = a_tile_offset(row, step * kMmaK + a_fragment_byte_in_step(lane));
              EXPECT_EQ(offset % 8, 0);
              pairs.insert((offset / 8) % kBankPairs);
            }
            EXPECT_EQ(pairs.size(), 16u) << "tile_m " << tile_m << " row0 " << m_tile_row0 << " step " << step;
          }
        }
      }
    }
  }
}

TEST(SharedTiles, BFragmentLoadsAreBankConflictFree) {
  for (int warp_col0 = 0; warp_col0 < kGemmTileN; warp_col0 += kGemmWarpTileN) {
    for (int nt = 0; nt < kGemmWarpNTiles; ++nt) {
      for (int step = 0; step < kGemmStepsPerStage; ++step) {
        std::set<int> banks;
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int channel = warp_col0 + nt * kMmaN + mma_group_id(lane);
          const int offset =
              b_tile_offset(channel, step * (kMmaK / kWeightsPerByte) + b_fragment_byte_in_step(lane));
          EXPECT_EQ(offset % 4, 0);
          banks.insert((offset / 4) % 32);
        }
        EXPECT_EQ(banks.size(), 32u) << "col0 " << warp_col0 << " nt " << nt << " step " << step;
      }
    }
  }
}

TEST(SharedTiles, CopyAssignmentCoversEachChunkOnce) {
  // (tile_m, warps_m) as gemm_tile_m_for / gemm_warps_m_for choose them.
  for (const int tile_m : {16, 32, 64, 128}) {
    const int threads = kGemmWarpsN * gemm_warps_m_for(tile_m) * kWarpSize;
    for (const auto& [rows, chunks_per_row] : {std::pair<int, int>{tile_m, kATileChunksPerRow},
                                               std::pair<int, int>{kGemmTileN, kBTileChunksPerRow}}) {
      const int total = rows * chunks_per_row;
      ASSERT_EQ(total % threads, 0);
      std::vector<int> hits(total, 0);
      for (int thread = 0; thread < threads; ++thread) {
        for (int j = 0; j < total / threads; ++j) {
          const MatrixCoord c = copy_chunk_coord(thread, j, threads, chunks_per_row);
          ASSERT_LT(c.row, rows);
          ASSERT_LT(c.col, chunks_per_row);
          ++hits[c.row * chunks_per_row + c.col];
        }
      }
      for (const int h : hits) EXPECT_EQ(h, 1);
    }
  }
}

TEST(SharedTiles, PipelineFitsTheSharedMemoryOfA100AndH100) {
  constexpr int kA100OptInBytes = 166912;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, sm_80
  for (const int tile_m : {16, 32, 64, 128}) {
    EXPECT_LE(gemm_shared_bytes(tile_m), kA100OptInBytes);
    EXPECT_EQ(gemm_stage_bytes(tile_m) % kCopyBytes, 0);
    EXPECT_EQ(tile_m % (gemm_warps_m_for(tile_m) * kMmaM), 0);
  }
}

TEST(GemmTiles, TileRowsGrowWithTokens) {
  EXPECT_EQ(gemm_tile_m_for(1), 16);
  EXPECT_EQ(gemm_tile_m_for(16), 16);
  EXPECT_EQ(gemm_tile_m_for(17), 32);
  EXPECT_EQ(gemm_tile_m_for(51), 64);
  EXPECT_EQ(gemm_tile_m_for(816), 128);
  int previous = 0;
  for (int64_t tokens = 1; tokens < 5000; ++tokens) {
    EXPECT_GE(gemm_tile_m_for(tokens), previous);
    previous = gemm_tile_m_for(tokens);
  }
}

// ---------------------------------------------------------------------------------------------
// Split-K.

TEST(SplitK, RangesPartitionTheKStepsWithoutEmptySplits) {
  for (const int num_sms : {1, 108, 132}) {
    for (const int64_t tiles : {1, 3, 16, 128, 264, 2000}) {
      for (const int k_steps : {1, 3, 4, 8, 31, 32, 36, 64, 128, 512, 513}) {
        const SplitKPlan plan = plan_split_k(tiles, k_steps, num_sms);
        ASSERT_GE(plan.splits, 1);
        EXPECT_EQ(plan.steps_per_split % kGemmStepsPerStage, 0);
        int covered = 0;
        for (int split = 0; split < plan.splits; ++split) {
          const int first = split_first_step(plan, split), end = split_end_step(plan, split, k_steps);
          EXPECT_EQ(first, covered);
          EXPECT_GT(end, first) << "empty split " << split << " of " << plan.splits;
          covered = end;
        }
        EXPECT_EQ(covered, k_steps) << "tiles " << tiles << " k_steps " << k_steps;
        if (plan.splits > 1) EXPECT_GE(plan.steps_per_split, kMinStepsPerSplit);
        if (tiles >= kTargetBlocksPerSm * num_sms) EXPECT_EQ(plan.splits, 1);
      }
    }
  }
}

TEST(SplitK, SmallMLayersFillTheH100) {
  constexpr int kH100Sms = 132;
  // 2048 -> 2048 at M = 1: 16 column tiles, 64 k steps.
  SplitKPlan plan = plan_split_k(16, 64, kH100Sms);
  EXPECT_EQ(plan.splits, 8);
  // 16384 -> 2048 at M = 1: 16 column tiles, 512 k steps.
  plan = plan_split_k(16, 512, kH100Sms);
  EXPECT_GE(16 * plan.splits, kH100Sms);
  // 2048 -> 16384 at M = 816: 128 column tiles x 7 row tiles, enough without splitting.
  EXPECT_EQ(plan_split_k(896, 64, kH100Sms).splits, 1);
}

// Every (group, split) intersection closes exactly once, and each group's zero-point term is owned
// by exactly one split.
TEST(SplitK, GroupsCloseOnceAndOwnTheirZeroPointOnce) {
  for (const int k_steps : {4, 8, 12, 64, 96, 512}) {
    for (const int group_steps : {1, 2, 4, 8, 64, 512}) {
      if (k_steps % group_steps != 0) continue;
      for (const int64_t tiles : {1, 16, 1000}) {
        const SplitKPlan plan = plan_split_k(tiles, k_steps, 132);
        const int groups = k_steps / group_steps;
        std::vector<int> owners(groups, 0);
        std::vector<std::set<int>> closes_per_split(plan.splits);
        for (int split = 0; split < plan.splits; ++split) {
          const int first = split_first_step(plan, split), end = split_end_step(plan, split, k_steps);
          std::set<int> touched;
          for (int step = first; step < end; ++step) {
            touched.insert(step / group_steps);
            if (closes_group(step, group_steps, end)) {
              EXPECT_TRUE(closes_per_split[split].insert(step / group_steps).second) << "group closed twice";
            }
          }
          EXPECT_EQ(touched, closes_per_split[split]) << "a touched group was not closed";
          for (const int group : touched) {
            if (owns_zero_point_term(group, group_steps, first)) ++owners[group];
          }
        }
        for (int group = 0; group < groups; ++group) EXPECT_EQ(owners[group], 1) << "group " << group;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-kernel.

TEST(RotationTiles, CoverEveryOutputOfEveryBlockOnce) {
  for (const int blocks_per_tile : {1, kRotationMaxBlocksPerTile}) {
    for (const int block : {1, 2, 4, 8, 16, 64, 128}) {
      for (const int padded_k : {128, 256, 1152, 2048, 16384}) {
        if (padded_k % block != 0) continue;
        const int columns = rotation_columns_per_tile(block);
        std::vector<int> hits(padded_k, 0);
        for (int tile = 0; tile < rotation_tile_count(padded_k, block, blocks_per_tile); ++tile) {
          const RotationTile position = rotation_tile(tile, block, blocks_per_tile);
          EXPECT_EQ(position.first_column % columns, 0);
          if (columns == 4) EXPECT_EQ(position.first_column * 4 % kCopyBytes, 0) << "float4 load of R";
          for (int r = 0; r < blocks_per_tile; ++r) {
            const int row_block = position.first_block + r;
            if (row_block >= padded_k / block) continue;
            for (int c = 0; c < columns; ++c) ++hits[row_block * block + position.first_column + c];
          }
        }
        for (int k = 0; k < padded_k; ++k) {
          ASSERT_EQ(hits[k], 1) << "b " << block << " K " << padded_k << " k " << k << " tile blocks " << blocks_per_tile;
        }
      }
    }
  }
}

TEST(RotationTiles, ShortRowsUseOneBlockTilesSoEveryThreadWorks) {
  constexpr int kThreads = 256;
  // K = 16384, b = 128: 32 x 32 four-block tiles, plenty for 256 threads.
  EXPECT_EQ(rotation_blocks_per_tile(16384, 128, kThreads), kRotationMaxBlocksPerTile);
  // K = 1024, b = 128: only 64 four-block tiles; 256 one-block tiles instead.
  EXPECT_EQ(rotation_blocks_per_tile(1024, 128, kThreads), 1);
  EXPECT_EQ(rotation_tile_count(1024, 128, 1), 256);
}

TEST(PreKernelShared, RegionsAreDisjointAlignedAndSized) {
  for (const RotationStaging staging : {RotationStaging::kNone, RotationStaging::kBoth, RotationStaging::kOneAtATime}) {
    for (const bool second_row : {false, true}) {
      for (const auto& [k, b1, b2, groups] : std::vector<std::array<int, 4>>{
               {2048, 128, 128, 1}, {1152, 128, 0, 9}, {96, 2, 2, 3}, {16384, 128, 128, 256}, {64, 0, 0, 1}}) {
        const PreKernelSharedLayout layout = pre_kernel_shared_layout(k, b1, b2, staging, second_row, groups);
        std::vector<std::pair<int, int>> regions;  // [begin, end) in floats
        if (staging == RotationStaging::kOneAtATime) {
          // One region that holds either rotation.
          if (b1 > 0) EXPECT_EQ(layout.rotation1, 0);
          if (b2 > 0) EXPECT_EQ(layout.rotation2, 0);
          const int largest = std::max(b1, b2);
          if (largest > 0) regions.push_back({0, largest * largest});
        } else {
          if (layout.rotation1 >= 0) regions.push_back({layout.rotation1, layout.rotation1 + b1 * b1});
          if (layout.rotation2 >= 0) regions.push_back({layout.rotation2, layout.rotation2 + b2 * b2});
        }
        regions.push_back({layout.row, layout.row + k});
        if (second_row) regions.push_back({layout.spare_row, layout.spare_row + k});
        if (!second_row) EXPECT_EQ(layout.spare_row, layout.row);
        regions.push_back({layout.counters, layout.counters + groups});
        EXPECT_EQ(layout.rotation1 >= 0, staging != RotationStaging::kNone && b1 > 0);
        EXPECT_EQ(layout.rotation2 >= 0, staging != RotationStaging::kNone && b2 > 0);
        for (size_t i = 0; i < regions.size(); ++i) {
          EXPECT_EQ(regions[i].first % 4, 0) << "region " << i << " is not 16-byte aligned";
          EXPECT_LE(regions[i].second, layout.total_floats);
          for (size_t j = i + 1; j < regions.size(); ++j) {
            EXPECT_TRUE(regions[i].second <= regions[j].first || regions[j].second <= regions[i].first)
                << "regions " << i << " and " << j << " overlap";
          }
        }
      }
    }
  }
  // K = 2048 with two staged 128 x 128 rotations fits the A100's 163 KB; K = 16384 does not, and
  // with one rotation staged at a time it fits the H100's 227 KB (the tensor-core path's need).
  constexpr int kA100OptInBytes = 166912, kH100OptInBytes = 232448;
  const auto bytes = [](int k, RotationStaging staging) {
    return pre_kernel_shared_layout(k, 128, 128, staging, true, 1).total_floats * 4;
  };
  EXPECT_LE(bytes(2048, RotationStaging::kBoth), kA100OptInBytes);
  EXPECT_GT(bytes(16384, RotationStaging::kBoth), kH100OptInBytes);
  EXPECT_LE(bytes(16384, RotationStaging::kNone), kA100OptInBytes);
  EXPECT_GT(bytes(16384, RotationStaging::kOneAtATime), kA100OptInBytes);
  EXPECT_LE(bytes(16384, RotationStaging::kOneAtATime), kH100OptInBytes);
}

// ---------------------------------------------------------------------------------------------
// Pre-kernel rotation on tensor cores: mma.m16n8k16 with fp16 operands.

// PTX ISA 9.7.14.5.8, m16n8k16, .f16 A: "row = groupID for ai where 0 <= i < 2 || 4 <= i < 6,
// groupID + 8 otherwise; col = (threadID_in_group * 2) + (i & 0x1) for ai where i < 4,
// (threadID_in_group * 2) + (i & 0x1) + 8 for ai where i >= 4".
MatrixCoord ptx_isa_f16_a(int lane, int i) {
  const int group_id = lane >> 2, thread_in_group = lane % 4;
  const int row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? group_id : group_id + 8;
  const int col = i < 4 ? thread_in_group * 2 + (i & 0x1) : thread_in_group * 2 + (i & 0x1) + 8;
  return {row, col};
}
// .f16 B: "row = (threadID_in_group * 2) + (i & 0x1) for bi where i < 2, ... + 8 for bi where
// i >= 2; col = groupID".
MatrixCoord ptx_isa_f16_b(int lane, int i) {
  const int group_id = lane >> 2, thread_in_group = lane % 4;
  const int row = i < 2 ? thread_in_group * 2 + (i & 0x1) : thread_in_group * 2 + (i & 0x1) + 8;
  return {row, group_id};
}

TEST(TensorCoreRotation, SlotToPhysicalKIsAPermutationAndTheKernelFillsEverySlotWithIt) {
  std::set<int> physical;
  for (int slot = 0; slot < kHalfMmaK; ++slot) physical.insert(half_mma_physical_k_of_slot(slot));
  EXPECT_EQ(physical.size(), static_cast<size_t>(kHalfMmaK));
  EXPECT_EQ(*physical.rbegin(), kHalfMmaK - 1);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int i = 0; i < kHalfMmaAElementsPerThread; ++i) {
      const MatrixCoord slot = ptx_isa_f16_a(lane, i), filled = rotation_a_element(lane, i);
      EXPECT_EQ(filled.row, slot.row) << "lane " << lane << " a" << i;
      EXPECT_EQ(filled.col, half_mma_physical_k_of_slot(slot.col)) << "lane " << lane << " a" << i;
    }
    for (int j = 0; j < kHalfMmaBElementsPerThread; ++j) {
      const MatrixCoord slot = ptx_isa_f16_b(lane, j), filled = rotation_b_element(lane, j);
      EXPECT_EQ(filled.col, slot.col) << "lane " << lane << " b" << j;
      EXPECT_EQ(filled.row, half_mma_physical_k_of_slot(slot.row)) << "lane " << lane << " b" << j;
    }
  }
  expect_tile_covered_once(kHalfMmaM, kHalfMmaK, kHalfMmaAElementsPerThread, rotation_a_element, "A");
  expect_tile_covered_once(kHalfMmaK, kHalfMmaN, kHalfMmaBElementsPerThread, rotation_b_element, "B");
}

// A lane's A values of one row are 4 consecutive floats from a 16-byte aligned offset, the ones
// rotation_a_element assigns to its registers.
TEST(TensorCoreRotation, ALoadsAreAlignedAndHoldTheRegistersValues) {
  constexpr int kBlock = 128;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int row_half = 0; row_half < 2; ++row_half) {
      const int offset = rotation_a_load_offset(2, 3, lane, row_half, kBlock);
      EXPECT_EQ(offset % 4, 0);
      EXPECT_EQ(offset / kBlock, rotation_a_block(2, lane, row_half));
      for (int pair = 0; pair < 2; ++pair) {
        for (int half = 0; half < 2; ++half) {
          const MatrixCoord element = rotation_a_element(lane, 2 * (row_half + 2 * pair) + half);
          EXPECT_EQ(element.row, mma_group_id(lane) + 8 * row_half);
          EXPECT_EQ(3 * kHalfMmaK + element.col, offset % kBlock + 2 * pair + half);
        }
      }
    }
  }
}

TEST(TensorCoreRotation, UnitsCoverEveryOutputOfEveryBlockOnce) {
  for (const int block : {16, 32, 64, 128}) {
    for (const int padded_k : {128, 1024, 2048, 16384}) {
      if (padded_k % block != 0) continue;
      const int blocks = padded_k / block;
      std::vector<int> hits(padded_k, 0);
      for (int unit = 0; unit < rotation_mma_unit_count(blocks, block); ++unit) {
        const RotationMmaUnit tile = rotation_mma_unit(unit, block);
        for (int j = 0; j < kRotationMmaNTilesPerUnit; ++j) {
          ASSERT_LT(tile.first_n_tile + j, block / kHalfMmaN);
          for (int lane = 0; lane < kWarpSize; ++lane) {
            for (int i = 0; i < kMmaCElementsPerThread; ++i) {
              if (tile.m_tile * kHalfMmaM + mma_c_element(lane, i).row >= blocks) continue;
              ++hits[rotation_c_offset(tile.m_tile, tile.first_n_tile + j, lane, i, block)];
            }
          }
        }
      }
      for (int k = 0; k < padded_k; ++k) ASSERT_EQ(hits[k], 1) << "b " << block << " K " << padded_k << " k " << k;
    }
  }
  // The pi0 shapes give the 8 warps of a 256-thread block one unit each or more.
  EXPECT_EQ(rotation_mma_unit_count(2048 / 128, 128), 8);
  EXPECT_EQ(rotation_mma_unit_count(1024 / 128, 128), 8);
  EXPECT_EQ(rotation_mma_unit_count(16384 / 128, 128), 64);
  EXPECT_FALSE(rotation_fits_tensor_cores(8));
  EXPECT_FALSE(rotation_fits_tensor_cores(24));
  EXPECT_TRUE(rotation_fits_tensor_cores(16));
}

TEST(TensorCoreRotation, StagedFragmentsAreABijectionReadWithoutBankConflicts) {
  for (const int block : {16, 128}) {
    std::vector<int> hits(rotation_fragment_count(block), 0);
    for (int k_tile = 0; k_tile < block / kHalfMmaK; ++k_tile) {
      for (int n_tile = 0; n_tile < block / kHalfMmaN; ++n_tile) {
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int index = rotation_fragment_index(k_tile, n_tile, block, lane);
          ASSERT_LT(index, static_cast<int>(hits.size()));
          ++hits[index];
          // A warp's 32 loads of one tile are 512 contiguous bytes: each quarter-warp's 8
          // 16-byte loads cover the 32 banks once.
          EXPECT_EQ(index - rotation_fragment_index(k_tile, n_tile, block, 0), lane);
        }
      }
    }
    for (const int h : hits) ASSERT_EQ(h, 1);
    // The staged fragments take exactly the bytes of the fp32 matrix they replace.
    EXPECT_EQ(rotation_fragment_count(block) * kRotationFragmentBytes, block * block * 4);
  }
}

TEST(TensorCoreRotation, OperandScalePutsTheLargestValueInTheTopBinadeAtEveryFloatMagnitude) {
  for (const float absmax : {1e-45f, 1e-40f, 1e-30f, 3e-5f, 0.7f, 1.0f, 1.5f, 1000.0f, 65504.0f, 1e20f, 3.4e38f}) {
    const int shift = half_operand_shift(absmax);
    const PowerOfTwo scale = power_of_two(shift);
    EXPECT_TRUE(std::isnormal(scale.first) && std::isnormal(scale.second)) << absmax;
    EXPECT_EQ(static_cast<double>(scale.first) * scale.second, std::ldexp(1.0, shift)) << absmax;
    const float scaled = scaled_by(absmax, scale);
    EXPECT_EQ(static_cast<double>(scaled), std::ldexp(static_cast<double>(absmax), shift)) << absmax << " exactly";
    EXPECT_GE(scaled, std::ldexp(1.0f, kHalfOperandTargetExponent - 1)) << absmax;
    EXPECT_LT(scaled, std::ldexp(1.0f, kHalfOperandTargetExponent)) << absmax;
  }
  // Zero and non-finite maxima leave the operand as it is.
  EXPECT_EQ(half_operand_shift(0.0f), 0);
  EXPECT_EQ(half_operand_shift(std::numeric_limits<float>::infinity()), 0);
  EXPECT_EQ(half_operand_shift(std::numeric_limits<float>::quiet_NaN()), 0);
}

// Scaled rows lie within +-2^15. Down to |x| = 2^-3, lo is a normal fp16 number and hi + lo keeps
// 22 bits; below, lo's subnormal spacing 2^-24 bounds the error by 2^-25, 2^-39 of the row's
// largest entry.
TEST(TensorCoreRotation, HalfSplitKeepsTwentyTwoBitsOrTwoToTheMinus25) {
  std::mt19937 random(5);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (int trial = 0; trial < 100000; ++trial) {
    const float value = std::ldexp(uniform(random), trial % 40 - 24);
    const HalfSplit split = split_to_halves(value);
    EXPECT_EQ(static_cast<float>(c10::Half(split.high)), split.high);
    EXPECT_EQ(static_cast<float>(c10::Half(split.low)), split.low);
    const double error = std::abs(static_cast<double>(split.high) + split.low - value);
    EXPECT_LE(error, std::max(std::ldexp(std::abs(static_cast<double>(value)), -22), std::ldexp(1.0, -25))) << value;
    if (std::abs(value) >= 0.125f) EXPECT_LE(error, std::ldexp(std::abs(static_cast<double>(value)), -22)) << value;
  }
  EXPECT_EQ(split_to_halves(0.1f).high, static_cast<float>(c10::Half(0.1f)));
}

// One token row rotated as the kernel does it, emulated on the CPU with the kernel's helpers:
// the scales of the row and of R, every warp unit, the 16-byte A loads, the staged B fragments,
// the three products hi x hi + lo x hi + hi x lo through the PTX ISA's fragment maps, and the
// output offsets. Summed in double (the tensor cores add in fp32), the result must be the float64
// rotation to ~2^-22 of the output's scale.
float largest_magnitude(const std::vector<float>& values) {
  float absmax = 0.0f;
  for (const float v : values) absmax = std::max(absmax, std::abs(v));
  return absmax;
}

std::vector<double> emulated_tensor_core_rotation(const std::vector<float>& row, const std::vector<float>& rotation,
                                                  int block) {
  const int padded_k = static_cast<int>(row.size()), blocks = padded_k / block;
  const int shift = half_operand_shift(largest_magnitude(row));
  const int rotation_shift = half_operand_shift(largest_magnitude(rotation));
  const int output_shift = -(shift + rotation_shift);
  std::vector<double> out(padded_k, std::nan(""));
  for (int unit = 0; unit < rotation_mma_unit_count(blocks, block); ++unit) {
    const RotationMmaUnit tile = rotation_mma_unit(unit, block);
    for (int j = 0; j < kRotationMmaNTilesPerUnit; ++j) {
      const int n_tile = tile.first_n_tile + j;
      double acc[kHalfMmaM][kHalfMmaN] = {};
      for (int k_tile = 0; k_tile < block / kHalfMmaK; ++k_tile) {
        // Slot-indexed hi/lo operands, filled lane by lane as the kernel's registers.
        double a_high[kHalfMmaM][kHalfMmaK] = {}, a_low[kHalfMmaM][kHalfMmaK] = {};
        double b_high[kHalfMmaK][kHalfMmaN] = {}, b_low[kHalfMmaK][kHalfMmaN] = {};
        for (int lane = 0; lane < kWarpSize; ++lane) {
          float loaded[2][4] = {};
          for (int row_half = 0; row_half < 2; ++row_half) {
            if (rotation_a_block(tile.m_tile, lane, row_half) >= blocks) continue;
            const int offset = rotation_a_load_offset(tile.m_tile, k_tile, lane, row_half, block);
            for (int v = 0; v < 4; ++v) loaded[row_half][v] = scaled_by(row[offset + v], power_of_two(shift));
          }
          for (int i = 0; i < kHalfMmaAElementsPerThread; ++i) {
            // Register r = i / 2 = row_half + 2 * pair holds floats 2 * pair, 2 * pair + 1.
            const int reg = i / 2, row_half = reg % 2, pair = reg / 2;
            const HalfSplit split = split_to_halves(loaded[row_half][2 * pair + i % 2]);
            const MatrixCoord slot = ptx_isa_f16_a(lane, i);
            a_high[slot.row][slot.col] = split.high;
            a_low[slot.row][slot.col] = split.low;
          }
          for (int i = 0; i < kHalfMmaBElementsPerThread; ++i) {
            const MatrixCoord element = rotation_b_element(lane, i);
            const float entry = rotation[(k_tile * kHalfMmaK + element.row) * block + n_tile * kHalfMmaN + element.col];
            const HalfSplit split = split_to_halves(scaled_by(entry, power_of_two(rotation_shift)));
            const MatrixCoord slot = ptx_isa_f16_b(lane, i);
            b_high[slot.row][slot.col] = split.high;
            b_low[slot.row][slot.col] = split.low;
          }
        }
        for (int r = 0; r < kHalfMmaM; ++r) {
          for (int n = 0; n < kHalfMmaN; ++n) {
            for (int s = 0; s < kHalfMmaK; ++s) {
              acc[r][n] += a_high[r][s] * b_high[s][n] + a_low[r][s] * b_high[s][n] + a_high[r][s] * b_low[s][n];
            }
          }
        }
      }
      for (int lane = 0; lane < kWarpSize; ++lane) {
        for (int i = 0; i < kMmaCElementsPerThread; ++i) {
          const MatrixCoord c = mma_c_element(lane, i);
          if (tile.m_tile * kHalfMmaM + c.row >= blocks) continue;
          out[rotation_c_offset(tile.m_tile, n_tile, lane, i, block)] = std::ldexp(acc[c.row][c.col], output_shift);
        }
      }
    }
  }
  return out;
}

TEST(TensorCoreRotation, EmulatedRowEqualsTheFloat64RotationToTwentyTwoBits) {
  std::mt19937 random(17);
  std::normal_distribution<float> gaussian(0.0f, 1.0f);
  // Rows of every magnitude fp32 holds, R of orthogonal-like entries (~1 / sqrt(b)) and far larger
  // or smaller ones; orthogonality itself plays no part in the arithmetic.
  for (const auto& [padded_k, block, magnitude, rotation_magnitude] : std::vector<std::tuple<int, int, float, float>>{
           {384, 128, 1.0f, 0.25f}, {1024, 128, 3e4f, 0.25f}, {96, 16, 1e-3f, 0.7f}, {2560, 128, 1e6f, 0.25f},
           {256, 16, 1.0f, 1000.0f}, {256, 128, 1e30f, 0.25f}, {256, 128, 1e-30f, 1e-3f}}) {
    std::uniform_real_distribution<float> entry(-rotation_magnitude, rotation_magnitude);
    std::vector<float> rotation(static_cast<size_t>(block) * block);
    for (auto& r : rotation) r = entry(random);
    std::vector<float> row(padded_k);
    for (auto& v : row) v = gaussian(random) * magnitude;
    row[padded_k / 3] = 40.0f * magnitude;  // an outlier channel
    const auto out = emulated_tensor_core_rotation(row, rotation, block);
    double scale = 0.0, worst = 0.0;
    for (int b = 0; b < padded_k / block; ++b) {
      for (int n = 0; n < block; ++n) {
        double exact = 0.0;
        for (int k = 0; k < block; ++k) exact += static_cast<double>(row[b * block + k]) * rotation[k * block + n];
        ASSERT_FALSE(std::isnan(out[b * block + n])) << "output " << b * block + n << " never written";
        worst = std::max(worst, std::abs(out[b * block + n] - exact));
        scale = std::max(scale, std::abs(exact));
      }
    }
    EXPECT_LE(worst, std::ldexp(scale, -20)) << "K " << padded_k << " b " << block << " magnitude " << magnitude;
  }
}

TEST(QuantizeLanes, EightLanesCoverOneKStep) {
  EXPECT_EQ(kQuantizeLanesPerStep * kQuantizeValuesPerLane, kMmaK);
  EXPECT_EQ(kWarpSize % kQuantizeLanesPerStep, 0);
  // Lane l of a warp starting at a multiple of 128 k covers k step (first + 4l) / 32, the same for
  // the 8 lanes of a shuffle segment.
  for (int lane = 0; lane < kWarpSize; ++lane) {
    EXPECT_EQ((lane * kQuantizeValuesPerLane) / kMmaK, lane / kQuantizeLanesPerStep);
  }
}

// ---------------------------------------------------------------------------------------------
// A whole GEMM, emulated on the CPU thread block by thread block, warp by warp, lane by lane,
// with the kernel's own helpers in the kernel's order: cp.async copies (copy_chunk_coord,
// a/b_copy_source, a/b_copy_step, zero fill, swizzled tile offsets), fragment loads
// (a/b_fragment_offset, a_register_of_load, unpack_weight_word), the MMA as the PTX ISA defines
// it (ptx_isa_* maps above), group closing and zero-point ownership, split-K partials and their
// reduction. Only the arithmetic of y is replaced by doubles where the kernel uses fp32.

struct GemmProblem {
  int tokens, out_features, padded_k, group_size;  // group_size: effective (K for per-channel)
  std::vector<int8_t> values;                      // [T, K]
  std::vector<uint8_t> packed;                     // [N, K / 2]
  std::vector<double> token_scale, weight_scale, weight_zero;  // [T], [N, G], [N, G]
  std::vector<int32_t> group_sum;                  // [T, G]
  int groups() const { return padded_k / group_size; }
};

GemmProblem random_problem(int tokens, int out_features, int padded_k, int group_size, uint32_t seed) {
  std::mt19937 random(seed);
  std::uniform_int_distribution<int> activation(-127, 127), level(0, kWeightMaxLevel);
  std::uniform_real_distribution<double> positive(0.5, 1.5);
  GemmProblem p{tokens, out_features, padded_k, group_size, {}, {}, {}, {}, {}, {}};
  p.values.resize(static_cast<size_t>(tokens) * padded_k);
  for (auto& v : p.values) v = static_cast<int8_t>(activation(random));
  p.packed.assign(static_cast<size_t>(out_features) * padded_k / kWeightsPerByte, 0);
  for (int n = 0; n < out_features; ++n) {
    for (int k = 0; k < padded_k; ++k) {
      p.packed[packed_byte_index(n, k, padded_k)] |= static_cast<uint8_t>(level(random) << nibble_shift(k));
    }
  }
  for (int t = 0; t < tokens; ++t) p.token_scale.push_back(positive(random));
  for (int i = 0; i < out_features * p.groups(); ++i) {
    p.weight_scale.push_back(positive(random));
    p.weight_zero.push_back(level(random));
  }
  for (int t = 0; t < tokens; ++t) {
    for (int g = 0; g < p.groups(); ++g) {
      int32_t sum = 0;
      for (int k = g * group_size; k < (g + 1) * group_size; ++k) sum += p.values[static_cast<size_t>(t) * padded_k + k];
      p.group_sum.push_back(sum);
    }
  }
  return p;
}

// ops.h step 6 directly.
std::vector<double> reference_gemm(const GemmProblem& p) {
  std::vector<double> y(static_cast<size_t>(p.tokens) * p.out_features, 0.0);
  for (int t = 0; t < p.tokens; ++t) {
    for (int n = 0; n < p.out_features; ++n) {
      double sum = 0;
      for (int g = 0; g < p.groups(); ++g) {
        int64_t acc = 0;
        for (int k = g * p.group_size; k < (g + 1) * p.group_size; ++k) {
          acc += p.values[static_cast<size_t>(t) * p.padded_k + k] *
                 unpack_level(p.packed[packed_byte_index(n, k, p.padded_k)], k);
        }
        const size_t ng = static_cast<size_t>(n) * p.groups() + g;
        sum += p.weight_scale[ng] * (static_cast<double>(acc) - p.weight_zero[ng] * p.group_sum[static_cast<size_t>(t) * p.groups() + g]);
      }
      y[static_cast<size_t>(t) * p.out_features + n] = p.token_scale[t] * sum;
    }
  }
  return y;
}

std::vector<double> emulate_gemm_kernel(const GemmProblem& p, int num_sms) {
  const int tile_m = gemm_tile_m_for(p.tokens), warps_m = gemm_warps_m_for(tile_m);
  const int threads = kGemmWarpsN * warps_m * kWarpSize, warp_tile_m = tile_m / warps_m;
  const int m_tiles = warp_tile_m / kMmaM, warps = threads / kWarpSize;
  const bool grouped = p.groups() > 1;
  const int k_steps = p.padded_k / kMmaK, group_steps = p.group_size / kMmaK;
  const int column_tiles = ceil_div(p.out_features, kGemmTileN), row_tiles = ceil_div(p.tokens, tile_m);
  const SplitKPlan plan = plan_split_k(static_cast<int64_t>(column_tiles) * row_tiles, k_steps, num_sms);
  const size_t elements = static_cast<size_t>(p.tokens) * p.out_features;
  std::vector<double> partial(static_cast<size_t>(plan.splits) * elements, 0.0), y(elements, 0.0);
  std::vector<int64_t> partial_acc(static_cast<size_t>(plan.splits) * elements, 0);
  std::vector<uint8_t> a_tile(a_tile_bytes(tile_m)), b_tile(kBTileBytes);

  for (int bx = 0; bx < column_tiles; ++bx) {
    for (int by = 0; by < row_tiles; ++by) {
      for (int split = 0; split < plan.splits; ++split) {
        const int column0 = bx * kGemmTileN, row0 = by * tile_m;
        const int first = split_first_step(plan, split), end = split_end_step(plan, split, k_steps);
        // [warp][lane][mt][nt][i]
        const size_t per_lane = static_cast<size_t>(m_tiles) * kGemmWarpNTiles * kMmaCElementsPerThread;
        std::vector<int64_t> acc(warps * kWarpSize * per_lane, 0);
        std::vector<double> dequantized(warps * kWarpSize * per_lane, 0.0);
        auto at = [&](int warp, int lane, int mt, int nt, int i) {
          return ((static_cast<size_t>(warp) * kWarpSize + lane) * m_tiles + mt) * kGemmWarpNTiles * kMmaCElementsPerThread +
                 nt * kMmaCElementsPerThread + i;
        };
        auto coordinates = [&](int warp, int lane, int mt, int nt, int i) {
          const MatrixCoord c = mma_c_element(lane, i);
          return MatrixCoord{row0 + (warp / kGemmWarpsN) * warp_tile_m + mt * kMmaM + c.row,
                             column0 + (warp % kGemmWarpsN) * kGemmWarpTileN + nt * kMmaN + c.col};
        };
        auto close_group = [&](int group) {
          const bool subtract = owns_zero_point_term(group, group_steps, first);
          for (int warp = 0; warp < warps; ++warp)
            for (int lane = 0; lane < kWarpSize; ++lane)
              for (int mt = 0; mt < m_tiles; ++mt)
                for (int nt = 0; nt < kGemmWarpNTiles; ++nt)
                  for (int i = 0; i < kMmaCElementsPerThread; ++i) {
                    const MatrixCoord c = coordinates(warp, lane, mt, nt, i);
                    auto& a = acc[at(warp, lane, mt, nt, i)];
                    if (c.row < p.tokens && c.col < p.out_features) {
                      const size_t ng = static_cast<size_t>(c.col) * p.groups() + group;
                      const double row_sum = subtract ? p.group_sum[static_cast<size_t>(c.row) * p.groups() + group] : 0;
                      dequantized[at(warp, lane, mt, nt, i)] += p.weight_scale[ng] * (a - p.weight_zero[ng] * row_sum);
                    }
                    a = 0;
                  }
        };
        const int stage_count = ceil_div(end - first, kGemmStepsPerStage);
        for (int stage = 0; stage < stage_count; ++stage) {
          const int stage_step0 = first + stage * kGemmStepsPerStage;
          for (int thread = 0; thread < threads; ++thread) {
            for (int j = 0; j < tile_m * kATileChunksPerRow / threads; ++j) {
              const MatrixCoord chunk = copy_chunk_coord(thread, j, threads, kATileChunksPerRow);
              const int row = row0 + chunk.row;
              const bool valid = row < p.tokens && a_copy_step(stage_step0, chunk.col) < end;
              for (int b = 0; b < kCopyBytes; ++b) {
                a_tile[a_tile_offset(chunk.row, chunk.col * kCopyBytes) + b] =
                    valid ? static_cast<uint8_t>(p.values[a_copy_source(row, stage_step0, chunk.col, p.padded_k) + b]) : 0;
              }
            }
            for (int j = 0; j < kGemmTileN * kBTileChunksPerRow / threads; ++j) {
              const MatrixCoord chunk = copy_chunk_coord(thread, j, threads, kBTileChunksPerRow);
              const int channel = column0 + chunk.row;
              const bool valid = channel < p.out_features && b_copy_step(stage_step0, chunk.col) < end;
              for (int b = 0; b < kCopyBytes; ++b) {
                b_tile[b_tile_offset(chunk.row, chunk.col * kCopyBytes) + b] =
                    valid ? p.packed[b_copy_source(channel, stage_step0, chunk.col, p.padded_k) + b] : 0;
              }
            }
          }
          for (int s = 0; s < kGemmStepsPerStage; ++s) {
            const int step = stage_step0 + s;
            if (step >= end) continue;
            for (int warp = 0; warp < warps; ++warp) {
              const int warp_row0 = (warp / kGemmWarpsN) * warp_tile_m, warp_col0 = (warp % kGemmWarpsN) * kGemmWarpTileN;
              for (int nt = 0; nt < kGemmWarpNTiles; ++nt) {
                int b_slots[kMmaK][kMmaN];
                for (int lane = 0; lane < kWarpSize; ++lane) {
                  const int channel = warp_col0 + nt * kMmaN + mma_group_id(lane);
                  uint32_t word = 0;
                  for (int b = 0; b < 4; ++b) word |= static_cast<uint32_t>(b_tile[b_fragment_offset(channel, s, lane) + b]) << (8 * b);
                  const UnpackedWeights unpacked = unpack_weight_word(word);
                  const uint32_t regs[2] = {unpacked.first, unpacked.second};
                  for (int i = 0; i < kMmaBElementsPerThread; ++i) {
                    const MatrixCoord c = ptx_isa_b(lane, i);
                    b_slots[c.row][c.col] = static_cast<int8_t>((regs[i / 4] >> (8 * (i % 4))) & 0xFFu);
                  }
                }
                for (int mt = 0; mt < m_tiles; ++mt) {
                  int a_slots[kMmaM][kMmaK];
                  for (int lane = 0; lane < kWarpSize; ++lane) {
                    uint32_t regs[4] = {};
                    for (int half = 0; half < 2; ++half) {
                      const int row = warp_row0 + mt * kMmaM + mma_group_id(lane) + half * (kMmaM / 2);
                      for (int word = 0; word < 2; ++word) {
                        uint32_t value = 0;
                        for (int b = 0; b < 4; ++b) value |= static_cast<uint32_t>(a_tile[a_fragment_offset(row, s, lane) + 4 * word + b]) << (8 * b);
                        regs[a_register_of_load(half, word)] = value;
                      }
                    }
                    for (int i = 0; i < kMmaAElementsPerThread; ++i) {
                      const MatrixCoord c = ptx_isa_a(lane, i);
                      a_slots[c.row][c.col] = static_cast<int8_t>((regs[i / 4] >> (8 * (i % 4))) & 0xFFu);
                    }
                  }
                  for (int lane = 0; lane < kWarpSize; ++lane) {
                    for (int i = 0; i < kMmaCElementsPerThread; ++i) {
                      const MatrixCoord c = ptx_isa_c(lane, i);
                      int64_t d = 0;
                      for (int slot = 0; slot < kMmaK; ++slot) d += a_slots[c.row][slot] * b_slots[slot][c.col];
                      acc[at(warp, lane, mt, nt, i)] += d;
                    }
                  }
                }
              }
            }
            if (grouped && closes_group(step, group_steps, end)) close_group(step / group_steps);
          }
        }
        const bool partial_accumulators = !grouped && plan.splits > 1;
        if (!grouped && !partial_accumulators) close_group(0);
        for (int warp = 0; warp < warps; ++warp)
          for (int lane = 0; lane < kWarpSize; ++lane)
            for (int mt = 0; mt < m_tiles; ++mt)
              for (int nt = 0; nt < kGemmWarpNTiles; ++nt)
                for (int i = 0; i < kMmaCElementsPerThread; ++i) {
                  const MatrixCoord c = coordinates(warp, lane, mt, nt, i);
                  if (c.row >= p.tokens || c.col >= p.out_features) continue;
                  const size_t index = static_cast<size_t>(c.row) * p.out_features + c.col;
                  if (partial_accumulators) {
                    partial_acc[split * elements + index] = acc[at(warp, lane, mt, nt, i)];
                  } else if (plan.splits > 1) {
                    partial[split * elements + index] = dequantized[at(warp, lane, mt, nt, i)];
                  } else {
                    y[index] = p.token_scale[c.row] * dequantized[at(warp, lane, mt, nt, i)];
                  }
                }
      }
    }
  }
  if (plan.splits > 1) {  // split_k_reduce_kernel
    for (size_t index = 0; index < elements; ++index) {
      const int row = static_cast<int>(index / p.out_features), col = static_cast<int>(index % p.out_features);
      double dequantized = 0;
      if (!grouped) {
        int64_t acc = 0;
        for (int s = 0; s < plan.splits; ++s) acc += partial_acc[s * elements + index];
        dequantized = p.weight_scale[col] * (static_cast<double>(acc) - p.weight_zero[col] * p.group_sum[row]);
      } else {
        for (int s = 0; s < plan.splits; ++s) dequantized += partial[s * elements + index];
      }
      y[index] = p.token_scale[row] * dequantized;
    }
  }
  return y;
}

TEST(EmulatedGemm, KernelIndexArithmeticComputesTheW4A8Product) {
  struct Case {
    int tokens, out_features, padded_k, group_size, num_sms;
  };
  // Partial row, column and stage tiles; per-channel and grouped weights; with and without
  // split-K (few SMs: one split; many: several, with groups straddling splits).
  const std::vector<Case> cases = {
      {1, 136, 320, 320, 132},  {3, 40, 96, 96, 1},      {20, 136, 320, 64, 132}, {20, 136, 320, 64, 1},
      {33, 8, 512, 512, 132},   {70, 130, 256, 128, 132}, {130, 24, 320, 32, 132}, {9, 256, 1024, 512, 132},
      {2, 40, 1024, 1024, 132}, {5, 130, 2048, 2048, 132}, {4, 64, 1024, 64, 132},
  };
  int split_cases = 0;
  for (const auto& c : cases) {
    const GemmProblem problem = random_problem(c.tokens, c.out_features, c.padded_k, c.group_size, 31 + c.tokens);
    const auto expected = reference_gemm(problem);
    const auto actual = emulate_gemm_kernel(problem, c.num_sms);
    const int64_t output_tiles = static_cast<int64_t>(ceil_div(c.out_features, kGemmTileN)) *
                                 ceil_div(c.tokens, gemm_tile_m_for(c.tokens));
    if (plan_split_k(output_tiles, c.padded_k / kMmaK, c.num_sms).splits > 1) ++split_cases;
    double scale = 0, worst = 0;
    for (const double v : expected) scale = std::max(scale, std::abs(v));
    for (size_t i = 0; i < expected.size(); ++i) worst = std::max(worst, std::abs(actual[i] - expected[i]));
    EXPECT_LE(worst, 1e-9 * scale) << "T " << c.tokens << " N " << c.out_features << " K " << c.padded_k << " group "
                                   << c.group_size << " SMs " << c.num_sms;
  }
  EXPECT_GE(split_cases, 4) << "split-K paths (per-channel and grouped) must be covered";
}

}  // namespace
}  // namespace duquant::layout::kernel
