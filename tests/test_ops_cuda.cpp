// GPU tests of the CUDA kernels of duquant::w4a8_linear (src/ops/w4a8_linear_cuda.cu) against the
// CPU reference kernel (src/ops/w4a8_linear_cpu.cpp). Every test skips without a CUDA device (or
// with a CPU-only build of the operator library).
//
// What "equal" means (DESIGN.md section 7: "equal up to fp32 epilogue rounding"):
//  * The GEMM alone, fed the CPU reference's own int8 activations, must match the CPU op to
//    1e-4 of the output's scale (max |y|), plus one unit in the last place of the output dtype
//    for fp16 / bf16 outputs (both sides round the same fp32 value, which may sit on a rounding
//    boundary).
//  * The pre-kernel must reproduce the CPU's int8 activations exactly except for rounding ties:
//    its block rotations add in another order than the CPU's BLAS, so a value within an ulp of
//    a .5 boundary can round the other way. Such entries differ by exactly 1 and are counted.
//  * The whole op: rows whose int8 activations agree must match as the GEMM does; a row with d
//    differing entries may differ by at most d * scale_t * max|weight_scale| * 15 more (each
//    tie moves one q by 1, and |w - z| <= 15).
//  * With rotations whose products are exact in fp32 (entries +-1/2, dyadic inputs) there are no
//    ties at all and the whole op must match strictly.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "duquant/ops.h"
#include "int8_weight_levels.h"
#include "test_support.h"
#include "w4a8_cpu_reference.h"
#include "w4a8_cuda.h"
#include "w4a8_layout.h"

