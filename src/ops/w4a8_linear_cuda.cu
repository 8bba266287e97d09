// CUDA kernels of duquant::w4a8_linear (semantics: include/duquant/ops.h; DESIGN.md section 4
// steps 5-7, section 6), registered for the CUDA dispatch key. Two kernels per call:
//
// 1. fused_quantize_kernel (the "pre-kernel"): one thread block (256 threads) per token row at a
//    time; min(T, resident blocks) blocks loop over the tokens.
//    Reads   x [T, in_features] (fp32 / fp16 / bf16 / fp64, row-major), smooth_inv float [in],
//            rotation1 float [b1, b1], permutation int64 [K], rotation2 float [b2, b2].
//    Shared  (pre_kernel_shared_layout) R1 and R2, copied once per block when they fit beside the
//            rows (two 128 x 128 rotations: K up to 4352 on sm_80, 12672 on sm_90; else the CUDA-core
//            path reads them through L1 and the tensor-core path stages one at a time); the token's row in fp32,
//            K floats, plus a second K-float buffer when any of rotation1, permutation, rotation2 is
//            present (each step reads one buffer and writes the other); G int32 group counters.
//    Steps   load * smooth_inv with zero padding to K -> rotation 1 -> permutation gather ->
//            rotation 2 -> absmax (NaN-propagating) -> q = clamp(rint(x / scale), +-qmax) ->
//            row sums per weight group.
//            A block rotation out[blk*b + j] = sum_i in[blk*b + i] R[i][j] is a [K/b x b] x [b x b]
//            product on CUDA cores in fp32 (as the CPU reference): a thread owns 4 (or, for short
//            rows, 1) blocks x 4 columns (w4a8_kernel_layout.h, rotation_tile), reads R rows with
//            16-byte loads and the row values of one i as broadcasts to the lanes sharing blocks.
//            With DUQUANT_CUDA_ROTATION=tensor-cores and blocks a multiple of 16, the rotation is the
//            [K/b, b] x [b, b] product on tensor cores instead (mma.sync m16n8k16 f16, fp32
//            accumulation), each operand split into two fp16 numbers so that the result keeps
//            ~22 bits (w4a8_kernel_layout.h, "Pre-kernel block rotation on tensor cores").
//            With DUQUANT_CUDA_ROTATION=cublas, steps 1-5 run before the pre-kernel as ATen ops
//            (apply_online_transform: each rotation one fp32 cuBLAS GEMM over all T * K/b block
//            rows), and the pre-kernel gets the transformed rows with no transform of its own.
//            Quantization: lane l of a warp handles 4 consecutive k (one char4 store); the 8 lanes of
//            one k32 step add their row sums by shuffles, and one of them adds the step's sum to its
//            weight group's shared counter (a k32 step never straddles a group).
//    Writes  values int8 [T, K] row-major (natural k order), scale float [T], group_sum int32 [T, G].
//
// 2. w4a8_gemm_kernel: int8 activations x uint4 weights on INT8 tensor cores,
//    mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (sm_80+).
//    Grid    (ceil(N / 128), ceil(T / TileM), splits). TileM in {16, 32, 64, 128} by T
//            (gemm_tile_m_for); 4 warps across N (32 columns each), 2 warps across M for TileM 128.
//            Each warp owns a (TileM / WarpsM) x 32 output tile: MT = rows / 16 by 4 n8 MMA tiles.
//    K loop  a block runs the k32 steps [first, end) of its split (plan_split_k: with few output
//            tiles K is split so that about 2 blocks per SM exist). Pipeline stage = 4 k32 steps =
//            128 k; 3 stages in shared memory filled by cp.async.cg (16-byte copies, zero-filled
//            past T, N or the split's end), one commit group per stage, wait_group<1> before a
//            stage is used, so two stages are in flight while the tensor cores consume the third.
//    Shared  per stage: A tile TileM x 128 int8 (row = token, 128 bytes = 8 chunks of 16, chunk c of
//            row r stored at c ^ 2(r & 3)); B tile 128 channels x 64 packed bytes (chunk s = k step s
//            of the stage, stored at s ^ ((n >> 1) & 3)). Both swizzles make the fragment loads
//            below bank-conflict free (w4a8_kernel_layout.h explains and the layout test checks).
//    Fragments (PTX ISA 9.7.14.5, "Matrix Fragments for mma.m16n8k32", g = lane / 4, t = lane % 4)
//            The kernel permutes k inside each k32 step identically for A and B (physical_k_of_slot):
//            MMA slot 4t+i <-> k 8t+i and slot 16+4t+i <-> k 8t+4+i. So, per k32 step:
//            A: lane reads 8 contiguous int8 of row g at byte 8t (one 64-bit load) -> registers 0, 2,
//               and of row g+8 -> registers 1, 3.
//            B: lane reads ONE 32-bit word at byte 4t of channel g's 16 packed bytes = the nibbles
//               of k 8t..8t+7; unpack_weight_word turns it into registers 0 (k 8t..8t+3) and 1
//               (k 8t+4..8t+7): two AND masks give the even and the odd nibbles as bytes 0..15 (a
//               valid non-negative s8), two PRMTs interleave them. No weight reordering offline:
//               the packed layout of w4a8_layout.h is read as is.
//            C: c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g+8.
//    Epilogue per weight group (all of K for per-channel weights): at the group's last step (or the
//            split's last), r += s[n,g] * float(acc - z[n,g] * group_sum[t,g]) (the difference in
//            double, exact for integer zero points, as the CPU reference computes it) with the zero-point
//            term only in the split holding the group's first step; acc is reset. Then
//            y = scale_t * r + bias (fp32, no contraction, as the CPU reference orders it), stored
//            in x's dtype. With splits > 1 a workspace [splits, T, N] takes, for per-channel
//            weights, the raw int32 accumulators (split_k_reduce_kernel adds them exactly, then
//            applies scale and zero point once: the same result as without splitting), for grouped
//            weights the fp32 r of each split (added in split order). Both are deterministic.
//            With DUQUANT_CUDA_GEMM=cublaslt, per-channel weights and more than 16 tokens, this
//            kernel does not run: torch::_int_mm (cuBLASLt) multiplies the activations by an int8
//            copy of the levels (int8_weight_levels.h) and split_k_reduce_kernel finishes its
//            exact int32 accumulators as one split.
//
// act_bits <= 0 (no activation quantization) has no integer kernel: the transform runs as torch
// ops (apply_online_transform), the weight is dequantized on the GPU and y = x W^T in fp32, which
// is the CPU reference's definition of that mode.
//
// CUDA-graph capture contract (DESIGN.md section 7: end-to-end latency is measured under CUDA
// graphs; include/duquant/cuda_graph.h captures whole models). Every host function below may run
// while the current stream is being captured, so it
//  * launches every kernel and torch op on at::cuda::getCurrentCUDAStream() of x's device;
//  * never synchronises the host: no .item(), .cpu(), cudaDeviceSynchronize, blocking cudaMemcpy
//    or check of tensor values; argument checks read metadata only (sizes, dtypes, devices), and
//    out-of-range permutation entries are caught on the device (CUDA_KERNEL_ASSERT);
//  * allocates only through the caching allocator (torch::empty / contiguous / clone on the
//    current stream: under capture the results, the quantized activations and the split-K
//    workspace come from the graph's private pool);
//  * changes no function attribute per call: the first call on a device raises each kernel's
//    dynamic shared-memory limit once (allow_dynamic_shared_memory, thread-safe); the runner's
//    warm-up calls before capture keep even that out of the captured forward;
//  * reads device properties and occupancy through host-side queries, which capture permits.
// The launch geometry depends on the shapes only (T, K, N), so a replay repeats exactly the
// captured launches for the captured shapes.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "activation_reuse.h"
#include "duquant/ops.h"
#include "int8_weight_levels.h"
#include "operator_settings.h"
#include "w4a8_cpu_reference.h"
#include "w4a8_cuda.h"
#include "w4a8_kernel_layout.h"
#include "w4a8_layout.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "duquant's W4A8 kernels need sm_80 or newer (mma.sync m16n8k32 s8, cp.async)"
#endif

