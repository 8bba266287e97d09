// duquant: select, quantize (W4A8 DuQuant), run and verify TorchScript pi0 models.
//   duquant list MODEL                          which Linear layers would be quantized, and why
//   duquant quantize MODEL -o OUT --calib IN    calibrate, transform, pack, swap, save + JSON report
//   duquant sensitivity MODEL --calib C|--quantized Q --inputs HELD_OUT   per-group end-to-end error,
//                                               float-fallback curve
//   duquant run MODEL --inputs IN               run a (quantized) model on saved inputs [--cuda-graph]
//   duquant verify ORIGINAL QUANTIZED --inputs IN   end-to-end and per-layer error
// Selection and recipe settings come from OPENPI_DUQUANT_* variables, overridden by flags.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <fmt/ostream.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <set>
#include <sstream>

#include "duquant/calibrate.h"
#include "duquant/config.h"
#include "duquant/cuda_graph.h"
#include "duquant/errors.h"
#include "duquant/large_block_cache.h"
#include "duquant/model_io.h"
#include "duquant/ops.h"
#include "duquant/quantize_model.h"
#include "duquant/recipe.h"
#include "duquant/report.h"
#include "duquant/select.h"
#include "duquant/sensitivity.h"
#include "duquant/stage_times.h"
#include "duquant/swap.h"
#include "operator_settings.h"

namespace {

using namespace duquant;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Unexpected errors keep the one-line contract: the first non-empty line.
std::string one_line(const std::string& text) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.find_first_not_of(" \t") != std::string::npos) return line;
  }
  return text;
}

// glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
// tensors below it -- a full-size model's packed int4 weights, observed rows, per-layer
// temporaries -- come from the heap and stay in the process when freed. Over a quantize or a
// verify, which hold one model and free another's worth of such tensors, that cost up to 5 GiB of
// peak resident memory on the full-size pi0. A fixed threshold (which also disables the raise)
// returns every block of 128 KiB or more to the system the moment it is freed -- or, for tensors,
// the moment the large-block cache gives it back (include/duquant/large_block_cache.h: it keeps a
// freed block for the next tensor of its size only within the process's own high-water mark).
void return_large_blocks_to_the_system() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, static_cast<int>(kLargeBlockBytes));
#endif
}

// Settings that are switches on the command line ("--dry-run"), not "--key VALUE" options.
bool is_switch(const std::string& key) { return key == "dry-run" || key == "include-action-head"; }

struct SettingFlags {
  std::map<std::string, std::string> values;

  void add_to(CLI::App& command) {
    const Config defaults = Config::defaults();
    for (const auto& setting : defaults.settings()) {
      const std::string help = setting.environment.empty()
                                   ? setting.help
                                   : fmt::format("{} [{}{}]", setting.help, kEnvironmentPrefix, setting.environment);
      if (is_switch(setting.key)) {
        // "--dry-run" means 1; "--dry-run=0" overrides OPENPI_DUQUANT_DRYRUN=1.
        command.add_flag("--" + setting.key + "{1}", values[setting.key], help + " (--" + setting.key + "=0 to turn off)");
      } else {
        command.add_option("--" + setting.key, values[setting.key], help);
      }
    }
  }

  Config resolve(const CLI::App& command) const {
    Config config = Config::defaults();
    config.apply_environment([](const std::string& name) -> std::optional<std::string> {
      const char* value = std::getenv(name.c_str());
      return value ? std::optional<std::string>(value) : std::nullopt;
    });
    for (const auto& [key, value] : values) {
      if (command.count("--" + key)) config.apply_flag(key, value);
    }
    return config;
  }
};

int list_or_dry_run(const torch::jit::Module& model, Config config, bool json) {
  detect_scope(config, model);
  const auto recipe = QuantizeRecipe::from_config(config);
  const auto decisions = select_linears(model, SelectionRules::from_config(config));
  if (json) {
    std::cout << selection_json(config, decisions, recipe).dump(2) << "\n";
  } else {
    print_configuration(config, std::cout);
    print_selection(decisions, recipe, std::cout);
  }
  if (count_targets(decisions) == 0) {
    std::cerr << "duquant: no Linear layer matched the selection; check SCOPE/INCLUDE/EXCLUDE/LAYERS\n";
    return static_cast<int>(ExitCode::NoTargets);
  }
  return 0;
}

// pi0_w4a8.pt -> pi0_w4a8.report.json, next to the output.
std::string default_report_path(const std::string& output) {
  const auto slash = output.rfind('/');
  const auto dot = output.rfind('.');
  const bool has_extension = dot != std::string::npos && (slash == std::string::npos || dot > slash + 1);
  return (has_extension ? output.substr(0, dot) : output) + ".report.json";
}

// The original is never overwritten: -o and the report must name other files than the model (a
// symbolic or hard link to it included) and than each other. Checked before any work.
void refuse_overwriting_inputs(const std::string& model_path, const std::string& output_path,
                               const std::string& report_path, const std::string& calibration_path) {
  auto refuse_same = [](const std::string& written, const std::string& written_role, const std::string& read,
                        const std::string& read_role) {
    if (written == read || same_file(written, read)) {
      throw UserError(fmt::format("{} '{}' is the {} '{}'; write to another path so that the {} is kept",
                                  written_role, written, read_role, read, read_role),
                      ExitCode::Usage);
    }
  };
  refuse_same(output_path, "-o", model_path, "input model");
  refuse_same(report_path, "the report", model_path, "input model");
  refuse_same(report_path, "the report", output_path, "output model");
  if (!calibration_path.empty()) {
    refuse_same(output_path, "-o", calibration_path, "calibration inputs");
    refuse_same(report_path, "the report", calibration_path, "calibration inputs");
  }
}

