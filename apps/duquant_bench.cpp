// duquant_bench: times the CUDA W4A8 operator against torch::linear in bf16 (cuBLAS) on the pi0
// layer shapes (DESIGN.md sections 3, 6, 7), in one process with CUDA events, and optionally the
// end-to-end latency and peak GPU memory of a bf16 model and its W4A8 version, each eager and
// captured as one CUDA graph (include/duquant/cuda_graph.h), with the W4A8 / bf16 ratios.
//
//   duquant_bench [--tokens 1,16,51,816] [--iterations 200] [--json out.json]
//                 [--w4a8-variant NAME=VALUE[,NAME=VALUE...]]...
//   duquant_bench --no-ops --model BF16.pt --quantized W4A8.pt --inputs INPUTS.pt [--model-iterations 20]
//                 [--w4a8-variant NAME=VALUE[,NAME=VALUE...]]...
// Each --w4a8-variant (operator settings, operator_settings.h) times the W4A8 op and model once
// more in the same process, e.g. DUQUANT_CUDA_ROTATION=cublas.
//
// Per shape and token count it reports the whole op, its two kernels alone (pre-kernel: transform
// + int8 quantization; GEMM: W4A8 tensor-core GEMM + split-K reduction), bf16 linear, the ratio
// op / bf16, and the op's achieved tensor throughput (2 M N K / t), memory throughput (bytes the
// op must move / t) and the larger of the two as a fraction of the H100 SXM peaks of DESIGN.md
// section 6 (1979 dense INT8 TOPS, 3.35 TB/s HBM). Weights and activations are random: only the
// shapes matter for timing. Without a GPU the operator table says so and exits 0; the end-to-end
// comparison is refused with a one-line error.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <CLI/CLI.hpp>
#include <c10/cuda/CUDACachingAllocator.h>
#include <fmt/format.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "duquant/cuda_graph.h"
#include "duquant/errors.h"
#include "duquant/model_io.h"
#include "duquant/ops.h"
#include "int8_weight_levels.h"
#include "operator_settings.h"
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

// Sets environment variables ("NAME=VALUE,NAME=VALUE") for the enclosing scope and restores them:
// the operator reads its settings at every call, so one process can time several W4A8 variants.
class ScopedSettings {
 public:
  explicit ScopedSettings(const std::string& settings) {
    std::stringstream stream(settings);
    std::string item;
    while (std::getline(stream, item, ',')) {
      const auto equals = item.find('=');
      if (equals == std::string::npos || equals == 0) {
        throw duquant::UserError(fmt::format("--w4a8-variant takes NAME=VALUE[,NAME=VALUE...], got '{}'", item),
                                 duquant::ExitCode::Usage);
      }
      const std::string name = item.substr(0, equals);
      const char* previous = std::getenv(name.c_str());
      saved_.push_back({name, previous ? std::optional<std::string>(previous) : std::nullopt});
      setenv(name.c_str(), item.substr(equals + 1).c_str(), 1);
    }
  }
  ~ScopedSettings() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second) {
        setenv(it->first.c_str(), it->second->c_str(), 1);
      } else {
        unsetenv(it->first.c_str());
      }
    }
  }
  ScopedSettings(const ScopedSettings&) = delete;
  ScopedSettings& operator=(const ScopedSettings&) = delete;

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

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
  {
    // Every call here has the same input: with activation reuse on, all but the first would skip
    // the pre-kernel. A layer's own cost includes it.
    const ScopedSettings no_reuse("DUQUANT_REUSE_ACTIVATIONS=0");
    m.w4a8_us = time_us(
        [&] {
          duquant::ops::w4a8_linear(x, layer.smooth_inv, layer.rotation1, layer.permutation, layer.rotation2,
                                    layer.packed_weight, layer.weight_scale, layer.weight_zero, layer.bias,
                                    layer.in_features, -1, kActBits, kActClip);
        },
        warmup, iterations);
  }
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
// End to end: the whole model, eager and as one CUDA graph (DESIGN.md section 7 compares both
// models under graphs: eagerly, launch overhead hides the kernels).