namespace duquant::ops {
namespace {

constexpr double kActClip = 1.0;
constexpr int64_t kActBits = 8;
constexpr double kEpilogueTolerance = 1e-4;  // relative to max |y|

#define SKIP_WITHOUT_CUDA_KERNELS()                                                         \
  do {                                                                                      \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";                     \
    if (!cuda::cuda_kernels_available()) GTEST_SKIP() << "operator library built without CUDA"; \
  } while (false)

struct Layer {
  int64_t in_features = 0;
  int64_t padded_in_features = 0;
  int64_t group_size = -1;
  torch::Tensor smooth_inv, rotation1, permutation, rotation2, packed_weight, weight_scale, weight_zero, bias;

  Layer to(const torch::Device& device) const {
    Layer moved = *this;
    for (auto* tensor : {&moved.smooth_inv, &moved.rotation1, &moved.permutation, &moved.rotation2,
                         &moved.packed_weight, &moved.weight_scale, &moved.weight_zero, &moved.bias}) {
      *tensor = tensor->to(device);
    }
    return moved;
  }
};

enum class Transform { None, SmoothOnly, PermutationOnly, Full, ExactRotations };

struct LayerSpec {
  int64_t in_features;
  int64_t out_features;
  int64_t block = 128;
  int64_t group_size = -1;
  bool bias = false;
  Transform transform = Transform::Full;
};

torch::Tensor random_orthogonal(int64_t size, torch::Generator& generator) {
  auto q = std::get<0>(torch::linalg_qr(torch::randn({size, size}, generator, torch::kDouble)));
  return q.to(torch::kFloat).contiguous();
}

// A +-1/2 matrix: every product with a dyadic input is exact in fp32, in any summation order.
torch::Tensor exact_sign_matrix(int64_t size, torch::Generator& generator) {
  return (torch::randint(0, 2, {size, size}, generator, torch::kFloat) - 0.5f).contiguous();
}

Layer make_layer(const LayerSpec& spec, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  Layer layer;
  layer.in_features = spec.in_features;
  layer.padded_in_features = layout::padded_in_features(spec.in_features, spec.block);
  layer.group_size = spec.group_size;
  const int64_t k = layer.padded_in_features, n = spec.out_features;
  const int64_t groups = spec.group_size > 0 ? k / spec.group_size : 1;
  const auto empty = torch::empty({0}, torch::kFloat);
  layer.smooth_inv = layer.rotation1 = layer.rotation2 = empty;
  layer.permutation = torch::empty({0}, torch::kLong);
  switch (spec.transform) {
    case Transform::None:
      break;
    case Transform::SmoothOnly:
      layer.smooth_inv = torch::rand({spec.in_features}, generator, torch::kFloat) * 1.5 + 0.5;
      break;
    case Transform::PermutationOnly:
      layer.permutation = torch::randperm(k, generator, torch::kLong);
      break;
    case Transform::Full:
      layer.smooth_inv = torch::rand({spec.in_features}, generator, torch::kFloat) * 1.5 + 0.5;
      layer.rotation1 = random_orthogonal(spec.block, generator);
      layer.permutation = torch::randperm(k, generator, torch::kLong);
      layer.rotation2 = random_orthogonal(spec.block, generator);
      break;
    case Transform::ExactRotations:
      // Powers of two keep the smoothing exact too.
      layer.smooth_inv = torch::pow(2.0, torch::randint(-1, 2, {spec.in_features}, generator, torch::kFloat));
      layer.rotation1 = exact_sign_matrix(spec.block, generator);
      layer.permutation = torch::randperm(k, generator, torch::kLong);
      layer.rotation2 = exact_sign_matrix(spec.block, generator);
      break;
  }
  const auto levels = torch::randint(0, layout::kWeightMaxLevel + 1, {n, k}, generator, torch::kLong).to(torch::kUInt8);
  layer.packed_weight = pack_int4(levels);
  layer.weight_scale = torch::rand({n, groups}, generator, torch::kFloat) * 0.02 + 0.001;
  layer.weight_zero = torch::randint(0, layout::kWeightMaxLevel + 1, {n, groups}, generator, torch::kFloat);
  layer.bias = spec.bias ? torch::randn({n}, generator, torch::kFloat) : empty;
  return layer;
}

// Activations with a few outlier channels (DESIGN.md section 4); dyadic values for exact tests.
torch::Tensor make_input(int64_t tokens, int64_t in_features, torch::ScalarType dtype, uint64_t seed, bool dyadic) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  torch::Tensor x;
  if (dyadic) {
    x = torch::randint(-16, 17, {tokens, in_features}, generator, torch::kFloat) / 8.0;
  } else {
    x = torch::randn({tokens, in_features}, generator, torch::kFloat);
    const int64_t outliers = std::max<int64_t>(1, in_features / 256);
    for (int64_t i = 0; i < outliers; ++i) x.select(1, (i * 7919 + 13) % in_features).mul_(30.0);
  }
  return x.to(dtype);
}

torch::Tensor run_op(const torch::Tensor& x, const Layer& layer, int64_t act_bits = kActBits) {
  return w4a8_linear(x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2, layer.packed_weight,
                     layer.weight_scale, layer.weight_zero, layer.bias, layer.in_features, layer.group_size, act_bits,
                     kActClip);
}

cpu_reference::QuantizedActivations reference_activations(const torch::Tensor& x_cpu, const Layer& layer) {
  const auto transformed = apply_online_transform(x_cpu.reshape({-1, layer.in_features}), layer.smooth_inv,
                                                  layer.rotation1, layer.permutation, layer.rotation2,
                                                  layer.padded_in_features)
                               .to(torch::kFloat);
  return cpu_reference::quantize_activations(transformed, kActBits, kActClip, layer.group_size);
}

// Relative precision of one unit in the last place of an output dtype (0 for fp32: compared at
// kEpilogueTolerance).
double output_ulp(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kBFloat16:
      return std::ldexp(1.0, -7);
    case torch::kHalf:
      return std::ldexp(1.0, -10);
    default:
      return 0.0;
  }
}

// Per-element bound: epilogue rounding plus `extra_per_row` [T] (float64) for rows with ties.
void expect_close(const torch::Tensor& actual_any, const torch::Tensor& expected_any, const torch::Tensor& extra_per_row,
                  const std::string& what) {
  ASSERT_EQ(actual_any.sizes(), expected_any.sizes()) << what;
  ASSERT_EQ(actual_any.scalar_type(), expected_any.scalar_type()) << what;
  const auto actual = actual_any.cpu().to(torch::kDouble).reshape({-1, expected_any.size(-1)});
  const auto expected = expected_any.to(torch::kDouble).reshape({-1, expected_any.size(-1)});
  const double scale = std::max(expected.abs().max().item<double>(), 1e-30);
  auto bound = expected.abs() * output_ulp(expected_any.scalar_type()) + kEpilogueTolerance * scale;
  if (extra_per_row.defined()) bound = bound + extra_per_row.to(torch::kDouble).unsqueeze(1);
  const auto excess = (actual - expected).abs() - bound;
  const auto worst = excess.max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |cuda - cpu| exceeds the bound by " << worst << " (output scale " << scale
                        << ", max diff " << (actual - expected).abs().max().item<double>() << ")";
}

struct QuantizedComparison {
  int64_t differing = 0;   // entries with q_cuda != q_cpu (all by exactly 1)
  torch::Tensor per_row;   // int64 [T]: differing entries per token
};

QuantizedComparison compare_quantized(const cuda::QuantizedActivations& on_gpu,
                                      const cpu_reference::QuantizedActivations& reference, int64_t group_size,
                                      const std::string& what) {
  const auto values = on_gpu.values.cpu();
  EXPECT_EQ(values.sizes(), reference.values.sizes()) << what;
  const auto difference = (values.to(torch::kInt) - reference.values.to(torch::kInt)).abs();
  EXPECT_LE(difference.max().item<int>(), 1) << what << ": an int8 activation differs by more than a rounding tie";
  QuantizedComparison result;
  result.per_row = difference.ne(0).sum(1);
  result.differing = result.per_row.sum().item<int64_t>();
  // Ties are rare: well under 0.1% of the entries.
  EXPECT_LE(result.differing, std::max<int64_t>(2, values.numel() / 1000)) << what;
  // The token scale comes from the absmax, which another summation order moves by a few ulps.
  EXPECT_TRUE(torch::allclose(on_gpu.scale.cpu(), reference.scale, /*rtol=*/1e-5, /*atol=*/0.0)) << what;
  // Group sums must be those of the GPU's own q.
  const int64_t k = values.size(1);
  const int64_t length = group_size > 0 ? group_size : k;
  const auto own_sums = values.to(torch::kInt).view({values.size(0), k / length, length}).sum(2).to(torch::kInt);
  EXPECT_TRUE(torch::equal(on_gpu.group_sum.cpu(), own_sums)) << what << ": group sums";
  return result;
}

// The three comparisons of the file comment for one layer and input.
void check_layer(const LayerSpec& spec, int64_t tokens, torch::ScalarType dtype, uint64_t seed) {
  const std::string what = "in " + std::to_string(spec.in_features) + " out " + std::to_string(spec.out_features) +
                           " M " + std::to_string(tokens) + " block " + std::to_string(spec.block) + " group " +
                           std::to_string(spec.group_size) + " " + std::string(c10::toString(dtype)) +
                           (spec.bias ? " bias" : "");
  const bool exact = spec.transform == Transform::ExactRotations || spec.transform == Transform::None ||
                     spec.transform == Transform::PermutationOnly;
  const Layer layer = make_layer(spec, seed);
  const Layer layer_gpu = layer.to(torch::kCUDA);
  const auto x = make_input(tokens, spec.in_features, dtype, seed + 1, spec.transform == Transform::ExactRotations);
  const auto x_gpu = x.to(torch::kCUDA);

  const auto expected = run_op(x, layer);
  const auto reference = reference_activations(x, layer);

  // 1. The GEMM on the CPU's own activations.
  const cuda::QuantizedActivations reference_on_gpu{reference.values.to(torch::kCUDA), reference.scale.to(torch::kCUDA),
                                                    reference.group_sum.to(torch::kCUDA)};
  const auto gemm = cuda::w4a8_gemm(reference_on_gpu, layer_gpu.packed_weight, layer_gpu.weight_scale,
                                    layer_gpu.weight_zero, layer_gpu.bias, layer.group_size, dtype);
  expect_close(gemm, expected, torch::Tensor(), what + " [gemm]");

  // 2. The pre-kernel against the CPU transform + quantization.
  const auto quantized = cuda::fused_quantize_activations(x_gpu, layer_gpu.smooth_inv, layer_gpu.rotation1,
                                                          layer_gpu.permutation, layer_gpu.rotation2,
                                                          layer.padded_in_features, layer.group_size, kActBits, kActClip);
  const auto ties = compare_quantized(quantized, reference, layer.group_size, what + " [pre-kernel]");
  if (exact) EXPECT_EQ(ties.differing, 0) << what << ": exact transforms leave no rounding ties";
  if (ties.differing > 0) {
    std::cout << "[ ties     ] " << what << ": " << ties.differing << " int8 activations of " << reference.values.numel()
              << " differ by a rounding tie\n";
  }

  // 3. The whole op.
  const auto actual = run_op(x_gpu, layer_gpu);
  const double max_weight_scale = layer.weight_scale.abs().max().item<double>();
  const auto tie_bound = ties.per_row.to(torch::kDouble) * reference.scale.to(torch::kDouble) * max_weight_scale *
                         static_cast<double>(layout::kWeightMaxLevel);
  expect_close(actual, expected, tie_bound, what + " [op]");
}

// ---------------------------------------------------------------------------------------------
// The fixtures themselves, on the CPU (these run without a GPU): the reference activations the
// GEMM is fed reproduce the CPU op through ops.h's formula, and the "exact" rotations really are
// exact in fp32.

torch::Tensor epilogue_from_activations(const cpu_reference::QuantizedActivations& activations, const Layer& layer) {
  const auto acc = cpu_reference::integer_group_dot_products(activations.values, layer.packed_weight, layer.group_size)
                       .to(torch::kDouble);                                         // [T, N, G]
  const auto sums = activations.group_sum.to(torch::kDouble).unsqueeze(1);        // [T, 1, G]
  const auto corrected = acc - layer.weight_zero.to(torch::kDouble).unsqueeze(0) * sums;
  auto y = (corrected * layer.weight_scale.to(torch::kDouble).unsqueeze(0)).sum(2) *
           activations.scale.to(torch::kDouble).unsqueeze(1);
  if (layer.bias.numel() > 0) y = y + layer.bias.to(torch::kDouble);
  return y;
}

TEST(W4A8LinearCudaFixtures, ReferenceActivationsReproduceTheCpuOp) {
  for (const auto& spec : {LayerSpec{256, 72, 128, -1, true}, LayerSpec{320, 40, 64, 64, false},
                           LayerSpec{1000, 24, 128, 128, true, Transform::ExactRotations}}) {
    const Layer layer = make_layer(spec, 1701);
    const auto x = make_input(5, spec.in_features, torch::kFloat, 1702, spec.transform == Transform::ExactRotations);
    const auto expected = run_op(x, layer).to(torch::kDouble);
    const auto reconstructed = epilogue_from_activations(reference_activations(x, layer), layer);
    const double scale = expected.abs().max().item<double>();
    EXPECT_LE((reconstructed - expected).abs().max().item<double>(), 1e-5 * scale) << spec.in_features;
  }
}

TEST(W4A8LinearCudaFixtures, ExactRotationsAreExactInFloat32) {
  const Layer layer = make_layer({2048, 16, 16, -1, false, Transform::ExactRotations}, 1801);
  const auto x = make_input(7, 2048, torch::kFloat, 1802, /*dyadic=*/true);
  const auto in_float = apply_online_transform(x, layer.smooth_inv, layer.rotation1, layer.permutation,
                                               layer.rotation2, layer.padded_in_features);
  const auto in_double = apply_online_transform(x.to(torch::kDouble), layer.smooth_inv, layer.rotation1,
                                                layer.permutation, layer.rotation2, layer.padded_in_features);
  EXPECT_TRUE(torch::equal(in_float.to(torch::kDouble), in_double));
}

// DESIGN.md section 3: the in/out pairs of the LLM and the action expert.
const std::vector<std::pair<int64_t, int64_t>> kPi0Shapes = {
    {2048, 2048}, {2048, 256}, {2048, 16384}, {16384, 2048},                 // language model
    {1024, 2048}, {1024, 256}, {2048, 1024}, {1024, 4096}, {4096, 1024}};  // action expert

TEST(W4A8LinearCuda, Pi0ShapesAtOneToken) {
  SKIP_WITHOUT_CUDA_KERNELS();
  for (const auto& [in, out] : kPi0Shapes) check_layer({in, out}, 1, torch::kBFloat16, 100 + in + out);
}

TEST(W4A8LinearCuda, Pi0ShapesAtExpertTokens) {
  SKIP_WITHOUT_CUDA_KERNELS();
  for (const auto& [in, out] : kPi0Shapes) check_layer({in, out}, 51, torch::kBFloat16, 200 + in + out);
}

TEST(W4A8LinearCuda, Pi0ShapesAtSevenTokens) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({2048, 256}, 7, torch::kBFloat16, 301);
  check_layer({1024, 4096}, 7, torch::kBFloat16, 302);
}

TEST(W4A8LinearCuda, Pi0ShapesAtPrefixTokens) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({2048, 2048}, 816, torch::kBFloat16, 401);
  check_layer({16384, 2048}, 816, torch::kBFloat16, 402);
  check_layer({2048, 256}, 816, torch::kBFloat16, 403);
}