// "auto" is CUDA when a device is present, else the CPU.
torch::Device parse_device(const std::string& name) {
  if (name == "auto") return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  if (name == "cpu") return torch::kCPU;
  if (name == "cuda") {
    if (!torch::cuda::is_available()) throw UserError("--device cuda: no CUDA device is available; use --device cpu");
    return torch::kCUDA;
  }
  throw UserError(fmt::format("--device '{}' is unknown; use auto, cpu or cuda", name), ExitCode::Usage);
}

struct QuantizeArguments {
  std::string model_path, output_path, report_path, sensitivity_path, device = "auto";
  std::vector<std::string> calibration_paths;
  bool data_free = false;
  int64_t keep_float = 0;
};

std::vector<std::string> target_paths(const std::vector<LinearDecision>& decisions) {
  std::vector<std::string> targets;
  for (const auto& decision : decisions) {
    if (decision.target) targets.push_back(decision.path);
  }
  return targets;
}

// "[calibration observation 3/16] 12 s" on stderr, only when it is a terminal.
ObservationCallback observation_progress(bool terminal, Clock::time_point start) {
  if (!terminal) return {};
  return [start](size_t done, size_t total) {
    fmt::print(stderr, "\r[calibration observation {}/{}] {:.0f} s", done, total, seconds_since(start));
    if (done == total) fmt::print(stderr, "\n");
  };
}

void print_kept_float(const std::vector<LinearDecision>& decisions, std::ostream& out) {
  for (const auto& d : decisions) {
    if (d.rule == Rule::KeptFloat) {
      out << fmt::format("[DUQUANT][KEPT] {}: Linear({}->{}) {}\n", d.path, d.in_features, d.out_features, d.detail);
    }
  }
}

