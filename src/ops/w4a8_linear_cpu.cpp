// CPU reference kernel of duquant::w4a8_linear (semantics: include/duquant/ops.h; DESIGN.md section
// 4 steps 5-7). It is the oracle the CUDA kernels are tested against, so it computes the integer
// definition itself, not a float approximation of it.
//
// Why the integer sums are exact although they run through fp32 GEMMs
// ---------------------------------------------------------------------
// acc[t,n,g] = sum_{k in g} q[t,k] w[n,k] is computed by at::bmm (MKL / oneDNN sgemm) on float
// operands that hold the integers q (int8, |q| <= 128) and w (0..15, w4a8_layout.h):
//  * every operand is an integer of at most 8 significant bits, so it is exact in fp32, and also in
//    the reduced-precision input formats a user may enable for fp32 matmuls (bf16 has 8 significant
//    bits, tf32 11); those modes keep fp32 accumulation;
//  * every product |q w| <= 128 * 15 = 1920 is exact;
//  * each GEMM's k range ("piece") has at most L = 2^24 / 1920 = 8738 terms, so every partial sum
//    the BLAS forms, in whatever order and blocking it adds the terms, is an integer of magnitude
//    <= L * 1920 <= 2^24, and every integer of magnitude <= 2^24 is exact in fp32: no addition
//    rounds, and each piece's result is the exact integer;
//  * a group (all of K for per-channel weights) longer than L is split into pieces, zero-padded to
//    equal length (zero terms change no sum); the pieces' exact results are added in double, exact
//    for any integer below 2^53. The argument check bounds group_size * 1920 < 2^31, so the sum is
//    also the int32 value of ops.h (no int32 overflow that a GPU kernel would wrap and this one not).
// So every accumulator equals the int32 sum of ops.h exactly, for every K. The per-token per-group
// row sum of q is accumulated in int32 directly. The epilogue
//     y[t,n] = scale_t * sum_g weight_scale[n,g] * (acc[t,n,g] - weight_zero[n,g] * row_sum[t,g])
// takes the fp32 scales and zero points as given and is evaluated in double, then rounded once to
// fp32: the zero-point correction is exact in double (integers < 2^53 and the integer-valued zero
// points of the quantizer), so the fp32 output is within about one fp32 rounding of the exact
// value, which is what "equal up to fp32 epilogue rounding" (DESIGN.md section 7) compares with.
//
// Speed: the weight is unpacked once per call to float levels, the GEMMs run on all intra-op
// threads through at::bmm, and the output is produced in column tiles whose fp32 partial sums
// (pieces x T x columns) are read by the epilogue straight from the GEMM's output, so memory stays
// bounded for any T, N and group count.
#include "w4a8_cpu_reference.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "activation_reuse.h"
#include "duquant/ops.h"
#include "w4a8_layout.h"