namespace duquant::ops::cuda {
namespace {

using namespace duquant::layout;
using namespace duquant::layout::kernel;

constexpr int kPreKernelThreads = 256;
constexpr unsigned kFullWarpMask = 0xFFFFFFFFu;
constexpr int kDefaultSharedLimit = 48 * 1024;  // dynamic shared memory without opting in

// ---------------------------------------------------------------------------------------------
// Pre-kernel

struct PreKernelParams {
  const void* x;  // [T, in_features], InT
  int64_t tokens;
  int in_features;
  int padded_k;
  const float* smooth_inv;       // [in_features] or null
  const float* rotation1;        // [block1, block1] (global memory) or null
  int block1;
  const int64_t* permutation;    // [padded_k] or null
  const float* rotation2;        // [block2, block2] (global memory) or null
  int block2;
  PreKernelSharedLayout shared;  // pre_kernel_shared_layout(...)
  RotationStaging staging;       // how `shared` holds the rotations
  int blocks_per_tile1;          // rotation_blocks_per_tile for rotation 1 and 2
  int blocks_per_tile2;
  int groups;
  int group_size;                // K / groups, a multiple of kMmaK
  float max_level;
  float clip;
  int8_t* values;                // [T, padded_k]
  float* scale;                  // [T]
  int32_t* group_sum;            // [T, groups]
};

DUQUANT_HOST_DEVICE constexpr bool needs_second_row_buffer(bool rotation1, bool permutation, bool rotation2) {
  return rotation1 || permutation || rotation2;
}

// max that keeps NaN (fmaxf drops it): a NaN in the row must make the scale NaN, as on the CPU.
__device__ __forceinline__ float nan_propagating_max(float a, float b) { return (a != a || a > b) ? a : b; }

// Every thread gets the block-wide result. The trailing barrier lets the next token's call reuse
// warp_results.
__device__ float block_reduce_max(float value) {
  __shared__ float warp_results[kPreKernelThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = nan_propagating_max(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  float result = warp_results[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarpSize); ++w) result = nan_propagating_max(result, warp_results[w]);
  __syncthreads();
  return result;
}

// Copies `count` floats of a rotation matrix into shared memory (16-byte copies when possible).
// Unrolled so that each thread has several global loads in flight: with one token per block (T
// below the number of SMs) the staging is paid once per token, and one load at a time would make
// it a chain of memory latencies.
__device__ void stage_in_shared(float* target, const float* __restrict__ source, int count) {
  if (count % 4 == 0) {
#pragma unroll 4
    for (int i = threadIdx.x; i < count / 4; i += blockDim.x) {
      reinterpret_cast<float4*>(target)[i] = __ldg(reinterpret_cast<const float4*>(source) + i);
    }
  } else {
    for (int i = threadIdx.x; i < count; i += blockDim.x) target[i] = __ldg(source + i);
  }
}

// target[blk*b + j] = sum_i source[blk*b + i] * rotation[i*b + j] for every block of the row
// (the [T, K/b, b] x [b, b] matmul of online_transform.cpp, one token). `rotation` is in shared
// memory when staged, else in global memory (read through L1): generic loads serve both. i runs
// upwards with fmaf; the CPU's BLAS may add in another order, hence rare last-bit differences.
template <int kColumns, int kBlocksPerTile>
__device__ void rotate_row_blocks(const float* source, float* target, const float* rotation, int padded_k,
                                  int block) {
  const int blocks = padded_k / block;
  const int tiles = rotation_tile_count(padded_k, block, kBlocksPerTile);
  for (int tile = threadIdx.x; tile < tiles; tile += blockDim.x) {
    const RotationTile position = rotation_tile(tile, block, kBlocksPerTile);
    float sums[kBlocksPerTile][kColumns] = {};
#pragma unroll 4
    for (int i = 0; i < block; ++i) {
      float columns[kColumns];
      const float* row = rotation + i * block + position.first_column;
      if constexpr (kColumns == 4) {
        const float4 v = *reinterpret_cast<const float4*>(row);
        columns[0] = v.x;
        columns[1] = v.y;
        columns[2] = v.z;
        columns[3] = v.w;
      } else {
        columns[0] = row[0];
      }
#pragma unroll
      for (int r = 0; r < kBlocksPerTile; ++r) {
        const int row_block = position.first_block + r;
        const float value = row_block < blocks ? source[row_block * block + i] : 0.0f;
#pragma unroll
        for (int c = 0; c < kColumns; ++c) sums[r][c] = fmaf(value, columns[c], sums[r][c]);
      }
    }
#pragma unroll
    for (int r = 0; r < kBlocksPerTile; ++r) {
      const int row_block = position.first_block + r;
      if (row_block < blocks) {
#pragma unroll
        for (int c = 0; c < kColumns; ++c) target[row_block * block + position.first_column + c] = sums[r][c];
      }
    }
  }
}

__device__ void rotate_row(const float* source, float* target, const float* rotation, int padded_k, int block,
                           int blocks_per_tile) {
  if (block % 4 == 0) {
    if (blocks_per_tile == kRotationMaxBlocksPerTile) {
      rotate_row_blocks<4, kRotationMaxBlocksPerTile>(source, target, rotation, padded_k, block);
    } else {
      rotate_row_blocks<4, 1>(source, target, rotation, padded_k, block);
    }
  } else {
    rotate_row_blocks<1, 1>(source, target, rotation, padded_k, block);
  }
}

// --- Rotation on tensor cores (w4a8_kernel_layout.h, "Pre-kernel block rotation on tensor cores").

__device__ __forceinline__ uint32_t pack_halves(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);  // exact: both are fp16 numbers already
  return *reinterpret_cast<const uint32_t*>(&pair);
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&c)[kMmaCElementsPerThread], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Largest |entry| of `count` floats, NaN-propagating, known to every thread of the block.
__device__ float block_absmax(const float* values, int count) {
  float local_max = 0.0f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) local_max = nan_propagating_max(local_max, fabsf(values[i]));
  return block_reduce_max(local_max);
}

// The shift that scales R's largest entry into [2^14, 2^15) (every thread of the block must call
// it: block-wide maximum). R is the same for every token, so a block computes it once.
__device__ int rotation_shift_of(const float* __restrict__ rotation, int block) {
  return rotation == nullptr ? 0 : half_operand_shift(block_absmax(rotation, block * block));
}

// Writes R (fp32 [b, b], global memory) as hi/lo fp16 B fragments in the staged order, scaled by
// 2^shift (rotation_shift_of).
__device__ void stage_rotation_fragments(float* target_floats, const float* __restrict__ rotation, int block,
                                         int shift) {
  const PowerOfTwo scale = power_of_two(shift);
  uint4* target = reinterpret_cast<uint4*>(target_floats);
  const int n_tiles = block / kHalfMmaN;
#pragma unroll 4  // several fragments' loads in flight per thread, as in stage_in_shared
  for (int index = threadIdx.x; index < rotation_fragment_count(block); index += blockDim.x) {
    const int lane = index % kWarpSize, tile = index / kWarpSize;
    const int k_tile = tile / n_tiles, n_tile = tile % n_tiles;
    HalfSplit parts[kHalfMmaBElementsPerThread];
#pragma unroll
    for (int j = 0; j < kHalfMmaBElementsPerThread; ++j) {
      const MatrixCoord element = rotation_b_element(lane, j);
      const float entry = __ldg(rotation + (k_tile * kHalfMmaK + element.row) * block + n_tile * kHalfMmaN + element.col);
      parts[j] = split_to_halves(scaled_by(entry, scale));
    }
    target[rotation_fragment_index(k_tile, n_tile, block, lane)] =
        make_uint4(pack_halves(parts[0].high, parts[1].high), pack_halves(parts[2].high, parts[3].high),
                   pack_halves(parts[0].low, parts[1].low), pack_halves(parts[2].low, parts[3].low));
  }
}

// target = source R for every block of the row, on tensor cores with fp16 hi/lo operands (three
// MMAs per tile, fp32 accumulation); `fragments` holds R scaled by 2^rotation_shift. Every thread
// of the block must call it (block-wide maximum).
__device__ void rotate_row_on_tensor_cores(const float* source, float* target, const uint4* fragments,
                                           int rotation_shift, int padded_k, int block) {
  const int shift = half_operand_shift(block_absmax(source, padded_k));
  const PowerOfTwo input_scale = power_of_two(shift);
  const int output_shift = -(shift + rotation_shift);
  const int blocks = padded_k / block;
  const int k_tiles = block / kHalfMmaK;
  const int lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int unit = threadIdx.x / kWarpSize; unit < rotation_mma_unit_count(blocks, block); unit += warps) {
    const RotationMmaUnit tile = rotation_mma_unit(unit, block);
    float acc[kRotationMmaNTilesPerUnit][kMmaCElementsPerThread] = {};
    for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
      uint32_t high[4], low[4];
#pragma unroll
      for (int row_half = 0; row_half < 2; ++row_half) {
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);  // blocks past K / b: zero rows
        if (rotation_a_block(tile.m_tile, lane, row_half) < blocks) {
          v = *reinterpret_cast<const float4*>(source +
                                               rotation_a_load_offset(tile.m_tile, k_tile, lane, row_half, block));
        }
        const HalfSplit x0 = split_to_halves(scaled_by(v.x, input_scale));
        const HalfSplit x1 = split_to_halves(scaled_by(v.y, input_scale));
        const HalfSplit x2 = split_to_halves(scaled_by(v.z, input_scale));
        const HalfSplit x3 = split_to_halves(scaled_by(v.w, input_scale));
        high[row_half] = pack_halves(x0.high, x1.high);
        high[row_half + 2] = pack_halves(x2.high, x3.high);
        low[row_half] = pack_halves(x0.low, x1.low);
        low[row_half + 2] = pack_halves(x2.low, x3.low);
      }
#pragma unroll
      for (int j = 0; j < kRotationMmaNTilesPerUnit; ++j) {
        const uint4 b = fragments[rotation_fragment_index(k_tile, tile.first_n_tile + j, block, lane)];
        mma_m16n8k16_f16(acc[j], high, b.x, b.y);  // hi x hi
        mma_m16n8k16_f16(acc[j], low, b.x, b.y);   // lo x hi
        mma_m16n8k16_f16(acc[j], high, b.z, b.w);  // hi x lo
      }
    }
