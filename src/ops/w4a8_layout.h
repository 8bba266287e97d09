// Data layout of the W4A8 linear operator: the one definition of bit widths, padding and the
// packed int4 weight layout, shared by the packer (CPU), the CPU reference kernel and the CUDA
// kernels. Everything here is __host__ __device__ so CPU tests cover the index arithmetic the
// kernels use.
//
// Packed weight: uint8 tensor of shape [N, K / 2] (N = out_features, K = padded in_features).
// Weight w[n][k] is an unsigned 4-bit level in 0..15 (asymmetric, zero point per output channel
// or group). Byte (n, k / 2) holds k even in its low nibble and k odd in its high nibble, so one
// 16-byte load reads 32 consecutive k of one output channel: the B operand order of
// mma.sync.m16n8k32 (each thread needs 4 consecutive k of one n).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DUQUANT_HOST_DEVICE __host__ __device__
#else
#define DUQUANT_HOST_DEVICE
#endif

namespace duquant::layout {

constexpr int kWeightBits = 4;
constexpr int kWeightMaxLevel = (1 << kWeightBits) - 1;  // unsigned levels 0..15
constexpr int kWeightsPerByte = 8 / kWeightBits;
constexpr int kActivationBits = 8;
// K is padded with zeros to a multiple of this (and of the rotation block): the GEMM consumes
// K in steps of 32 int8 values (one mma.sync k-step), and zero padding is exact.
constexpr int64_t kInFeatureAlignment = 32;

DUQUANT_HOST_DEVICE constexpr int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Padded K for a layer of `in_features` rotated in blocks of `block` (0: no rotation).
DUQUANT_HOST_DEVICE constexpr int64_t padded_in_features(int64_t in_features, int64_t block) {
  return round_up(in_features, block > kInFeatureAlignment ? block : kInFeatureAlignment);
}

DUQUANT_HOST_DEVICE constexpr int64_t packed_row_bytes(int64_t padded_k) {
  return padded_k / kWeightsPerByte;
}

DUQUANT_HOST_DEVICE constexpr int64_t packed_byte_index(int64_t n, int64_t k, int64_t padded_k) {
  return n * packed_row_bytes(padded_k) + k / kWeightsPerByte;
}

DUQUANT_HOST_DEVICE constexpr int nibble_shift(int64_t k) {
  return static_cast<int>(k % kWeightsPerByte) * kWeightBits;
}

DUQUANT_HOST_DEVICE constexpr int unpack_level(uint8_t byte, int64_t k) {
  return (byte >> nibble_shift(k)) & kWeightMaxLevel;
}

// Largest symmetric integer level of a signed activation of `bits` bits (127 for int8).
DUQUANT_HOST_DEVICE constexpr int activation_max_level(int bits) {
  return (1 << (bits - 1)) - 1;
}

}  // namespace duquant::layout
