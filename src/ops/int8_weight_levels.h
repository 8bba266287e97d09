// The packed int4 weight levels of duquant::w4a8_linear (w4a8_layout.h) as an int8 [N, K] matrix,
// for GEMMs that take two int8 operands: DUQUANT_CUDA_GEMM=cublaslt (operator_settings.h) runs
// the integer product as torch::_int_mm (cuBLASLt, int32 accumulation) on these levels instead of
// the W4A8 tensor-core kernel, which reads the packed nibbles itself.
//
// The integer product is exact either way (levels 0..15 times int8 activations, summed in int32),
// so both GEMMs hand the same accumulators to the same epilogue. The price is memory: an int8
// copy holds one byte per weight, twice the packed int4 bytes, next to the packed tensor.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>

namespace duquant::ops {

// uint8 [N, K/2] packed levels -> int8 [N, K] levels 0..15, with tensor ops on the packed
// tensor's device: no host copy, so it may run inside a CUDA-graph capture.
torch::Tensor unpack_int4_to_int8(const torch::Tensor& packed);

// unpack_int4_to_int8(packed), computed at the first call for a packed tensor and kept while that
// tensor lives and is unchanged: same TensorImpl (held by a weak reference, so neither its
// address nor its storage is kept) and the same version (an in-place change bumps it; inference
// tensors keep none and count as unchanged). `after_unpack`, when given, runs once after a new
// copy is made, before any caller can see it (the CUDA op synchronises the stream there).
// Entries of freed tensors are dropped at the next miss or by forget_freed_int8_levels().
// Thread-safe. A CUDA graph captured while a copy is cached reads that copy: like the packed
// weight itself, it must stay alive and unchanged while the graph is replayed.
torch::Tensor cached_int8_levels(const torch::Tensor& packed, const std::function<void()>& after_unpack = nullptr);

// The cached copy for `packed` if there is a current one, else an undefined tensor; makes none.
torch::Tensor find_cached_int8_levels(const torch::Tensor& packed);

// Drops the copies of packed tensors that have been freed (a benchmark that frees a model and
// measures the next one's memory calls it), and the number of entries held; and drops them all.
void forget_freed_int8_levels();
int64_t cached_int8_levels_entries();
void forget_cached_int8_levels();

}  // namespace duquant::ops