TEST(W4A8LinearCuda, LargeTokenCount) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({2048, 16384}, 2048, torch::kBFloat16, 501);
  check_layer({4096, 1024}, 2048, torch::kBFloat16, 502);
}

TEST(W4A8LinearCuda, PaddedInFeatures) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({1152, 1152, 128, -1, true}, 51, torch::kBFloat16, 601);  // SigLIP width, 9 blocks
  check_layer({4304, 1152, 128, -1, true}, 51, torch::kBFloat16, 602);  // SigLIP fc2: padded to 4352
  check_layer({1000, 200, 128, -1, true}, 3, torch::kFloat, 603);       // padded to 1024
}

TEST(W4A8LinearCuda, AwkwardOutputWidthsAndTokenCounts) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({256, 200}, 3, torch::kFloat, 701);
  check_layer({256, 37}, 17, torch::kHalf, 702);
  check_layer({512, 130}, 33, torch::kBFloat16, 703);
  check_layer({512, 8}, 257, torch::kFloat, 704);
}

TEST(W4A8LinearCuda, GroupedWeights) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({2048, 256, 128, 64}, 51, torch::kBFloat16, 801);
  check_layer({2048, 2048, 128, 128, true}, 1, torch::kBFloat16, 802);  // split-K, whole groups per split
  check_layer({2048, 256, 128, 512}, 1, torch::kBFloat16, 805);         // a group straddles two splits
  check_layer({1024, 200, 128, 32}, 7, torch::kFloat, 803);
  check_layer({16384, 256, 128, 128}, 816, torch::kHalf, 804);
}

