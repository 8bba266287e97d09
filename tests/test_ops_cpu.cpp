// Tests of the operator library's CPU side: int4 packing, the layout helpers, and the CPU reference
// kernel of duquant::w4a8_linear (include/duquant/ops.h) against an independent computation in
// the test: activations quantized with the formula of ops.h, weights dequantized from the unpacked
// levels, products summed in float64.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/csrc/jit/runtime/operator.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <iostream>
#include <string>
#include <tuple>
#include <vector>

#include "activation_reuse.h"
#include "duquant/ops.h"
#include "fma_kernels_cpu.h"
#include "int8_weight_levels.h"
#include "operator_settings.h"
#include "test_support.h"
#include "w4a8_cpu_reference.h"
#include "w4a8_layout.h"

namespace {

using duquant::ops::apply_online_transform;
using duquant::ops::pack_int4;
using duquant::ops::unpack_int4;
namespace layout = duquant::layout;
namespace cpu_reference = duquant::ops::cpu_reference;
namespace cpu = duquant::ops::cpu;
namespace ops = duquant::ops;

// One quantized layer in the argument form of w4a8_linear, plus the unpacked levels the test
// dequantizes on its own.
struct Layer {
  int64_t in_features = 0;
  int64_t padded_in_features = 0;
  int64_t out_features = 0;
  int64_t group_size = 0;
  torch::Tensor smooth_inv, rotation1, permutation, rotation2;
  torch::Tensor levels;  // uint8 [N, K]
  torch::Tensor packed, scale, zero, bias;
};

struct LayerSpec {
  int64_t in_features = 100;
  int64_t out_features = 24;
  int64_t group_size = 0;
  int64_t block = 0;  // rotation block; 0: no smoothing, rotation or permutation
  bool bias = false;
};

torch::Tensor random_orthogonal(int64_t size) {
  return std::get<0>(torch::linalg_qr(torch::randn({size, size}, torch::kDouble))).to(torch::kFloat);
}

Layer make_layer(const LayerSpec& spec) {
  Layer layer;
  layer.in_features = spec.in_features;
  layer.out_features = spec.out_features;
  layer.group_size = spec.group_size;
  layer.padded_in_features = layout::padded_in_features(spec.in_features, spec.block);
  const int64_t k = layer.padded_in_features;
  const int64_t groups = spec.group_size > 0 ? k / spec.group_size : 1;
  const auto empty = torch::empty({0});
  layer.smooth_inv = layer.rotation1 = layer.permutation = layer.rotation2 = layer.bias = empty;
  if (spec.block > 0) {
    layer.smooth_inv = torch::rand({spec.in_features}) * 1.5 + 0.25;
    layer.rotation1 = random_orthogonal(spec.block);
    layer.permutation = torch::randperm(k, torch::kLong);
    layer.rotation2 = random_orthogonal(spec.block);
  }
  layer.levels = torch::randint(0, layout::kWeightMaxLevel + 1, {spec.out_features, k}, torch::kUInt8);
  layer.packed = pack_int4(layer.levels);
  layer.scale = torch::rand({spec.out_features, groups}) * 0.02 + 0.001;
  layer.zero = torch::randint(0, layout::kWeightMaxLevel + 1, {spec.out_features, groups}).to(torch::kFloat);
  if (spec.bias) layer.bias = torch::randn({spec.out_features});
  return layer;
}

// Activations with a few outlier channels, as DuQuant expects (DESIGN.md section 4).
torch::Tensor outlier_activations(std::vector<int64_t> sizes) {
  auto x = torch::randn(sizes);
  x.select(-1, 3).mul_(20.0);
  x.select(-1, x.size(-1) - 1).mul_(-12.0);
  return x;
}

torch::Tensor run_op(const Layer& layer, const torch::Tensor& x, int64_t act_bits = 8, double act_clip = 1.0) {
  return duquant::ops::w4a8_linear(x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2,
                                   layer.packed, layer.scale, layer.zero, layer.bias, layer.in_features,
                                   layer.group_size, act_bits, act_clip);
}

// Per-token scale of ops.h step 6, written out in scalar fp32: clip * max|x| / qmax, 1 for a zero row.
torch::Tensor reference_token_scale(const torch::Tensor& transformed, int64_t act_bits, double act_clip) {
  const auto absmax = transformed.abs().amax(1).contiguous();
  auto scale = torch::empty_like(absmax);
  const float qmax = static_cast<float>(layout::activation_max_level(static_cast<int>(act_bits)));
  for (int64_t t = 0; t < absmax.size(0); ++t) {
    const float value = static_cast<float>(act_clip) * absmax[t].item<float>() / qmax;
    scale[t] = value == 0.0f ? 1.0f : value;
  }
  return scale;
}

// q of ops.h step 6 from torch ops: round half to even, clamp to +-qmax.
torch::Tensor reference_quantized(const torch::Tensor& transformed, const torch::Tensor& token_scale, int64_t act_bits) {
  const double qmax = layout::activation_max_level(static_cast<int>(act_bits));
  return (transformed / token_scale.unsqueeze(1)).round().clamp(-qmax, qmax);
}

// y of ops.h in float64 from the same integers: (scale_t q) @ (weight_scale (w - zero))^T + bias.
torch::Tensor reference_output(const Layer& layer, const torch::Tensor& x, int64_t act_bits = 8, double act_clip = 1.0) {
  const auto tokens = x.reshape({-1, layer.in_features}).to(torch::kFloat);
  const auto transformed = apply_online_transform(tokens, layer.smooth_inv, layer.rotation1, layer.permutation,
                                                  layer.rotation2, layer.padded_in_features);
  torch::Tensor activations = transformed.to(torch::kDouble);
  if (act_bits > 0) {
    const auto token_scale = reference_token_scale(transformed, act_bits, act_clip);
    activations = reference_quantized(transformed, token_scale, act_bits).to(torch::kDouble) *
                  token_scale.to(torch::kDouble).unsqueeze(1);
  }
  const int64_t n = layer.out_features, k = layer.padded_in_features;
  const int64_t group_length = layer.group_size > 0 ? layer.group_size : k;
  const auto weight = ((layer.levels.to(torch::kDouble).view({n, -1, group_length}) -
                        layer.zero.to(torch::kDouble).unsqueeze(2)) *
                       layer.scale.to(torch::kDouble).unsqueeze(2))
                          .view({n, k});
  auto y = torch::matmul(activations, weight.t());
  if (layer.bias.numel() > 0) y = y + layer.bias.to(torch::kDouble);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return y.view(sizes);
}

// max |actual - expected| <= relative * max |expected| (fp32 epilogue rounding is ~1e-7 of that).
void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, double relative = 1e-5) {
  ASSERT_EQ(actual.sizes(), expected.sizes());
  const auto difference = (actual.to(torch::kDouble) - expected.to(torch::kDouble)).abs().max().item<double>();
  const auto magnitude = expected.to(torch::kDouble).abs().max().item<double>();
  EXPECT_LE(difference, relative * magnitude) << "max |difference| " << difference << " for max |expected| " << magnitude;
}