struct EndToEnd {
  std::string model;  // "bf16" or "w4a8"
  std::string mode;   // "eager" or "graph"
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double weights_mib = 0;        // allocated by moving the model to the GPU
  double peak_allocated_mib = 0;  // during the timed calls (graph: capture included), weights included
  double peak_reserved_mib = 0;   // what the caching allocator held (graph: its private pool included)
  std::string output_dtype;
  double difference_from_eager = 0;  // graph only: max |graph - eager| / max |eager| of the first output
};

constexpr size_t kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

double mib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

c10::CachingDeviceAllocator::DeviceStats device_stats() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
}

// Per call: CUDA events around it, waited for before the next call, so each figure is the latency
// of one call (host launch work included). Returns the sorted times in ms.
std::vector<double> time_calls_ms(const std::function<void()>& call, int iterations) {
  std::vector<double> times;
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int i = 0; i < iterations; ++i) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record(stream);
    call();
    stop.record(stream);
    stop.synchronize();
    times.push_back(static_cast<double>(start.elapsed_time(stop)));
  }
  std::sort(times.begin(), times.end());
  return times;
}

void fill_times(EndToEnd& result, const std::vector<double>& sorted_ms) {
  const size_t middle = sorted_ms.size() / 2;
  result.median_ms = sorted_ms.size() % 2 ? sorted_ms[middle] : 0.5 * (sorted_ms[middle - 1] + sorted_ms[middle]);
  result.min_ms = sorted_ms.front();
  result.max_ms = sorted_ms.back();
}

torch::Tensor first_tensor(const torch::jit::IValue& value) {
  if (value.isTensor()) return value.toTensor();
  if (value.isTuple() && !value.toTupleRef().elements().empty()) return first_tensor(value.toTupleRef().elements()[0]);
  throw duquant::UserError("the model's output holds no tensor to compare");
}

// Eager then graph for one model file; the model is freed (and the cache emptied) before return
// so that the next model's peaks are its own.
std::vector<EndToEnd> measure_model(const std::string& label, const std::string& path,
                                    const duquant::ModelInputs& inputs, const std::string& method, int warmup,
                                    int iterations) {
  const torch::Device device(torch::kCUDA, c10::cuda::current_device());
  torch::NoGradGuard no_grad;
  // What the previous model left in the operator library goes with it: its last activations kept
  // for reuse, and the int8 copies of its weights (DUQUANT_CUDA_GEMM=cublaslt).
  duquant::ops::forget_reusable_activations();
  duquant::ops::forget_freed_int8_levels();
  c10::cuda::CUDACachingAllocator::emptyCache();
  const int64_t before = device_stats().allocated_bytes[kAggregate].current;
  auto module = duquant::load_model(path);
  module.eval();
  // Only by device: Module::to(dtype) would also cast the packed and integer buffers (DESIGN.md 5).
  module.to(device);
  torch::cuda::synchronize();
  const double weights_mib = mib(device_stats().allocated_bytes[kAggregate].current - before);
  if (!module.find_method(method)) throw duquant::UserError(fmt::format("{} has no method '{}'", path, method));
  auto entry = module.get_method(method);

  std::vector<EndToEnd> results(2);
  results[0].mode = "eager";
  results[1].mode = "graph";
  for (auto& result : results) {
    result.model = label;
    result.weights_mib = weights_mib;
  }
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
  torch::jit::IValue eager_output;
  for (int i = 0; i < warmup; ++i) eager_output = entry(inputs.values);
  fill_times(results[0], time_calls_ms([&] { entry(inputs.values); }, iterations));
  const torch::Tensor eager = first_tensor(eager_output).to(torch::kFloat);
  results[0].output_dtype = c10::toString(first_tensor(eager_output).scalar_type());
  auto stats = device_stats();
  results[0].peak_allocated_mib = mib(stats.allocated_bytes[kAggregate].peak);
  results[0].peak_reserved_mib = mib(stats.reserved_bytes[kAggregate].peak);

  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
  duquant::CudaGraphOptions options;
  options.method = method;
  options.warmup_calls = std::max(warmup, 1);
  auto graph = duquant::CudaGraphRunner::capture(module, inputs, options);
  fill_times(results[1], time_calls_ms([&] { graph->replay(); }, iterations));
  const torch::Tensor replayed = first_tensor(graph->output()).to(torch::kFloat);
  results[1].output_dtype = c10::toString(first_tensor(graph->output()).scalar_type());
  results[1].difference_from_eager =
      ((replayed - eager).abs().max() / eager.abs().max().clamp_min(1e-30)).item<double>();
  stats = device_stats();
  results[1].peak_allocated_mib = mib(stats.allocated_bytes[kAggregate].peak);
  results[1].peak_reserved_mib = mib(stats.reserved_bytes[kAggregate].peak);
  graph.reset();
  return results;
}