TEST(W4A8LinearCuda, InputDtypesAndBias) {
  SKIP_WITHOUT_CUDA_KERNELS();
  for (const auto dtype : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
    for (const bool bias : {false, true}) check_layer({1024, 256, 128, -1, bias}, 51, dtype, 900 + bias);
  }
}

TEST(W4A8LinearCuda, SkippedTransformSteps) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({1024, 256, 128, -1, false, Transform::None}, 51, torch::kBFloat16, 1001);
  check_layer({1024, 256, 128, -1, true, Transform::SmoothOnly}, 51, torch::kFloat, 1002);
  check_layer({1024, 256, 128, -1, false, Transform::PermutationOnly}, 51, torch::kHalf, 1003);
}

TEST(W4A8LinearCuda, SmallRotationBlocks) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({1024, 256, 16}, 51, torch::kBFloat16, 1101);  // the fork's default block
  check_layer({96, 64, 2}, 5, torch::kFloat, 1102);          // block not a multiple of 4
}

TEST(W4A8LinearCuda, ExactRotationsMatchStrictly) {
  SKIP_WITHOUT_CUDA_KERNELS();
  check_layer({1024, 512, 16, -1, true, Transform::ExactRotations}, 51, torch::kFloat, 1201);
  check_layer({2048, 256, 16, 64, false, Transform::ExactRotations}, 7, torch::kBFloat16, 1202);
}