#pragma unroll
    for (int j = 0; j < kRotationMmaNTilesPerUnit; ++j) {
#pragma unroll
      for (int i = 0; i < kMmaCElementsPerThread; ++i) {
        if (tile.m_tile * kHalfMmaM + mma_c_element(lane, i).row < blocks) {
          // ldexpf: the two shifts together may exceed one float's exponent range.
          target[rotation_c_offset(tile.m_tile, tile.first_n_tile + j, lane, i, block)] =
              ldexpf(acc[j][i], output_shift);
        }
      }
    }
  }
}

__device__ __forceinline__ int quantize_value(float value, float token_scale, float max_level, bool finite_scale) {
  // rintf rounds half to even, like std::nearbyint on the CPU; IEEE division (no fast math).
  return finite_scale ? static_cast<int>(fminf(fmaxf(rintf(value / token_scale), -max_level), max_level)) : 0;
}

// Grid: min(T, resident blocks); block b handles tokens b, b + gridDim.x, ... so that the staged
// rotations are copied once per block.
// kTensorCores: the rotations run on tensor cores from staged fragments (rotate_row_on_tensor_cores),
// else on CUDA cores (rotate_row), reading R from shared memory when staged.
template <typename InT, bool kTensorCores>
__global__ void __launch_bounds__(kPreKernelThreads) fused_quantize_kernel(const PreKernelParams p) {
  extern __shared__ float4 pre_kernel_shared[];
  float* shared = reinterpret_cast<float*>(pre_kernel_shared);
  const float* rotation1 = p.rotation1;
  const float* rotation2 = p.rotation2;
  const bool restage = p.staging == RotationStaging::kOneAtATime;
  int rotation1_shift = 0, rotation2_shift = 0;  // tensor cores: the staged fragments' scales
  if constexpr (kTensorCores) {
    rotation1_shift = rotation_shift_of(rotation1, p.block1);
    rotation2_shift = rotation_shift_of(rotation2, p.block2);
    if (!restage && rotation1 != nullptr) {
      stage_rotation_fragments(shared + p.shared.rotation1, rotation1, p.block1, rotation1_shift);
    }
    if (!restage && rotation2 != nullptr) {
      stage_rotation_fragments(shared + p.shared.rotation2, rotation2, p.block2, rotation2_shift);
    }
  } else {
    if (p.shared.rotation1 >= 0 && rotation1 != nullptr) {
      stage_in_shared(shared + p.shared.rotation1, rotation1, p.block1 * p.block1);
      rotation1 = shared + p.shared.rotation1;
    }
    if (p.shared.rotation2 >= 0 && rotation2 != nullptr) {
      stage_in_shared(shared + p.shared.rotation2, rotation2, p.block2 * p.block2);
      rotation2 = shared + p.shared.rotation2;
    }
  }
  // One rotation of the token row: on tensor cores, first staging R's fragments when the two
  // rotations share one region (the barrier before the call ends every read of the region).
  const auto rotate = [&](const float* source, float* target, const float* rotation, const float* global_rotation,
                          int region, int rotation_shift, int block, int blocks_per_tile) {
    if constexpr (kTensorCores) {
      if (restage) {
        stage_rotation_fragments(shared + region, global_rotation, block, rotation_shift);
        __syncthreads();
      }
      rotate_row_on_tensor_cores(source, target, reinterpret_cast<const uint4*>(shared + region), rotation_shift,
                                 p.padded_k, block);
    } else {
      rotate_row(source, target, rotation, p.padded_k, block, blocks_per_tile);
    }
  };
  int* group_counters = reinterpret_cast<int*>(shared + p.shared.counters);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  constexpr int kWarpValues = kWarpSize * kQuantizeValuesPerLane;

  for (int64_t token = blockIdx.x; token < p.tokens; token += gridDim.x) {
    float* current = shared + p.shared.row;
    float* spare = shared + p.shared.spare_row;
    const InT* x_row = static_cast<const InT*>(p.x) + token * p.in_features;
    // Unrolled (here and in the gather below) so that a thread's global loads of the row, of
    // smooth_inv and of the permutation are in flight together: one at a time, each iteration
    // would wait a full memory latency (K / 256 of them per token).
#pragma unroll 8
    for (int k = threadIdx.x; k < p.padded_k; k += blockDim.x) {
      float value = 0.0f;  // zero padding is exact (ops.h step 2)
      if (k < p.in_features) {
        value = static_cast<float>(x_row[k]);
        if (p.smooth_inv != nullptr) value *= p.smooth_inv[k];
      }
      current[k] = value;
    }
    for (int g = threadIdx.x; g < p.groups; g += blockDim.x) group_counters[g] = 0;
    __syncthreads();  // also publishes the staged rotations on the first token

    if (rotation1 != nullptr) {
      rotate(current, spare, rotation1, p.rotation1, p.shared.rotation1, rotation1_shift, p.block1, p.blocks_per_tile1);
      __syncthreads();
      float* done = spare;
      spare = current;
      current = done;
    }
    if (p.permutation != nullptr) {
#pragma unroll 8
      for (int k = threadIdx.x; k < p.padded_k; k += blockDim.x) {
        const int64_t source = p.permutation[k];
        CUDA_KERNEL_ASSERT(source >= 0 && source < p.padded_k);
        spare[k] = current[source];
      }
      __syncthreads();
      float* done = spare;
      spare = current;
      current = done;
    }
    if (rotation2 != nullptr) {
      rotate(current, spare, rotation2, p.rotation2, p.shared.rotation2, rotation2_shift, p.block2, p.blocks_per_tile2);
      __syncthreads();
      float* done = spare;
      spare = current;
      current = done;
    }

    float local_max = 0.0f;
    for (int k = threadIdx.x; k < p.padded_k; k += blockDim.x) {
      local_max = nan_propagating_max(local_max, fabsf(current[k]));
    }
    const float absmax = block_reduce_max(local_max);
    // Same fp32 expression and special cases as cpu_reference::quantize_activations.
    float token_scale = p.clip * absmax / p.max_level;
    if (token_scale == 0.0f) token_scale = 1.0f;
    const bool finite_scale = isfinite(token_scale);
    if (threadIdx.x == 0) p.scale[token] = token_scale;

    int8_t* values_row = p.values + token * p.padded_k;
    // Warp-uniform loop so that the shuffles always see the full warp; K is a multiple of kMmaK,
    // so the 8 lanes of one k32 step are all in range or all out of it.
    for (int warp_first = warp * kWarpValues; warp_first < p.padded_k; warp_first += warps * kWarpValues) {
      const int first = warp_first + lane * kQuantizeValuesPerLane;
      const bool in_range = first < p.padded_k;
      int step_sum = 0;
      if (in_range) {
        const int q0 = quantize_value(current[first + 0], token_scale, p.max_level, finite_scale);
        const int q1 = quantize_value(current[first + 1], token_scale, p.max_level, finite_scale);
        const int q2 = quantize_value(current[first + 2], token_scale, p.max_level, finite_scale);
        const int q3 = quantize_value(current[first + 3], token_scale, p.max_level, finite_scale);
        *reinterpret_cast<char4*>(values_row + first) =
            make_char4(static_cast<signed char>(q0), static_cast<signed char>(q1), static_cast<signed char>(q2),
                       static_cast<signed char>(q3));
        step_sum = q0 + q1 + q2 + q3;
      }
      for (int offset = 1; offset < kQuantizeLanesPerStep; offset *= 2) {
        step_sum += __shfl_xor_sync(kFullWarpMask, step_sum, offset);
      }
      if (in_range && lane % kQuantizeLanesPerStep == 0) atomicAdd(&group_counters[first / p.group_size], step_sum);
    }
    __syncthreads();
    for (int g = threadIdx.x; g < p.groups; g += blockDim.x) p.group_sum[token * p.groups + g] = group_counters[g];
    __syncthreads();  // the next token rewrites the row buffers and the counters
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM

enum class OutputType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

struct GemmParams {
  const int8_t* activations;     // [T, K]
  const float* token_scale;      // [T]
  const int32_t* group_sum;      // [T, G]
  const uint8_t* packed_weight;  // [N, K / 2] (w4a8_layout.h)
  const float* weight_scale;     // [N, G]
  const float* weight_zero;      // [N, G]
  const float* bias;             // [N] or null
  void* output;                  // [T, N] in output_type
  // [splits, T, N] when splits > 1, else null. Per-channel weights (one group): the raw int32
  // accumulators (the reduction then adds them exactly and corrects the zero point once, as
  // without split-K); grouped weights: fp32 sums of the groups' dequantized contributions.
  float* partial;
  OutputType output_type;
  int tokens;
  int out_features;
  int padded_k;
  int groups;
  int group_steps;  // k32 steps per group
  int k_steps;
  SplitKPlan plan;
};

__device__ __forceinline__ void cp_async_16(void* shared_target, const void* global_source, bool valid) {
  const unsigned target = static_cast<unsigned>(__cvta_generic_to_shared(shared_target));
  // src-size 0 zero-fills the 16 bytes without reading global memory (rows past T or N, steps
  // past the split's end).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(target), "l"(global_source),
               "r"(valid ? kCopyBytes : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void mma_m16n8k32_s8(int32_t (&c)[kMmaCElementsPerThread], const uint32_t (&a)[4],
                                                uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void store_output(const GemmParams& p, int64_t index, float value) {
  switch (p.output_type) {
    case OutputType::kFloat32:
      static_cast<float*>(p.output)[index] = value;
      break;
    case OutputType::kFloat16:
      static_cast<__half*>(p.output)[index] = __float2half_rn(value);
      break;
    case OutputType::kBFloat16:
      static_cast<__nv_bfloat16*>(p.output)[index] = __float2bfloat16_rn(value);
      break;
    case OutputType::kFloat64:
      static_cast<double*>(p.output)[index] = static_cast<double>(value);
      break;
  }
}

// y = scale_t * r (+ bias): two roundings in this order, as the CPU reference (its product is
// rounded to fp32, then the fp32 bias is added).
__device__ __forceinline__ float finish_output(const GemmParams& p, int row, int col, float dequantized) {
  float y = __fmul_rn(p.token_scale[row], dequantized);
  if (p.bias != nullptr) y = __fadd_rn(y, p.bias[col]);
  return y;
}

template <int kTileM, int kWarpsM>
struct GemmTile {
  static constexpr int kThreads = kGemmWarpsN * kWarpsM * kWarpSize;
  static constexpr int kWarpTileM = kTileM / kWarpsM;
  static constexpr int kMTiles = kWarpTileM / kMmaM;
  static constexpr int kACopiesPerThread = kTileM * kATileChunksPerRow / kThreads;
  static constexpr int kBCopiesPerThread = kGemmTileN * kBTileChunksPerRow / kThreads;
  static_assert(kWarpTileM % kMmaM == 0, "warp tile rows must be whole m16 tiles");
  static_assert(kTileM * kATileChunksPerRow % kThreads == 0, "A tile copies must split evenly over the threads");
  static_assert(kGemmTileN * kBTileChunksPerRow % kThreads == 0, "B tile copies must split evenly over the threads");
};

// Minimum one resident block per SM: without it ptxas capped the grouped 16-row kernel at 128
// registers and spilled on sm_80; the occupancy it bought is not needed (weights stream from
// memory through the cp.async pipeline, several blocks per SM remain possible).
template <int kTileM, int kWarpsM, bool kGrouped>
__global__ void __launch_bounds__(GemmTile<kTileM, kWarpsM>::kThreads, 1) w4a8_gemm_kernel(const GemmParams p) {
  using Tile = GemmTile<kTileM, kWarpsM>;
  constexpr int kMTiles = Tile::kMTiles;
  extern __shared__ float4 gemm_shared_words[];
  uint8_t* gemm_shared = reinterpret_cast<uint8_t*>(gemm_shared_words);

  const int column0 = blockIdx.x * kGemmTileN;
  const int row0 = blockIdx.y * kTileM;
  const int split = blockIdx.z;
  const int first_step = split_first_step(p.plan, split);
  const int end_step = split_end_step(p.plan, split, p.k_steps);
  const int stage_count = ceil_div(end_step - first_step, kGemmStepsPerStage);

  const int thread = threadIdx.x;
  const int lane = thread % kWarpSize, warp = thread / kWarpSize;
  const int warp_row0 = (warp / kGemmWarpsN) * Tile::kWarpTileM;
  const int warp_col0 = (warp % kGemmWarpsN) * kGemmWarpTileN;

  // Issues the cp.async copies of pipeline stage `stage` (k steps first_step + 4 * stage ...)
  // into shared buffer `buffer`.
  auto load_stage = [&](int stage, int buffer) {
    uint8_t* a_tile = gemm_shared + buffer * gemm_stage_bytes(kTileM);
    uint8_t* b_tile = a_tile + a_tile_bytes(kTileM);
    const int stage_step0 = first_step + stage * kGemmStepsPerStage;
#pragma unroll
    for (int j = 0; j < Tile::kACopiesPerThread; ++j) {
      const MatrixCoord chunk = copy_chunk_coord(thread, j, Tile::kThreads, kATileChunksPerRow);
      const int row = row0 + chunk.row;
      const bool valid = row < p.tokens && a_copy_step(stage_step0, chunk.col) < end_step;
      const int8_t* source = p.activations + (valid ? a_copy_source(row, stage_step0, chunk.col, p.padded_k) : 0);
      cp_async_16(a_tile + a_tile_offset(chunk.row, chunk.col * kCopyBytes), source, valid);
    }
#pragma unroll
    for (int j = 0; j < Tile::kBCopiesPerThread; ++j) {
      const MatrixCoord chunk = copy_chunk_coord(thread, j, Tile::kThreads, kBTileChunksPerRow);
      const int channel = column0 + chunk.row;
      const bool valid = channel < p.out_features && b_copy_step(stage_step0, chunk.col) < end_step;
      const uint8_t* source =
          p.packed_weight + (valid ? b_copy_source(channel, stage_step0, chunk.col, p.padded_k) : 0);
      cp_async_16(b_tile + b_tile_offset(chunk.row, chunk.col * kCopyBytes), source, valid);
    }
  };

  int32_t acc[kMTiles][kGemmWarpNTiles][kMmaCElementsPerThread] = {};
  float dequantized[kMTiles][kGemmWarpNTiles][kMmaCElementsPerThread] = {};

  // Folds the integer accumulators of weight group `group` into `dequantized` and clears them.
  auto close_group = [&](int group) {
    const bool subtract_zero_point = owns_zero_point_term(group, p.group_steps, first_step);
    float column_scale[kGemmWarpNTiles][2], column_zero[kGemmWarpNTiles][2];
#pragma unroll
    for (int nt = 0; nt < kGemmWarpNTiles; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = column0 + warp_col0 + nt * kMmaN + mma_c_element(lane, c).col;
        const bool valid = col < p.out_features;
        column_scale[nt][c] = valid ? p.weight_scale[static_cast<int64_t>(col) * p.groups + group] : 0.0f;
        column_zero[nt][c] = valid ? p.weight_zero[static_cast<int64_t>(col) * p.groups + group] : 0.0f;
      }
    }
    int32_t row_sum[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + warp_row0 + mt * kMmaM + mma_c_element(lane, 2 * h).row;
        row_sum[mt][h] =
            (subtract_zero_point && row < p.tokens) ? p.group_sum[static_cast<int64_t>(row) * p.groups + group] : 0;
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kGemmWarpNTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < kMmaCElementsPerThread; ++i) {
          // acc - z * row_sum in double, as the CPU reference: exact for integer-valued zero points
          // (|terms| < 2^53), while fp32 would round both terms (up to 15 * 127 * K > 2^24) before
          // they cancel.
          const double corrected = static_cast<double>(acc[mt][nt][i]) -
                                   static_cast<double>(column_zero[nt][i & 1]) * static_cast<double>(row_sum[mt][i >> 1]);
          dequantized[mt][nt][i] =
              fmaf(column_scale[nt][i & 1], static_cast<float>(corrected), dequantized[mt][nt][i]);
          acc[mt][nt][i] = 0;
        }
      }
    }
  };

#pragma unroll
  for (int stage = 0; stage < kGemmStages - 1; ++stage) {
    if (stage < stage_count) load_stage(stage, stage);
    cp_async_commit();  // possibly empty: keeps one group per stage for wait_group's count
  }

  for (int stage = 0; stage < stage_count; ++stage) {
    cp_async_wait<kGemmStages - 2>();  // this stage's copies (of this thread) have landed
    __syncthreads();  // ... and everyone's; everyone is also done with the buffer refilled next
    const int next = stage + kGemmStages - 1;
    if (next < stage_count) load_stage(next, next % kGemmStages);
    cp_async_commit();

    const uint8_t* a_tile = gemm_shared + (stage % kGemmStages) * gemm_stage_bytes(kTileM);
    const uint8_t* b_tile = a_tile + a_tile_bytes(kTileM);
    const int stage_step0 = first_step + stage * kGemmStepsPerStage;
#pragma unroll
    for (int s = 0; s < kGemmStepsPerStage; ++s) {
      const int step = stage_step0 + s;
      if (step < end_step) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = warp_row0 + mt * kMmaM + mma_group_id(lane) + half * (kMmaM / 2);
            const uint2 eight = *reinterpret_cast<const uint2*>(a_tile + a_fragment_offset(row, s, lane));
            a[mt][a_register_of_load(half, 0)] = eight.x;
            a[mt][a_register_of_load(half, 1)] = eight.y;
          }
        }
#pragma unroll
        for (int nt = 0; nt < kGemmWarpNTiles; ++nt) {
          const int channel = warp_col0 + nt * kMmaN + mma_group_id(lane);
          const uint32_t word = *reinterpret_cast<const uint32_t*>(b_tile + b_fragment_offset(channel, s, lane));
          const UnpackedWeights b = unpack_weight_word(word);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) mma_m16n8k32_s8(acc[mt][nt], a[mt], b.first, b.second);
        }
        if (kGrouped && closes_group(step, p.group_steps, end_step)) close_group(step / p.group_steps);
      }
    }
  }
  cp_async_wait<0>();
  const bool partial_accumulators = !kGrouped && p.partial != nullptr;
  if (!kGrouped && !partial_accumulators) close_group(0);

