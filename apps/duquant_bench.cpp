// duquant_bench: times the CUDA W4A8 operator against torch::linear in bf16 (cuBLAS) on the pi0
// layer shapes (DESIGN.md sections 3, 6, 7), in one process with CUDA events, and optionally the
// end-to-end forward latency and peak GPU memory of a bf16 model and its W4A8 version.
//
//   duquant_bench [--tokens 1,16,51,816] [--iterations 200] [--json out.json]
//   duquant_bench --model BF16.pt --quantized W4A8.pt --inputs INPUTS.pt [--method forward]
//
// Per shape and token count it reports the whole op, its two kernels alone (pre-kernel: transform
// + int8 quantization; GEMM: W4A8 tensor-core GEMM + split-K reduction), bf16 linear, the ratio
// op / bf16, and the op's achieved tensor throughput (2 M N K / t), memory throughput (bytes the
// op must move / t) and the larger of the two as a fraction of the H100 SXM peaks of DESIGN.md
// section 6 (1979 dense INT8 TOPS, 3.35 TB/s HBM). Weights and activations are random: only the
// shapes matter for timing. Without a GPU it says so and exits 0.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <CLI/CLI.hpp>
#include <c10/cuda/CUDACachingAllocator.h>
#include <fmt/format.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "duquant/ops.h"
#include "w4a8_cuda.h"
#include "w4a8_layout.h"

namespace {

using duquant::ops::cuda::QuantizedActivations;

// H100 SXM, DESIGN.md section 6.
constexpr double kPeakInt8Tops = 1979.0;
constexpr double kPeakHbmGBps = 3350.0;
constexpr int64_t kRotationBlock = 128;  // DuQuant's default block (DESIGN.md section 4)
constexpr double kActClip = 1.0;
constexpr int64_t kActBits = 8;

struct LayerShape {
  std::string name;
  int64_t in_features;
  int64_t out_features;
};

// DESIGN.md section 3: the 7 projections of one LLM layer and of one expert layer.
const std::vector<LayerShape> kShapes = {
    {"llm.q_proj", 2048, 2048},      {"llm.k_proj", 2048, 256},        {"llm.v_proj", 2048, 256},
    {"llm.o_proj", 2048, 2048},      {"llm.gate_proj", 2048, 16384},   {"llm.up_proj", 2048, 16384},
    {"llm.down_proj", 16384, 2048},  {"expert.q_proj", 1024, 2048},    {"expert.k_proj", 1024, 256},
    {"expert.v_proj", 1024, 256},    {"expert.o_proj", 2048, 1024},    {"expert.gate_proj", 1024, 4096},
    {"expert.up_proj", 1024, 4096},  {"expert.down_proj", 4096, 1024},
};

// Mean time of one call in microseconds: `warmup` untimed calls, then `iterations` calls between
// two CUDA events on the current stream.
double time_us(const std::function<void()>& call, int warmup, int iterations) {
  for (int i = 0; i < warmup; ++i) call();
  at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
  const auto stream = at::cuda::getCurrentCUDAStream();
  start.record(stream);
  for (int i = 0; i < iterations; ++i) call();
  stop.record(stream);
  stop.synchronize();
  return 1000.0 * static_cast<double>(start.elapsed_time(stop)) / iterations;
}

struct Layer {
  torch::Tensor smooth_inv, rotation1, permutation, rotation2, packed_weight, weight_scale, weight_zero, bias;
  int64_t in_features = 0;
  int64_t padded_in_features = 0;
};

torch::Tensor random_orthogonal(int64_t size) {
  return std::get<0>(torch::linalg_qr(torch::randn({size, size}, torch::kDouble))).to(torch::kFloat);
}

Layer random_layer(const LayerShape& shape, const torch::Device& device) {
  Layer layer;
  layer.in_features = shape.in_features;
  layer.padded_in_features = duquant::layout::padded_in_features(shape.in_features, kRotationBlock);
  const int64_t k = layer.padded_in_features, n = shape.out_features;
  layer.smooth_inv = (torch::rand({shape.in_features}) + 0.5).to(device);
  layer.rotation1 = random_orthogonal(kRotationBlock).to(device);
  layer.permutation = torch::randperm(k, torch::kLong).to(device);
  layer.rotation2 = random_orthogonal(kRotationBlock).to(device);
  const auto levels = torch::randint(0, duquant::layout::kWeightMaxLevel + 1, {n, k}, torch::kLong).to(torch::kUInt8);
  layer.packed_weight = duquant::ops::pack_int4(levels).to(device);
  layer.weight_scale = (torch::rand({n, 1}) * 0.01 + 1e-3).to(device);
  layer.weight_zero = torch::full({n, 1}, 8.0f).to(device);
  layer.bias = torch::empty({0}, torch::TensorOptions().device(device));
  return layer;
}

struct Measurement {
  std::string name;
  int64_t in_features, out_features, tokens;
  double w4a8_us, pre_kernel_us, gemm_us, bf16_us;
  double tops, gbps, peak_fraction;
};

Measurement measure(const LayerShape& shape, int64_t tokens, int warmup, int iterations) {
  const torch::Device device(torch::kCUDA);
  const Layer layer = random_layer(shape, device);
  const auto x = torch::randn({tokens, shape.in_features}, torch::TensorOptions().device(device).dtype(torch::kBFloat16));
  const auto weight_bf16 =
      torch::randn({shape.out_features, shape.in_features}, torch::TensorOptions().device(device).dtype(torch::kBFloat16));
  const QuantizedActivations activations = duquant::ops::cuda::fused_quantize_activations(
      x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2, layer.padded_in_features, -1,
      kActBits, kActClip);

  Measurement m{shape.name, shape.in_features, shape.out_features, tokens, 0, 0, 0, 0, 0, 0, 0};
  m.w4a8_us = time_us(
      [&] {
        duquant::ops::w4a8_linear(x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2,
                                  layer.packed_weight, layer.weight_scale, layer.weight_zero, layer.bias,
                                  layer.in_features, -1, kActBits, kActClip);
      },
      warmup, iterations);
  m.pre_kernel_us = time_us(
      [&] {
        duquant::ops::cuda::fused_quantize_activations(x, layer.smooth_inv, layer.rotation1, layer.permutation,
                                                       layer.rotation2, layer.padded_in_features, -1, kActBits,
                                                       kActClip);
      },
      warmup, iterations);
  m.gemm_us = time_us(
      [&] {
        duquant::ops::cuda::w4a8_gemm(activations, layer.packed_weight, layer.weight_scale, layer.weight_zero,
                                      layer.bias, -1, torch::kBFloat16);
      },
      warmup, iterations);
  m.bf16_us = time_us([&] { torch::linear(x, weight_bf16); }, warmup, iterations);

  const double k = static_cast<double>(layer.padded_in_features), n = static_cast<double>(shape.out_features);
  const double t = static_cast<double>(tokens);
  // What the op must move at least: packed weights, scales and zero points, bf16 x in, bf16 y out.
  const double bytes = n * k / duquant::layout::kWeightsPerByte + 2.0 * n * sizeof(float) +
                       t * static_cast<double>(shape.in_features) * 2.0 + t * n * 2.0;
  const double seconds = m.w4a8_us * 1e-6;
  m.tops = 2.0 * t * n * k / seconds / 1e12;
  m.gbps = bytes / seconds / 1e9;
  m.peak_fraction = std::max(m.tops / kPeakInt8Tops, m.gbps / kPeakHbmGBps);
  return m;
}

// ---------------------------------------------------------------------------------------------
// End to end

std::vector<torch::jit::IValue> load_inputs(const std::string& path, const torch::Device& device) {
  auto container = torch::jit::load(path);
  const auto names = container.attr("arg_names").toListRef();
  std::vector<torch::jit::IValue> inputs;
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string buffer = "arg" + std::to_string(i);
    TORCH_CHECK(container.hasattr(buffer), "duquant_bench: ", path, " has no buffer ", buffer, " for input ",
                names[i].toStringRef());
    inputs.emplace_back(container.attr(buffer).toTensor().to(device));
  }
  return inputs;
}