int quantize(QuantizeArguments arguments, Config config) {
  if (!arguments.output_path.empty()) {
    if (arguments.report_path.empty()) arguments.report_path = default_report_path(arguments.output_path);
    for (const auto& calibration_path : arguments.calibration_paths) {
      refuse_overwriting_inputs(arguments.model_path, arguments.output_path, arguments.report_path, calibration_path);
    }
    refuse_overwriting_inputs(arguments.model_path, arguments.output_path, arguments.report_path, "");
  }
  const auto& report_path = arguments.report_path;
  const auto start = Clock::now();
  // The original's weights are freed as they are quantized unless the sensitivity ranking must
  // still run it (--keep-float without a ranking file).
  const bool ranks_here = arguments.keep_float > 0 && arguments.sensitivity_path.empty();
  PipelineOptions pipeline;
  pipeline.device = parse_device(arguments.device);
  pipeline.release_original_weights = !ranks_here;
  StageTimes load_and_save;
  torch::jit::Module model;
  {
    StageTimer timer(load_and_save, Stage::Load);
    model = load_model(arguments.model_path);
  }
  detect_scope(config, model);
  const auto recipe = QuantizeRecipe::from_config(config);
  auto decisions = select_linears(model, SelectionRules::from_config(config));
  if (arguments.keep_float < 0) throw UserError("--keep-float must be at least 0", ExitCode::Usage);
  // A ranking from a file decides the float layers before anything runs (and in the dry run).
  std::map<std::string, int64_t> kept;
  if (arguments.keep_float > 0 && !arguments.sensitivity_path.empty()) {
    kept = layers_kept_float(read_sensitivity_ranking(arguments.sensitivity_path), arguments.keep_float,
                             target_paths(decisions));
    mark_kept_float(decisions, kept);
  } else if (!arguments.sensitivity_path.empty()) {
    throw UserError("--sensitivity is only used with --keep-float K; add --keep-float or drop --sensitivity",
                    ExitCode::Usage);
  }
  if (config.get_bool("dry-run")) {
    if (ranks_here) {
      throw UserError("a dry run with --keep-float needs the ranking from --sensitivity FILE (`duquant sensitivity "
                      "... --json FILE`); without it the ranking is measured, which needs a real run",
                      ExitCode::Usage);
    }
    print_configuration(config, std::cout);
    print_selection(decisions, recipe, std::cout);
    if (!kept.empty()) std::cout << layers_environment_line(config, decisions) << "\n";
    if (count_targets(decisions) == 0) {
      std::cerr << "duquant: no Linear layer matched the selection; check SCOPE/INCLUDE/EXCLUDE/LAYERS\n";
      return static_cast<int>(ExitCode::NoTargets);
    }
    return 0;
  }
  if (arguments.output_path.empty()) throw UserError("quantize needs -o OUTPUT.pt (or --dry-run)", ExitCode::Usage);
  if (arguments.calibration_paths.empty() && !arguments.data_free) {
    throw UserError("quantize needs calibration inputs (--calib INPUTS.pt or --calib DIRECTORY, repeatable); "
                    "--data-free quantizes without them, less accurately",
                    ExitCode::Usage);
  }
  if (arguments.data_free && !arguments.calibration_paths.empty()) {
    throw UserError("--data-free and --calib exclude each other; drop one", ExitCode::Usage);
  }
  if (arguments.data_free && ranks_here) {
    throw UserError("--keep-float with --data-free needs the ranking from --sensitivity FILE", ExitCode::Usage);
  }
  check_writable(arguments.output_path);
  check_writable(report_path);
  for (const auto& [path, bits] : recipe.layer_bits) {
    const bool is_target = std::any_of(decisions.begin(), decisions.end(),
                                       [&](const LinearDecision& d) { return d.target && d.path == path; });
    if (!is_target) {
      throw UserError(fmt::format("WBITS names '{}', which is not a selected target layer", path), ExitCode::Usage);
    }
  }
  print_configuration(config, std::cout);
  print_matched_count(decisions, std::cout);
  std::vector<Observation> observations;
  if (!arguments.data_free) {
    StageTimer timer(load_and_save, Stage::Load);
    observations = load_observations(arguments.calibration_paths);
  }

  const bool terminal = isatty(STDERR_FILENO);
  if (!observations.empty()) {
    std::cout << fmt::format("[DUQUANT] calibrating on {} observation(s), {} rows kept per layer ({} for the "
                             "rotation/clipping searches{})\n",
                             observations.size(), recipe.observed_rows(), recipe.calibration_rows,
                             recipe.weight_rounding == WeightRounding::Gptq
                                 ? fmt::format(", {} for GPTQ's Hessian on inputs over {} wide; narrower "
                                               "inputs sum it over every token",
                                               recipe.gptq_rows, recipe.gptq_hessian_width)
                                 : "");
  }
  auto result = quantize_model(model, decisions, recipe, observations,
                               [&](const LayerReport& layer, size_t done, size_t total) {
                                 std::cout << replaced_line(layer) << "\n";
                                 if (terminal) fmt::print(stderr, "\r[{}/{}] {:.0f} s", done, total, seconds_since(start));
                               },
                               observation_progress(terminal, start), pipeline);
  if (terminal) fmt::print(stderr, "\n");

  if (ranks_here) {
    // No ranking given: measure it on the calibration observations with this quantized model.
    std::cout << fmt::format("[DUQUANT] ranking groups by sensitivity on the {} calibration observation(s)\n",
                             observations.size());
    const auto sensitivity = measure_sensitivity(
        model, result.model, target_paths(decisions), observations, {},
        [&](const std::string& what, double, size_t done, size_t total) {
          if (terminal) fmt::print(stderr, "\r[sensitivity {}/{}] {:<40} {:.0f} s", done, total, what, seconds_since(start));
        });
    if (terminal) fmt::print(stderr, "\n");
    std::vector<TargetGroup> ranking;
    for (const auto& group : sensitivity.ranked) ranking.push_back(group.group);
    kept = layers_kept_float(ranking, arguments.keep_float, target_paths(decisions));
    mark_kept_float(decisions, kept);
    std::set<std::string> quantized_paths;
    for (const auto& path : target_paths(decisions)) quantized_paths.insert(path);
    result.model = with_quantized_layers(model, result.model, quantized_paths);
    std::vector<LayerReport> layers;
    for (const auto& layer : result.layers) {
      if (!kept.count(layer.path)) layers.push_back(layer);
    }
    result.layers = layers;
  }
  if (!kept.empty()) {
    // Memory of what is left quantized, counted from the final model (shared transforms once).
    std::map<std::string, torch::jit::Module> originals;
    for (const auto& item : model.named_modules()) originals.emplace(item.name, item.value);
    std::set<const void*> seen;
    result.bf16_bytes = 0;
    result.w4a8_bytes = 0;
    for (const auto& item : result.model.named_modules()) {
      if (!is_quantized_linear(item.value)) continue;
      const auto& linear = originals.at(item.name);
      const auto bias = linear_bias(linear);
      result.bf16_bytes += (linear.attr("weight").toTensor().numel() + (bias.defined() ? bias.numel() : 0)) * 2;
      for (const auto& buffer : item.value.named_buffers()) {
        if (buffer.value.numel() > 0 && seen.insert(buffer.value.data_ptr()).second) {
          result.w4a8_bytes += buffer.value.nbytes();
        }
      }
    }
    print_kept_float(decisions, std::cout);
    int64_t kept_bytes = 0;
    for (const auto& [path, rank] : kept) {
      const auto& linear = originals.at(path);
      const auto bias = linear_bias(linear);
      kept_bytes += (linear.attr("weight").toTensor().numel() + (bias.defined() ? bias.numel() : 0)) * 2;
    }
    std::cout << fmt::format("[DUQUANT] kept in floating point: {} group(s), {} layer(s), {:.2f} MiB as bf16\n",
                             arguments.keep_float, kept.size(), kept_bytes / 1048576.0);
    std::cout << "[DUQUANT] the same selection in the fork's scripts:\n"
              << layers_environment_line(config, decisions) << "\n";
  }
  std::cout << fmt::format("[DUQUANT] Total layers replaced: {}\n", result.layers.size());
  print_component_table(decisions, std::cout);
  // Both files or neither: the model is removed again if the report cannot be written, or if a
  // signal ends the process before the report is complete (registered before the model's rename,
  // so no signal falls between the two). The model goes first so that the report can hold the
  // time its save took.
  {
    RemoveOnSignal remove_model_on_signal(arguments.output_path);
    {
      StageTimer timer(load_and_save, Stage::Save);
      save_model_atomically(result.model, arguments.output_path);
    }
    result.stages += load_and_save;
    try {
      auto report = quantize_report_json(config, result, decisions, arguments.model_path, arguments.output_path);
      for (const auto& [path, rank] : kept) report["kept_float"].push_back({{"path", path}, {"rank", rank}});
      if (!kept.empty()) report["layers_environment"] = layers_environment_line(config, decisions);
      write_text_atomically(report.dump(2) + "\n", report_path);
    } catch (...) {
      std::remove(arguments.output_path.c_str());
      throw;
    }
  }
  std::cout << fmt::format("[DUQUANT] target layer memory: {:.2f} MiB as bf16, {:.2f} MiB as W4A8 ({:.2f}x smaller)\n",
                           result.bf16_bytes / 1048576.0, result.w4a8_bytes / 1048576.0,
                           static_cast<double>(result.bf16_bytes) / std::max<int64_t>(result.w4a8_bytes, 1));
  print_stage_table(result.stages, seconds_since(start), std::cout);
  std::cout << fmt::format("[DUQUANT] wrote {} ({:.1f} MiB, input {:.1f} MiB) and report {}\n", arguments.output_path,
                           file_size_bytes(arguments.output_path) / 1048576.0,
                           file_size_bytes(arguments.model_path) / 1048576.0, report_path);
  return 0;
}