#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kGemmWarpNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < kMmaCElementsPerThread; ++i) {
        const MatrixCoord element = mma_c_element(lane, i);
        const int row = row0 + warp_row0 + mt * kMmaM + element.row;
        const int col = column0 + warp_col0 + nt * kMmaN + element.col;
        if (row >= p.tokens || col >= p.out_features) continue;
        const int64_t index = static_cast<int64_t>(row) * p.out_features + col;
        const int64_t partial_index = static_cast<int64_t>(split) * p.tokens * p.out_features + index;
        if (partial_accumulators) {
          reinterpret_cast<int32_t*>(p.partial)[partial_index] = acc[mt][nt][i];
        } else if (p.partial != nullptr) {
          p.partial[partial_index] = dequantized[mt][nt][i];
        } else {
          store_output(p, index, finish_output(p, row, col, dequantized[mt][nt][i]));
        }
      }
    }
  }
}

// Adds the splits' partials in split order (deterministic) and finishes y (see the file comment
// and GemmParams::partial).
__global__ void split_k_reduce_kernel(const GemmParams p) {
  const int64_t elements = static_cast<int64_t>(p.tokens) * p.out_features;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < elements;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(index / p.out_features), col = static_cast<int>(index % p.out_features);
    float dequantized = 0.0f;
    if (p.groups == 1) {
      const int32_t* accumulators = reinterpret_cast<const int32_t*>(p.partial);
      int32_t acc = 0;
      for (int s = 0; s < p.plan.splits; ++s) acc += accumulators[s * elements + index];
      // The same expression as close_group of the kernel without split-K.
      const double corrected = static_cast<double>(acc) -
                               static_cast<double>(p.weight_zero[col]) * static_cast<double>(p.group_sum[row]);
      dequantized = fmaf(p.weight_scale[col], static_cast<float>(corrected), 0.0f);
    } else {
      for (int s = 0; s < p.plan.splits; ++s) dequantized += p.partial[s * elements + index];
    }
    store_output(p, index, finish_output(p, row, col, dequantized));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

// Raises a kernel's dynamic shared-memory limit to what the device allows it (the opt-in maximum
// less the kernel's static shared memory), once per device and kernel: std::call_once makes
// concurrent first calls wait for the one that sets it, so no thread launches before the limit is
// raised and no call ever changes the attribute again (capture contract at the top of the file).
// The limit only permits; each launch's own dynamic size decides the occupancy.
struct SharedMemoryGrant {
  std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> raised;
  std::array<int64_t, C10_COMPILE_TIME_MAX_GPUS> limit{};  // written inside call_once, read after it
};

template <typename Kernel>
void allow_dynamic_shared_memory(Kernel kernel, int64_t bytes, SharedMemoryGrant& grant) {
  if (bytes <= kDefaultSharedLimit) return;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "duquant::w4a8_linear (CUDA): device index ",
              device, " is out of range");
  const auto slot = static_cast<size_t>(device);
  std::call_once(grant.raised[slot], [&] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const int64_t limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) -
                          static_cast<int64_t>(attributes.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
    grant.limit[slot] = limit;
  });
  TORCH_CHECK(bytes <= grant.limit[slot], "duquant::w4a8_linear (CUDA): ", bytes,
              " bytes of dynamic shared memory needed, the device allows this kernel ", grant.limit[slot]);
}