TEST(W4A8LinearCuda, LeadingDimensionsAndEmptyInputs) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const Layer layer = make_layer({256, 64}, 1301);
  const Layer layer_gpu = layer.to(torch::kCUDA);
  const auto x = make_input(6, 256, torch::kFloat, 1302, false).view({2, 3, 256});
  const auto actual = run_op(x.to(torch::kCUDA), layer_gpu);
  EXPECT_EQ(actual.sizes(), (std::vector<int64_t>{2, 3, 64}));
  const auto expected = run_op(x, layer);
  EXPECT_LE((actual.cpu() - expected).abs().max().item<double>(), 1e-2 * expected.abs().max().item<double>());
  const auto empty = run_op(torch::empty({0, 256}, torch::kCUDA), layer_gpu);
  EXPECT_EQ(empty.sizes(), (std::vector<int64_t>{0, 64}));
}

TEST(W4A8LinearCuda, NonFiniteRowsGiveNonFiniteOutputsLikeTheCpu) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const Layer layer = make_layer({256, 64, 128, -1, true, Transform::None}, 1401);
  auto x = make_input(4, 256, torch::kFloat, 1402, false);
  x.index_put_({1, 5}, std::nan(""));
  x.index_put_({2}, 0.0);  // all-zero row: scale 1, q = 0, y = bias
  const auto expected = run_op(x, layer);
  const auto actual = run_op(x.to(torch::kCUDA), layer.to(torch::kCUDA)).cpu();
  EXPECT_TRUE(torch::equal(actual.isnan(), expected.isnan()));
  EXPECT_TRUE(torch::allclose(actual.select(0, 2), expected.select(0, 2)));
}

TEST(W4A8LinearCuda, UnquantizedActivationsUseTheFloatPath) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const Layer layer = make_layer({1024, 256, 128, 64, true}, 1501);
  const auto x = make_input(51, 1024, torch::kFloat, 1502, false);
  const auto expected = run_op(x, layer, /*act_bits=*/0);
  const auto actual = run_op(x.to(torch::kCUDA), layer.to(torch::kCUDA), /*act_bits=*/0);
  expect_close(actual, expected, torch::Tensor(), "act_bits 0");
}

TEST(W4A8LinearCuda, RejectsMisplacedAndUnsupportedArguments) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const Layer layer = make_layer({256, 64}, 1601);
  Layer mixed = layer.to(torch::kCUDA);
  mixed.packed_weight = layer.packed_weight;  // left on the CPU
  const auto x_gpu = make_input(3, 256, torch::kFloat, 1602, false).to(torch::kCUDA);
  EXPECT_THROW(run_op(x_gpu, mixed), c10::Error);
  // group_size 48 divides K = 384 (the CPU accepts it) but straddles the 32-wide MMA k steps.
  const Layer grouped = make_layer({384, 64, 128, 48}, 1603);
  EXPECT_THROW(run_op(make_input(3, 384, torch::kFloat, 1604, false).to(torch::kCUDA), grouped.to(torch::kCUDA)),
               c10::Error);
}

// ---------------------------------------------------------------------------------------------
// The two other rotation paths of DUQUANT_CUDA_ROTATION (operator_settings.h): `tensor-cores`
// (fp16 hi/lo operands inside the pre-kernel, w4a8_kernel_layout.h) and `cublas` (the transform
// as ATen ops, fp32 cuBLAS GEMMs, before the pre-kernel): the same comparisons with the CPU as the
// default CUDA-core path, ties counted the same way, and exact rotations still exact.

// Picks the op's rotation path for the enclosing scope.
class RotationPath : public testing::ScopedEnvironment {
 public:
  explicit RotationPath(const char* path) : ScopedEnvironment("DUQUANT_CUDA_ROTATION", path) {}
};

struct RotationPathCase {
  std::string name;
  const char* value;
};

void PrintTo(const RotationPathCase& path_case, std::ostream* out) { *out << path_case.name; }

class W4A8LinearCudaRotationPath : public ::testing::TestWithParam<RotationPathCase> {};

TEST_P(W4A8LinearCudaRotationPath, Pi0ShapesAtOneAndExpertTokens) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const RotationPath path(GetParam().value);
  for (const auto& [in, out] : kPi0Shapes) check_layer({in, out}, 1, torch::kBFloat16, 2100 + in + out);
  for (const auto& [in, out] : kPi0Shapes) check_layer({in, out}, 51, torch::kBFloat16, 2200 + in + out);
}

// K = 16384: on tensor cores sm_90 stages one rotation at a time (both do not fit beside the rows).
TEST_P(W4A8LinearCudaRotationPath, Pi0ShapesAtPrefixTokens) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const RotationPath path(GetParam().value);
  check_layer({2048, 2048}, 816, torch::kBFloat16, 2401);
  check_layer({16384, 2048}, 816, torch::kBFloat16, 2402);
  check_layer({2048, 16384}, 816, torch::kBFloat16, 2403);
}

TEST_P(W4A8LinearCudaRotationPath, PaddedGroupedAndOddShapes) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const RotationPath path(GetParam().value);
  check_layer({1152, 1152, 128, -1, true}, 51, torch::kBFloat16, 2601);  // 9 blocks: a partly empty m16 tile
  check_layer({1000, 200, 128, -1, true}, 3, torch::kFloat, 2603);       // padded to 1024
  check_layer({2048, 256, 128, 64}, 51, torch::kBFloat16, 2801);
  check_layer({16384, 256, 128, 128}, 816, torch::kHalf, 2804);
  for (const auto dtype : {torch::kFloat, torch::kHalf}) check_layer({1024, 256, 128, -1, true}, 51, dtype, 2900);
}

