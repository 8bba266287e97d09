// Index arithmetic of the CUDA kernels of duquant::w4a8_linear (src/ops/w4a8_linear_cuda.cu):
// tensor-core fragment maps, the order of k inside one MMA, shared-memory tile offsets with their
// swizzles, the split-K plan and the pre-kernel's rotation tiles. Everything is __host__ __device__
// and constexpr where possible so tests/test_ops_layout_cuda.cpp checks on the CPU exactly the
// functions the kernels call.
//
// The tensor-core instruction is mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (sm_80+):
// D[16 x 8] (s32) = A[16 x 32] (s8, row-major) * B[32 x 8] (s8, column-major) + C. The fragment
// maps below are those of the PTX ISA (version 8.x / 9.x), section 9.7.14.5 "Matrix Fragments for
// mma.m16n8k32", figures for multiplicand A with .s8, multiplicand B with .s8 and accumulators
// C/D with .s32:
//   groupID = laneid >> 2, threadID_in_group = laneid % 4
//   A: a0..a15 in four .b32 registers (4 bytes each, element i = 4 * register + byte)
//      row = groupID          for 0 <= i < 4 or 8 <= i < 12,  groupID + 8 otherwise
//      col = threadID_in_group * 4 + (i & 3)  for i < 8,  the same + 16 for i >= 8
//   B: b0..b7 in two .b32 registers
//      row = threadID_in_group * 4 + (i & 3)  for i < 4,  the same + 16 for i >= 4
//      col = groupID
//   C/D: c0..c3 (.s32)
//      row = groupID for c0, c1,  groupID + 8 for c2, c3;   col = threadID_in_group * 2 + (i & 1)
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "w4a8_layout.h"