void expect_error_mentions(const std::function<void()>& call, const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << "no error; expected one mentioning \"" << fragment << "\"";
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    EXPECT_NE(message.find(fragment), std::string::npos) << "message: " << message;
  }
}

// ---------------------------------------------------------------------------------------------
// Packing and layout

TEST(Int4Packing, RoundTripsRandomLevels) {
  torch::manual_seed(1);
  for (int64_t k : {2, 32, 100, 4304}) {
    const auto levels = torch::randint(0, layout::kWeightMaxLevel + 1, {7, k}, torch::kUInt8);
    const auto packed = pack_int4(levels);
    ASSERT_EQ(packed.sizes(), (std::vector<int64_t>{7, layout::packed_row_bytes(k)}));
    EXPECT_TRUE(torch::equal(unpack_int4(packed), levels)) << "K = " << k;
  }
}

TEST(Int4Packing, LowNibbleHoldsEvenK) {
  const auto levels = torch::tensor({3, 10}, torch::kUInt8).view({1, 2});
  const auto packed = pack_int4(levels);
  ASSERT_EQ(packed.numel(), 1);
  EXPECT_EQ(packed.item<uint8_t>(), 0xA3);
  EXPECT_TRUE(torch::equal(unpack_int4(packed), levels));
}

TEST(W4A8Layout, PaddedInFeatures) {
  // {in_features, block, padded}: K is a multiple of 32 and of the rotation block.
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> cases = {
      {32, 0, 32},     {33, 0, 64},     {100, 0, 128},    {1152, 0, 1152},   {4304, 0, 4320},
      {32, 16, 32},    {33, 16, 64},    {100, 16, 128},   {1152, 16, 1152},  {4304, 16, 4320},
      {32, 128, 128},  {33, 128, 128},  {100, 128, 128},  {1152, 128, 1152}, {4304, 128, 4352}};
  for (const auto& [in_features, block, padded] : cases) {
    EXPECT_EQ(layout::padded_in_features(in_features, block), padded) << in_features << " in blocks of " << block;
  }
}

TEST(W4A8Layout, PackedByteIndexAndNibbles) {
  EXPECT_EQ(layout::packed_row_bytes(64), 32);
  EXPECT_EQ(layout::packed_byte_index(0, 0, 64), 0);
  EXPECT_EQ(layout::packed_byte_index(0, 1, 64), 0);
  EXPECT_EQ(layout::packed_byte_index(2, 5, 64), 2 * 32 + 2);
  EXPECT_EQ(layout::nibble_shift(4), 0);
  EXPECT_EQ(layout::nibble_shift(5), 4);
  EXPECT_EQ(layout::unpack_level(0xA3, 0), 3);
  EXPECT_EQ(layout::unpack_level(0xA3, 1), 10);
  EXPECT_EQ(layout::activation_max_level(8), 127);
  EXPECT_EQ(layout::activation_max_level(4), 7);
}

// ---------------------------------------------------------------------------------------------
// Pieces of the kernel

TEST(OnlineTransformOp, MatchesDenseFormula) {
  torch::manual_seed(2);
  const int64_t in_features = 100, block = 32, k = layout::padded_in_features(in_features, block);
  const Layer layer = make_layer({in_features, 8, 0, block, false});
  const auto x = outlier_activations({2, 3, in_features});
  // Dense T = diag(smooth_inv, 0) (I kron R1) P (I kron R2) in float64, P[perm[i], i] = 1.
  const auto eye_blocks = torch::eye(k / block, torch::kDouble);
  auto permutation_matrix = torch::zeros({k, k}, torch::kDouble);
  permutation_matrix.index_put_({layer.permutation, torch::arange(k)}, 1.0);
  const auto smoothing = torch::diag(torch::constant_pad_nd(layer.smooth_inv.to(torch::kDouble), {0, k - in_features}));
  // QR returns column-major Q (the op must accept that); torch::kron needs contiguous factors.
  const auto dense = smoothing.matmul(torch::kron(eye_blocks, layer.rotation1.to(torch::kDouble).contiguous()))
                         .matmul(permutation_matrix)
                         .matmul(torch::kron(eye_blocks, layer.rotation2.to(torch::kDouble).contiguous()));
  const auto expected = torch::constant_pad_nd(x.to(torch::kDouble), {0, k - in_features}).matmul(dense);

  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("duquant::online_transform", "")
                             .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                                  const torch::Tensor&, const torch::Tensor&, int64_t)>();
  const auto actual = op.call(x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2, k);
  EXPECT_EQ(actual.scalar_type(), torch::kFloat);
  expect_close(actual, expected);
}

// x @ w^T as fma_kernels_cpu.h defines it: k in blocks of `block`, each block one FMA chain in k
// order from zero, the blocks' sums added in order. One block of b is rotate_rows' single chain.
torch::Tensor fma_chain_product(const torch::Tensor& x, const torch::Tensor& w, int64_t block) {
  const auto left = x.contiguous(), right = w.contiguous();
  const int64_t t = left.size(0), n = right.size(0), k = left.size(1);
  auto out = torch::empty({t, n}, torch::kFloat);
  const float *a = left.data_ptr<float>(), *b = right.data_ptr<float>();
  float* result = out.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t start = 0; start < k; start += block) {
        float chain = 0.0f;
        for (int64_t kk = start; kk < std::min(k, start + block); ++kk) {
          chain = std::fma(a[i * k + kk], b[j * k + kk], chain);
        }
        sum = start == 0 ? chain : sum + chain;
      }
      result[i * n + j] = sum;
    }
  }
  return out;
}