// 16-byte vector loads (cp.async, float4) need 16-byte aligned bases.
torch::Tensor aligned_contiguous(const torch::Tensor& tensor) {
  auto result = tensor.contiguous();
  if (reinterpret_cast<uintptr_t>(result.data_ptr()) % kCopyBytes != 0) result = result.clone();
  return result;
}

// Empty tensors mean "step skipped" and may live anywhere; others must be on x's device.
void check_on_device(const torch::Tensor& tensor, const char* name, const c10::Device& device) {
  if (!tensor.defined() || tensor.numel() == 0) return;
  TORCH_CHECK(tensor.device() == device, "duquant::w4a8_linear (CUDA): ", name, " is on ", tensor.device(),
              " but x is on ", device, "; move the module with .to(device)");
}

int64_t effective_group_size(int64_t padded_k, int64_t group_size) { return group_size > 0 ? group_size : padded_k; }

void check_kernel_group_size(int64_t padded_k, int64_t group_size) {
  TORCH_CHECK(group_size > 0 && padded_k % group_size == 0, "duquant::w4a8_linear (CUDA): group_size ", group_size,
              " must divide the padded in_features K = ", padded_k);
  TORCH_CHECK(group_size % kMmaK == 0, "duquant::w4a8_linear (CUDA): group_size ", group_size,
              " must be a multiple of ", kMmaK, " (one tensor-core k step never straddles a weight group)");
}

// torch::_int_mm (cuBLASLt) takes more than 16 rows and column counts that are multiples of 8.
constexpr int64_t kIntMmMinTokens = 16;
constexpr int64_t kIntMmMultiple = 8;

// Rotation blocks are at most this wide on the GPU: the kernels index a block's b * b entries
// with 32-bit integers (DuQuant's blocks are 16 to 128).
constexpr int64_t kMaxRotationBlock = 4096;