namespace duquant::ops::cpu_reference {
namespace {

// Largest |q| an int8 can hold (-128); the quantizer itself stays within +-qmax = 127.
constexpr int64_t kMaxAbsActivationLevel = int64_t{1} << (layout::kActivationBits - 1);
constexpr int64_t kMaxAbsProduct = kMaxAbsActivationLevel * layout::kWeightMaxLevel;
// Every integer of magnitude <= 2^24 is exact in fp32 (24-bit significand).
constexpr int64_t kFloatExactIntegerLimit = int64_t{1} << std::numeric_limits<float>::digits;
constexpr int64_t kMaxExactPieceLength = kFloatExactIntegerLimit / kMaxAbsProduct;
// Longest group whose int32 accumulator cannot overflow.
constexpr int64_t kMaxGroupLength = std::numeric_limits<int32_t>::max() / kMaxAbsProduct;
// Output columns per tile: about kTileElements fp32 partial sums, but at least kMinTileColumns
// columns so that each GEMM call stays efficient when there are many small groups.
constexpr int64_t kTileElements = int64_t{1} << 20;
constexpr int64_t kMinTileColumns = 256;

// The k range of one integer accumulator: all of K (per output channel) or one group.
int64_t effective_group_size(int64_t padded_k, int64_t group_size) {
  if (group_size <= 0) return padded_k;
  TORCH_CHECK(padded_k % group_size == 0, "duquant::w4a8_linear: group_size ", group_size,
              " does not divide the padded in_features K = ", padded_k);
  return group_size;
}

void check_activation_quantization(int64_t act_bits, double act_clip) {
  TORCH_CHECK(act_bits >= 2 && act_bits <= layout::kActivationBits, "duquant::w4a8_linear: act_bits ", act_bits,
              " is outside 2..", layout::kActivationBits, " (int8 storage; <= 0 disables activation quantization)");
  TORCH_CHECK(std::isfinite(act_clip) && act_clip > 0, "duquant::w4a8_linear: act_clip must be a positive finite ratio, got ",
              act_clip);
}

void check_accumulator_length(int64_t group_length) {
  TORCH_CHECK(group_length <= kMaxGroupLength, "duquant::w4a8_linear: an int32 accumulator over ", group_length,
              " k could overflow; use group_size <= ", kMaxGroupLength);
}

void check_rotation(const char* name, const torch::Tensor& rotation, int64_t padded_k) {
  if (rotation.numel() == 0) return;
  TORCH_CHECK(rotation.dim() == 2 && rotation.size(0) == rotation.size(1) && rotation.is_floating_point(),
              "duquant::w4a8_linear: ", name, " must be a square floating-point [b, b] matrix or empty, got ",
              rotation.scalar_type(), " ", rotation.sizes());
  TORCH_CHECK(padded_k % rotation.size(0) == 0, "duquant::w4a8_linear: ", name, " block ", rotation.size(0),
              " does not divide the padded in_features K = ", padded_k);
}

// How the exact integer GEMM of one call is cut into fp32 GEMMs (see the top of this file).
struct ExactGemmPlan {
  int64_t groups = 1;
  int64_t group_size = 0;
  int64_t pieces_per_group = 1;
  int64_t piece_length = 0;  // pieces_per_group * piece_length >= group_size; the rest is zero padding

  int64_t pieces() const { return groups * pieces_per_group; }
};

ExactGemmPlan plan_exact_gemm(int64_t padded_k, int64_t group_size) {
  ExactGemmPlan plan;
  plan.group_size = effective_group_size(padded_k, group_size);
  plan.groups = padded_k / plan.group_size;
  check_accumulator_length(plan.group_size);
  plan.pieces_per_group = (plan.group_size + kMaxExactPieceLength - 1) / kMaxExactPieceLength;
  plan.piece_length = (plan.group_size + plan.pieces_per_group - 1) / plan.pieces_per_group;
  return plan;
}

// Integer-valued rows [R, K] -> float [pieces, R, piece_length], piece p of group g at p = g *
// pieces_per_group + i: the batched GEMM operand whose batch entries are the exact pieces.
torch::Tensor as_piece_operand(const torch::Tensor& rows, const ExactGemmPlan& plan) {
  const int64_t row_count = rows.size(0);
  auto grouped = rows.to(torch::kFloat).view({row_count, plan.groups, plan.group_size});
  const int64_t padded_group = plan.pieces_per_group * plan.piece_length;
  if (padded_group > plan.group_size) {
    grouped = torch::constant_pad_nd(grouped, {0, padded_group - plan.group_size});
  }
  return grouped.reshape({row_count, plan.pieces(), plan.piece_length}).permute({1, 0, 2}).contiguous();
}

// Packed weight [N, K / 2] -> float levels [pieces, N, piece_length], the layout of
// as_piece_operand, unpacked in parallel straight from the packed bytes (w4a8_layout.h).
torch::Tensor unpack_weight_pieces(const torch::Tensor& packed_weight, const ExactGemmPlan& plan) {
  const auto packed = packed_weight.contiguous();
  const int64_t out_features = packed.size(0), padded_k = packed.size(1) * layout::kWeightsPerByte;
  const bool padded = plan.pieces_per_group * plan.piece_length > plan.group_size;
  auto pieces = padded ? torch::zeros({plan.pieces(), out_features, plan.piece_length}, torch::kFloat)
                       : torch::empty({plan.pieces(), out_features, plan.piece_length}, torch::kFloat);
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  float* levels = pieces.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / padded_k);
  at::parallel_for(0, out_features, grain, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t n = row_begin; n < row_end; ++n) {
      for (int64_t piece = 0; piece < plan.pieces(); ++piece) {
        const int64_t group = piece / plan.pieces_per_group;
        const int64_t first_k = group * plan.group_size + (piece % plan.pieces_per_group) * plan.piece_length;
        const int64_t end_k = std::min(first_k + plan.piece_length, (group + 1) * plan.group_size);
        float* piece_row = levels + (piece * out_features + n) * plan.piece_length;
        for (int64_t k = first_k; k < end_k; ++k) {
          piece_row[k - first_k] =
              static_cast<float>(layout::unpack_level(bytes[layout::packed_byte_index(n, k, padded_k)], k));
        }
      }
    }
  });
  return pieces;
}