std::string isa_name(cpu::VectorIsa isa) { return isa == cpu::VectorIsa::Avx512 ? "AVX-512" : "AVX2"; }

// Every instruction set the kernels have that this CPU runs (an AVX-512 CPU runs the AVX2 path too).
std::vector<cpu::VectorIsa> supported_isas() {
  switch (cpu::best_vector_isa()) {
    case cpu::VectorIsa::Avx512:
      return {cpu::VectorIsa::Avx2Fma, cpu::VectorIsa::Avx512};
    case cpu::VectorIsa::Avx2Fma:
      return {cpu::VectorIsa::Avx2Fma};
    case cpu::VectorIsa::None:
      break;
  }
  return {};
}

// Every tile shape (full tiles, each remainder, several tasks) on every instruction set the CPU
// has: a row's result is its own FMA chain, so it cannot depend on the rows rotated with it.
TEST(RotateRows, EveryEntryIsOneFmaChainInKOrderWhateverTheRowCount) {
  const auto isas = supported_isas();
  if (isas.empty()) GTEST_SKIP() << "this CPU has neither AVX-512 nor AVX2 + FMA";
  torch::manual_seed(11);
  for (const auto isa : isas) {
    for (int64_t b : {32, 64, 128}) {
      const auto rotation = std::get<0>(torch::linalg_qr(torch::randn({b, b}, torch::kDouble))).to(torch::kFloat);
      for (int64_t count : {1, 5, 7, 8, 13, 64, 67, 200}) {
        SCOPED_TRACE(isa_name(isa) + ", b = " + std::to_string(b) + ", " + std::to_string(count) + " rows");
        const auto rows = torch::randn({count, b}) * torch::exp(2.0 * torch::randn({count, 1}));
        auto out = torch::full({count, b}, std::nanf(""));
        ASSERT_TRUE(cpu::rotate_rows(out.data_ptr<float>(), rows.data_ptr<float>(), count,
                                     rotation.contiguous().data_ptr<float>(), b, isa));
        EXPECT_TRUE(torch::equal(out, fma_chain_product(rows, rotation.t(), b)));
      }
    }
  }
}

// The public entry point on every path: the kernel (float32, b a multiple of 32, a column-major
// rotation as QR returns it), the at::mm fallback (b = 16, float64), and no rows at all.
TEST(RotateRows, IsTheMatrixProductOnEveryPath) {
  torch::manual_seed(12);
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    for (int64_t b : {16, 128}) {
      for (int64_t count : {0, 3, 300}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + ", b = " + std::to_string(b) + ", " +
                     std::to_string(count) + " rows");
        const auto rotation = std::get<0>(torch::linalg_qr(torch::randn({b, b}, torch::kDouble))).to(dtype);
        const auto rows = torch::randn({count, b}, dtype);
        const auto out = ops::rotate_rows(rows, rotation);
        EXPECT_EQ(out.scalar_type(), dtype);
        EXPECT_EQ(out.sizes(), rows.sizes());
        if (count > 0) expect_close(out, rows.to(torch::kDouble).matmul(rotation.to(torch::kDouble)));
      }
    }
  }
  const auto rows = torch::randn({4, 32});
  const auto rotation = torch::eye(32);
  EXPECT_THROW(ops::rotate_rows(rows, torch::eye(16)), c10::Error);
  EXPECT_THROW(ops::rotate_rows_out(torch::empty({4, 16}), rows, rotation), c10::Error);
  EXPECT_THROW(ops::rotate_rows_out(torch::empty({32, 4}).t(), rows, rotation), c10::Error);
}

// Full and remainder tiles (t), full and narrow panels (n), one, several and a partial k block,
// whole and partial 16 x 16 transposes of the packing, and (t = 600) several groups of panels per
// thread.
TEST(MultiplyByTranspose, SumsEachKBlockAsOneFmaChainThenAddsTheBlocksInOrder) {
  const auto isas = supported_isas();
  if (isas.empty()) GTEST_SKIP() << "this CPU has neither AVX-512 nor AVX2 + FMA";
  torch::manual_seed(13);
  for (const auto isa : isas) {
    for (const auto& [t, k, n] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 1, 1}, {9, 100, 33}, {25, 192, 64}, {31, 500, 70}, {179, 1024, 96}, {600, 400, 1000}}) {
      SCOPED_TRACE(isa_name(isa) + ", [" + std::to_string(t) + ", " + std::to_string(k) + "] x [" +
                   std::to_string(n) + ", " + std::to_string(k) + "]^T");
      const auto x = torch::randn({t, k}) * torch::exp(torch::randn({t, 1}));
      const auto w = torch::randn({n, k});
      auto out = torch::full({t, n}, std::nanf(""));
      ASSERT_TRUE(cpu::multiply_by_transpose(out.data_ptr<float>(), x.data_ptr<float>(), t, w.data_ptr<float>(), n,
                                             k, isa));
      EXPECT_TRUE(torch::equal(out, fma_chain_product(x, w, cpu::kProductBlock)));
    }
  }
}

TEST(MultiplyByTranspose, IsTheLinearOutputOnEveryPath) {
  torch::manual_seed(14);
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes{{0, 64, 8}, {5, 0, 3}, {40, 300, 50}};
    for (const auto& [t, k, n] : shapes) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + ", [" + std::to_string(t) + ", " + std::to_string(k) +
                   "] x [" + std::to_string(n) + ", " + std::to_string(k) + "]^T");
      const auto x = torch::randn({t, k}, dtype), w = torch::randn({n, k}, dtype);
      // A transposed view as the weight: the entry point must read it as [n, k].
      const auto out = ops::multiply_by_transpose(x, w.t().contiguous().t());
      EXPECT_EQ(out.scalar_type(), dtype);
      ASSERT_EQ(out.sizes(), (std::vector<int64_t>{t, n}));
      if (t > 0 && k > 0) expect_close(out, x.to(torch::kDouble).matmul(w.to(torch::kDouble).t()));
      if (k == 0) EXPECT_TRUE(torch::equal(out, torch::zeros({t, n}, dtype)));
    }
  }
  EXPECT_THROW(ops::multiply_by_transpose(torch::randn({4, 8}), torch::randn({3, 9})), c10::Error);
}