nlohmann::json end_to_end_json(const EndToEnd& r) {
  return {{"model", r.model},
          {"mode", r.mode},
          {"median_ms", r.median_ms},
          {"min_ms", r.min_ms},
          {"max_ms", r.max_ms},
          {"weights_mib", r.weights_mib},
          {"peak_allocated_mib", r.peak_allocated_mib},
          {"peak_reserved_mib", r.peak_reserved_mib},
          {"output_dtype", r.output_dtype},
          {"difference_from_eager", r.difference_from_eager}};
}

// The bf16 and W4A8 models, each eager and under a CUDA graph, then the W4A8 / bf16 ratios; each
// variant (environment settings of the operator) times the W4A8 model once more.
nlohmann::json run_end_to_end(const std::string& model_path, const std::string& quantized_path,
                              const std::string& inputs_path, const std::string& method, int warmup, int iterations,
                              const std::vector<std::string>& variants) {
  auto inputs = duquant::load_inputs(inputs_path);
  for (auto& value : inputs.values) {
    if (value.isTensor()) value = value.toTensor().to(torch::kCUDA);
  }
  std::vector<EndToEnd> results;
  for (const auto& [label, path] : {std::pair<std::string, std::string>{"bf16", model_path}, {"w4a8", quantized_path}}) {
    for (auto& result : measure_model(label, path, inputs, method, warmup, iterations)) results.push_back(result);
  }
  for (const auto& variant : variants) {
    const ScopedSettings settings(variant);
    for (auto& result : measure_model("w4a8 " + variant, quantized_path, inputs, method, warmup, iterations)) {
      results.push_back(result);
    }
  }
  size_t label_width = 6;
  for (const auto& r : results) label_width = std::max(label_width, r.model.size());
  fmt::print("\nend to end, {} calls each (median of per-call CUDA-event times):\n", iterations);
  fmt::print("{:<{}} {:<6} {:>10} {:>9} {:>9} {:>12} {:>15} {:>15} {:>9} {:>12}\n", "model", label_width, "mode",
             "median ms", "min ms", "max ms", "weights MiB", "peak alloc MiB", "peak resv MiB", "output", "graph-eager");
  nlohmann::json json;
  json["iterations"] = iterations;
  json["runs"] = nlohmann::json::array();
  for (const auto& r : results) {
    fmt::print("{:<{}} {:<6} {:>10.2f} {:>9.2f} {:>9.2f} {:>12.1f} {:>15.1f} {:>15.1f} {:>9} {:>12}\n", r.model,
               label_width, r.mode, r.median_ms, r.min_ms, r.max_ms, r.weights_mib, r.peak_allocated_mib,
               r.peak_reserved_mib, r.output_dtype,
               r.mode == "graph" ? fmt::format("{:.2e}", r.difference_from_eager) : "");
    json["runs"].push_back(end_to_end_json(r));
  }
  // results: bf16 eager, bf16 graph, w4a8 eager, w4a8 graph, then eager and graph per variant
  const double eager_ratio = results[2].median_ms / results[0].median_ms;
  const double graph_ratio = results[3].median_ms / results[1].median_ms;
  const double weight_ratio = results[2].weights_mib / std::max(results[0].weights_mib, 1e-9);
  const double peak_ratio = results[3].peak_allocated_mib / std::max(results[1].peak_allocated_mib, 1e-9);
  fmt::print("w4a8 / bf16 latency: eager {:.2f}, CUDA graph {:.2f} (target <= 0.80 under graphs)\n", eager_ratio,
             graph_ratio);
  fmt::print("CUDA graph speed-up over eager: bf16 {:.2f}x, w4a8 {:.2f}x\n", results[0].median_ms / results[1].median_ms,
             results[2].median_ms / results[3].median_ms);
  fmt::print("w4a8 / bf16 memory: weights {:.2f}, peak allocated under graphs {:.2f}\n", weight_ratio, peak_ratio);
  json["ratios"] = {{"latency_eager_w4a8_over_bf16", eager_ratio},
                    {"latency_graph_w4a8_over_bf16", graph_ratio},
                    {"weights_w4a8_over_bf16", weight_ratio},
                    {"peak_allocated_graph_w4a8_over_bf16", peak_ratio},
                    {"graph_speedup_bf16", results[0].median_ms / results[1].median_ms},
                    {"graph_speedup_w4a8", results[2].median_ms / results[3].median_ms}};
  json["variants"] = nlohmann::json::array();
  for (size_t i = 0; i < variants.size(); ++i) {
    const EndToEnd& eager = results[4 + 2 * i];
    const EndToEnd& graph = results[5 + 2 * i];
    fmt::print("w4a8 [{}] / bf16 latency: eager {:.2f}, CUDA graph {:.2f}\n", variants[i],
               eager.median_ms / results[0].median_ms, graph.median_ms / results[1].median_ms);
    json["variants"].push_back({{"settings", variants[i]},
                                {"latency_eager_over_bf16", eager.median_ms / results[0].median_ms},
                                {"latency_graph_over_bf16", graph.median_ms / results[1].median_ms}});
  }
  return json;
}