struct EndToEnd {
  std::string label;
  double latency_ms = 0;
  double weights_mib = 0;
  double peak_mib = 0;
};

double allocated_mib(c10::DeviceIndex device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return static_cast<double>(stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current) /
         (1024.0 * 1024.0);
}

EndToEnd run_model(const std::string& label, const std::string& path, const std::vector<torch::jit::IValue>& inputs,
                   const std::string& method, int warmup, int iterations) {
  const torch::Device device(torch::kCUDA);
  const auto index = device.has_index() ? device.index() : c10::cuda::current_device();
  torch::cuda::synchronize();
  const double before = allocated_mib(index);
  auto module = torch::jit::load(path);
  module.eval();
  // Only by device: Module::to(dtype) would also cast the packed and integer buffers (DESIGN.md 5).
  module.to(device);
  torch::cuda::synchronize();
  EndToEnd result;
  result.label = label;
  result.weights_mib = allocated_mib(index) - before;
  auto entry = module.get_method(method);
  torch::NoGradGuard no_grad;
  c10::cuda::CUDACachingAllocator::resetPeakStats(index);
  result.latency_ms = time_us([&] { entry(inputs); }, warmup, iterations) / 1000.0;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
  result.peak_mib =
      static_cast<double>(stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak) /
      (1024.0 * 1024.0);
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"duquant_bench: W4A8 CUDA operator vs bf16 linear, and end-to-end model latency"};
  std::vector<int64_t> token_counts = {1, 16, 51, 816};
  int iterations = 200, warmup = 20, model_iterations = 10, model_warmup = 3;
  std::string json_path, model_path, quantized_path, inputs_path, method = "forward";
  app.add_option("--tokens", token_counts, "token counts M to time")->delimiter(',');
  app.add_option("--iterations", iterations, "timed calls per measurement")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed calls before each measurement")->check(CLI::NonNegativeNumber);
  app.add_option("--json", json_path, "write the results as JSON to this file");
  app.add_option("--model", model_path, "bf16 TorchScript model for the end-to-end comparison");
  app.add_option("--quantized", quantized_path, "its W4A8 TorchScript version (duquant quantize)");
  app.add_option("--inputs", inputs_path, "inputs container (buffers arg0..argN-1, List[str] arg_names)");
  app.add_option("--method", method, "model method to time end to end");
  app.add_option("--model-iterations", model_iterations, "timed end-to-end calls")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  if (!torch::cuda::is_available()) {
    fmt::print("no CUDA device: benchmark skipped\n");
    return 0;
  }
  if (!duquant::ops::cuda::cuda_kernels_available()) {
    fmt::print("libduquant_ops was built without its CUDA kernels: benchmark skipped\n");
    return 0;
  }
  torch::manual_seed(0);
  const auto* properties = at::cuda::getCurrentDeviceProperties();
  fmt::print("device: {} ({} SMs); peaks used for the fraction: {:.0f} INT8 TOPS, {:.0f} GB/s (H100 SXM)\n",
             properties->name, properties->multiProcessorCount, kPeakInt8Tops, kPeakHbmGBps);

  nlohmann::json report;
  report["device"] = properties->name;
  report["iterations"] = iterations;
  report["layers"] = nlohmann::json::array();
  fmt::print("{:<18} {:>12} {:>5} {:>9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>7} {:>6}\n", "layer", "in->out", "M",
             "w4a8 us", "pre us", "gemm us", "bf16 us", "ratio", "TOPS", "GB/s", "%peak");
  for (const int64_t tokens : token_counts) {
    for (const auto& shape : kShapes) {
      const Measurement m = measure(shape, tokens, warmup, iterations);
      fmt::print("{:<18} {:>12} {:>5} {:>9.1f} {:>8.1f} {:>8.1f} {:>9.1f} {:>6.2f} {:>7.1f} {:>7.0f} {:>5.1f}%\n",
                 m.name, fmt::format("{}->{}", m.in_features, m.out_features), m.tokens, m.w4a8_us, m.pre_kernel_us,
                 m.gemm_us, m.bf16_us, m.w4a8_us / m.bf16_us, m.tops, m.gbps, 100.0 * m.peak_fraction);
      report["layers"].push_back({{"layer", m.name},
                                  {"in_features", m.in_features},
                                  {"out_features", m.out_features},
                                  {"tokens", m.tokens},
                                  {"w4a8_us", m.w4a8_us},
                                  {"pre_kernel_us", m.pre_kernel_us},
                                  {"gemm_us", m.gemm_us},
                                  {"bf16_us", m.bf16_us},
                                  {"ratio", m.w4a8_us / m.bf16_us},
                                  {"tops", m.tops},
                                  {"gbps", m.gbps},
                                  {"peak_fraction", m.peak_fraction}});
    }
  }

  if (!model_path.empty() || !quantized_path.empty()) {
    if (model_path.empty() || quantized_path.empty() || inputs_path.empty()) {
      std::cerr << "duquant_bench: --model, --quantized and --inputs go together\n";
      return 2;
    }
    const auto inputs = load_inputs(inputs_path, torch::Device(torch::kCUDA));
    report["end_to_end"] = nlohmann::json::array();
    fmt::print("\n{:<10} {:>12} {:>14} {:>14}\n", "model", "latency ms", "weights MiB", "peak MiB");
    std::vector<EndToEnd> results;
    for (const auto& [label, path] : {std::pair<std::string, std::string>{"bf16", model_path}, {"w4a8", quantized_path}}) {
      results.push_back(run_model(label, path, inputs, method, model_warmup, model_iterations));
      const auto& r = results.back();
      fmt::print("{:<10} {:>12.2f} {:>14.1f} {:>14.1f}\n", r.label, r.latency_ms, r.weights_mib, r.peak_mib);
      report["end_to_end"].push_back(
          {{"model", r.label}, {"latency_ms", r.latency_ms}, {"weights_mib", r.weights_mib}, {"peak_mib", r.peak_mib}});
    }
    fmt::print("latency ratio w4a8 / bf16: {:.2f}\n", results[1].latency_ms / results[0].latency_ms);
  }

  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << report.dump(2) << "\n";
    fmt::print("wrote {}\n", json_path);
  }
  return 0;
}