TEST(QuantizeActivations, MatchesOpsFormula) {
  torch::manual_seed(3);
  const auto transformed = outlier_activations({5, 128});
  transformed[2].zero_();
  for (int64_t act_bits : {8, 4}) {
    for (double act_clip : {1.0, 0.8}) {
      for (int64_t group_size : {0, 32}) {
        SCOPED_TRACE("act_bits " + std::to_string(act_bits) + " clip " + std::to_string(act_clip) + " group " +
                     std::to_string(group_size));
        const auto result = cpu_reference::quantize_activations(transformed, act_bits, act_clip, group_size);
        const auto scale = reference_token_scale(transformed, act_bits, act_clip);
        const auto quantized = reference_quantized(transformed, scale, act_bits);
        EXPECT_TRUE(torch::equal(result.scale, scale));
        EXPECT_EQ(result.scale[2].item<float>(), 1.0f);  // all-zero row
        EXPECT_TRUE(torch::equal(result.values, quantized.to(torch::kInt8)));
        const int64_t group_length = group_size > 0 ? group_size : 128;
        const auto sums = quantized.view({5, -1, group_length}).sum(2).to(torch::kInt);
        EXPECT_TRUE(torch::equal(result.group_sum, sums));
      }
    }
  }
}

TEST(QuantizeActivations, OpKeepsLeadingDimensionsAndSumsPerToken) {
  torch::manual_seed(4);
  const auto x = outlier_activations({2, 3, 64});
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("duquant::quantize_activations", "")
                             .typed<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>(const torch::Tensor&,
                                                                                            int64_t, double)>();
  const auto [values, scale, row_sum] = op.call(x, 8, 0.9);
  const auto direct = cpu_reference::quantize_activations(x.view({6, 64}), 8, 0.9, 0);
  EXPECT_TRUE(torch::equal(values, direct.values.view({2, 3, 64})));
  EXPECT_TRUE(torch::equal(scale, direct.scale.view({2, 3})));
  EXPECT_TRUE(torch::equal(row_sum, values.sum(-1).to(torch::kInt)));
}

TEST(IntegerGroupDotProducts, ExactBeyondFp32IntegerRange) {
  torch::manual_seed(5);
  // {K, group_size}: one accumulator over 16384 k (two exact fp32 pieces), and groups of 9024 k
  // (each split in two) -- both longer than the 8738 terms one fp32 sum holds exactly.
  for (const auto& [k, group_size] : std::vector<std::pair<int64_t, int64_t>>{{16384, 0}, {18048, 9024}}) {
    SCOPED_TRACE("K " + std::to_string(k) + " group " + std::to_string(group_size));
    auto quantized = torch::randint(-128, 128, {3, k}, torch::kInt8);
    quantized[0].fill_(127);  // extreme token: sums near 127 * 15 * K, far above 2^24
    auto levels = torch::randint(0, layout::kWeightMaxLevel + 1, {4, k}, torch::kUInt8);
    levels[0].fill_(layout::kWeightMaxLevel);
    levels[0].slice(0, 0, 3).fill_(layout::kWeightMaxLevel - 1);
    const int64_t group_length = group_size > 0 ? group_size : k;
    const auto expected =
        (quantized.to(torch::kLong).unsqueeze(1) * levels.to(torch::kLong).unsqueeze(0)).view({3, 4, -1, group_length}).sum(-1);
    // The extreme entry is odd and above 2^24: no fp32 value equals it.
    const int64_t extreme = expected[0][0][0].item<int64_t>();
    ASSERT_GT(extreme, int64_t{1} << 24);
    ASSERT_EQ(extreme % 2, 1);
    const auto actual = cpu_reference::integer_group_dot_products(quantized, pack_int4(levels), group_size);
    EXPECT_EQ(actual.scalar_type(), torch::kInt);
    EXPECT_TRUE(torch::equal(actual.to(torch::kLong), expected));
  }
}

// ---------------------------------------------------------------------------------------------
// The op against the float64 reference

struct OpCase {
  std::string name;
  LayerSpec layer;
  int64_t act_bits = 8;
};

class W4A8LinearCpuMatchesReference : public ::testing::TestWithParam<OpCase> {};

TEST_P(W4A8LinearCpuMatchesReference, OnTwoDimensionalInput) {
  torch::manual_seed(6);
  const auto& param = GetParam();
  const Layer layer = make_layer(param.layer);
  auto x = outlier_activations({9, param.layer.in_features});
  const auto actual = run_op(layer, x, param.act_bits);
  EXPECT_EQ(actual.scalar_type(), torch::kFloat);
  expect_close(actual, reference_output(layer, x, param.act_bits));
}

INSTANTIATE_TEST_SUITE_P(
    Layers, W4A8LinearCpuMatchesReference,
    ::testing::Values(
        // in_features 100 pads to K = 128 in every case below (layout::padded_in_features).
        OpCase{"PerChannelNoTransform", {100, 24, 0, 0, false}},
        OpCase{"PerChannelNoTransformBias", {100, 24, 0, 0, true}},
        OpCase{"Group32NoTransform", {100, 24, 32, 0, false}},
        OpCase{"Group64NoTransformBias", {100, 24, 64, 0, true}},
        OpCase{"PerChannelTransform", {100, 24, 0, 32, false}},
        OpCase{"PerChannelTransformBias", {100, 24, 0, 32, true}},
        OpCase{"Group32TransformBias", {100, 24, 32, 64, true}},
        OpCase{"Group64Transform", {100, 24, 64, 16, false}},
        OpCase{"AlignedBlock128Group64", {256, 40, 64, 128, true}},
        OpCase{"FourBitActivations", {100, 24, 32, 32, true}, 4},
        OpCase{"PerChannelK16384", {16384, 16, 0, 0, true}},
        OpCase{"Group9024K18048", {18048, 8, 9024, 0, false}}),
    [](const ::testing::TestParamInfo<OpCase>& info) { return info.param.name; });