struct SensitivityArguments {
  std::string model_path, quantized_path, inputs_path, json_path, device = "auto";
  std::vector<std::string> calibration_paths;
  std::vector<int64_t> curve_points;  // empty: default_curve_points
};

// The quantized model either comes from `--quantized` (a model `duquant quantize` wrote with the
// same selection: ranking a full-size model then costs forwards only, not another quantize) or
// is quantized here from `--calib`.
int sensitivity(const SensitivityArguments& arguments, Config config) {
  if (arguments.calibration_paths.empty() == arguments.quantized_path.empty()) {
    throw UserError(arguments.quantized_path.empty()
                        ? "sensitivity needs a quantized model: --calib FILE or DIRECTORY to quantize here, or "
                          "--quantized Q.pt written by `duquant quantize`"
                        : "--calib and --quantized both given; --quantized already holds the quantized layers, "
                          "drop --calib",
                    ExitCode::Usage);
  }
  auto model = load_model(arguments.model_path);
  if (!arguments.json_path.empty()) check_writable(arguments.json_path);
  detect_scope(config, model);
  PipelineOptions pipeline;
  pipeline.device = parse_device(arguments.device);
  const auto recipe = QuantizeRecipe::from_config(config);
  const auto decisions = select_linears(model, SelectionRules::from_config(config));
  const auto targets = target_paths(decisions);
  const auto groups = static_cast<int64_t>(target_groups(targets).size());
  check_curve_points(arguments.curve_points, groups);
  const auto observations = arguments.calibration_paths.empty() ? std::vector<Observation>{}
                                                                 : load_observations(arguments.calibration_paths);
  const auto& inputs_path = arguments.inputs_path;
  const std::vector<Observation> evaluation = {{inputs_path, load_inputs(inputs_path)}};
  for (const auto& observation : observations) {
    if (observation.path == inputs_path || same_file(observation.path, inputs_path)) {
      throw UserError(fmt::format("--inputs '{}' is also a calibration input; measure on held-out inputs "
                                  "(make_pi0.py writes STEM.heldout.inputs.pt)",
                                  inputs_path),
                      ExitCode::Usage);
    }
  }
  print_configuration(config, std::cout);
  print_matched_count(decisions, std::cout);
  const bool terminal = isatty(STDERR_FILENO);
  const auto start = Clock::now();
  torch::jit::Module quantized;
  if (arguments.quantized_path.empty()) {
    quantized = quantize_model(model, decisions, recipe, observations,
                               [&](const LayerReport&, size_t done, size_t total) {
                                 if (terminal) fmt::print(stderr, "\r[quantize {}/{}] {:.0f} s", done, total, seconds_since(start));
                               },
                               observation_progress(terminal, start), pipeline)
                    .model;
    if (terminal) fmt::print(stderr, "\n");
  } else {
    // Only the W4A8 layers are kept (swapped into the original, tensors shared); the rest of the
    // loaded copy (every float tensor again: 4 GiB on the full-size pi0) is freed at once.
    const auto loaded = load_model(arguments.quantized_path);
    check_quantizes_exactly(loaded, targets, arguments.quantized_path);
    quantized = with_quantized_layers(model, loaded, std::set<std::string>(targets.begin(), targets.end()));
    std::cout << fmt::format("[DUQUANT] quantized layers from {}\n", arguments.quantized_path);
  }
  const double quantize_seconds = seconds_since(start);
  // One line per forward: a full-size ranking runs for an hour on a CPU.
  const auto result = measure_sensitivity(
      model, quantized, targets, evaluation,
      arguments.curve_points.empty() ? default_curve_points(groups) : arguments.curve_points,
      [&](const std::string& what, double error, size_t done, size_t total) {
        std::cout << fmt::format("[DUQUANT][SENSITIVITY] {:>3}/{} {:<36} rel L2 {:.4e}  {:.0f} s\n", done, total, what,
                                 error, seconds_since(start))
                  << std::flush;
      });

  std::cout << fmt::format("[DUQUANT][SENSITIVITY] all {} groups quantized: end-to-end relative L2 {:.4e} on {}\n",
                           result.ranked.size(), result.all_quantized_error, inputs_path);
  std::cout << "[DUQUANT][SENSITIVITY] end-to-end error with only one group quantized, worst first:\n";
  for (size_t r = 0; r < result.ranked.size(); ++r) {
    const auto& entry = result.ranked[r];
    std::cout << fmt::format("  {:>3}  {:<28} {:>2} layers  rel L2 {:.4e}\n", r + 1, entry.group.name,
                             entry.group.paths.size(), entry.end_to_end_error);
  }
  std::cout << "[DUQUANT][SENSITIVITY] end-to-end error with the K worst groups kept in floating point:\n";
  for (const auto& point : result.curve) {
    std::cout << fmt::format("  K {:>3} ({:>3} layers)  rel L2 {:.4e}  target memory {:.2f} MiB\n", point.kept_groups,
                             point.kept_layers, point.end_to_end_error, point.target_bytes / 1048576.0);
  }
  std::cout << fmt::format("[DUQUANT][SENSITIVITY] {} {:.1f} s, {} forwards {:.1f} s, total {:.1f} s\n",
                           arguments.quantized_path.empty() ? "quantize" : "load", quantize_seconds, result.forwards,
                           result.seconds, seconds_since(start));
  if (!arguments.json_path.empty()) {
    auto json = sensitivity_json(result, arguments.model_path);
    json["inputs"] = inputs_path;
    json["calibration"] = arguments.calibration_paths;
    if (!arguments.quantized_path.empty()) json["quantized"] = arguments.quantized_path;
    json["quantize_seconds"] = quantize_seconds;
    write_text_atomically(json.dump(2) + "\n", arguments.json_path);
    std::cout << fmt::format("[DUQUANT] wrote {}\n", arguments.json_path);
  }
  return 0;
}