// fp32 [pieces, T, column_count]: the exact integer sum of every piece (top of this file) for the
// output columns [first_column, first_column + column_count).
torch::Tensor piece_sums_tile(const torch::Tensor& activation_pieces, const torch::Tensor& weight_pieces,
                              int64_t first_column, int64_t column_count) {
  return torch::bmm(activation_pieces, weight_pieces.narrow(1, first_column, column_count).transpose(1, 2));
}

int64_t columns_per_tile(const ExactGemmPlan& plan, int64_t tokens, int64_t out_features) {
  const int64_t columns = kTileElements / std::max<int64_t>(plan.pieces() * tokens, 1);
  return std::min(std::max(columns, kMinTileColumns), out_features);
}

// y[t, first_column + j] = scale_t * sum_g weight_scale * (acc - weight_zero * row_sum), in double,
// acc being the sum of the group's pieces (exact in double).
void dequantize_tile(const torch::Tensor& piece_sums, const ExactGemmPlan& plan,
                     const QuantizedActivations& activations, const torch::Tensor& weight_scale,
                     const torch::Tensor& weight_zero, int64_t first_column, torch::Tensor& output) {
  const int64_t tokens = piece_sums.size(1), columns = piece_sums.size(2);
  const int64_t groups = plan.groups, out_features = output.size(1);
  const float* sums = piece_sums.data_ptr<float>();
  const int32_t* group_sum = activations.group_sum.data_ptr<int32_t>();
  const float* token_scale = activations.scale.data_ptr<float>();
  const float* scale = weight_scale.data_ptr<float>() + first_column * groups;
  const float* zero = weight_zero.data_ptr<float>() + first_column * groups;
  float* out = output.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(plan.pieces() * columns, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t token_begin, int64_t token_end) {
    std::vector<double> row(columns), accumulator(columns);
    for (int64_t t = token_begin; t < token_end; ++t) {
      std::fill(row.begin(), row.end(), 0.0);
      for (int64_t g = 0; g < groups; ++g) {
        std::fill(accumulator.begin(), accumulator.end(), 0.0);
        for (int64_t piece = g * plan.pieces_per_group; piece < (g + 1) * plan.pieces_per_group; ++piece) {
          const float* piece_row = sums + (piece * tokens + t) * columns;
          for (int64_t j = 0; j < columns; ++j) accumulator[j] += static_cast<double>(piece_row[j]);
        }
        const double row_sum = group_sum[t * groups + g];
        for (int64_t j = 0; j < columns; ++j) {
          const double corrected = accumulator[j] - static_cast<double>(zero[j * groups + g]) * row_sum;
          row[j] += static_cast<double>(scale[j * groups + g]) * corrected;
        }
      }
      float* out_row = out + t * out_features + first_column;
      for (int64_t j = 0; j < columns; ++j) {
        out_row[j] = static_cast<float>(static_cast<double>(token_scale[t]) * row[j]);
      }
    }
  });
}

// Step 6 with act_bits > 0, weight side: float32 [T, N] from the quantized activations.
torch::Tensor integer_matmul(const QuantizedActivations& activations, const torch::Tensor& packed_weight,
                             const torch::Tensor& weight_scale, const torch::Tensor& weight_zero, int64_t group_size) {
  const auto plan = plan_exact_gemm(activations.values.size(1), group_size);
  const auto activation_pieces = as_piece_operand(activations.values, plan);
  const auto weight_pieces = unpack_weight_pieces(packed_weight, plan);
  const auto scale = weight_scale.contiguous(), zero = weight_zero.contiguous();
  const int64_t tokens = activations.values.size(0), out_features = packed_weight.size(0);
  auto output = torch::empty({tokens, out_features}, torch::kFloat);
  const int64_t tile = columns_per_tile(plan, tokens, out_features);
  for (int64_t first = 0; first < out_features; first += tile) {
    const int64_t count = std::min(tile, out_features - first);
    dequantize_tile(piece_sums_tile(activation_pieces, weight_pieces, first, count), plan, activations, scale, zero,
                    first, output);
  }
  return output;
}