TEST(W4A8LinearCpu, ThreeDimensionalInput) {
  torch::manual_seed(7);
  const Layer layer = make_layer({100, 24, 32, 32, true});
  const auto x = outlier_activations({2, 3, 100});
  const auto actual = run_op(layer, x);
  ASSERT_EQ(actual.sizes(), (std::vector<int64_t>{2, 3, 24}));
  expect_close(actual, reference_output(layer, x));
  EXPECT_TRUE(torch::equal(actual.view({6, 24}), run_op(layer, x.view({6, 100}))));
}

TEST(W4A8LinearCpu, Bfloat16InputGivesBfloat16Output) {
  torch::manual_seed(8);
  const Layer layer = make_layer({100, 24, 0, 32, true});
  const auto x = outlier_activations({4, 100}).to(torch::kBFloat16);
  const auto actual = run_op(layer, x);
  EXPECT_EQ(actual.scalar_type(), torch::kBFloat16);
  // bf16 keeps 8 significant bits: allow one bf16 rounding of the float64 value.
  expect_close(actual, reference_output(layer, x), 1.0 / 128);
  // The kernel computes in fp32 and rounds once at the end: identical to the fp32 call on the same values.
  EXPECT_TRUE(torch::equal(actual, run_op(layer, x.to(torch::kFloat)).to(torch::kBFloat16)));
}

TEST(W4A8LinearCpu, ZeroPointCorrectionExactBeyondFp32IntegerRange) {
  // x = 1 everywhere quantizes to q = 127; w = 15 except three k at 14, zero point 15: the int32
  // sum is 127 * (15 K - 3) = 31211139 (odd, > 2^24, not an fp32 value) and the corrected sum
  // acc - 15 * row_sum = -381. An accumulation that rounded by even 1 would be off by 1/381.
  const int64_t k = 16384;
  Layer layer = make_layer({k, 1, 0, 0, false});
  layer.levels.fill_(layout::kWeightMaxLevel);
  layer.levels[0].slice(0, 0, 3).fill_(layout::kWeightMaxLevel - 1);
  layer.packed = pack_int4(layer.levels);
  layer.scale.fill_(1.0f);
  layer.zero.fill_(static_cast<float>(layout::kWeightMaxLevel));
  const auto x = torch::ones({1, k});
  const float token_scale = 1.0f / 127.0f;
  const double expected = static_cast<double>(token_scale) * -381.0;
  EXPECT_NEAR(run_op(layer, x).item<float>(), expected, 1e-6 * std::abs(expected));
  expect_close(run_op(layer, x), reference_output(layer, x));
}

TEST(W4A8LinearCpu, UnquantizedActivationsUseFloatMatmul) {
  torch::manual_seed(9);
  const Layer layer = make_layer({100, 24, 32, 32, true});
  const auto x = outlier_activations({6, 100});
  for (int64_t act_bits : {0, -1}) {
    const auto actual = run_op(layer, x, act_bits);
    expect_close(actual, reference_output(layer, x, act_bits));
    // ... and differs from the 8-bit result: the activation quantization is really skipped.
    EXPECT_FALSE(torch::allclose(actual, run_op(layer, x, 8), 1e-6, 1e-6));
  }
}

TEST(W4A8LinearCpu, ActClipBelowOneClampsOutliers) {
  torch::manual_seed(10);
  const Layer layer = make_layer({100, 24, 0, 0, true});
  const auto x = outlier_activations({6, 100});
  const auto transformed = apply_online_transform(x, layer.smooth_inv, layer.rotation1, layer.permutation,
                                                  layer.rotation2, layer.padded_in_features);
  const auto clipped = cpu_reference::quantize_activations(transformed, 8, 0.5, 0);
  // With half the range every |x| >= max|x| / 2 of a token lands on +-127, the token's maximum at 2 * 127.
  const auto beyond_clip = transformed.abs() >= 0.5 * transformed.abs().amax(1, /*keepdim=*/true);
  EXPECT_TRUE((clipped.values.abs() == 127).masked_select(beyond_clip).all().item<bool>());
  expect_close(run_op(layer, x, 8, 0.5), reference_output(layer, x, 8, 0.5));
  EXPECT_FALSE(torch::allclose(run_op(layer, x, 8, 0.5), run_op(layer, x, 8, 1.0), 1e-3, 1e-3));
}

TEST(W4A8LinearCpu, AllZeroTokenGivesExactlyTheBias) {
  torch::manual_seed(11);
  const Layer layer = make_layer({100, 24, 32, 32, true});
  auto x = outlier_activations({3, 100});
  x[1].zero_();
  const auto actual = run_op(layer, x);
  EXPECT_TRUE(torch::equal(actual[1], layer.bias));
  EXPECT_TRUE(actual.isfinite().all().item<bool>());
}

TEST(W4A8LinearCpu, RejectsBadArgumentsWithNamedProblem) {
  torch::manual_seed(12);
  const Layer good = make_layer({100, 24, 32, 32, true});
  const auto x = outlier_activations({2, 100});
  auto call_with = [&](const std::function<void(Layer&, torch::Tensor&, int64_t&, double&)>& edit) {
    return [&, edit] {
      Layer layer = good;
      torch::Tensor input = x;
      int64_t act_bits = 8;
      double act_clip = 1.0;
      edit(layer, input, act_bits, act_clip);
      run_op(layer, input, act_bits, act_clip);
    };
  };
  expect_error_mentions(call_with([](Layer&, torch::Tensor& input, int64_t&, double&) { input = torch::randn({2, 99}); }),
                        "x's last dimension is 99 but in_features is 100");
  expect_error_mentions(
      call_with([](Layer&, torch::Tensor& input, int64_t&, double&) { input = torch::ones({2, 100}, torch::kInt); }),
      "x must be a floating-point tensor");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) { layer.group_size = 48; }),
                        "group_size 48 does not divide the padded in_features K = 128");
  expect_error_mentions(
      call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) { layer.permutation = torch::randperm(100); }),
      "permutation has length 100 but the padded in_features K is 128");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) {
                          layer.permutation = torch::arange(128).to(torch::kFloat);
                        }),
                        "permutation must be an integer vector");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) {
                          layer.permutation = torch::arange(1, 129);
                        }),
                        "permutation has entries outside 0..127");
  expect_error_mentions(
      call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) { layer.rotation1 = random_orthogonal(48); }),
      "rotation1 block 48 does not divide the padded in_features K = 128");
  expect_error_mentions(
      call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) { layer.rotation2 = torch::randn({32, 16}); }),
      "rotation2 must be a square floating-point");
  expect_error_mentions(
      call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) { layer.smooth_inv = torch::ones({128}); }),
      "smooth_inv must be a floating-point [in_features = 100]");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) {
                          layer.packed = layer.packed.to(torch::kInt);
                        }),
                        "packed_weight must be uint8");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) {
                          layer.packed = layer.packed.slice(1, 0, 40);
                        }),
                        "packed_weight holds K = 80 input features, fewer than in_features 100");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) {
                          layer.packed = torch::zeros({24, 60}, torch::kUInt8);
                        }),
                        "K = 120 of packed_weight is not a multiple of 32");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) {
                          layer.scale = layer.scale.to(torch::kDouble);
                        }),
                        "weight_scale must be float32 [out_features, groups] = [24, 4]");
  expect_error_mentions(
      call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) { layer.zero = layer.zero.slice(1, 0, 1); }),
      "weight_zero must be float32 [out_features, groups] = [24, 4]");
  expect_error_mentions(call_with([](Layer& layer, torch::Tensor&, int64_t&, double&) { layer.bias = torch::ones({23}); }),
                        "bias must be a floating-point [out_features = 24]");
  expect_error_mentions(call_with([](Layer&, torch::Tensor&, int64_t& act_bits, double&) { act_bits = 9; }),
                        "act_bits 9 is outside 2..8");
  expect_error_mentions(call_with([](Layer&, torch::Tensor&, int64_t&, double& act_clip) { act_clip = 0.0; }),
                        "act_clip must be a positive finite ratio");
}

