// The FMA-chain products of fma_kernels_cpu.h (arithmetic and layout there).
#include "fma_kernels_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace duquant::ops::cpu {
namespace {

// Rows of rotate_rows handed to one task: every panel is swept over them before the next rows,
// so their 32 KB (b = 128) stay in L2 while the panels take turns in L1.
constexpr int64_t kRowsPerTask = 64;

// The most output one group of multiply_by_transpose's panels writes: with one k block of x
// (150 KB at t = 200) and a packed panel (24 KB), about a third of a 2 MB L2.
constexpr int64_t kGroupOutputBytes = int64_t{1} << 19;

#if defined(__x86_64__)

// AVX-512: Rows x 32 outputs in 2 * Rows zmm accumulators (Rows <= 8 keeps 16 of 32 registers
// for them), one FMA per accumulator per k, in k order, from zero. Row r of the left operand
// starts at rows + r * row_stride; its entries 0 .. depth-1 are used. The 32 results of row r go
// to out + r * out_stride, written, or added to what is there when `accumulate`.
template <int Rows>
__attribute__((target("avx512f"))) void tile_avx512(const float* rows, int64_t row_stride, int64_t depth,
                                                    const float* panel, float* out, int64_t out_stride,
                                                    bool accumulate) {
  __m512 acc[Rows][2];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 low = _mm512_loadu_ps(panel + k * kPanelColumns);
    const __m512 high = _mm512_loadu_ps(panel + k * kPanelColumns + 16);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const __m512 entry = _mm512_set1_ps(rows[r * row_stride + k]);
      acc[r][0] = _mm512_fmadd_ps(entry, low, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(entry, high, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    float* row_out = out + r * out_stride;
    if (accumulate) {
      acc[r][0] = _mm512_add_ps(_mm512_loadu_ps(row_out), acc[r][0]);
      acc[r][1] = _mm512_add_ps(_mm512_loadu_ps(row_out + 16), acc[r][1]);
    }
    _mm512_storeu_ps(row_out, acc[r][0]);
    _mm512_storeu_ps(row_out + 16, acc[r][1]);
  }
}

// AVX2: Rows x 16 outputs in 2 * Rows ymm accumulators (Rows <= 6 of 16 registers); a 32-column
// panel is two such column halves. Same arguments as tile_avx512.
template <int Rows>
__attribute__((target("avx2,fma"))) void half_tile_avx2(const float* rows, int64_t row_stride, int64_t depth,
                                                         const float* panel, float* out, int64_t out_stride,
                                                         bool accumulate) {
  __m256 acc[Rows][2];
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 low = _mm256_loadu_ps(panel + k * kPanelColumns);
    const __m256 high = _mm256_loadu_ps(panel + k * kPanelColumns + 8);
#pragma GCC unroll 6
    for (int r = 0; r < Rows; ++r) {
      const __m256 entry = _mm256_set1_ps(rows[r * row_stride + k]);
      acc[r][0] = _mm256_fmadd_ps(entry, low, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(entry, high, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) {
    float* row_out = out + r * out_stride;
    if (accumulate) {
      acc[r][0] = _mm256_add_ps(_mm256_loadu_ps(row_out), acc[r][0]);
      acc[r][1] = _mm256_add_ps(_mm256_loadu_ps(row_out + 8), acc[r][1]);
    }
    _mm256_storeu_ps(row_out, acc[r][0]);
    _mm256_storeu_ps(row_out + 8, acc[r][1]);
  }
}

// Requests `count` floats from `start` on into L2 (one prefetch per 64-byte line), so that a
// loop about to read them finds them there.
void prefetch_to_l2(const float* start, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(start);
  for (int64_t offset = 0; offset < count * int64_t{sizeof(float)}; offset += 64) {
    _mm_prefetch(bytes + offset, _MM_HINT_T1);
  }
}

// target[i * target_stride + j] = source[j * source_stride + i] for i, j < 16: a 16 x 16 block
// transposed in registers (pairs, then quads within 128-bit lanes, then the lanes), so that
// packing a panel reads and writes whole vectors instead of one float at a time.
__attribute__((target("avx512f"))) void transpose_16x16(const float* source, int64_t source_stride, float* target,
                                                        int64_t target_stride) {
  __m512 rows[16], pairs[16], quads[16];
  for (int j = 0; j < 16; ++j) rows[j] = _mm512_loadu_ps(source + j * source_stride);
  // pairs[2p] interleaves rows 2p and 2p+1 at columns 4L, 4L+1 of each 128-bit lane L; pairs[2p+1]
  // at columns 4L+2, 4L+3.
  for (int p = 0; p < 8; ++p) {
    pairs[2 * p] = _mm512_unpacklo_ps(rows[2 * p], rows[2 * p + 1]);
    pairs[2 * p + 1] = _mm512_unpackhi_ps(rows[2 * p], rows[2 * p + 1]);
  }
  // quads[4q + m]: lane L holds column 4L + m of rows 4q .. 4q+3.
  for (int q = 0; q < 4; ++q) {
    const __m512d low = _mm512_castps_pd(pairs[4 * q]), high = _mm512_castps_pd(pairs[4 * q + 1]);
    const __m512d low_next = _mm512_castps_pd(pairs[4 * q + 2]), high_next = _mm512_castps_pd(pairs[4 * q + 3]);
    quads[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(low, low_next));
    quads[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(low, low_next));
    quads[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(high, high_next));
    quads[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(high, high_next));
  }
  // Column 4L + m of all 16 rows: lane L of quads[m], quads[4 + m], quads[8 + m], quads[12 + m].
  for (int m = 0; m < 4; ++m) {
    const __m512 front_low = _mm512_shuffle_f32x4(quads[m], quads[4 + m], 0x44);
    const __m512 front_high = _mm512_shuffle_f32x4(quads[m], quads[4 + m], 0xEE);
    const __m512 back_low = _mm512_shuffle_f32x4(quads[8 + m], quads[12 + m], 0x44);
    const __m512 back_high = _mm512_shuffle_f32x4(quads[8 + m], quads[12 + m], 0xEE);
    _mm512_storeu_ps(target + m * target_stride, _mm512_shuffle_f32x4(front_low, back_low, 0x88));
    _mm512_storeu_ps(target + (4 + m) * target_stride, _mm512_shuffle_f32x4(front_low, back_low, 0xDD));
    _mm512_storeu_ps(target + (8 + m) * target_stride, _mm512_shuffle_f32x4(front_high, back_high, 0x88));
    _mm512_storeu_ps(target + (12 + m) * target_stride, _mm512_shuffle_f32x4(front_high, back_high, 0xDD));
  }
}

// packed[i * kPanelColumns + j] = w[j * k + i] for j < width, i < depth: the panel layout of
// fma_kernels_cpu.h from `width` rows of w (each read from its k block's start).
void pack_panel(VectorIsa isa, const float* w, int64_t k, int64_t width, int64_t depth, float* packed) {
  int64_t full_rows = 0, full_depth = 0;
  if (isa == VectorIsa::Avx512) {
    full_rows = width / 16 * 16, full_depth = depth / 16 * 16;
    for (int64_t j = 0; j < full_rows; j += 16) {
      for (int64_t i = 0; i < full_depth; i += 16) {
        transpose_16x16(w + j * k + i, k, packed + i * kPanelColumns + j, kPanelColumns);
      }
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    const float* source = w + j * k;
    for (int64_t i = j < full_rows ? full_depth : 0; i < depth; ++i) packed[i * kPanelColumns + j] = source[i];
  }
}

template <int Rows>
struct Avx512Tile {
  static void run(const float* rows, int64_t row_stride, int64_t depth, const float* panel, float* out,
                  int64_t out_stride, bool accumulate) {
    tile_avx512<Rows>(rows, row_stride, depth, panel, out, out_stride, accumulate);
  }
};
template <int Rows>
struct Avx2Tile {
  static void run(const float* rows, int64_t row_stride, int64_t depth, const float* panel, float* out,
                  int64_t out_stride, bool accumulate) {
    half_tile_avx2<Rows>(rows, row_stride, depth, panel, out, out_stride, accumulate);
    half_tile_avx2<Rows>(rows, row_stride, depth, panel + 16, out + 16, out_stride, accumulate);
  }
};

// `count` left rows against one panel: full tiles of MaxRows rows, then one tile of the rest.
template <int MaxRows, template <int> class Tile>
struct PanelSweep {
  template <int Rows>
  static void remainder(int64_t left, const float* rows, int64_t row_stride, int64_t depth, const float* panel,
                        float* out, int64_t out_stride, bool accumulate) {
    if constexpr (Rows > 0) {
      if (left == Rows) return Tile<Rows>::run(rows, row_stride, depth, panel, out, out_stride, accumulate);
      remainder<Rows - 1>(left, rows, row_stride, depth, panel, out, out_stride, accumulate);
    }
  }
  static void run(const float* rows, int64_t count, int64_t row_stride, int64_t depth, const float* panel,
                  float* out, int64_t out_stride, bool accumulate) {
    int64_t row = 0;
    for (; row + MaxRows <= count; row += MaxRows) {
      Tile<MaxRows>::run(rows + row * row_stride, row_stride, depth, panel, out + row * out_stride, out_stride,
                         accumulate);
    }
    remainder<MaxRows - 1>(count - row, rows + row * row_stride, row_stride, depth, panel, out + row * out_stride,
                           out_stride, accumulate);
  }
};

void sweep_panel(VectorIsa isa, const float* rows, int64_t count, int64_t row_stride, int64_t depth,
                 const float* panel, float* out, int64_t out_stride, bool accumulate) {
  if (isa == VectorIsa::Avx512) {
    PanelSweep<8, Avx512Tile>::run(rows, count, row_stride, depth, panel, out, out_stride, accumulate);
  } else {
    PanelSweep<6, Avx2Tile>::run(rows, count, row_stride, depth, panel, out, out_stride, accumulate);
  }
}

#endif  // __x86_64__

}  // namespace

VectorIsa best_vector_isa() {
#if defined(__x86_64__)
  static const VectorIsa isa = __builtin_cpu_supports("avx512f")                                    ? VectorIsa::Avx512
                               : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? VectorIsa::Avx2Fma
                                                                                                   : VectorIsa::None;
  return isa;
#else
  return VectorIsa::None;
#endif
}

bool rotate_rows(float* out, const float* rows, int64_t count, const float* rotation, int64_t b, VectorIsa isa) {
#if defined(__x86_64__)
  if (isa == VectorIsa::None || b <= 0 || b % kPanelColumns != 0) return false;
  if (count == 0) return true;
  // The [b/32][b][32] panels of the rotation (fma_kernels_cpu.h), copied once per call.
  const int64_t panels = b / kPanelColumns;
  std::vector<float> packed(static_cast<size_t>(b * b));
  for (int64_t panel = 0; panel < panels; ++panel) {
    for (int64_t k = 0; k < b; ++k) {
      std::copy_n(rotation + k * b + panel * kPanelColumns, kPanelColumns,
                  packed.data() + (panel * b + k) * kPanelColumns);
    }
  }
  const int64_t tasks = (count + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t last_task) {
    for (int64_t task = first_task; task < last_task; ++task) {
      const int64_t begin = task * kRowsPerTask, rows_here = std::min(kRowsPerTask, count - begin);
      // The next task's rows are requested into L2 while this one computes: the large greedy
      // searches (32768 rows, 16 MB a buffer) ran at ~140 GFLOP/s on two cores without it, ~170
      // with it (128-row blocks, AMD EPYC).
      if (task + 1 < last_task) {
        prefetch_to_l2(rows + (begin + kRowsPerTask) * b, std::min(kRowsPerTask, count - begin - kRowsPerTask) * b);
      }
      for (int64_t panel = 0; panel < panels; ++panel) {
        sweep_panel(isa, rows + begin * b, rows_here, b, b, packed.data() + panel * b * kPanelColumns,
                    out + begin * b + panel * kPanelColumns, b, /*accumulate=*/false);
      }
    }
  });
  return true;
#else
  (void)out, (void)rows, (void)count, (void)rotation, (void)b, (void)isa;
  return false;
#endif
}

bool multiply_by_transpose(float* out, const float* x, int64_t t, const float* w, int64_t n, int64_t k,
                           VectorIsa isa) {
#if defined(__x86_64__)
  if (isa == VectorIsa::None) return false;
  if (t == 0 || n == 0) return true;
  if (k == 0) {
    std::fill_n(out, t * n, 0.0f);
    return true;
  }
  const int64_t panels = (n + kPanelColumns - 1) / kPanelColumns;
  // Each thread takes its panels in groups whose outputs fit in its L2 next to one k block of x;
  // within a group every panel sweeps a block of x before any panel moves to the next, so that
  // block (t x 192 floats) comes from L2 for all of them. Sweeping each panel over the whole of k
  // instead read all of x from memory once per panel: 13 MB per 32 output columns for the
  // 16384-wide layers. Panels write disjoint columns, so the order needs no synchronisation.
  const int64_t group_panels =
      std::max<int64_t>(1, kGroupOutputBytes / (t * kPanelColumns * int64_t{sizeof(float)}));
  at::parallel_for(0, panels, 1, [&](int64_t first_panel, int64_t last_panel) {
    std::vector<float> packed(static_cast<size_t>(kProductBlock * kPanelColumns));
    std::vector<float> narrow;  // the last panel's results when n is not a multiple of 32
    for (int64_t group = first_panel; group < last_panel; group += group_panels) {
      const int64_t group_end = std::min(last_panel, group + group_panels);
      for (int64_t block = 0; block < k; block += kProductBlock) {
        const int64_t depth = std::min(kProductBlock, k - block);
        const bool accumulate = block > 0;
        for (int64_t panel = group; panel < group_end; ++panel) {
          const int64_t column = panel * kPanelColumns, width = std::min(kPanelColumns, n - column);
          // The rows of w that the next panel packs are requested into L2 while this one
          // computes: the packing reads 32 rows k apart, which the hardware prefetchers miss.
          if (panel + 1 < group_end) {
            const int64_t next_width = std::min(kPanelColumns, n - column - kPanelColumns);
            const float* next_rows = w + (column + kPanelColumns) * k + block;
            for (int64_t j = 0; j < next_width; ++j) prefetch_to_l2(next_rows + j * k, depth);
          }
          if (width < kPanelColumns) {
            std::fill(packed.begin(), packed.end(), 0.0f);
            narrow.resize(static_cast<size_t>(t * kPanelColumns));
          }
          // Columns column .. column+width-1 of w^T for k in this block: rows of w, transposed.
          pack_panel(isa, w + column * k + block, k, width, depth, packed.data());
          if (width == kPanelColumns) {
            sweep_panel(isa, x + block, t, k, depth, packed.data(), out + column, n, accumulate);
            continue;
          }
          sweep_panel(isa, x + block, t, k, depth, packed.data(), narrow.data(), kPanelColumns, false);
          for (int64_t row = 0; row < t; ++row) {
            float* target = out + row * n + column;
            const float* chain = narrow.data() + row * kPanelColumns;
            for (int64_t j = 0; j < width; ++j) target[j] = accumulate ? target[j] + chain[j] : chain[j];
          }
        }
      }
    }
  });
  return true;
#else
  (void)out, (void)x, (void)t, (void)w, (void)n, (void)k, (void)isa;
  return false;
#endif
}

}  // namespace duquant::ops::cpu