void check_rotation_operand(const torch::Tensor& rotation, const char* name, int64_t padded_k) {
  if (rotation.numel() == 0) return;
  TORCH_CHECK(rotation.dim() == 2 && rotation.size(0) == rotation.size(1) && rotation.is_floating_point() &&
                  padded_k % rotation.size(0) == 0,
              "duquant (CUDA): ", name, " must be a square floating-point matrix whose size divides K = ", padded_k,
              ", got ", rotation.scalar_type(), " ", rotation.sizes());
  TORCH_CHECK(rotation.size(0) <= kMaxRotationBlock, "duquant (CUDA): ", name, " is a ", rotation.size(0),
              "-wide block; the GPU kernels take blocks of at most ", kMaxRotationBlock,
              " (quantize with a smaller --block)");
}

QuantizedActivations fused_quantize_activations_cuda(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                                                     const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                                     const torch::Tensor& rotation2, int64_t padded_in_features,
                                                     int64_t group_size, int64_t act_bits, double act_clip) {
  TORCH_CHECK(x.is_cuda() && x.is_floating_point() && x.dim() >= 1,
              "duquant::_fused_quantize_activations: x must be a floating-point CUDA tensor [..., in_features], got ",
              x.toString(), " ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t in_features = x.size(-1);
  const int64_t padded_k = padded_in_features;
  TORCH_CHECK(padded_k >= in_features && padded_k % kMmaK == 0, "duquant::_fused_quantize_activations: padded K ",
              padded_k, " must be >= in_features ", in_features, " and a multiple of ", kMmaK);
  TORCH_CHECK(padded_k <= std::numeric_limits<int32_t>::max() / 2, "duquant: padded K ", padded_k, " is too large");
  TORCH_CHECK(act_bits >= 2 && act_bits <= kActivationBits, "duquant::_fused_quantize_activations: act_bits ",
              act_bits, " is outside 2..", kActivationBits);
  TORCH_CHECK(std::isfinite(act_clip) && act_clip > 0, "duquant::_fused_quantize_activations: act_clip must be a "
              "positive finite ratio, got ", act_clip);
  const int64_t group_length = effective_group_size(padded_k, group_size);
  check_kernel_group_size(padded_k, group_length);
  const int64_t groups = padded_k / group_length;
  check_rotation_operand(rotation1, "rotation1", padded_k);
  check_rotation_operand(rotation2, "rotation2", padded_k);
  for (const auto& [tensor, name] : {std::pair<const torch::Tensor&, const char*>{smooth_inv, "smooth_inv"},
                                     {rotation1, "rotation1"},
                                     {permutation, "permutation"},
                                     {rotation2, "rotation2"}}) {
    check_on_device(tensor, name, x.device());
  }
  if (smooth_inv.numel() > 0) {
    TORCH_CHECK(smooth_inv.numel() == in_features, "duquant: smooth_inv has ", smooth_inv.numel(), " entries for ",
                in_features, " input features");
  }
  if (permutation.numel() > 0) {
    TORCH_CHECK(permutation.dim() == 1 && permutation.size(0) == padded_k &&
                    c10::isIntegralType(permutation.scalar_type(), /*includeBool=*/false),
                "duquant: permutation must be an integer vector of length K = ", padded_k, ", got ",
                permutation.scalar_type(), " ", permutation.sizes());
  }

  const int64_t tokens = in_features > 0 ? x.numel() / in_features : 0;
  // DUQUANT_CUDA_ROTATION (operator_settings.h), read at every call. With `cublas`, steps 1-5 run
  // as ATen ops on this stream and the pre-kernel below quantizes their result, which has no
  // transform left (so the nested call takes none of these branches).
  const CudaRotationPath rotation_path = cuda_rotation_path();
  const bool any_transform =
      smooth_inv.numel() > 0 || rotation1.numel() > 0 || permutation.numel() > 0 || rotation2.numel() > 0;
  if (rotation_path == CudaRotationPath::kCublas && any_transform && tokens > 0) {
    const auto transformed = apply_online_transform(x.reshape({tokens, in_features}), smooth_inv, rotation1,
                                                    permutation, rotation2, padded_k);
    const auto none = torch::empty({0}, x.options().dtype(torch::kFloat));
    return fused_quantize_activations_cuda(transformed, none, none, none, none, padded_k, group_size, act_bits,
                                           act_clip);
  }
  QuantizedActivations result;
  result.values = torch::empty({tokens, padded_k}, x.options().dtype(torch::kInt8));
  result.scale = torch::empty({tokens}, x.options().dtype(torch::kFloat));
  result.group_sum = torch::empty({tokens, groups}, x.options().dtype(torch::kInt));
  if (tokens == 0) return result;
  TORCH_CHECK(tokens <= std::numeric_limits<int32_t>::max(), "duquant: too many tokens for one launch: ", tokens);

  const auto x_rows = x.reshape({tokens, in_features}).contiguous();
  const auto smooth = smooth_inv.numel() > 0 ? smooth_inv.to(torch::kFloat).contiguous() : torch::Tensor();
  const auto r1 = rotation1.numel() > 0 ? aligned_contiguous(rotation1.to(torch::kFloat)) : torch::Tensor();
  const auto r2 = rotation2.numel() > 0 ? aligned_contiguous(rotation2.to(torch::kFloat)) : torch::Tensor();
  const auto perm = permutation.numel() > 0 ? permutation.to(torch::kLong).contiguous() : torch::Tensor();

  const bool second_row = needs_second_row_buffer(r1.defined(), perm.defined(), r2.defined());
  const int block1 = r1.defined() ? static_cast<int>(r1.size(0)) : 0;
  const int block2 = r2.defined() ? static_cast<int>(r2.size(0)) : 0;
  const auto* properties = at::cuda::getCurrentDeviceProperties();
  const int64_t shared_limit = static_cast<int64_t>(properties->sharedMemPerBlockOptin);
  const auto layout_for = [&](RotationStaging staging) {
    return pre_kernel_shared_layout(static_cast<int>(padded_k), block1, block2, staging, second_row,
                                    static_cast<int>(groups));
  };
  // The kernel's static shared memory (block_reduce_max's per-warp results) comes off the limit.
  constexpr int64_t kStaticSharedBytes = sizeof(float) * (kPreKernelThreads / kWarpSize);
  const auto fits = [&](const PreKernelSharedLayout& candidate) {
    return static_cast<int64_t>(candidate.total_floats) * static_cast<int64_t>(sizeof(float)) <=
           shared_limit - kStaticSharedBytes;
  };
  // Tensor cores when asked for and every rotation's block is a multiple of 16 and at least one
  // rotation can be staged; they stage both rotations when both fit beside the rows (K = 2048
  // with two 128 x 128 rotations: 144 KB), else one at a time (K = 16384 on sm_90: 192 KB). The
  // CUDA-core path stages both when they fit, else reads them through L1.
  bool tensor_cores = rotation_path == CudaRotationPath::kTensorCores && (block1 > 0 || block2 > 0) &&
                      (block1 == 0 || rotation_fits_tensor_cores(block1)) &&
                      (block2 == 0 || rotation_fits_tensor_cores(block2));
  RotationStaging staging = block1 > 0 || block2 > 0 ? RotationStaging::kBoth : RotationStaging::kNone;
  if (!fits(layout_for(staging))) staging = tensor_cores ? RotationStaging::kOneAtATime : RotationStaging::kNone;
  if (tensor_cores && !fits(layout_for(staging))) {
    tensor_cores = false;
    staging = RotationStaging::kNone;
  }
  const PreKernelSharedLayout layout = layout_for(staging);
  const int64_t shared_bytes = static_cast<int64_t>(layout.total_floats) * static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(shared_bytes <= shared_limit, "duquant (CUDA): a token row of K = ", padded_k, " needs ", shared_bytes,
              " bytes of shared memory in the pre-kernel, the device allows ", shared_limit);

  PreKernelParams params{};
  params.x = x_rows.data_ptr();
  params.tokens = tokens;
  params.in_features = static_cast<int>(in_features);
  params.padded_k = static_cast<int>(padded_k);
  params.smooth_inv = smooth.defined() ? smooth.data_ptr<float>() : nullptr;
  params.rotation1 = r1.defined() ? r1.data_ptr<float>() : nullptr;
  params.block1 = block1;
  params.permutation = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
  params.rotation2 = r2.defined() ? r2.data_ptr<float>() : nullptr;
  params.block2 = block2;
  params.shared = layout;
  params.staging = staging;
  params.blocks_per_tile1 = block1 > 0 ? rotation_blocks_per_tile(params.padded_k, block1, kPreKernelThreads) : 1;
  params.blocks_per_tile2 = block2 > 0 ? rotation_blocks_per_tile(params.padded_k, block2, kPreKernelThreads) : 1;
  params.groups = static_cast<int>(groups);
  params.group_size = static_cast<int>(group_length);
  params.max_level = static_cast<float>(activation_max_level(static_cast<int>(act_bits)));
  params.clip = static_cast<float>(act_clip);
  params.values = result.values.data_ptr<int8_t>();
  params.scale = result.scale.data_ptr<float>();
  params.group_sum = result.group_sum.data_ptr<int32_t>();

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_rows.scalar_type(), "duquant_fused_quantize", [&] {
    using InT = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
                                   std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, scalar_t>>;
    // One grant per kernel: each case of the dispatch has its own lambda, and two rotation paths.
    static SharedMemoryGrant grants[2];
    const auto kernel = tensor_cores ? fused_quantize_kernel<InT, true> : fused_quantize_kernel<InT, false>;
    allow_dynamic_shared_memory(kernel, shared_bytes, grants[tensor_cores ? 1 : 0]);
    // As many blocks as can be resident at once (each then loops over tokens), at most one per token.
    int resident_per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident_per_sm, kernel, kPreKernelThreads,
                                                                 static_cast<size_t>(shared_bytes)));
    const int64_t resident = static_cast<int64_t>(std::max(resident_per_sm, 1)) * properties->multiProcessorCount;
    const auto grid = static_cast<unsigned>(std::min(tokens, resident));
    kernel<<<grid, kPreKernelThreads, shared_bytes, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

OutputType output_type_of(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat:
      return OutputType::kFloat32;
    case torch::kHalf:
      return OutputType::kFloat16;
    case torch::kBFloat16:
      return OutputType::kBFloat16;
    case torch::kDouble:
      return OutputType::kFloat64;
    default:
      TORCH_CHECK(false, "duquant::w4a8_linear (CUDA): unsupported output dtype ", dtype);
  }
}