// ---------------------------------------------------------------------------------------------
// Registration

TEST(W4A8LinearRegistration, SchemaIsTheOneOfOpsHeader) {
  const auto& handle = c10::Dispatcher::singleton().findSchemaOrThrow("duquant::w4a8_linear", "");
  EXPECT_EQ(c10::toString(handle.schema()),
            "duquant::w4a8_linear(Tensor x, Tensor smooth_inv, Tensor rotation1, Tensor permutation, "
            "Tensor rotation2, Tensor packed_weight, Tensor weight_scale, Tensor weight_zero, Tensor bias, "
            "int in_features, int group_size, int act_bits, float act_clip) -> Tensor");
}

TEST(W4A8LinearRegistration, DispatcherAndJitOperatorReachTheCpuKernel) {
  torch::manual_seed(13);
  const Layer layer = make_layer({100, 24, 64, 32, true});
  const auto x = outlier_activations({2, 5, 100});
  const auto direct = cpu_reference::w4a8_linear_cpu(x, layer.smooth_inv, layer.rotation1, layer.permutation,
                                                     layer.rotation2, layer.packed, layer.scale, layer.zero,
                                                     layer.bias, layer.in_features, layer.group_size, 8, 1.0);
  EXPECT_TRUE(torch::equal(run_op(layer, x), direct));

  static const auto typed =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("duquant::w4a8_linear", "")
          .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                               const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                               const torch::Tensor&, int64_t, int64_t, int64_t, double)>();
  EXPECT_TRUE(torch::equal(typed.call(x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2,
                                      layer.packed, layer.scale, layer.zero, layer.bias, layer.in_features,
                                      layer.group_size, 8, 1.0),
                           direct));

  // The operator TorchScript resolves ops.duquant.w4a8_linear to, run on an interpreter stack.
  const auto operators = torch::jit::getAllOperatorsFor(c10::Symbol::fromQualString("duquant::w4a8_linear"));
  ASSERT_EQ(operators.size(), 1u);
  torch::jit::Stack stack = {x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2,
                             layer.packed, layer.scale, layer.zero, layer.bias, layer.in_features,
                             layer.group_size, int64_t{8}, 1.0};
  operators.front()->getOperation()(stack);
  ASSERT_EQ(stack.size(), 1u);
  EXPECT_TRUE(torch::equal(stack.front().toTensor(), direct));
}

// ---------------------------------------------------------------------------------------------
// Activation reuse (src/ops/activation_reuse.h): layers that share their input and transform
// (q/k/v, gate/up) compute their int8 activations once.

// Turns reuse on or off ("1" / "0") for the enclosing scope.
class ReuseSetting : public duquant::testing::ScopedEnvironment {
 public:
  explicit ReuseSetting(const char* value) : ScopedEnvironment("DUQUANT_REUSE_ACTIVATIONS", value) {}
};

// Three layers (q, k, v) with one transform: the same four tensors, other weights.
std::vector<Layer> layers_sharing_a_transform(const LayerSpec& spec) {
  std::vector<Layer> layers;
  for (int i = 0; i < 3; ++i) {
    Layer layer = make_layer(spec);
    if (i > 0) {
      layer.smooth_inv = layers[0].smooth_inv;
      layer.rotation1 = layers[0].rotation1;
      layer.permutation = layers[0].permutation;
      layer.rotation2 = layers[0].rotation2;
    }
    layers.push_back(layer);
  }
  return layers;
}

// Outputs of the layers on x, one call each in order, and the calls that reused / computed.
struct GroupRun {
  std::vector<torch::Tensor> outputs;
  int64_t reused = 0;
  int64_t computed = 0;
};
GroupRun run_group(const std::vector<Layer>& layers, const torch::Tensor& x) {
  ops::forget_reusable_activations();
  const auto before = ops::activation_reuse_stats();
  GroupRun run;
  for (const auto& layer : layers) run.outputs.push_back(run_op(layer, x));
  const auto after = ops::activation_reuse_stats();
  run.reused = after.reused - before.reused;
  run.computed = after.computed - before.computed;
  return run;
}

TEST(ActivationReuse, LayersSharingInputAndTransformComputeTheActivationsOnceWithTheSameOutputs) {
  torch::manual_seed(21);
  const auto layers = layers_sharing_a_transform({256, 40, 0, 128, true});
  const auto x = outlier_activations({5, 256});
  const GroupRun shared = run_group(layers, x);
  EXPECT_EQ(shared.computed, 1);
  EXPECT_EQ(shared.reused, 2);
  const ReuseSetting off("0");
  const GroupRun separate = run_group(layers, x);
  EXPECT_EQ(separate.computed, 3);
  EXPECT_EQ(separate.reused, 0);
  for (size_t i = 0; i < layers.size(); ++i) {
    EXPECT_TRUE(torch::equal(shared.outputs[i], separate.outputs[i])) << "layer " << i;
    expect_close(shared.outputs[i], reference_output(layers[i], x));
  }
}