namespace duquant::layout::kernel {

constexpr int kWarpSize = 32;

// ---------------------------------------------------------------------------------------------
// mma.m16n8k32 s8 fragments (PTX ISA section 9.7.14.5, quoted above).
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 32;
constexpr int kMmaAElementsPerThread = 16;  // 4 registers x 4 int8
constexpr int kMmaBElementsPerThread = 8;   // 2 registers x 4 int8
constexpr int kMmaCElementsPerThread = 4;   // 4 int32
static_assert(kMmaK == kInFeatureAlignment, "one MMA k-step must be the K alignment of w4a8_layout.h");

struct MatrixCoord {
  int row;
  int col;
};

DUQUANT_HOST_DEVICE constexpr int mma_group_id(int lane) { return lane >> 2; }
DUQUANT_HOST_DEVICE constexpr int mma_thread_in_group(int lane) { return lane % 4; }

// (row, k) of element i of lane's A fragment, in the PTX ISA's own k numbering ("slots").
DUQUANT_HOST_DEVICE constexpr MatrixCoord mma_a_element(int lane, int i) {
  return {mma_group_id(lane) + ((i & 4) ? 8 : 0), mma_thread_in_group(lane) * 4 + (i & 3) + ((i & 8) ? 16 : 0)};
}
// (k slot, n) of element i of lane's B fragment.
DUQUANT_HOST_DEVICE constexpr MatrixCoord mma_b_element(int lane, int i) {
  return {mma_thread_in_group(lane) * 4 + (i & 3) + ((i & 4) ? 16 : 0), mma_group_id(lane)};
}
// (row, n) of element i of lane's accumulator fragment.
DUQUANT_HOST_DEVICE constexpr MatrixCoord mma_c_element(int lane, int i) {
  return {mma_group_id(lane) + ((i & 2) ? 8 : 0), mma_thread_in_group(lane) * 2 + (i & 1)};
}

// ---------------------------------------------------------------------------------------------
// The order of k inside one k32 step.
//
// The MMA sums A[row][slot] * B[slot][n] over its 32 k slots, so the kernel may put any physical k
// in a slot as long as A and B use the same slot -> k map. It chooses the map that makes each
// thread's operands contiguous in memory:
//   slot = 4 * t + i        (t = threadID_in_group, i < 4)   <->  physical k = 8 * t + i
//   slot = 16 + 4 * t + i                                      <->  physical k = 8 * t + 4 + i
// Then lane's B fragment (column n = groupID) is physical k 8t..8t+7 of one output channel: the 8
// nibbles of ONE 32-bit word, bytes 4t..4t+3 of the channel's 16 packed bytes of the step
// (w4a8_layout.h: byte k/2, low nibble = even k). And lane's A registers 0 and 2 (row groupID) are
// physical k 8t..8t+3 and 8t+4..8t+7: the 8 contiguous int8 at byte 8t of the row's 32 bytes, one
// 64-bit shared-memory load; registers 1 and 3 are the same for row groupID + 8.
DUQUANT_HOST_DEVICE constexpr int physical_k_of_slot(int slot) {
  return 8 * ((slot % 16) / 4) + 4 * (slot / 16) + slot % 4;
}
// Byte offset, inside a row's 32 activation bytes of one k step, of lane's 8-byte A load.
DUQUANT_HOST_DEVICE constexpr int a_fragment_byte_in_step(int lane) { return 8 * mma_thread_in_group(lane); }
// Byte offset, inside a channel's 16 packed weight bytes of one k step, of lane's 32-bit B word.
DUQUANT_HOST_DEVICE constexpr int b_fragment_byte_in_step(int lane) { return 4 * mma_thread_in_group(lane); }

// A 64-bit load of 8 int8 (little-endian, lowest address in the low byte) splits into the two A
// registers of one row: the low word fills register 0 (row groupID) or 1 (row groupID + 8), the
// high word register 2 or 3. Physical k of byte `byte` (0..7) of that load: 8t + byte.
DUQUANT_HOST_DEVICE constexpr int a_register_of_load(int row_half, int word) { return row_half + 2 * word; }

// PRMT semantics (PTX prmt.b32 default mode, CUDA __byte_perm): result byte j = byte number
// (selector >> 4j) & 7 of the 8-byte value {high_source:low_source}.
DUQUANT_HOST_DEVICE constexpr uint32_t byte_permute(uint32_t low_source, uint32_t high_source, uint32_t selector) {
  uint32_t result = 0;
  for (int j = 0; j < 4; ++j) {
    const uint32_t index = (selector >> (4 * j)) & 7u;
    const uint32_t source = index < 4 ? low_source : high_source;
    result |= ((source >> (8 * (index & 3))) & 0xFFu) << (8 * j);
  }
  return result;
}

constexpr uint32_t kLowNibbles = 0x0F0F0F0Fu;
// Interleave bytes of the even-k word {k0,k2,k4,k6} and the odd-k word {k1,k3,k5,k7}.
constexpr uint32_t kSelectFirstFourK = 0x5140u;   // k0, k1, k2, k3
constexpr uint32_t kSelectSecondFourK = 0x7362u;  // k4, k5, k6, k7

// Unpacks one 32-bit word of 8 nibbles (k0..k7, k0 in bits 0-3, w4a8_layout.h) into the two int8x4
// B registers of one lane: `first` = levels of k0..k3, `second` = k4..k7 (bytes low to high).
// Two masks extract the even and odd nibbles as bytes (values 0..15, valid non-negative s8), two
// byte permutes restore k order: 5 integer instructions per 8 weights, no lookup table.
struct UnpackedWeights {
  uint32_t first;
  uint32_t second;
};
DUQUANT_HOST_DEVICE inline UnpackedWeights unpack_weight_word(uint32_t packed) {
  const uint32_t even = packed & kLowNibbles;
  const uint32_t odd = (packed >> 4) & kLowNibbles;
#if defined(__CUDA_ARCH__)
  return {__byte_perm(even, odd, kSelectFirstFourK), __byte_perm(even, odd, kSelectSecondFourK)};
#else
  return {byte_permute(even, odd, kSelectFirstFourK), byte_permute(even, odd, kSelectSecondFourK)};
#endif
}

// ---------------------------------------------------------------------------------------------
// GEMM tiles. A block computes a kGemmTileN-column by TileM-row output tile over the k steps of
// its split, kGemmStepsPerStage k32 steps per pipeline stage. Warps: kGemmWarpsN across N (32
// columns = 4 n8 tiles each) times WarpsM across M.
constexpr int kGemmTileN = 128;
constexpr int kGemmStepsPerStage = 4;
constexpr int kGemmStageK = kGemmStepsPerStage * kMmaK;  // 128 k per stage
constexpr int kGemmStages = 3;                           // cp.async pipeline depth
constexpr int kGemmWarpsN = 4;
constexpr int kGemmWarpTileN = kGemmTileN / kGemmWarpsN;  // 32
constexpr int kGemmWarpNTiles = kGemmWarpTileN / kMmaN;   // 4
constexpr int kCopyBytes = 16;                            // one cp.async

// Shared-memory A tile: TileM rows of kGemmStageK int8 (128 bytes = 8 copy chunks). Chunk c of
// row r is stored at chunk c ^ ((r & 3) << 1). Why: a 64-bit load is served per half-warp; the
// half-warp's 16 lanes read rows groupID = 0..3 (or 4..7) at byte 8t of the step's 32 bytes, i.e.
// chunk 2 * step + (t >> 1). Unswizzled, all four rows hit the same banks (row stride 128 bytes
// = all 32 banks); XOR-ing the chunk by 2 * (row & 3) sends each row to another pair of chunks,
// so the 16 lanes cover the 32 banks exactly once.
constexpr int kATileRowBytes = kGemmStageK;
constexpr int kATileChunksPerRow = kATileRowBytes / kCopyBytes;  // 8
DUQUANT_HOST_DEVICE constexpr int a_tile_chunk_swizzle(int row, int chunk) { return chunk ^ ((row & 3) << 1); }
DUQUANT_HOST_DEVICE constexpr int a_tile_offset(int row, int byte) {
  return row * kATileRowBytes + a_tile_chunk_swizzle(row, byte / kCopyBytes) * kCopyBytes + byte % kCopyBytes;
}

// Shared-memory B tile: kGemmTileN output channels of kGemmStageK / 2 packed bytes (64 bytes = 4
// chunks, chunk s = k step s of the stage). Chunk s of channel n is stored at s ^ ((n >> 1) & 3).
// Why: a warp reads 32-bit words of channels groupID = 0..7 at byte 4t of one chunk; with a 64-byte
// row stride channels n and n + 2 share banks; the XOR spreads the 4 channels of equal parity
// over the 4 chunk positions, so the 32 lanes hit 32 distinct banks.
constexpr int kBTileRowBytes = kGemmStageK / kWeightsPerByte;    // 64
constexpr int kBTileChunksPerRow = kBTileRowBytes / kCopyBytes;  // 4
DUQUANT_HOST_DEVICE constexpr int b_tile_chunk_swizzle(int n, int chunk) { return chunk ^ ((n >> 1) & 3); }
DUQUANT_HOST_DEVICE constexpr int b_tile_offset(int n, int byte) {
  return n * kBTileRowBytes + b_tile_chunk_swizzle(n, byte / kCopyBytes) * kCopyBytes + byte % kCopyBytes;
}

// Global sources of the cp.async copies of one stage whose first k step is `stage_step0`: chunk
// `chunk` of activation row `row` (int8 [T, K]) covers k step a_copy_step(...); chunk `chunk` of
// output channel `channel` (packed [N, K / 2]) is k step b_copy_step(...). Byte offsets.
DUQUANT_HOST_DEVICE constexpr int a_copy_step(int stage_step0, int chunk) {
  return stage_step0 + chunk * kCopyBytes / kMmaK;
}
DUQUANT_HOST_DEVICE constexpr int64_t a_copy_source(int row, int stage_step0, int chunk, int64_t padded_k) {
  return static_cast<int64_t>(row) * padded_k + static_cast<int64_t>(stage_step0) * kMmaK +
         static_cast<int64_t>(chunk) * kCopyBytes;
}
DUQUANT_HOST_DEVICE constexpr int b_copy_step(int stage_step0, int chunk) { return stage_step0 + chunk; }
DUQUANT_HOST_DEVICE constexpr int64_t b_copy_source(int channel, int stage_step0, int chunk, int64_t padded_k) {
  return static_cast<int64_t>(channel) * packed_row_bytes(padded_k) +
         static_cast<int64_t>(b_copy_step(stage_step0, chunk)) * (kMmaK / kWeightsPerByte);
}

// Shared-memory offsets of a lane's fragment loads for k step `step_in_stage` of a stage: the
// 8-byte A load of tile row `row` and the 4-byte B word of tile channel `channel`.
DUQUANT_HOST_DEVICE constexpr int a_fragment_offset(int row, int step_in_stage, int lane) {
  return a_tile_offset(row, step_in_stage * kMmaK + a_fragment_byte_in_step(lane));
}
DUQUANT_HOST_DEVICE constexpr int b_fragment_offset(int channel, int step_in_stage, int lane) {
  return b_tile_offset(channel, step_in_stage * (kMmaK / kWeightsPerByte) + b_fragment_byte_in_step(lane));
}

DUQUANT_HOST_DEVICE constexpr int a_tile_bytes(int tile_m) { return tile_m * kATileRowBytes; }
constexpr int kBTileBytes = kGemmTileN * kBTileRowBytes;
DUQUANT_HOST_DEVICE constexpr int gemm_stage_bytes(int tile_m) { return a_tile_bytes(tile_m) + kBTileBytes; }
DUQUANT_HOST_DEVICE constexpr int gemm_shared_bytes(int tile_m) { return kGemmStages * gemm_stage_bytes(tile_m); }

// cp.async work split: copy j of thread `thread` (of `threads`) moves chunk index
// thread + j * threads of a tile with `chunks_per_row` chunks per row: (row, chunk) below.
DUQUANT_HOST_DEVICE constexpr MatrixCoord copy_chunk_coord(int thread, int j, int threads, int chunks_per_row) {
  return {(thread + j * threads) / chunks_per_row, (thread + j * threads) % chunks_per_row};
}

// Output rows per block, by the number of tokens M: the smallest tile that holds M up to 64 rows
// (memory-bound regime: weight bytes dominate, unused rows only cost shared-memory traffic), then
// 128-row tiles with 8 warps for large M (tensor-core bound: more reuse of each B tile).
DUQUANT_HOST_DEVICE constexpr int gemm_tile_m_for(int64_t tokens) {
  return tokens <= 16 ? 16 : tokens <= 32 ? 32 : tokens <= 256 ? 64 : 128;
}
DUQUANT_HOST_DEVICE constexpr int gemm_warps_m_for(int tile_m) { return tile_m == 128 ? 2 : 1; }

// ---------------------------------------------------------------------------------------------
// Split-K. With few tokens there are only ceil(N / 128) output tiles (16 for a 2048-wide layer),
// far fewer than the SMs (132 on H100, DESIGN.md section 6), so K is cut into `splits` ranges of
// whole k32 steps; each (tile, split) block writes fp32 partial sums and a second kernel adds
// them in split order (deterministic). A split gets a multiple of one pipeline stage of steps and
// at least kMinStepsPerSplit, so its pipeline still overlaps loads and MMAs.
constexpr int kMinStepsPerSplit = 8;
constexpr int kTargetBlocksPerSm = 2;

struct SplitKPlan {
  int splits;
  int steps_per_split;
};

DUQUANT_HOST_DEVICE constexpr int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

DUQUANT_HOST_DEVICE constexpr SplitKPlan plan_split_k(int64_t output_tiles, int k_steps, int num_sms) {
  const int64_t target_blocks = static_cast<int64_t>(kTargetBlocksPerSm) * (num_sms > 0 ? num_sms : 1);
  int wanted = output_tiles >= target_blocks ? 1 : ceil_div(target_blocks, output_tiles > 0 ? output_tiles : 1);
  const int most = k_steps / kMinStepsPerSplit > 1 ? k_steps / kMinStepsPerSplit : 1;
  if (wanted > most) wanted = most;
  int steps = ceil_div(k_steps, wanted);
  steps = static_cast<int>(round_up(steps, kGemmStepsPerStage));
  // Re-derive the count so that no split is empty.
  return {ceil_div(k_steps, steps), steps};
}
DUQUANT_HOST_DEVICE constexpr int split_first_step(const SplitKPlan& plan, int split) {
  return split * plan.steps_per_split;
}
DUQUANT_HOST_DEVICE constexpr int split_end_step(const SplitKPlan& plan, int split, int k_steps) {
  return (split + 1) * plan.steps_per_split < k_steps ? (split + 1) * plan.steps_per_split : k_steps;
}

// Weight groups (group_size a multiple of kMmaK, or all of K): the int32 accumulators of a group
// are turned into fp32 (scale, zero point) after the group's last k step or the split's last
// step. The zero-point term weight_zero * row_sum of a group is subtracted by the split that
// holds the group's first step only, so that across splits it counts exactly once.
DUQUANT_HOST_DEVICE constexpr bool closes_group(int step, int group_steps, int split_end) {
  return (step + 1) % group_steps == 0 || step + 1 == split_end;
}
DUQUANT_HOST_DEVICE constexpr bool owns_zero_point_term(int group, int group_steps, int split_first) {
  return group * group_steps >= split_first;
}

// ---------------------------------------------------------------------------------------------
// Pre-kernel block rotation: out[blk * b + j] = sum_i in[blk * b + i] * R[i][j] for the K / b
// blocks of one token row. Thread tile: `blocks_per_tile` blocks x `columns` consecutive columns
// (4 columns when b % 4 == 0: one 16-byte load of R feeds 4 * blocks_per_tile FMAs; else 1).
// 4 blocks per tile reuse each R load 4 times; rows too short to give every thread a 4-block tile
// use 1-block tiles so that all threads work.
constexpr int kRotationMaxBlocksPerTile = 4;

struct RotationTile {
  int first_block;
  int first_column;
};
DUQUANT_HOST_DEVICE constexpr int rotation_columns_per_tile(int block) { return block % 4 == 0 ? 4 : 1; }
DUQUANT_HOST_DEVICE constexpr int rotation_tile_count(int padded_k, int block, int blocks_per_tile) {
  return ceil_div(padded_k / block, blocks_per_tile) * (block / rotation_columns_per_tile(block));
}
DUQUANT_HOST_DEVICE constexpr int rotation_blocks_per_tile(int padded_k, int block, int threads) {
  return rotation_tile_count(padded_k, block, kRotationMaxBlocksPerTile) >= threads ? kRotationMaxBlocksPerTile : 1;
}
DUQUANT_HOST_DEVICE constexpr RotationTile rotation_tile(int tile, int block, int blocks_per_tile) {
  return {(tile / (block / rotation_columns_per_tile(block))) * blocks_per_tile,
          (tile % (block / rotation_columns_per_tile(block))) * rotation_columns_per_tile(block)};
}

// Pre-kernel shared memory, in floats from the start: the staged rotations, the token row, a
// second row buffer when any transform step runs (each step reads one buffer and writes the
// other), and one int32 row-sum counter per weight group. Rotations are staged (copied once per
// thread block, then read by every token it handles) as [R1][R2] when both fit beside the rows;
// the tensor-core path, which reads R only in its staged fragment order, otherwise stages one at
// a time into a single region (R1 before the first rotation of each token, R2 before the second);
// the CUDA-core path reads unstaged rotations from global memory through L1. Every region starts
// at a multiple of 4 floats, so the 16-byte loads of R and the 16-byte copies stay aligned.
enum class RotationStaging { kNone, kBoth, kOneAtATime };

struct PreKernelSharedLayout {
  int rotation1;  // offsets in floats; -1 when the region is absent (equal when staged one at a time)
  int rotation2;
  int row;
  int spare_row;  // == row when there is no second buffer
  int counters;
  int total_floats;
};
DUQUANT_HOST_DEVICE constexpr int round_up_to_vector(int floats) { return (floats + 3) / 4 * 4; }
DUQUANT_HOST_DEVICE constexpr PreKernelSharedLayout pre_kernel_shared_layout(int padded_k, int block1, int block2,
                                                                            RotationStaging staging, bool second_row,
                                                                            int groups) {
  const bool both = staging == RotationStaging::kBoth, one = staging == RotationStaging::kOneAtATime;
  const int largest = block1 > block2 ? block1 : block2;
  const int rotation1_floats = both ? round_up_to_vector(block1 * block1) : one ? round_up_to_vector(largest * largest) : 0;
  const int rotation2_floats = both ? round_up_to_vector(block2 * block2) : 0;
  const int row = rotation1_floats + rotation2_floats;
  const int spare_row = second_row ? row + round_up_to_vector(padded_k) : row;
  const int counters = spare_row + round_up_to_vector(padded_k);
  return {staging != RotationStaging::kNone && block1 > 0 ? 0 : -1,
          both && block2 > 0 ? rotation1_floats : one && block2 > 0 ? 0 : -1,
          row,
          spare_row,
          counters,
          counters + round_up_to_vector(groups)};
}

// ---------------------------------------------------------------------------------------------
// Pre-kernel block rotation on tensor cores (DUQUANT_CUDA_ROTATION=tensor-cores, blocks that are a
// multiple of 16). One token's row of K values is the [K / b, b] matrix of its rotation blocks, so
// its rotation is the product [K / b, b] x [b, b] = one GEMM with M = K / b (16 for K = 2048 and
// b = 128), k = n = b, computed with mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32. Fragment
// maps (PTX ISA section 9.7.14.5, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   A: a0..a7 in four .f16x2 registers (element i = 2 * register + half, low half first)
//      row = groupID for a0, a1, a4, a5;  groupID + 8 for a2, a3, a6, a7
//      col = threadID_in_group * 2 + (i & 1) for i < 4,  the same + 8 for i >= 4
//   B: b0..b3 in two .f16x2 registers
//      row = threadID_in_group * 2 + (i & 1) for i < 2,  the same + 8 for i >= 2;  col = groupID
//   C/D: .f32, the map of the s32 accumulators above (mma_c_element).
//
// Precision. fp16 keeps 11 significant bits and the CPU reference rotates in fp32, so every
// operand is split in two fp16 numbers, x = hi + lo with hi = fp16(x), lo = fp16(x - hi) (22
// bits), and x R = hi_x hi_R + lo_x hi_R + hi_x lo_R with fp32 accumulation: three MMAs per tile,
// the dropped lo_x lo_R is ~2^-22 of the product. fp16's range is kept by powers of two, which are
// exact: the row and R are each scaled so that their largest magnitude lies in [2^14, 2^15)
// (half_operand_shift; R's maximum is taken once per thread block), whatever their magnitude in fp32.
// Then hi + lo keeps 22 bits of every entry down to 2^-3 (lo is a normal fp16 number) and errs by
// at most 2^-25 below (lo's subnormal spacing), 2^-39 of the operand's largest entry; products and
// their sums stay below 2^37, and the outputs are scaled back exactly (ldexpf). The result differs
// from the CPU's fp32 FMA chain by rounding only, like the CUDA-core path: int8 activations can
// differ by a rounding tie.
//
// k order inside one k16 tile: as for the int8 GEMM, A and B may put any physical k in an MMA slot
// as long as both use the same map. Slots 2t, 2t+1, 2t+8, 2t+9 (t = threadID_in_group) hold
// physical k 4t .. 4t+3, so a lane's A values of one row are 4 consecutive floats of the row
// buffer (one 16-byte load, which fills halves of registers `row half` and `row half + 2`).
//
// Work: a warp computes one "unit", one m16 tile (16 blocks of the row) times two n8 tiles (16
// output columns of every block), over the b / 16 k tiles. Blocks past K / b are zero rows.
//
// Staged rotation: the B fragments, split and scaled, in the order the lanes read them: 16 bytes
// per lane and (k tile, n tile) = {hi(b0, b1), hi(b2, b3), lo(b0, b1), lo(b2, b3)}, tile-major,
// so a warp reads 512 contiguous bytes (no bank conflict) and R needs b * b * 4 bytes, the size of
// the fp32 matrix.
constexpr int kHalfMmaM = 16;
constexpr int kHalfMmaN = 8;
constexpr int kHalfMmaK = 16;
constexpr int kHalfMmaAElementsPerThread = 8;
constexpr int kHalfMmaBElementsPerThread = 4;
constexpr int kRotationMmaNTilesPerUnit = 2;
constexpr int kRotationMmaBlockMultiple = kHalfMmaK;  // k tiles and pairs of n8 tiles: b % 16 == 0
constexpr int kRotationFragmentBytes = 16;
// Each operand's largest magnitude is scaled into [2^(e - 1), 2^e), below fp16's largest number.
constexpr int kHalfOperandTargetExponent = 15;

DUQUANT_HOST_DEVICE constexpr bool rotation_fits_tensor_cores(int block) {
  return block > 0 && block % kRotationMmaBlockMultiple == 0;
}

// Physical k (0..15 inside the k tile) held by MMA slot `slot` (0..15), for A and B alike.
DUQUANT_HOST_DEVICE constexpr int half_mma_physical_k_of_slot(int slot) {
  return 4 * ((slot % 8) / 2) + 2 * (slot / 8) + slot % 2;
}
// (row in the m16 tile, physical k in the k tile) of element i of lane's A fragment as the
// kernel fills it: registers h and h + 2 come from the 16-byte load of row groupID + 8h.
DUQUANT_HOST_DEVICE constexpr MatrixCoord rotation_a_element(int lane, int i) {
  return {mma_group_id(lane) + 8 * ((i >> 1) & 1), 4 * mma_thread_in_group(lane) + (i & 1) + 2 * (i >> 2)};
}
// (k in the k tile, n in the n8 tile) of element j of lane's B fragment.
DUQUANT_HOST_DEVICE constexpr MatrixCoord rotation_b_element(int lane, int j) {
  return {4 * mma_thread_in_group(lane) + j, mma_group_id(lane)};
}

struct RotationMmaUnit {
  int m_tile;
  int first_n_tile;
};
DUQUANT_HOST_DEVICE constexpr int rotation_mma_unit_count(int blocks, int block) {
  return ceil_div(blocks, kHalfMmaM) * (block / (kHalfMmaN * kRotationMmaNTilesPerUnit));
}
DUQUANT_HOST_DEVICE constexpr RotationMmaUnit rotation_mma_unit(int unit, int block) {
  return {unit / (block / (kHalfMmaN * kRotationMmaNTilesPerUnit)),
          (unit % (block / (kHalfMmaN * kRotationMmaNTilesPerUnit))) * kRotationMmaNTilesPerUnit};
}
// Float offset in the row buffer of lane's 16-byte A load for row half `row_half` (0: groupID,
// 1: groupID + 8) of m tile `m_tile` and k tile `k_tile`; its block is the tile's row.
DUQUANT_HOST_DEVICE constexpr int rotation_a_block(int m_tile, int lane, int row_half) {
  return m_tile * kHalfMmaM + mma_group_id(lane) + 8 * row_half;
}
DUQUANT_HOST_DEVICE constexpr int rotation_a_load_offset(int m_tile, int k_tile, int lane, int row_half, int block) {
  return rotation_a_block(m_tile, lane, row_half) * block + k_tile * kHalfMmaK + 4 * mma_thread_in_group(lane);
}
// Float offset in the row buffer of accumulator element i of lane for (m tile, n tile).
DUQUANT_HOST_DEVICE constexpr int rotation_c_offset(int m_tile, int n_tile, int lane, int i, int block) {
  return (m_tile * kHalfMmaM + mma_c_element(lane, i).row) * block + n_tile * kHalfMmaN + mma_c_element(lane, i).col;
}
// Index, in 16-byte units, of lane's staged B fragment of (k tile, n tile).
DUQUANT_HOST_DEVICE constexpr int rotation_fragment_index(int k_tile, int n_tile, int block, int lane) {
  return (k_tile * (block / kHalfMmaN) + n_tile) * kWarpSize + lane;
}
DUQUANT_HOST_DEVICE constexpr int rotation_fragment_count(int block) {
  return (block / kHalfMmaK) * (block / kHalfMmaN) * kWarpSize;
}

// The shift s that puts an operand's largest magnitude `absmax` into [2^14, 2^15) when multiplied
// by 2^s (frexp: absmax in [2^(e-1), 2^e), s = 15 - e, from -113 for the largest float to 163 for
// the smallest subnormal); a zero or non-finite maximum leaves the operand unscaled (NaN and Inf
// then propagate through the MMAs as through the CPU's sums).
DUQUANT_HOST_DEVICE inline int half_operand_shift(float absmax) {
  if (!(absmax > 0.0f && absmax <= 3.40282347e38f)) return 0;
  int exponent = 0;
  frexpf(absmax, &exponent);
  return kHalfOperandTargetExponent - exponent;
}

// 2^shift as two factors of equal sign, each a normal float for |shift| <= 252 (one float cannot
// hold 2^163): multiplying by the first, then the second, is exact whenever the result is.
struct PowerOfTwo {
  float first;
  float second;
};
DUQUANT_HOST_DEVICE inline PowerOfTwo power_of_two(int shift) {
  return {ldexpf(1.0f, shift / 2), ldexpf(1.0f, shift - shift / 2)};
}
DUQUANT_HOST_DEVICE inline float scaled_by(float value, PowerOfTwo scale) { return value * scale.first * scale.second; }

// fp16 rounding (round to nearest even, subnormals kept) as a float.
DUQUANT_HOST_DEVICE inline float round_to_half(float value) {
#if defined(__CUDA_ARCH__)
  return __half2float(__float2half_rn(value));
#else
  return static_cast<float>(c10::Half(value));
#endif
}
struct HalfSplit {
  float high;  // both exactly representable in fp16
  float low;
};
DUQUANT_HOST_DEVICE inline HalfSplit split_to_halves(float value) {
  const float high = round_to_half(value);
  return {high, round_to_half(value - high)};
}

// Pre-kernel quantization: each lane quantizes 4 consecutive k, so 8 lanes cover one k32 step,
// which lies in a single weight group (group_size is a multiple of kMmaK); the 8 lanes' row sums
// are added by shuffles and one lane adds the step's sum to the group's shared counter.
constexpr int kQuantizeValuesPerLane = 4;
constexpr int kQuantizeLanesPerStep = kMmaK / kQuantizeValuesPerLane;  // 8

}  // namespace duquant::layout::kernel