// b = 16 (the fork's default) runs on tensor cores; b = 2 is no multiple of 16 and keeps the
// CUDA-core path there whatever the variable says; cuBLAS takes both.
TEST_P(W4A8LinearCudaRotationPath, SixteenAndTwoWideBlocksAndAPermutationAlone) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const RotationPath path(GetParam().value);
  check_layer({1024, 256, 16}, 51, torch::kBFloat16, 3101);
  check_layer({96, 64, 2}, 5, torch::kFloat, 3102);
  check_layer({1024, 256, 128, -1, false, Transform::PermutationOnly}, 51, torch::kHalf, 3103);
}

TEST_P(W4A8LinearCudaRotationPath, ExactRotationsMatchStrictly) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const RotationPath path(GetParam().value);
  check_layer({1024, 512, 16, -1, true, Transform::ExactRotations}, 51, torch::kFloat, 3201);
  check_layer({2048, 256, 128, 64, false, Transform::ExactRotations}, 7, torch::kBFloat16, 3202);
}

// A NaN row maximum leaves the row unscaled and the NaN reaches the output; rows far beyond fp16's
// range either way (|x| up to ~1e31, or ~1e-30) are scaled into it on tensor cores and match the
// CPU on every path.
TEST_P(W4A8LinearCudaRotationPath, NonFiniteHugeAndTinyRowsLikeTheCpu) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const RotationPath path(GetParam().value);
  const Layer layer = make_layer({256, 64, 128, -1, false}, 3401);
  auto x = make_input(6, 256, torch::kFloat, 3402, false);
  x.index_put_({1, 5}, std::nan(""));
  x.index_put_({2}, 0.0);
  x.select(0, 3).mul_(1e6);
  x.select(0, 4).mul_(1e30);
  x.select(0, 5).mul_(1e-30);
  const auto expected = run_op(x, layer);
  const auto actual = run_op(x.to(torch::kCUDA), layer.to(torch::kCUDA)).cpu();
  EXPECT_TRUE(torch::equal(actual.isnan(), expected.isnan()));
  EXPECT_TRUE(torch::equal(actual.select(0, 2), expected.select(0, 2)));
  for (const int64_t row : {0, 3, 4, 5}) {
    const auto got = actual.select(0, row), want = expected.select(0, row);
    EXPECT_TRUE(torch::isfinite(got).all().item<bool>()) << "row " << row;
    EXPECT_LE((got - want).abs().max().item<double>(), 1e-2 * want.abs().max().item<double>()) << "row " << row;
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, W4A8LinearCudaRotationPath,
                         ::testing::Values(RotationPathCase{"TensorCores", "tensor-cores"},
                                           RotationPathCase{"Cublas", "cublas"}),
                         [](const ::testing::TestParamInfo<RotationPathCase>& info) { return info.param.name; });

TEST(W4A8LinearCudaRotationPathSetting, AnUnknownPathIsRejectedByName) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const RotationPath path("fast");
  const Layer layer = make_layer({256, 64}, 3501).to(torch::kCUDA);
  try {
    run_op(make_input(3, 256, torch::kFloat, 3502, false).to(torch::kCUDA), layer);
    FAIL() << "DUQUANT_CUDA_ROTATION=fast was accepted";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what_without_backtrace()).find("DUQUANT_CUDA_ROTATION=fast"), std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// DUQUANT_CUDA_GEMM=cublaslt (operator_settings.h): where torch::_int_mm applies (more than 16
// tokens, per-channel weights, N a multiple of 8) it multiplies an int8 copy of the levels and
// hands the epilogue the same exact int32 accumulators, so the output is bitwise the W4A8
// kernel's; elsewhere the W4A8 kernel runs.

class GemmPath : public testing::ScopedEnvironment {
 public:
  explicit GemmPath(const char* path) : ScopedEnvironment("DUQUANT_CUDA_GEMM", path) {}
};