TEST(ActivationReuse, ChangedInputOrTransformIsComputedAgain) {
  torch::manual_seed(22);
  auto layers = layers_sharing_a_transform({256, 40, 64, 128, false});
  auto x = outlier_activations({3, 256});
  // An in-place change of x between two layers of the group.
  ops::forget_reusable_activations();
  run_op(layers[0], x);
  x.mul_(2.0);
  auto before = ops::activation_reuse_stats();
  const auto after_change = run_op(layers[1], x);
  EXPECT_EQ(ops::activation_reuse_stats().computed, before.computed + 1);
  EXPECT_TRUE(torch::equal(after_change, run_op(layers[1], x.clone())));
  // Equal values in another tensor, and an equal transform in other tensors, are not the same.
  ops::forget_reusable_activations();
  run_op(layers[0], x);
  before = ops::activation_reuse_stats();
  run_op(layers[1], x.clone());
  EXPECT_EQ(ops::activation_reuse_stats().computed, before.computed + 1);
  Layer copied = layers[2];
  copied.rotation2 = layers[2].rotation2.clone();
  run_op(layers[1], x);
  before = ops::activation_reuse_stats();
  run_op(copied, x);
  EXPECT_EQ(ops::activation_reuse_stats().computed, before.computed + 1);
  // An in-place change of a transform tensor (its version moves even if its values do not).
  run_op(layers[0], x);
  layers[0].rotation1.mul_(1.0);
  before = ops::activation_reuse_stats();
  run_op(layers[1], x);
  EXPECT_EQ(ops::activation_reuse_stats().computed, before.computed + 1);
  // Other activation settings.
  before = ops::activation_reuse_stats();
  run_op(layers[1], x, /*act_bits=*/6);
  run_op(layers[1], x, /*act_bits=*/6, /*act_clip=*/0.9);
  EXPECT_EQ(ops::activation_reuse_stats().computed, before.computed + 2);
}

// Skipped steps are empty tensors, a different one in every layer: they still match.
TEST(ActivationReuse, SkippedStepsMatchWhateverEmptyTensorStandsForThem) {
  torch::manual_seed(23);
  std::vector<Layer> layers = {make_layer({100, 24}), make_layer({100, 16})};
  layers[1].permutation = torch::empty({0}, torch::kLong);
  ASSERT_FALSE(layers[0].rotation1.is_same(layers[1].rotation1));
  const GroupRun run = run_group(layers, outlier_activations({4, 100}));
  EXPECT_EQ(run.computed, 1);
  EXPECT_EQ(run.reused, 1);
}

// Inference tensors keep no version counter, so an in-place change could not be seen: never reused.
TEST(ActivationReuse, InferenceTensorsAreAlwaysComputed) {
  torch::manual_seed(24);
  const auto layers = layers_sharing_a_transform({256, 40, 0, 128, false});
  const c10::InferenceMode inference;
  const GroupRun run = run_group(layers, outlier_activations({2, 256}));
  EXPECT_EQ(run.computed, 3);
  EXPECT_EQ(run.reused, 0);
}

// The CUDA op passes its rotation path (the paths differ by rounding ties): a call on another
// path computes its own activations.
TEST(ActivationReuse, AnotherPathComputesItsOwnActivations) {
  torch::manual_seed(26);
  const auto x = outlier_activations({3, 128});
  int computed = 0;
  const auto quantize = [&] {
    ++computed;
    return cpu_reference::quantize_activations(x, 8, 1.0, -1);
  };
  const auto none = torch::empty({0});
  ops::ActivationRequest request{x, none, none, none, none, 128, 128, 8, 1.0};
  ops::forget_reusable_activations();
  ops::reuse_or_quantize(request, quantize);
  ops::reuse_or_quantize(request, quantize);
  EXPECT_EQ(computed, 1);
  request.path = 2;
  ops::reuse_or_quantize(request, quantize);
  EXPECT_EQ(computed, 2);
  ops::forget_reusable_activations();
}

TEST(ActivationReuse, TheSwitchTakesZeroOrOneAndNamesAnythingElse) {
  torch::manual_seed(25);
  const Layer layer = make_layer({100, 24});
  const ReuseSetting bad("yes");
  try {
    run_op(layer, outlier_activations({2, 100}));
    FAIL() << "DUQUANT_REUSE_ACTIVATIONS=yes was accepted";
  } catch (const c10::Error& error) {
    EXPECT_NE(std::string(error.what_without_backtrace()).find("DUQUANT_REUSE_ACTIVATIONS=yes"), std::string::npos);
  }
}

// The CUDA op's two path settings (operator_settings.h) are read here, on any machine; the CUDA
// tests run each path against the CPU. `read` maps the variable to its enum: unset means the
// default, every value names its path (and name_of prints it back), anything else is an error
// naming the variable, the value and the choices.
template <typename Path>
void expect_setting(const char* variable, const std::function<Path()>& read, Path fallback,
                    const std::vector<std::pair<const char*, Path>>& named, const char* choices) {
  {
    const duquant::testing::ScopedEnvironment unset(variable, "");
    EXPECT_EQ(read(), fallback) << variable << " unset";
  }
  for (const auto& [value, path] : named) {
    const duquant::testing::ScopedEnvironment setting(variable, value);
    EXPECT_EQ(read(), path) << variable << "=" << value;
    EXPECT_STREQ(ops::name_of(path), value) << "the name printed for " << variable << "=" << value;
  }
  const duquant::testing::ScopedEnvironment unknown(variable, "CUBLAS");
  const std::string assignment = std::string(variable) + "=CUBLAS";
  try {
    read();
    ADD_FAILURE() << assignment << " was accepted";
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    EXPECT_NE(message.find(assignment), std::string::npos) << message;
    EXPECT_NE(message.find(choices), std::string::npos) << message;
  }
}