template <int kTileM, int kWarpsM, bool kGrouped>
void launch_gemm(const GemmParams& params, cudaStream_t stream) {
  using Tile = GemmTile<kTileM, kWarpsM>;
  constexpr int64_t kSharedBytes = gemm_shared_bytes(kTileM);
  static SharedMemoryGrant grant;
  allow_dynamic_shared_memory(w4a8_gemm_kernel<kTileM, kWarpsM, kGrouped>, kSharedBytes, grant);
  const dim3 grid(ceil_div(params.out_features, kGemmTileN), ceil_div(params.tokens, kTileM), params.plan.splits);
  w4a8_gemm_kernel<kTileM, kWarpsM, kGrouped><<<grid, Tile::kThreads, kSharedBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kGrouped>
void launch_gemm_for_tile(int tile_m, const GemmParams& params, cudaStream_t stream) {
  switch (tile_m) {
    case 16:
      return launch_gemm<16, gemm_warps_m_for(16), kGrouped>(params, stream);
    case 32:
      return launch_gemm<32, gemm_warps_m_for(32), kGrouped>(params, stream);
    case 64:
      return launch_gemm<64, gemm_warps_m_for(64), kGrouped>(params, stream);
    default:
      return launch_gemm<128, gemm_warps_m_for(128), kGrouped>(params, stream);
  }
}

// The int8 levels of `packed` for a product on `stream` (int8_weight_levels.h). Outside a capture
// the cached copy, made at the first call and the stream synchronised once, so that a later call
// on any stream (a capture's side stream) reads finished levels. During a capture the cached copy
// if one exists, else a copy made inside the graph and not cached: captured kernels only run at
// replay, so caching it would hand the next caller unwritten memory.
torch::Tensor int8_levels_on(const c10::cuda::CUDAStream& stream, const torch::Tensor& packed) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  if (status != cudaStreamCaptureStatusNone) {
    const auto cached = find_cached_int8_levels(packed);
    return cached.defined() ? cached : unpack_int4_to_int8(packed);
  }
  return cached_int8_levels(packed, [&] { stream.synchronize(); });
}

torch::Tensor w4a8_gemm_cuda(const torch::Tensor& values, const torch::Tensor& scale, const torch::Tensor& group_sum,
                             const torch::Tensor& packed_weight, const torch::Tensor& weight_scale,
                             const torch::Tensor& weight_zero, const torch::Tensor& bias, int64_t group_size,
                             c10::ScalarType out_dtype) {
  TORCH_CHECK(values.is_cuda() && values.scalar_type() == torch::kInt8 && values.dim() == 2,
              "duquant::_w4a8_gemm: values must be int8 CUDA [T, K], got ", values.toString(), " ", values.sizes());
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t tokens = values.size(0), padded_k = values.size(1);
  TORCH_CHECK(packed_weight.scalar_type() == torch::kUInt8 && packed_weight.dim() == 2 &&
                  packed_weight.size(1) * kWeightsPerByte == padded_k,
              "duquant::_w4a8_gemm: packed_weight must be uint8 [N, K / 2 = ", padded_k / kWeightsPerByte, "], got ",
              packed_weight.scalar_type(), " ", packed_weight.sizes());
  TORCH_CHECK(padded_k % kMmaK == 0, "duquant::_w4a8_gemm: K = ", padded_k, " is not a multiple of ", kMmaK);
  const int64_t group_length = effective_group_size(padded_k, group_size);
  check_kernel_group_size(padded_k, group_length);
  const int64_t groups = padded_k / group_length;
  const int64_t out_features = packed_weight.size(0);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.dim() == 1 && scale.size(0) == tokens,
              "duquant::_w4a8_gemm: scale must be float32 [T = ", tokens, "], got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(group_sum.scalar_type() == torch::kInt && group_sum.dim() == 2 && group_sum.size(0) == tokens &&
                  group_sum.size(1) == groups,
              "duquant::_w4a8_gemm: group_sum must be int32 [T, G] = [", tokens, ", ", groups, "], got ",
              group_sum.scalar_type(), " ", group_sum.sizes());
  const std::vector<int64_t> parameter_sizes = {out_features, groups};
  TORCH_CHECK(weight_scale.scalar_type() == torch::kFloat && weight_scale.sizes() == c10::IntArrayRef(parameter_sizes) &&
                  weight_zero.scalar_type() == torch::kFloat && weight_zero.sizes() == c10::IntArrayRef(parameter_sizes),
              "duquant::_w4a8_gemm: weight_scale and weight_zero must be float32 [N, G] = ", parameter_sizes, ", got ",
              weight_scale.sizes(), " and ", weight_zero.sizes());
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_features && bias.is_floating_point(),
                "duquant::_w4a8_gemm: bias must be a floating-point [N = ", out_features, "] vector or empty, got ",
                bias.sizes());
  }
  for (const auto& [tensor, name] : {std::pair<const torch::Tensor&, const char*>{scale, "scale"},
                                     {group_sum, "group_sum"},
                                     {packed_weight, "packed_weight"},
                                     {weight_scale, "weight_scale"},
                                     {weight_zero, "weight_zero"},
                                     {bias, "bias"}}) {
    check_on_device(tensor, name, values.device());
  }
  TORCH_CHECK(tokens <= std::numeric_limits<int32_t>::max() && out_features <= std::numeric_limits<int32_t>::max() &&
                  padded_k <= std::numeric_limits<int32_t>::max() / 2,
              "duquant::_w4a8_gemm: sizes too large for one launch");

  auto output = torch::empty({tokens, out_features}, values.options().dtype(out_dtype));
  if (tokens == 0 || out_features == 0) return output;

  const auto activations = aligned_contiguous(values);
  const auto weight = aligned_contiguous(packed_weight);
  const auto token_scale = scale.contiguous();
  const auto sums = group_sum.contiguous();
  const auto weight_scale_c = weight_scale.contiguous();
  const auto weight_zero_c = weight_zero.contiguous();
  const auto bias_f = bias.numel() > 0 ? bias.to(torch::kFloat).contiguous() : torch::Tensor();

  const int tile_m = gemm_tile_m_for(tokens);
  TORCH_CHECK(ceil_div(tokens, tile_m) <= 65535, "duquant::_w4a8_gemm: ", tokens, " tokens exceed one launch's grid");
  const int64_t output_tiles = static_cast<int64_t>(ceil_div(out_features, kGemmTileN)) * ceil_div(tokens, tile_m);
  const int k_steps = static_cast<int>(padded_k / kMmaK);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  GemmParams params{};
  params.activations = activations.data_ptr<int8_t>();
  params.token_scale = token_scale.data_ptr<float>();
  params.group_sum = sums.data_ptr<int32_t>();
  params.packed_weight = weight.data_ptr<uint8_t>();
  params.weight_scale = weight_scale_c.data_ptr<float>();
  params.weight_zero = weight_zero_c.data_ptr<float>();
  params.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  params.output = output.data_ptr();
  params.output_type = output_type_of(out_dtype);
  params.tokens = static_cast<int>(tokens);
  params.out_features = static_cast<int>(out_features);
  params.padded_k = static_cast<int>(padded_k);
  params.groups = static_cast<int>(groups);
  params.group_steps = static_cast<int>(group_length / kMmaK);
  params.k_steps = k_steps;
  params.plan = plan_split_k(output_tiles, k_steps, num_sms);

  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto reduce_splits = [&] {
    constexpr int kReduceThreads = 256;
    const int64_t elements = tokens * out_features;
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(elements, kReduceThreads), 8LL * num_sms));
    split_k_reduce_kernel<<<blocks, kReduceThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  // DUQUANT_CUDA_GEMM=cublaslt (operator_settings.h), where torch::_int_mm applies: cuBLASLt's
  // int32 accumulators of the int8 levels, exact as the W4A8 kernel's, finished by the split-K
  // reduction as one split, which applies the same epilogue: the output is bitwise the same.
  if (cuda_gemm_path() == CudaGemmPath::kCublasLt && groups == 1 && tokens > kIntMmMinTokens &&
      out_features % kIntMmMultiple == 0) {
    const auto accumulators = at::_int_mm(activations, int8_levels_on(stream, packed_weight).t());
    params.plan = SplitKPlan{1, k_steps};
    params.partial = reinterpret_cast<float*>(accumulators.data_ptr<int32_t>());
    reduce_splits();
    return output;
  }

  torch::Tensor workspace;
  if (params.plan.splits > 1) {
    workspace = torch::empty({params.plan.splits, tokens, out_features}, values.options().dtype(torch::kFloat));
    params.partial = workspace.data_ptr<float>();
  }
  if (groups > 1) {
    launch_gemm_for_tile<true>(tile_m, params, stream);
  } else {
    launch_gemm_for_tile<false>(tile_m, params, stream);
  }
  if (params.plan.splits > 1) reduce_splits();
  return output;
}

