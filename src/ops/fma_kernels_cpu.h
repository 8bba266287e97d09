// Two float32 matrix products on the CPU whose every output entry has one fixed order of
// roundings, whatever the matrix sizes, the tile an entry falls in and the thread count. Both
// reproduce, bitwise, what MKL's sgemm computes for the same shapes on the host measured (AMD
// EPYC, where MKL runs its Zen kernels; tests/test_ops_cpu.cpp pins the arithmetic, not MKL), so
// replacing MKL by them changed no value of the quantized model, while MKL's packing of both
// operands and zero-filling of the output were a third of its time on these shapes.
//
//   rotate_rows:           out[i, j] = fma(x[i, b-1], R[b-1, j], ... fma(x[i, 0], R[0, j], 0))
//                          rows [n, b] @ rotation [b, b]: one FMA chain over k in order from zero.
//   multiply_by_transpose: out[t, j] = sum over k blocks of kProductBlock, in order, of one FMA
//                          chain per block from zero: out = chain_0; out = out + chain_1; ...
//                          x [T, K] @ w[N, K]^T, the output of a linear layer without its bias.
//
// Layout: the right-hand factor is copied into column panels of kPanelColumns: panel p holds its
// columns p*32 .. p*32+31 for every k of the block contiguously ([depth][32]), zero beyond the
// last column, so a tile reads its 32 columns for each k from one contiguous run that stays in
// L1 (16 KB for a 128-row rotation, 24 KB for a product block). A tile is up to 8 (AVX-512) or 6
// (AVX2, two 16-column halves) rows x 32 columns held in registers for the whole k loop; the
// left-hand rows are read in place, one broadcast per entry, and the output is written (or, for
// later product blocks, added to) once: neither left operand nor output is packed or zero-filled.
#pragma once

#include <cstdint>

namespace duquant::ops::cpu {

// Output columns of one tile (two AVX-512 vectors, four AVX2 vectors).
constexpr int64_t kPanelColumns = 32;
// The k block of multiply_by_transpose: MKL's sgemm blocks k by 192 for the clip search's shapes
// (measured: [179 | 224, K] @ [K, N] for K = 1024 .. 16384). Shorter chains also round less.
constexpr int64_t kProductBlock = 192;

enum class VectorIsa { Avx512, Avx2Fma, None };

// The widest instruction set this CPU offers the kernels (None: not x86-64, or no AVX2 + FMA).
VectorIsa best_vector_isa();

// out [count, b] = rows [count, b] @ rotation [b, b] with `isa` (which the CPU must support),
// parallel over rows. Returns false, writing nothing, when the kernel does not apply (isa None,
// or b not a positive multiple of kPanelColumns); the caller then multiplies another way.
bool rotate_rows(float* out, const float* rows, int64_t count, const float* rotation, int64_t b, VectorIsa isa);

// out [t, n] = x [t, k] @ w [n, k]^T with `isa`, parallel over column panels; any n and k.
// Returns false, writing nothing, when isa is None.
bool multiply_by_transpose(float* out, const float* x, int64_t t, const float* w, int64_t n, int64_t k,
                           VectorIsa isa);

}  // namespace duquant::ops::cpu