TEST(OperatorSettings, TheCudaRotationPathIsReadByNameAndAnUnknownOneIsNamed) {
  using ops::CudaRotationPath;
  expect_setting<CudaRotationPath>("DUQUANT_CUDA_ROTATION", ops::cuda_rotation_path, CudaRotationPath::kCudaCores,
                                   {{"cuda-cores", CudaRotationPath::kCudaCores},
                                    {"tensor-cores", CudaRotationPath::kTensorCores},
                                    {"cublas", CudaRotationPath::kCublas}},
                                   "cuda-cores or tensor-cores or cublas");
}

TEST(OperatorSettings, TheCudaGemmPathIsReadByNameAndAnUnknownOneIsNamed) {
  using ops::CudaGemmPath;
  expect_setting<CudaGemmPath>("DUQUANT_CUDA_GEMM", ops::cuda_gemm_path, CudaGemmPath::kMmaSync,
                               {{"mma-sync", CudaGemmPath::kMmaSync}, {"cublaslt", CudaGemmPath::kCublasLt}},
                               "mma-sync or cublaslt");
}

TEST(OperatorSettings, TheLogLineNamesBothPathsInEffectWithTheirVariables) {
  const duquant::testing::ScopedEnvironment rotation("DUQUANT_CUDA_ROTATION", "cublas");
  const duquant::testing::ScopedEnvironment gemm("DUQUANT_CUDA_GEMM", "");
  EXPECT_EQ(ops::cuda_paths_in_effect(),
            "rotations cublas (DUQUANT_CUDA_ROTATION), integer product mma-sync (DUQUANT_CUDA_GEMM)");
}

// ---------------------------------------------------------------------------------------------
// int8 copies of the packed weights (src/ops/int8_weight_levels.h), which DUQUANT_CUDA_GEMM=cublaslt
// multiplies on the GPU: the tensor-op unpacking the GPU runs is checked here on the CPU.

TEST(Int8WeightLevels, TensorOpUnpackingGivesEveryPackedLevel) {
  torch::manual_seed(31);
  for (const auto& [rows, columns] : {std::pair<int64_t, int64_t>{1, 2}, {7, 96}, {64, 2048}}) {
    const auto levels = torch::randint(0, layout::kWeightMaxLevel + 1, {rows, columns}, torch::kLong).to(torch::kUInt8);
    const auto packed = pack_int4(levels);
    const auto unpacked = ops::unpack_int4_to_int8(packed);
    EXPECT_EQ(unpacked.scalar_type(), torch::kChar);
    EXPECT_TRUE(torch::equal(unpacked, levels.to(torch::kChar))) << rows << " x " << columns;
    EXPECT_TRUE(torch::equal(unpacked, unpack_int4(packed).to(torch::kChar))) << rows << " x " << columns;
  }
}

TEST(Int8WeightLevels, TheCacheKeepsOneCopyPerLiveUnchangedWeight) {
  torch::manual_seed(32);
  ops::forget_cached_int8_levels();
  const auto random_packed = [] {
    return pack_int4(torch::randint(0, layout::kWeightMaxLevel + 1, {16, 64}, torch::kLong).to(torch::kUInt8));
  };
  auto packed = random_packed();
  EXPECT_FALSE(ops::find_cached_int8_levels(packed).defined());
  int unpacked = 0;
  const auto count_unpacking = [&] { ++unpacked; };
  const auto first = ops::cached_int8_levels(packed, count_unpacking);
  EXPECT_TRUE(first.is_same(ops::cached_int8_levels(packed, count_unpacking))) << "a second call unpacks again";
  EXPECT_TRUE(first.is_same(ops::find_cached_int8_levels(packed)));
  EXPECT_EQ(unpacked, 1);
  EXPECT_EQ(ops::cached_int8_levels_entries(), 1);

  // An in-place change is seen: the copy is made again from the new bytes.
  packed.bitwise_xor_(0x11);
  EXPECT_FALSE(ops::find_cached_int8_levels(packed).defined()) << "a changed weight's old copy is still current";
  const auto changed = ops::cached_int8_levels(packed);
  EXPECT_FALSE(changed.is_same(first));
  EXPECT_TRUE(torch::equal(changed, ops::unpack_int4_to_int8(packed)));
  EXPECT_FALSE(torch::equal(changed, first));
  EXPECT_EQ(ops::cached_int8_levels_entries(), 1);

  // A freed weight's entry goes at the next miss, or when the freed ones are dropped.
  for (const bool by_a_miss : {true, false}) {
    {
      const auto other = random_packed();
      ops::cached_int8_levels(other);
      EXPECT_EQ(ops::cached_int8_levels_entries(), 2);
    }
    if (by_a_miss) {
      const auto third = random_packed();
      ops::cached_int8_levels(third);
      EXPECT_EQ(ops::cached_int8_levels_entries(), 2);
    }
    ops::forget_freed_int8_levels();
    EXPECT_EQ(ops::cached_int8_levels_entries(), 1);
  }
  EXPECT_TRUE(changed.is_same(ops::cached_int8_levels(packed)));
  ops::forget_cached_int8_levels();
  EXPECT_EQ(ops::cached_int8_levels_entries(), 0);
}

// ---------------------------------------------------------------------------------------------
// Timing of one LLM MLP-shaped call (DESIGN.md section 3: M ~ 816, 2048 -> 16384). Prints, asserts
// nothing; run with --gtest_also_run_disabled_tests --gtest_filter='*Timing*'.

TEST(W4A8LinearCpuTiming, DISABLED_Llm816x2048To16384) {
  torch::manual_seed(14);
  for (int64_t group_size : {0, 128}) {
    const Layer layer = make_layer({2048, 16384, group_size, 128, false});
    const auto x = outlier_activations({816, 2048});
    run_op(layer, x.slice(0, 0, 8));  // warm-up: thread pool, allocator
    const auto start = std::chrono::steady_clock::now();
    const auto y = run_op(layer, x);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const auto float_start = std::chrono::steady_clock::now();
    const auto y_float = torch::matmul(x, torch::randn({2048, 16384}));
    const double float_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - float_start).count();
    std::cout << "[timing] w4a8_linear CPU [816 x 2048] x [2048 -> 16384], group_size " << group_size << ", "
              << torch::get_num_threads() << " threads: " << seconds << " s (fp32 matmul of the same shape: "
              << float_seconds << " s)\n";
  }
}

}  // namespace