// Step 6 with act_bits <= 0: x @ (weight_scale * (w - weight_zero))^T in fp32.
torch::Tensor float_matmul(const torch::Tensor& transformed, const torch::Tensor& packed_weight,
                           const torch::Tensor& weight_scale, const torch::Tensor& weight_zero, int64_t group_size) {
  const int64_t out_features = packed_weight.size(0), padded_k = transformed.size(1);
  const int64_t group_length = effective_group_size(padded_k, group_size);
  const auto levels = unpack_int4(packed_weight).to(torch::kFloat).view({out_features, -1, group_length});
  const auto dequantized = ((levels - weight_zero.unsqueeze(2)) * weight_scale.unsqueeze(2)).view({out_features, padded_k});
  return torch::matmul(transformed, dequantized.t());
}

}  // namespace

W4A8LinearShape check_w4a8_linear_arguments(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                                            const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                            const torch::Tensor& rotation2, const torch::Tensor& packed_weight,
                                            const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                                            const torch::Tensor& bias, int64_t in_features, int64_t group_size,
                                            int64_t act_bits, double act_clip) {
  TORCH_CHECK(x.defined() && x.is_floating_point() && x.dim() >= 1,
              "duquant::w4a8_linear: x must be a floating-point tensor [..., in_features], got ",
              x.defined() ? x.toString() : std::string("undefined"), " ", x.defined() ? x.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(in_features > 0, "duquant::w4a8_linear: in_features must be positive, got ", in_features);
  TORCH_CHECK(x.size(-1) == in_features, "duquant::w4a8_linear: x's last dimension is ", x.size(-1),
              " but in_features is ", in_features);
  TORCH_CHECK(packed_weight.scalar_type() == torch::kUInt8 && packed_weight.dim() == 2,
              "duquant::w4a8_linear: packed_weight must be uint8 [out_features, padded_in_features / ",
              layout::kWeightsPerByte, "], got ", packed_weight.scalar_type(), " ", packed_weight.sizes());

  W4A8LinearShape shape;
  shape.in_features = in_features;
  shape.tokens = x.numel() / in_features;
  shape.out_features = packed_weight.size(0);
  shape.padded_in_features = packed_weight.size(1) * layout::kWeightsPerByte;
  const int64_t padded_k = shape.padded_in_features;
  TORCH_CHECK(padded_k >= in_features, "duquant::w4a8_linear: packed_weight holds K = ", padded_k,
              " input features, fewer than in_features ", in_features);
  TORCH_CHECK(padded_k % layout::kInFeatureAlignment == 0, "duquant::w4a8_linear: the padded in_features K = ",
              padded_k, " of packed_weight is not a multiple of ", layout::kInFeatureAlignment, " (w4a8_layout.h)");

  if (smooth_inv.numel() > 0) {
    TORCH_CHECK(smooth_inv.dim() == 1 && smooth_inv.size(0) == in_features && smooth_inv.is_floating_point(),
                "duquant::w4a8_linear: smooth_inv must be a floating-point [in_features = ", in_features,
                "] vector or empty, got ", smooth_inv.scalar_type(), " ", smooth_inv.sizes());
  }
  check_rotation("rotation1", rotation1, padded_k);
  check_rotation("rotation2", rotation2, padded_k);
  if (permutation.numel() > 0) {
    TORCH_CHECK(permutation.dim() == 1 && c10::isIntegralType(permutation.scalar_type(), /*includeBool=*/false),
                "duquant::w4a8_linear: permutation must be an integer vector or empty, got ",
                permutation.scalar_type(), " ", permutation.sizes());
    TORCH_CHECK(permutation.size(0) == padded_k, "duquant::w4a8_linear: permutation has length ", permutation.size(0),
                " but the padded in_features K is ", padded_k);
  }

  shape.group_size = effective_group_size(padded_k, group_size);
  shape.groups = padded_k / shape.group_size;
  const std::vector<int64_t> scale_sizes = {shape.out_features, shape.groups};
  TORCH_CHECK(weight_scale.scalar_type() == torch::kFloat && weight_scale.sizes() == c10::IntArrayRef(scale_sizes),
              "duquant::w4a8_linear: weight_scale must be float32 [out_features, groups] = ",
              c10::IntArrayRef(scale_sizes), ", got ", weight_scale.scalar_type(), " ", weight_scale.sizes());
  TORCH_CHECK(weight_zero.scalar_type() == torch::kFloat && weight_zero.sizes() == c10::IntArrayRef(scale_sizes),
              "duquant::w4a8_linear: weight_zero must be float32 [out_features, groups] = ",
              c10::IntArrayRef(scale_sizes), ", got ", weight_zero.scalar_type(), " ", weight_zero.sizes());
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == shape.out_features && bias.is_floating_point(),
                "duquant::w4a8_linear: bias must be a floating-point [out_features = ", shape.out_features,
                "] vector or empty, got ", bias.scalar_type(), " ", bias.sizes());
  }
  if (act_bits > 0) {
    check_activation_quantization(act_bits, act_clip);
    check_accumulator_length(shape.group_size);
  }
  return shape;
}