torch::Tensor output_tensor(const torch::jit::IValue& output) {
  if (output.isTensor()) return output.toTensor();
  if (output.isTuple() && output.toTupleRef().elements().size() > 0 && output.toTupleRef().elements()[0].isTensor()) {
    return output.toTupleRef().elements()[0].toTensor();
  }
  throw UserError("the model's forward does not return a tensor (or a tuple starting with one)");
}

struct RunOptions {
  std::string device = "auto";
  bool cuda_graph = false;
  int repeat = 1;
  // "auto": one-shot for a single call, profiling for --repeat N > 1 and --cuda-graph (the steady
  // state); "profiling" or "one-shot" to compare the first calls of both (README, executor).
  std::string executor = "auto";

  bool profiling_executor() const {
    if (executor == "auto") return repeat > 1 || cuda_graph;
    return executor == "profiling";
  }
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t middle = values.size() / 2;
  return values.size() % 2 ? values[middle] : 0.5 * (values[middle - 1] + values[middle]);
}

// --repeat N times the first call and the median of the others (one-shot vs steady state);
// --cuda-graph captures the forward once (include/duquant/cuda_graph.h) and replays it.
int run(const std::string& model_path, const std::string& inputs_path, const std::string& save_path,
        const RunOptions& options) {
  const auto device = parse_device(options.device);
  if (options.cuda_graph && !device.is_cuda()) {
    throw UserError(options.device == "auto"
                        ? "--cuda-graph needs a CUDA device and none is available; run without --cuda-graph"
                        : "--cuda-graph needs --device cuda (or auto on a machine with a GPU); drop --cuda-graph to "
                          "run on the CPU",
                    options.device == "auto" ? ExitCode::Failure : ExitCode::Usage);
  }
  auto model = load_model(model_path);
  if (!save_path.empty()) check_writable(save_path);
  const auto inputs = inputs_on(load_inputs(inputs_path), device);
  model.to(device);  // by device only: Module::to(dtype) would cast the packed weights (DESIGN 5)
  // Host clock around each call, finished on the device: the latency a caller waits for.
  auto finish = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  std::unique_ptr<CudaGraphRunner> graph;
  torch::jit::IValue result;
  auto start = Clock::now();
  if (options.cuda_graph) {
    graph = CudaGraphRunner::capture(model, inputs);
    result = graph->replay();
  } else {
    result = run_forward(model, inputs);
  }
  finish();
  const double first_seconds = seconds_since(start);
  std::vector<double> steady_seconds;
  for (int call = 1; call < options.repeat; ++call) {
    start = Clock::now();
    result = graph ? graph->replay() : run_forward(model, inputs);
    finish();
    steady_seconds.push_back(seconds_since(start));
  }
  const auto output = output_tensor(result).to(torch::kCPU);
  const auto as_float = output.to(torch::kFloat);
  const std::string where = fmt::format("{}{}", device.str(), graph ? " (CUDA graph)" : "");
  std::cout << fmt::format("[DUQUANT] ran {} on {}: output {} {} in {:.3f} s; mean {:.6g}, std {:.6g}, max |y| {:.6g}\n",
                           model_path, where, fmt::join(output.sizes(), "x"), c10::toString(output.scalar_type()),
                           first_seconds, as_float.mean().item<double>(), as_float.std().item<double>(),
                           as_float.abs().max().item<double>());
  // W4A8 layers of a shared input (q/k/v, gate/up) quantize it once (ops.h): say how often.
  const auto reuse = ops::activation_reuse_stats();
  if (reuse.reused + reuse.computed > 0) {
    std::cout << fmt::format("[DUQUANT] W4A8 calls: {} quantized their input, {} reused the activations of the "
                             "layer before them on the same input\n",
                             reuse.computed, reuse.reused);
    if (device.is_cuda()) {
      std::cout << "[DUQUANT] W4A8 CUDA paths: " << ops::cuda_paths_in_effect() << "\n";
    }
  }
  if (!steady_seconds.empty()) {
    // The first calls one by one: the profiling executor profiles call 1 and re-optimises on call 2.
    std::string first_calls = fmt::format("1: {:.2f} ms", 1e3 * first_seconds);
    for (size_t call = 0; call < std::min<size_t>(2, steady_seconds.size()); ++call) {
      first_calls += fmt::format(", {}: {:.2f} ms", call + 2, 1e3 * steady_seconds[call]);
    }
    std::cout << fmt::format("[DUQUANT] {} executor, calls {}\n",
                             options.profiling_executor() ? "profiling" : "one-shot", first_calls);
    const auto [fastest, slowest] = std::minmax_element(steady_seconds.begin(), steady_seconds.end());
    std::cout << fmt::format("[DUQUANT] {} calls: first {:.2f} ms{}, then median {:.2f} ms (min {:.2f}, max {:.2f}) "
                             "over {} call{}\n",
                             options.repeat, 1e3 * first_seconds, graph ? " (warm-up, capture and one replay)" : "",
                             1e3 * median(steady_seconds), 1e3 * *fastest, 1e3 * *slowest, steady_seconds.size(),
                             steady_seconds.size() == 1 ? "" : "s");
  }
  if (!save_path.empty()) {
    torch::jit::Module container(c10::QualifiedName("__torch__.duquant.Output"),
                                 std::make_shared<torch::jit::CompilationUnit>());
    container.register_buffer("output", output);
    save_model_atomically(container, save_path);
    std::cout << fmt::format("[DUQUANT] wrote output to {}\n", save_path);
  }
  return 0;
}