// act_bits <= 0: y = transform(x) @ (weight_scale * (w - weight_zero))^T in fp32 with torch ops on
// the GPU, the CPU reference's definition of that mode (no integer kernel exists for it).
torch::Tensor float_weight_linear_cuda(const torch::Tensor& x_rows, const torch::Tensor& smooth_inv,
                                       const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                       const torch::Tensor& rotation2, const torch::Tensor& packed_weight,
                                       const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                                       int64_t padded_k, int64_t group_length) {
  const auto transformed =
      apply_online_transform(x_rows, smooth_inv, rotation1, permutation, rotation2, padded_k).to(torch::kFloat);
  const int64_t out_features = packed_weight.size(0);
  const auto levels = unpack_int4_to_int8(packed_weight).view({out_features, -1, group_length}).to(torch::kFloat);
  const auto dequantized =
      ((levels - weight_zero.unsqueeze(2)) * weight_scale.unsqueeze(2)).view({out_features, padded_k});
  return torch::matmul(transformed, dequantized.t());
}

torch::Tensor w4a8_linear_cuda(const torch::Tensor& x, const torch::Tensor& smooth_inv, const torch::Tensor& rotation1,
                               const torch::Tensor& permutation, const torch::Tensor& rotation2,
                               const torch::Tensor& packed_weight, const torch::Tensor& weight_scale,
                               const torch::Tensor& weight_zero, const torch::Tensor& bias, int64_t in_features,
                               int64_t group_size, int64_t act_bits, double act_clip) {
  const auto shape = cpu_reference::check_w4a8_linear_arguments(x, smooth_inv, rotation1, permutation, rotation2,
                                                                packed_weight, weight_scale, weight_zero, bias,
                                                                in_features, group_size, act_bits, act_clip);
  TORCH_CHECK(x.is_cuda(), "duquant::w4a8_linear (CUDA): x must be a CUDA tensor");
  for (const auto& [tensor, name] : {std::pair<const torch::Tensor&, const char*>{smooth_inv, "smooth_inv"},
                                     {rotation1, "rotation1"},
                                     {permutation, "permutation"},
                                     {rotation2, "rotation2"},
                                     {packed_weight, "packed_weight"},
                                     {weight_scale, "weight_scale"},
                                     {weight_zero, "weight_zero"},
                                     {bias, "bias"}}) {
    check_on_device(tensor, name, x.device());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto output_sizes = x.sizes().vec();
  output_sizes.back() = shape.out_features;
  if (shape.tokens == 0 || shape.out_features == 0) return torch::empty(output_sizes, x.options());
  const auto x_rows = x.reshape({shape.tokens, in_features});

  if (act_bits <= 0) {
    auto y = float_weight_linear_cuda(x_rows, smooth_inv, rotation1, permutation, rotation2, packed_weight,
                                      weight_scale, weight_zero, shape.padded_in_features, shape.group_size);
    if (bias.numel() > 0) y.add_(bias.to(torch::kFloat));
    return y.to(x.scalar_type()).view(output_sizes);
  }

  // The activations of the previous call when it had the same input and transform, on the same
  // stream and in the same capture (activation_reuse.h).
  const auto stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture_status = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream.stream(), &capture_status, &capture_id));
  ActivationRequest request{x, smooth_inv, rotation1, permutation, rotation2, shape.padded_in_features,
                            shape.group_size, act_bits, act_clip};
  request.stream = stream.id();
  request.capture = capture_status == cudaStreamCaptureStatusActive ? capture_id : 0;
  request.path = static_cast<int>(cuda_rotation_path());
  const auto activations = reuse_or_quantize(request, [&] {
    return fused_quantize_activations_cuda(x_rows, smooth_inv, rotation1, permutation, rotation2,
                                           shape.padded_in_features, shape.group_size, act_bits, act_clip);
  });
  return w4a8_gemm_cuda(activations.values, activations.scale, activations.group_sum, packed_weight, weight_scale,
                        weight_zero, bias, shape.group_size, x.scalar_type())
      .view(output_sizes);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> fused_quantize_activations_op(
    const torch::Tensor& x, const torch::Tensor& smooth_inv, const torch::Tensor& rotation1,
    const torch::Tensor& permutation, const torch::Tensor& rotation2, int64_t padded_in_features, int64_t group_size,
    int64_t act_bits, double act_clip) {
  auto result = fused_quantize_activations_cuda(x, smooth_inv, rotation1, permutation, rotation2, padded_in_features,
                                                group_size, act_bits, act_clip);
  return {result.values, result.scale, result.group_sum};
}

}  // namespace
}  // namespace duquant::ops::cuda

// Internal operators of the CUDA kernels (documented in w4a8_cuda.h): the pieces of w4a8_linear,
// for tests and the benchmark. The model-facing schema is defined in register_ops.cpp.
TORCH_LIBRARY_FRAGMENT(duquant, m) {
  m.def(
      "_fused_quantize_activations(Tensor x, Tensor smooth_inv, Tensor rotation1, Tensor permutation, "
      "Tensor rotation2, int padded_in_features, int group_size, int act_bits, float act_clip) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_w4a8_gemm(Tensor values, Tensor scale, Tensor group_sum, Tensor packed_weight, Tensor weight_scale, "
      "Tensor weight_zero, Tensor bias, int group_size, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(duquant, CUDA, m) {
  m.impl("w4a8_linear", TORCH_FN(duquant::ops::cuda::w4a8_linear_cuda));
  m.impl("_fused_quantize_activations", TORCH_FN(duquant::ops::cuda::fused_quantize_activations_op));
  m.impl("_w4a8_gemm", TORCH_FN(duquant::ops::cuda::w4a8_gemm_cuda));
}