QuantizedActivations quantize_activations(const torch::Tensor& transformed, int64_t act_bits, double act_clip,
                                          int64_t group_size) {
  TORCH_CHECK(transformed.dim() == 2 && transformed.is_floating_point() && transformed.device().is_cpu(),
              "duquant: quantize_activations expects a floating-point CPU tensor [tokens, K], got ",
              transformed.toString(), " ", transformed.sizes());
  check_activation_quantization(act_bits, act_clip);
  const int64_t tokens = transformed.size(0), padded_k = transformed.size(1);
  const int64_t group_length = effective_group_size(padded_k, group_size);
  const int64_t groups = padded_k / group_length;
  const auto input = transformed.to(torch::kFloat).contiguous();

  QuantizedActivations result;
  result.values = torch::empty({tokens, padded_k}, torch::kInt8);
  result.scale = torch::empty({tokens}, torch::kFloat);
  result.group_sum = torch::empty({tokens, groups}, torch::kInt);
  const float* in = input.data_ptr<float>();
  int8_t* values = result.values.data_ptr<int8_t>();
  float* scale = result.scale.data_ptr<float>();
  int32_t* group_sum = result.group_sum.data_ptr<int32_t>();
  const float max_level = static_cast<float>(layout::activation_max_level(static_cast<int>(act_bits)));
  const float clip = static_cast<float>(act_clip);

  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(padded_k, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t token_begin, int64_t token_end) {
    for (int64_t t = token_begin; t < token_end; ++t) {
      const float* row = in + t * padded_k;
      float absmax = 0.0f;
      for (int64_t k = 0; k < padded_k; ++k) {
        const float magnitude = std::abs(row[k]);
        // NaN must not be skipped by max: it makes the scale, and so the token's output, NaN.
        if (std::isnan(magnitude)) {
          absmax = magnitude;
          break;
        }
        absmax = std::max(absmax, magnitude);
      }
      float token_scale = clip * absmax / max_level;
      // An all-zero row quantizes to q = 0 with any scale; 1 keeps its dequantization finite.
      if (token_scale == 0.0f) token_scale = 1.0f;
      scale[t] = token_scale;
      // A non-finite scale (inf or NaN in the row) gives q = 0 and a non-finite output for the
      // token, as the float layer would, instead of casting NaN to int8.
      const bool finite_scale = std::isfinite(token_scale);
      for (int64_t g = 0; g < groups; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * group_length; k < (g + 1) * group_length; ++k) {
          // nearbyint rounds half to even (default rounding mode), like torch.round and cvt.rni.
          const float level = finite_scale ? std::clamp(std::nearbyint(row[k] / token_scale), -max_level, max_level) : 0.0f;
          values[t * padded_k + k] = static_cast<int8_t>(level);
          sum += static_cast<int32_t>(level);
        }
        group_sum[t * groups + g] = sum;
      }
    }
  });
  return result;
}