struct ErrorFigures {
  double relative_l2 = 0, cosine = 0, max_abs = 0;
};

ErrorFigures compare(const torch::Tensor& approximate, const torch::Tensor& exact) {
  const auto a = approximate.to(torch::kDouble).flatten(), e = exact.to(torch::kDouble).flatten();
  ErrorFigures figures;
  figures.relative_l2 = ((a - e).norm() / e.norm().clamp_min(1e-30)).item<double>();
  figures.cosine = (a.dot(e) / (a.norm() * e.norm()).clamp_min(1e-30)).item<double>();
  figures.max_abs = (a - e).abs().max().item<double>();
  return figures;
}

// The two models never coexist in memory (peak: the larger of the two, plus the small per-layer
// state): the quantized model runs first and only its W4A8 layers' state (the packed weights) is
// kept; then the original runs, its observed per-layer input rows go through its float Linear
// and through the kept W4A8 layers. Both forwards and the observation run on `device_name`; the
// per-layer comparison runs on the CPU (a few hundred rows per layer).
int verify(const std::string& original_path, const std::string& quantized_path, const std::string& inputs_path,
           const std::string& json_path, int64_t rows, const std::string& device_name) {
  if (rows < 1) throw UserError("--rows must be at least 1", ExitCode::Usage);
  const auto device = parse_device(device_name);
  if (!json_path.empty()) check_writable(json_path);
  const auto inputs = load_inputs(inputs_path);
  const auto device_inputs = inputs_on(inputs, device);

  std::vector<std::string> layers;
  std::map<std::string, W4A8LinearState> quantized_layers;
  torch::Tensor approximate;
  {
    auto quantized = load_model(quantized_path);
    for (const auto& item : quantized.named_modules()) {
      if (is_quantized_linear(item.value)) layers.push_back(item.name);
    }
    if (layers.empty()) {
      throw UserError(fmt::format("'{}' has no W4A8 layers; give the quantized model second", quantized_path));
    }
    quantized.to(device);  // by device only (DESIGN 5)
    approximate = output_tensor(run_forward(quantized, device_inputs)).to(torch::kCPU);
    for (const auto& item : quantized.named_modules()) {
      if (is_quantized_linear(item.value)) {
        quantized_layers.emplace(item.name, W4A8LinearClass::read(item.value).to(torch::kCPU));
      }
    }
  }

  torch::Tensor exact;
  std::vector<std::pair<std::string, ErrorFigures>> per_layer;
  {
    auto original = load_model(original_path);
    std::map<std::string, torch::jit::Module> originals;
    for (const auto& item : original.named_modules()) originals.emplace(item.name, item.value);
    for (const auto& path : layers) {
      if (!originals.count(path) || !is_linear(originals.at(path))) {
        throw UserError(fmt::format("'{}' has no Linear at '{}', where '{}' has a W4A8 layer; give the model that "
                                    "was quantized",
                                    original_path, path, quantized_path));
      }
    }
    original.to(device);
    exact = output_tensor(run_forward(original, device_inputs)).to(torch::kCPU);
    if (exact.sizes() != approximate.sizes()) {
      throw UserError("the two models' outputs differ in shape; are they the same model?");
    }
    // Per layer: the original float layer and the kept W4A8 layer on the same observed input rows.
    // Each layer's rows, reference and W4A8 state are dropped as soon as its figures are taken, so
    // the comparison adds one layer's temporaries to the original model, not all 252 layers' at
    // once. Observation brings the model back to the CPU.
    torch::NoGradGuard no_grad;
    auto statistics = calibrate(original, layers, inputs, rows, device);
    for (const auto& path : layers) {
      const auto sample = statistics.at(path).sample.to(torch::kCPU, torch::kFloat);  // kept in the input's dtype
      statistics.erase(path);
      const auto& linear = originals.at(path);
      const auto bias = linear_bias(linear);
      const auto reference = torch::linear(sample, linear.attr("weight").toTensor().to(torch::kCPU, torch::kFloat),
                                           bias.defined() ? bias.to(torch::kCPU, torch::kFloat) : torch::Tensor());
      per_layer.emplace_back(path, compare(quantized_layers.at(path).forward(sample), reference));
      quantized_layers.erase(path);
    }
  }
  const auto end_to_end = compare(approximate, exact);

  std::sort(per_layer.begin(), per_layer.end(),
            [](const auto& a, const auto& b) { return a.second.relative_l2 > b.second.relative_l2; });

  std::cout << fmt::format("[DUQUANT][VERIFY] end-to-end: relative L2 {:.4e}, cosine {:.6f}, max abs {:.4e}\n",
                           end_to_end.relative_l2, end_to_end.cosine, end_to_end.max_abs);
  std::cout << fmt::format("[DUQUANT][VERIFY] per-layer output error, worst first ({} layers):\n", per_layer.size());
  for (const auto& [path, figures] : per_layer) {
    std::cout << fmt::format("  {:<70} {:<17} rel L2 {:.4e}  cosine {:.6f}\n", path,
                             component_name(classify_component(path)), figures.relative_l2, figures.cosine);
  }
  std::cout << fmt::format("[DUQUANT][VERIFY] peak resident memory {:.2f} GiB (the two models ran one after the other)\n",
                           peak_resident_bytes() / 1073741824.0);
  if (!json_path.empty()) {
    nlohmann::json json;
    json["peak_resident_bytes"] = peak_resident_bytes();
    json["end_to_end"] = {{"relative_l2", end_to_end.relative_l2}, {"cosine", end_to_end.cosine},
                          {"max_abs", end_to_end.max_abs}};
    for (const auto& [path, figures] : per_layer) {
      json["layers"].push_back({{"path", path}, {"component", component_name(classify_component(path))},
                                {"relative_l2", figures.relative_l2}, {"cosine", figures.cosine},
                                {"max_abs", figures.max_abs}});
    }
    write_text_atomically(json.dump(2) + "\n", json_path);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return_large_blocks_to_the_system();
  install_large_block_cache();
  CLI::App app{"duquant: W4A8 DuQuant quantization of TorchScript pi0 models"};
  app.require_subcommand(1);

  std::string model_path, inputs_path, save_path, json_path;
  std::string quantized_path;
  RunOptions run_options;
  QuantizeArguments quantize_arguments;
  bool json = false;
  int64_t rows = 256;

  auto* list = app.add_subcommand("list", "show which Linear layers would be quantized, and which rule decided each");
  list->add_option("model", model_path, "TorchScript model (.pt)")->required();
  list->add_flag("--json", json, "print JSON instead of text");
  SettingFlags list_flags;
  list_flags.add_to(*list);

  auto* quantize_command = app.add_subcommand("quantize", "quantize the selected layers to W4A8 DuQuant");
  quantize_command->add_option("model", quantize_arguments.model_path, "TorchScript model (.pt)")->required();
  quantize_command->add_option("-o,--output", quantize_arguments.output_path, "quantized TorchScript model to write");
  quantize_command
      ->add_option("--calib", quantize_arguments.calibration_paths,
                   "calibration observations: an .inputs.pt file or a directory of them (repeatable)")
      ->allow_extra_args(false);
  quantize_command->add_flag("--data-free", quantize_arguments.data_free,
                             "quantize without calibration data (less accurate)");
  quantize_command->add_option("--report", quantize_arguments.report_path,
                               "JSON report (default: OUTPUT stem + .report.json)");
  quantize_command->add_option("--keep-float", quantize_arguments.keep_float,
                               "leave the K groups most harmful to the actions in floating point");
  quantize_command->add_option("--sensitivity", quantize_arguments.sensitivity_path,
                               "ranking for --keep-float from `duquant sensitivity --json` (default: measured on the "
                               "calibration inputs)");
  quantize_command->add_option("--device", quantize_arguments.device,
                               "where calibration and the transform run: auto (CUDA when present), cpu or cuda");
  SettingFlags quantize_flags;
  quantize_flags.add_to(*quantize_command);

  SensitivityArguments sensitivity_arguments;
  auto* sensitivity_command = app.add_subcommand(
      "sensitivity", "rank layer groups by the end-to-end error each causes alone; error vs groups kept float");
  sensitivity_command->add_option("model", sensitivity_arguments.model_path, "TorchScript model (.pt)")->required();
  sensitivity_command
      ->add_option("--calib", sensitivity_arguments.calibration_paths,
                   "calibration observations to quantize with: file or directory (repeatable)")
      ->allow_extra_args(false);
  sensitivity_command->add_option("--quantized", sensitivity_arguments.quantized_path,
                                  "instead of --calib: the model `duquant quantize` wrote with the same selection");
  sensitivity_command->add_option("--inputs", sensitivity_arguments.inputs_path, "held-out evaluation inputs (.inputs.pt)")
      ->required();
  sensitivity_command->add_option("--json", sensitivity_arguments.json_path, "write the ranking and the curve as JSON");
  sensitivity_command
      ->add_option("--curve", sensitivity_arguments.curve_points,
                   "numbers of worst groups kept float to measure, e.g. 0,4,8,16 (default 0..16, then doubling)")
      ->delimiter(',');
  sensitivity_command->add_option("--device", sensitivity_arguments.device,
                                  "where calibration and the transform run: auto (CUDA when present), cpu or cuda");
  SettingFlags sensitivity_flags;
  sensitivity_flags.add_to(*sensitivity_command);

  auto* run_command = app.add_subcommand("run", "run a model (quantized or not) on saved inputs");
  run_command->add_option("model", model_path, "TorchScript model (.pt)")->required();
  run_command->add_option("--inputs", inputs_path, "inputs (.inputs.pt container)")->required();
  run_command->add_option("--save", save_path, "write the output tensor (TorchScript container, buffer 'output')");
  run_command->add_option("--device", run_options.device, "auto (CUDA when present), cpu or cuda");
  run_command->add_flag("--cuda-graph", run_options.cuda_graph,
                        "capture the whole forward into a CUDA graph once, then replay it (needs CUDA)");
  run_command->add_option("--repeat", run_options.repeat, "run N times: first call and median of the others")
      ->check(CLI::Range(1, 1000000));
  run_command
      ->add_option("--executor", run_options.executor,
                   "TorchScript executor: auto (one-shot for one call, profiling with --repeat or --cuda-graph), "
                   "profiling or one-shot")
      ->check(CLI::IsMember({"auto", "profiling", "one-shot"}));

  auto* verify_command = app.add_subcommand("verify", "compare a quantized model with its original");
  verify_command->add_option("original", model_path, "original TorchScript model")->required();
  verify_command->add_option("quantized", quantized_path, "quantized TorchScript model")->required();
  verify_command->add_option("--inputs", inputs_path, "inputs (.inputs.pt container)")->required();
  verify_command->add_option("--json", json_path, "write the figures as JSON");
  verify_command->add_option("--rows", rows, "token rows per layer for the per-layer errors");
  std::string verify_device = "auto";
  verify_command->add_option("--device", verify_device, "where both models run: auto (CUDA when present), cpu or cuda");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::CallForAllHelp& help) {
    return app.exit(help);
  } catch (const CLI::ParseError& error) {
    std::cerr << "duquant: error: " << one_line(error.what()) << "; see duquant --help\n";
    return static_cast<int>(ExitCode::Usage);
  }
  // Every command runs the model once or a few times (calibration, run, verify), except `run
  // --repeat N` and `run --cuda-graph`, which measure or capture the optimised steady state
  // (`run --executor` chooses explicitly).
  const bool profiling_run = run_command->parsed() && run_options.profiling_executor();
  if (!profiling_run) use_one_shot_executor();
  try {
    if (list->parsed()) return list_or_dry_run(load_model(model_path), list_flags.resolve(*list), json);
    if (quantize_command->parsed()) return quantize(quantize_arguments, quantize_flags.resolve(*quantize_command));
    if (sensitivity_command->parsed()) {
      return sensitivity(sensitivity_arguments, sensitivity_flags.resolve(*sensitivity_command));
    }
    if (run_command->parsed()) return run(model_path, inputs_path, save_path, run_options);
    if (verify_command->parsed()) return verify(model_path, quantized_path, inputs_path, json_path, rows, verify_device);
  } catch (const UserError& error) {
    std::cerr << "duquant: error: " << error.what() << "\n";
    return static_cast<int>(error.code());
  } catch (const c10::Error& error) {
    std::cerr << "duquant: error: " << one_line(error.what_without_backtrace()) << "\n";
    // PyTorch's own switch for C++ stack traces: where inside duquant a LibTorch call failed.
    const char* stack_traces = std::getenv("TORCH_SHOW_CPP_STACKTRACES");
    if (stack_traces && std::string(stack_traces) == "1") std::cerr << error.what() << "\n";
    return static_cast<int>(ExitCode::Failure);
  } catch (const std::exception& error) {
    std::cerr << "duquant: error: " << one_line(error.what()) << "\n";
    return static_cast<int>(ExitCode::Failure);
  }
  return 0;
}