TEST(W4A8LinearCudaCublasLtGemm, EqualsTheW4A8KernelBitwiseAndRunsWhereIntMmApplies) {
  SKIP_WITHOUT_CUDA_KERNELS();
  struct Case {
    LayerSpec spec;
    int64_t tokens;
    torch::ScalarType dtype;
    bool int_mm_applies;
  };
  std::vector<Case> cases;
  for (const auto& [in, out] : kPi0Shapes) {
    for (const int64_t tokens : {1, 16, 17, 51, 816}) cases.push_back({{in, out}, tokens, torch::kBFloat16, tokens > 16});
  }
  cases.push_back({{1024, 256, 128, -1, true}, 51, torch::kFloat, true});     // bias, fp32 output
  cases.push_back({{1000, 200, 128, -1, false}, 33, torch::kHalf, true});     // padded K
  cases.push_back({{2048, 256, 128, 128, false}, 51, torch::kBFloat16, false});  // grouped weights
  cases.push_back({{1024, 100, 128, -1, false}, 51, torch::kBFloat16, false});   // N = 100, not a multiple of 8
  uint64_t seed = 4000;
  for (const auto& c : cases) {
    const std::string what = "in " + std::to_string(c.spec.in_features) + " out " + std::to_string(c.spec.out_features) +
                             " M " + std::to_string(c.tokens) + " group " + std::to_string(c.spec.group_size);
    const Layer layer = make_layer(c.spec, ++seed).to(torch::kCUDA);
    const auto x = make_input(c.tokens, c.spec.in_features, c.dtype, ++seed, false).to(torch::kCUDA);
    const auto activations =
        cuda::fused_quantize_activations(x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2,
                                         layer.padded_in_features, layer.group_size, kActBits, kActClip);
    const auto gemm = [&] {
      return cuda::w4a8_gemm(activations, layer.packed_weight, layer.weight_scale, layer.weight_zero, layer.bias,
                             layer.group_size, c.dtype)
          .cpu();
    };
    torch::Tensor kernel;
    {
      const GemmPath path("mma-sync");
      kernel = gemm();
    }
    forget_cached_int8_levels();
    torch::Tensor through_int_mm;
    {
      const GemmPath path("cublaslt");
      through_int_mm = gemm();
    }
    EXPECT_EQ(cached_int8_levels_entries(), c.int_mm_applies ? 1 : 0) << what << ": which GEMM ran";
    EXPECT_TRUE(torch::equal(through_int_mm, kernel)) << what << ": max diff "
                                                      << (through_int_mm.to(torch::kDouble) - kernel.to(torch::kDouble))
                                                             .abs()
                                                             .max()
                                                             .item<double>();
  }
  forget_cached_int8_levels();
}

// A first cuBLASLt call inside a capture makes its int8 copy inside the graph (its kernels only
// run at replay) and caches nothing; the replay is right, and the next eager call caches a copy.
TEST(W4A8LinearCudaCublasLtGemm, AFirstCallInsideACaptureCachesNothing) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const GemmPath path("cublaslt");
  // cuBLASLt and the kernels' attributes set up outside the capture, on another layer.
  run_op(make_input(51, 1024, torch::kBFloat16, 4501, false).to(torch::kCUDA),
         make_layer({1024, 256}, 4502).to(torch::kCUDA));
  torch::cuda::synchronize();
  forget_cached_int8_levels();
  const Layer layer = make_layer({1024, 2048}, 4503).to(torch::kCUDA);
  const auto x = make_input(51, 1024, torch::kBFloat16, 4504, false).to(torch::kCUDA);
  at::cuda::CUDAGraph graph;
  torch::Tensor captured;
  {
    const c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromPool());
    graph.capture_begin();
    captured = run_op(x, layer);
    graph.capture_end();
  }
  EXPECT_FALSE(find_cached_int8_levels(layer.packed_weight).defined());
  graph.replay();
  torch::cuda::synchronize();
  const auto eager = run_op(x, layer);
  EXPECT_TRUE(find_cached_int8_levels(layer.packed_weight).defined());
  EXPECT_TRUE(torch::equal(captured.cpu(), eager.cpu()));
  forget_cached_int8_levels();
}

// The capture contract at the top of w4a8_linear_cuda.cu: after one eager (warm-up) call, the op
// captured into a CUDA graph replays exactly its eager result (same kernels, same launch geometry
// for the same shapes), and a replay after new values are copied into the captured input computes
// on those values, not on the ones seen at capture.
struct CaptureCase {
  std::string name;
  LayerSpec spec;
  int64_t tokens;
  torch::ScalarType dtype;
  int64_t act_bits = kActBits;
  const char* rotation_path = nullptr;  // DUQUANT_CUDA_ROTATION, or the default
  const char* gemm_path = nullptr;      // DUQUANT_CUDA_GEMM, or the default
};

// ctest lists parameterised cases with their printed parameter: the case name, not its bytes.
void PrintTo(const CaptureCase& capture_case, std::ostream* out) { *out << capture_case.name; }

class W4A8LinearCudaGraph : public ::testing::TestWithParam<CaptureCase> {};