torch::Tensor integer_group_dot_products(const torch::Tensor& quantized, const torch::Tensor& packed_weight,
                                         int64_t group_size) {
  TORCH_CHECK(quantized.scalar_type() == torch::kInt8 && quantized.dim() == 2 && quantized.device().is_cpu(),
              "duquant: integer_group_dot_products expects int8 CPU activations [T, K], got ", quantized.toString(), " ",
              quantized.sizes());
  TORCH_CHECK(packed_weight.scalar_type() == torch::kUInt8 && packed_weight.dim() == 2 &&
                  packed_weight.size(1) * layout::kWeightsPerByte == quantized.size(1),
              "duquant: integer_group_dot_products expects uint8 packed_weight [N, ", quantized.size(1) / layout::kWeightsPerByte,
              "] for K = ", quantized.size(1), ", got ", packed_weight.scalar_type(), " ", packed_weight.sizes());
  const auto plan = plan_exact_gemm(quantized.size(1), group_size);
  const int64_t tokens = quantized.size(0), out_features = packed_weight.size(0);
  auto result = torch::empty({tokens, out_features, plan.groups}, torch::kInt);
  if (tokens == 0 || out_features == 0) return result;
  const auto activation_pieces = as_piece_operand(quantized, plan);
  const auto weight_pieces = unpack_weight_pieces(packed_weight, plan);
  const int64_t tile = columns_per_tile(plan, tokens, out_features);
  for (int64_t first = 0; first < out_features; first += tile) {
    const int64_t count = std::min(tile, out_features - first);
    // Pieces hold exact integers: convert to int32, then add the pieces of each group in int32.
    const auto pieces = piece_sums_tile(activation_pieces, weight_pieces, first, count).to(torch::kInt);
    const auto accumulators =
        pieces.view({plan.groups, plan.pieces_per_group, tokens, count}).sum(1, /*keepdim=*/false, torch::kInt);
    result.narrow(1, first, count).copy_(accumulators.permute({1, 2, 0}));
  }
  return result;
}

torch::Tensor w4a8_linear_cpu(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                              const torch::Tensor& rotation1, const torch::Tensor& permutation,
                              const torch::Tensor& rotation2, const torch::Tensor& packed_weight,
                              const torch::Tensor& weight_scale, const torch::Tensor& weight_zero,
                              const torch::Tensor& bias, int64_t in_features, int64_t group_size,
                              int64_t act_bits, double act_clip) {
  const auto shape = check_w4a8_linear_arguments(x, smooth_inv, rotation1, permutation, rotation2, packed_weight,
                                                 weight_scale, weight_zero, bias, in_features, group_size, act_bits,
                                                 act_clip);
  if (permutation.numel() > 0) {
    TORCH_CHECK(permutation.min().item<int64_t>() >= 0 && permutation.max().item<int64_t>() < shape.padded_in_features,
                "duquant::w4a8_linear: permutation has entries outside 0..", shape.padded_in_features - 1);
  }
  auto output_sizes = x.sizes().vec();
  output_sizes.back() = shape.out_features;
  if (shape.tokens == 0 || shape.out_features == 0) return torch::empty(output_sizes, x.options());

  // Steps 1-5 (online_transform.cpp), then quantized in fp32 whatever x's dtype; the activations
  // of the previous call when it had the same input and transform (activation_reuse.h).
  const auto transformed = [&] {
    return apply_online_transform(x.reshape({shape.tokens, in_features}), smooth_inv, rotation1, permutation,
                                  rotation2, shape.padded_in_features)
        .to(torch::kFloat);
  };
  torch::Tensor output;
  if (act_bits > 0) {
    const ActivationRequest request{x, smooth_inv, rotation1, permutation, rotation2, shape.padded_in_features,
                                    group_size, act_bits, act_clip};
    const auto activations =
        reuse_or_quantize(request, [&] { return quantize_activations(transformed(), act_bits, act_clip, group_size); });
    output = integer_matmul(activations, packed_weight, weight_scale, weight_zero, group_size);
  } else {
    output = float_matmul(transformed(), packed_weight, weight_scale, weight_zero, group_size);
  }
  if (bias.numel() > 0) output.add_(bias.to(torch::kFloat));  // step 7
  return output.to(x.scalar_type()).view(output_sizes);
}

}  // namespace duquant::ops::cpu_reference