// The per-layer operator table: every pi0 projection shape at every token count.
nlohmann::json run_operator_table(const std::vector<int64_t>& token_counts, int warmup, int iterations) {
  nlohmann::json json;
  json["iterations"] = iterations;
  json["layers"] = nlohmann::json::array();
  fmt::print("{:<18} {:>12} {:>5} {:>9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>7} {:>6}\n", "layer", "in->out", "M",
             "w4a8 us", "pre us", "gemm us", "bf16 us", "ratio", "TOPS", "GB/s", "%peak");
  for (const int64_t tokens : token_counts) {
    for (const auto& shape : kShapes) {
      const Measurement m = measure(shape, tokens, warmup, iterations);
      fmt::print("{:<18} {:>12} {:>5} {:>9.1f} {:>8.1f} {:>8.1f} {:>9.1f} {:>6.2f} {:>7.1f} {:>7.0f} {:>5.1f}%\n",
                 m.name, fmt::format("{}->{}", m.in_features, m.out_features), m.tokens, m.w4a8_us, m.pre_kernel_us,
                 m.gemm_us, m.bf16_us, m.w4a8_us / m.bf16_us, m.tops, m.gbps, 100.0 * m.peak_fraction);
      json["layers"].push_back({{"layer", m.name},
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
  return json;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"duquant_bench: W4A8 CUDA operator vs bf16 linear, and end-to-end model latency"};
  std::vector<int64_t> token_counts = {1, 16, 51, 816};
  int iterations = 200, warmup = 20, model_iterations = 20, model_warmup = 3;
  bool skip_ops = false;
  std::string json_path, model_path, quantized_path, inputs_path, method = "forward";
  std::vector<std::string> variants;
  app.add_option("--tokens", token_counts, "token counts M to time")->delimiter(',');
  app.add_option("--iterations", iterations, "timed calls per measurement")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed calls before each measurement")->check(CLI::NonNegativeNumber);
  app.add_option("--json", json_path, "write the results as JSON to this file");
  app.add_flag("--no-ops", skip_ops, "skip the per-layer operator table (end-to-end only)");
  app.add_option("--model", model_path, "bf16 TorchScript model for the end-to-end comparison");
  app.add_option("--quantized", quantized_path, "its W4A8 TorchScript version (duquant quantize)");
  app.add_option("--inputs", inputs_path, "inputs container (buffers arg0..argN-1, List[str] arg_names)");
  app.add_option("--method", method, "model method to time end to end");
  app.add_option("--w4a8-variant", variants,
                 "time the W4A8 operator table and model once more with these operator settings "
                 "(NAME=VALUE[,NAME=VALUE...]; repeatable), e.g. DUQUANT_CUDA_ROTATION=cublas");
  app.add_option("--model-iterations", model_iterations, "timed end-to-end calls (per model and mode)")
      ->check(CLI::PositiveNumber);
  app.add_option("--model-warmup", model_warmup, "untimed end-to-end calls before timing and before capture")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  const bool end_to_end = !model_path.empty() || !quantized_path.empty() || !inputs_path.empty();
  try {
    if (end_to_end && (model_path.empty() || quantized_path.empty() || inputs_path.empty())) {
      throw duquant::UserError("--model, --quantized and --inputs go together", duquant::ExitCode::Usage);
    }
    // The operator table alone is skipped (exit 0) on a machine without a GPU, so scripts can call
    // it anywhere; an end-to-end comparison asked for by name is refused.
    if (!torch::cuda::is_available()) {
      if (end_to_end) throw duquant::UserError("the end-to-end benchmark needs a CUDA device and none is available");
      fmt::print("no CUDA device: benchmark skipped\n");
      return 0;
    }
    if (!duquant::ops::cuda::cuda_kernels_available()) {
      if (end_to_end) {
        throw duquant::UserError("libduquant_ops was built without its CUDA kernels; rebuild with the CUDA toolkit");
      }
      fmt::print("libduquant_ops was built without its CUDA kernels: benchmark skipped\n");
      return 0;
    }
    if (!json_path.empty()) duquant::check_writable(json_path);
    torch::manual_seed(0);
    const auto* properties = at::cuda::getCurrentDeviceProperties();
    fmt::print("device: {} ({} SMs); peaks used for the fraction: {:.0f} INT8 TOPS, {:.0f} GB/s (H100 SXM)\n",
               properties->name, properties->multiProcessorCount, kPeakInt8Tops, kPeakHbmGBps);
    fmt::print("W4A8 paths: {}\n", duquant::ops::cuda_paths_in_effect());

    nlohmann::json report;
    report["device"] = properties->name;
    report["w4a8_paths"] = duquant::ops::cuda_paths_in_effect();
    if (!skip_ops) {
      report["ops"] = run_operator_table(token_counts, warmup, iterations);
      report["ops_variants"] = nlohmann::json::array();
      for (const auto& variant : variants) {
        const ScopedSettings settings(variant);
        fmt::print("\nW4A8 with {} ({}):\n", variant, duquant::ops::cuda_paths_in_effect());
        report["ops_variants"].push_back(
            {{"settings", variant}, {"table", run_operator_table(token_counts, warmup, iterations)}});
      }
    }
    if (end_to_end) {
      report["end_to_end"] = run_end_to_end(model_path, quantized_path, inputs_path, method, model_warmup,
                                            model_iterations, variants);
    }
    if (!json_path.empty()) {
      duquant::write_text_atomically(report.dump(2) + "\n", json_path);
      fmt::print("wrote {}\n", json_path);
    }
  } catch (const duquant::UserError& error) {
    std::cerr << "duquant_bench: error: " << error.what() << "\n";
    return static_cast<int>(error.code());
  } catch (const c10::Error& error) {
    std::cerr << "duquant_bench: error: " << duquant::interpreter_message(error.what_without_backtrace()) << "\n";
    return static_cast<int>(duquant::ExitCode::Failure);
  }
  return 0;
}