// The integer kernels are deterministic: bit for bit. The float path (act_bits 0) runs cuBLAS,
// whose algorithm choice may differ between the capture stream and the default stream; so do the
// rotations of the cublas path, and a value moved by an ulp may round to the next int8 level,
// which moves its outputs by about a thousandth of their scale.
bool same_result(const torch::Tensor& actual, const torch::Tensor& expected, const CaptureCase& capture_case) {
  const auto got = actual.cpu(), want = expected.cpu();
  const bool through_cublas = capture_case.rotation_path != nullptr && std::string(capture_case.rotation_path) == "cublas";
  if (capture_case.act_bits <= 0) return torch::allclose(got, want, /*rtol=*/1e-5, /*atol=*/1e-6);
  if (!through_cublas) return torch::equal(got, want);
  const double scale = want.abs().max().item<double>();
  return (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().max().item<double>() <= 1e-2 * scale;
}

TEST_P(W4A8LinearCudaGraph, ReplayEqualsEagerAndFollowsNewInputs) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const auto& param = GetParam();
  std::optional<RotationPath> path;
  if (param.rotation_path != nullptr) path.emplace(param.rotation_path);
  std::optional<GemmPath> gemm_path;
  if (param.gemm_path != nullptr) gemm_path.emplace(param.gemm_path);
  const Layer layer = make_layer(param.spec, 1701).to(torch::kCUDA);
  auto x = make_input(param.tokens, param.spec.in_features, param.dtype, 1702, false).to(torch::kCUDA);
  const auto eager = run_op(x, layer, param.act_bits);
  torch::cuda::synchronize();

  at::cuda::CUDAGraph graph;
  torch::Tensor captured;
  {
    // Capture needs a stream other than the default one.
    const c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromPool());
    graph.capture_begin();
    captured = run_op(x, layer, param.act_bits);
    graph.capture_end();
  }
  graph.replay();
  torch::cuda::synchronize();
  EXPECT_TRUE(same_result(captured, eager, param)) << param.name << ": replay differs from the eager call";

  const auto next = make_input(param.tokens, param.spec.in_features, param.dtype, 1703, false).to(torch::kCUDA);
  x.copy_(next);
  graph.replay();
  torch::cuda::synchronize();
  const auto next_eager = run_op(next, layer, param.act_bits);
  EXPECT_TRUE(same_result(captured, next_eager, param)) << param.name << ": replay on new inputs";
  EXPECT_FALSE(same_result(next_eager, eager, param)) << param.name << ": the two inputs must differ in output";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, W4A8LinearCudaGraph,
    ::testing::Values(CaptureCase{"ExpertQProjAt51TokensBf16", {1024, 2048}, 51, torch::kBFloat16},
                      // Few output tiles and a long K: split-K with its workspace and reduction kernel.
                      CaptureCase{"LlmDownProjAtOneTokenSplitK", {16384, 2048}, 1, torch::kBFloat16},
                      CaptureCase{"GroupedWeightsWithBiasFloat32", {1024, 256, 128, 128, true}, 16, torch::kFloat},
                      CaptureCase{"PrefixTokensWithPaddingHalf", {1000, 512}, 816, torch::kHalf},
                      CaptureCase{"UnquantizedActivationsFloatPath", {1024, 256}, 7, torch::kFloat, 0},
                      CaptureCase{"ExpertQProjAt51TokensTensorCoreRotation", {1024, 2048}, 51, torch::kBFloat16,
                                  kActBits, "tensor-cores"},
                      CaptureCase{"LlmDownProjAtOneTokenTensorCoreRotation", {16384, 2048}, 1, torch::kBFloat16,
                                  kActBits, "tensor-cores"},
                      CaptureCase{"ExpertQProjAt51TokensCublasRotation", {1024, 2048}, 51, torch::kBFloat16,
                                  kActBits, "cublas"},
                      CaptureCase{"LlmDownProjAtPrefixTokensCublasRotation", {16384, 2048}, 816, torch::kBFloat16,
                                  kActBits, "cublas"},
                      CaptureCase{"ExpertQProjAt51TokensCublasLtGemm", {1024, 2048}, 51, torch::kBFloat16, kActBits,
                                  nullptr, "cublaslt"},
                      CaptureCase{"LlmUpProjAtPrefixTokensBothCublasPaths", {2048, 16384}, 816, torch::kBFloat16,
                                  kActBits, "cublas", "cublaslt"}),
    [](const ::testing::TestParamInfo<CaptureCase>& info) { return info.param.name; });

// GPTQ's batch sweep (src/ops/gptq_sweep.h): the CUDA kernel rounds every column as the CPU
// kernel does, bit for bit, on strided batches of every width the kernel takes (one column, a
// partial warp, the default 128, its 256 maximum) and more rows than one thread block holds.
TEST(GptqSweepCuda, EqualsTheCpuKernelBitwise) {
  SKIP_WITHOUT_CUDA_KERNELS();
  for (const int64_t columns : {1, 45, 128, 256}) {
    const int64_t rows = 203, width = 300;
    auto generator = at::make_generator<at::CPUGeneratorImpl>(60 + columns);
    const auto wide = torch::randn({rows, width}, generator);
    const auto scale = torch::rand({rows, width}, generator) * 0.05 + 0.02;
    const auto zero = torch::randint(0, 16, {rows, width}, generator).to(torch::kFloat);
    const auto upper = (torch::randn({width, width}, generator) * 0.1).triu(1) +
                       torch::diag(torch::rand({width}, generator) + 0.5);
    const auto batch = [&](const torch::Tensor& tensor) { return tensor.slice(1, 3, 3 + columns); };
    const auto square = upper.slice(0, 3, 3 + columns).slice(1, 3, 3 + columns);
    const auto [levels, errors] = gptq_sweep_block(batch(wide), batch(scale), batch(zero), square, 15);
    const auto [cuda_levels, cuda_errors] = gptq_sweep_block(batch(wide.cuda()), batch(scale.cuda()),
                                                             batch(zero.cuda()), square.cuda(), 15);
    EXPECT_TRUE(torch::equal(cuda_levels.cpu(), levels)) << columns << " columns";
    EXPECT_TRUE(torch::equal(cuda_errors.cpu(), errors)) << columns << " columns";
  }
}

}  // namespace
}  // namespace duquant::ops
