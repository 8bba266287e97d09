// Settings of the operator library: environment variables read at every call, so that a process
// can change them between calls (tests, benchmarks) and a CUDA-graph capture sees the value at
// capture time. Reading the environment is a host-side call that capture permits.
//   DUQUANT_CUDA_ROTATION      cuda-cores (default) | tensor-cores | cublas   (cuda_rotation_path)
//   DUQUANT_CUDA_GEMM          mma-sync (default) | cublaslt                 (cuda_gemm_path)
//   DUQUANT_REUSE_ACTIVATIONS  1 (default) | 0                                 (activation_reuse.h)
#pragma once

#include <string>
#include <vector>

namespace duquant::ops {

// The value of environment variable `name`, or `fallback` when it is unset or empty. A value
// outside `allowed` is an error naming the variable, the value and the choices.
std::string operator_setting(const char* name, const std::vector<const char*>& allowed, const char* fallback);

// How the CUDA op applies the block rotations of the online transform (w4a8_linear_cuda.cu):
//   kCudaCores    cuda-cores: inside the pre-kernel, fp32 FMAs on CUDA cores, one token row per
//                 thread block (the default);
//   kTensorCores  tensor-cores: inside the pre-kernel, fp16 hi/lo MMAs (w4a8_kernel_layout.h);
//   kCublas       cublas: smoothing, rotations and permutation as ATen ops before the pre-kernel,
//                 each rotation one fp32 cuBLAS GEMM over all T * K / b block rows of the call
//                 (at PyTorch's fp32 matmul precision), the pre-kernel then only quantizes.
enum class CudaRotationPath { kCudaCores, kTensorCores, kCublas };

// DUQUANT_CUDA_ROTATION as a path (an unknown value is an error naming the variable), and a
// path's name as the variable spells it.
CudaRotationPath cuda_rotation_path();
const char* name_of(CudaRotationPath path);

// Which kernel computes the CUDA op's integer product (w4a8_linear_cuda.cu):
//   kMmaSync   mma-sync: the W4A8 kernel, mma.sync on the packed int4 weights (the default);
//   kCublasLt  cublaslt: torch::_int_mm (cuBLASLt) on an int8 copy of the weight levels
//              (int8_weight_levels.h), then the same epilogue; used where _int_mm applies (more
//              than 16 tokens, out_features a multiple of 8) and the weights are per channel,
//              else the W4A8 kernel runs.
enum class CudaGemmPath { kMmaSync, kCublasLt };

// DUQUANT_CUDA_GEMM as a path (an unknown value is an error naming the variable), and a path's
// name as the variable spells it.
CudaGemmPath cuda_gemm_path();
const char* name_of(CudaGemmPath path);

// Both paths as they are set now, for a log line: "rotations cuda-cores (DUQUANT_CUDA_ROTATION),
// integer product mma-sync (DUQUANT_CUDA_GEMM)".
std::string cuda_paths_in_effect();

}  // namespace duquant::ops
