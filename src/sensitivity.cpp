// Layer sensitivity (sensitivity.h): quantize once, toggle groups, rank by end-to-end error.
#include "duquant/sensitivity.h"

#include <fmt/format.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <regex>
#include <tuple>

#include "duquant/errors.h"
#include "duquant/swap.h"

namespace duquant {
namespace {

torch::Tensor output_tensor(const torch::jit::IValue& output) {
  if (output.isTensor()) return output.toTensor();
  if (output.isTuple() && !output.toTupleRef().elements().empty() && output.toTupleRef().elements()[0].isTensor()) {
    return output.toTupleRef().elements()[0].toTensor();
  }
  throw UserError("the model's forward does not return a tensor (or a tuple starting with one)");
}

// Every evaluated model is a fresh type-split copy that runs only on the evaluation inputs: the
// graph executor's profiling and optimisation passes would cost more than those few forwards,
// so they are switched off for the measurement (and restored after, also on errors).
class UnoptimizedExecutor {
 public:
  UnoptimizedExecutor() : previous_(torch::jit::getGraphExecutorOptimize()) { torch::jit::setGraphExecutorOptimize(false); }
  ~UnoptimizedExecutor() { torch::jit::setGraphExecutorOptimize(previous_); }
  UnoptimizedExecutor(const UnoptimizedExecutor&) = delete;
  UnoptimizedExecutor& operator=(const UnoptimizedExecutor&) = delete;

 private:
  bool previous_;
};

// All outputs of the evaluation observations, flattened and stacked, in float64.
torch::Tensor evaluation_outputs(torch::jit::Module model, const std::vector<Observation>& evaluation) {
  std::vector<torch::Tensor> outputs;
  for (const auto& observation : evaluation) {
    outputs.push_back(output_tensor(run_forward(model, observation.inputs)).to(torch::kDouble).flatten());
  }
  return torch::cat(outputs);
}

double relative_l2(const torch::Tensor& approximate, const torch::Tensor& exact) {
  return ((approximate - exact).norm() / exact.norm().clamp_min(1e-30)).item<double>();
}

std::map<std::string, torch::jit::Module> modules_by_path(const torch::jit::Module& model) {
  std::map<std::string, torch::jit::Module> modules;
  for (const auto& item : model.named_modules()) modules.emplace(item.name, item.value);
  return modules;
}

// bf16 bytes of the float layers and W4A8 bytes of the quantized ones at `paths`; tensors shared
// between layers (the transform of q/k/v, gate/up) are counted once.
std::pair<int64_t, int64_t> group_bytes(const std::vector<std::string>& paths,
                                        const std::map<std::string, torch::jit::Module>& originals,
                                        const std::map<std::string, torch::jit::Module>& quantized) {
  int64_t bf16 = 0, w4a8 = 0;
  std::set<const void*> seen;
  for (const auto& path : paths) {
    const auto& linear = originals.at(path);
    bf16 += linear.attr("weight").toTensor().numel() * 2;
    const auto bias = linear_bias(linear);
    if (bias.defined()) bf16 += bias.numel() * 2;
    for (const auto& buffer : quantized.at(path).named_buffers()) {
      if (buffer.value.numel() > 0 && seen.insert(buffer.value.data_ptr()).second) w4a8 += buffer.value.nbytes();
    }
  }
  return {bf16, w4a8};
}

nlohmann::json group_json(const TargetGroup& group) {
  return {{"name", group.name},
          {"component", component_name(group.component)},
          {"layer_index", group.layer_index},
          {"paths", group.paths}};
}

}  // namespace

std::vector<int64_t> default_curve_points(int64_t groups) {
  std::vector<int64_t> points;
  for (int64_t k = 0; k <= std::min<int64_t>(16, groups); ++k) points.push_back(k);
  for (int64_t k = 32; k < groups; k *= 2) points.push_back(k);
  if (points.back() != groups) points.push_back(groups);
  return points;
}

void check_curve_points(const std::vector<int64_t>& points, int64_t groups) {
  for (int64_t keep : points) {
    if (keep < 0 || keep > groups) {
      throw UserError(fmt::format("--curve {}: a point is a number of groups kept float, 0 to {}", keep, groups),
                      ExitCode::Usage);
    }
  }
}

void check_quantizes_exactly(const torch::jit::Module& quantized, const std::vector<std::string>& targets,
                             const std::string& quantized_path) {
  const std::set<std::string> target_set(targets.begin(), targets.end());
  std::set<std::string> quantized_layers;
  for (const auto& item : quantized.named_modules()) {
    if (is_quantized_linear(item.value)) quantized_layers.insert(item.name);
  }
  const std::string fix =
      "give the model `duquant quantize` wrote from this model with the same OPENPI_DUQUANT_* selection (and no "
      "--keep-float), or --calib to quantize here";
  for (const auto& path : targets) {
    if (!quantized_layers.count(path)) {
      throw UserError(fmt::format("'{}' leaves target '{}' in floating point ({} of the {} targets are W4A8); {}",
                                  quantized_path, path, quantized_layers.size(), targets.size(), fix),
                      ExitCode::Usage);
    }
  }
  for (const auto& path : quantized_layers) {
    if (!target_set.count(path)) {
      throw UserError(fmt::format("'{}' quantizes '{}', which is not a target of this selection; {}", quantized_path,
                                  path, fix),
                      ExitCode::Usage);
    }
  }
}

std::vector<TargetGroup> target_groups(const std::vector<std::string>& targets) {
  static const std::regex layer_index(R"((?:^|\.)layers\.(\d+)(?:\.|$))");
  std::vector<TargetGroup> groups;
  std::map<std::pair<Component, int64_t>, size_t> position;
  for (const auto& path : targets) {
    const Component component = classify_component(path);
    std::smatch match;
    const int64_t index = std::regex_search(path, match, layer_index) ? std::stoll(match[1].str()) : -1;
    const auto key = std::make_pair(component, index);
    auto found = position.find(key);
    if (found == position.end()) {
      TargetGroup group;
      group.component = component;
      group.layer_index = index;
      group.name = index >= 0 ? fmt::format("{} layer {}", component_name(component), index)
                              : component_name(component);
      found = position.emplace(key, groups.size()).first;
      groups.push_back(std::move(group));
    }
    groups[found->second].paths.push_back(path);
  }
  return groups;
}

torch::jit::Module with_quantized_layers(const torch::jit::Module& original, const torch::jit::Module& quantized,
                                         const std::set<std::string>& paths) {
  std::map<std::string, torch::jit::Module> replacements;
  for (const auto& item : quantized.named_modules()) {
    if (paths.count(item.name)) replacements.emplace(item.name, item.value);
  }
  for (const auto& path : paths) {
    if (!replacements.count(path) || !is_quantized_linear(replacements.at(path))) {
      throw UserError(fmt::format("'{}' is not a W4A8 layer of the quantized model", path));
    }
  }
  return replace_submodules(original, replacements);
}

SensitivityResult measure_sensitivity(const torch::jit::Module& original, const torch::jit::Module& quantized,
                                      const std::vector<std::string>& targets,
                                      const std::vector<Observation>& evaluation,
                                      const std::vector<int64_t>& curve_points,
                                      const SensitivityCallback& progress) {
  torch::NoGradGuard no_grad;
  UnoptimizedExecutor executor;
  if (evaluation.empty()) throw UserError("sensitivity needs evaluation inputs (--inputs FILE)", ExitCode::Usage);
  const auto groups = target_groups(targets);
  const auto group_count = static_cast<int64_t>(groups.size());
  check_curve_points(curve_points, group_count);
  const auto start = std::chrono::steady_clock::now();
  SensitivityResult result;
  result.evaluation_observations = static_cast<int64_t>(evaluation.size());
  const auto originals = modules_by_path(original);
  const auto quantized_modules = modules_by_path(quantized);
  // K = 0 is the every-group forward and K = all groups is the float model: neither runs again.
  const auto needs_forward = [&](int64_t keep) { return keep != 0 && keep != group_count; };
  const size_t total = groups.size() + 1 +
                       static_cast<size_t>(std::count_if(curve_points.begin(), curve_points.end(), needs_forward));
  size_t done = 0;
  auto report = [&](const std::string& what, double error) {
    if (progress) progress(what, error, ++done, total);
  };

  const auto exact = evaluation_outputs(original, evaluation);
  result.all_quantized_error = relative_l2(evaluation_outputs(quantized, evaluation), exact);
  report("all groups quantized", result.all_quantized_error);
  for (const auto& group : groups) {
    GroupSensitivity sensitivity;
    sensitivity.group = group;
    const std::set<std::string> paths(group.paths.begin(), group.paths.end());
    sensitivity.end_to_end_error =
        relative_l2(evaluation_outputs(with_quantized_layers(original, quantized, paths), evaluation), exact);
    std::tie(sensitivity.bf16_bytes, sensitivity.w4a8_bytes) = group_bytes(group.paths, originals, quantized_modules);
    report(group.name, sensitivity.end_to_end_error);
    result.ranked.push_back(std::move(sensitivity));
  }
  // Worst first; ties keep model order.
  std::stable_sort(result.ranked.begin(), result.ranked.end(), [](const GroupSensitivity& a, const GroupSensitivity& b) {
    return a.end_to_end_error > b.end_to_end_error;
  });

  for (int64_t keep : curve_points) {
    KeptFloatPoint point;
    point.kept_groups = keep;
    std::set<std::string> quantized_paths(targets.begin(), targets.end());
    for (int64_t r = 0; r < keep; ++r) {
      for (const auto& path : result.ranked[static_cast<size_t>(r)].group.paths) quantized_paths.erase(path);
      point.kept_layers += static_cast<int64_t>(result.ranked[static_cast<size_t>(r)].group.paths.size());
    }
    for (size_t r = 0; r < result.ranked.size(); ++r) {
      point.target_bytes += static_cast<int64_t>(r) < keep ? result.ranked[r].bf16_bytes : result.ranked[r].w4a8_bytes;
    }
    if (keep == 0) {
      point.end_to_end_error = result.all_quantized_error;
    } else if (keep == group_count) {
      point.end_to_end_error = 0.0;
    } else {
      point.end_to_end_error = relative_l2(
          evaluation_outputs(with_quantized_layers(original, quantized, quantized_paths), evaluation), exact);
      report(fmt::format("{} worst groups kept float", keep), point.end_to_end_error);
    }
    result.curve.push_back(point);
  }
  result.forwards = static_cast<int64_t>((done + 1) * evaluation.size());
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

nlohmann::json sensitivity_json(const SensitivityResult& result, const std::string& model_path) {
  nlohmann::json json;
  json["model"] = model_path;
  json["metric"] = "relative L2 of the model outputs (actions) against the float model, evaluation inputs";
  json["evaluation_observations"] = result.evaluation_observations;
  json["all_quantized_relative_l2"] = result.all_quantized_error;
  json["forwards"] = result.forwards;
  json["seconds"] = result.seconds;
  json["ranking"] = nlohmann::json::array();
  for (size_t r = 0; r < result.ranked.size(); ++r) {
    auto entry = group_json(result.ranked[r].group);
    entry["rank"] = r + 1;
    entry["relative_l2_only_this_group_quantized"] = result.ranked[r].end_to_end_error;
    entry["bf16_bytes"] = result.ranked[r].bf16_bytes;
    entry["w4a8_bytes"] = result.ranked[r].w4a8_bytes;
    json["ranking"].push_back(entry);
  }
  json["kept_float_curve"] = nlohmann::json::array();
  for (const auto& point : result.curve) {
    json["kept_float_curve"].push_back({{"kept_groups", point.kept_groups},
                                        {"kept_layers", point.kept_layers},
                                        {"relative_l2", point.end_to_end_error},
                                        {"target_bytes", point.target_bytes}});
  }
  return json;
}

std::vector<TargetGroup> read_sensitivity_ranking(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw UserError(fmt::format("sensitivity file '{}' cannot be read; write it with `duquant sensitivity "
                                         "MODEL --calib C --inputs HELD_OUT --json FILE`",
                                         path));
  nlohmann::json json;
  try {
    file >> json;
  } catch (const std::exception&) {
    throw UserError(fmt::format("sensitivity file '{}' is not JSON; write it with `duquant sensitivity ... --json`",
                                path));
  }
  if (!json.contains("ranking") || !json["ranking"].is_array()) {
    throw UserError(fmt::format("sensitivity file '{}' has no 'ranking' list; write it with `duquant sensitivity "
                                "... --json`",
                                path));
  }
  std::vector<TargetGroup> ranking;
  for (const auto& entry : json["ranking"]) {
    TargetGroup group;
    group.name = entry.value("name", "");
    group.layer_index = entry.value("layer_index", int64_t{-1});
    for (const auto& layer : entry.value("paths", std::vector<std::string>{})) group.paths.push_back(layer);
    if (!group.paths.empty()) group.component = classify_component(group.paths.front());
    ranking.push_back(std::move(group));
  }
  return ranking;
}

std::map<std::string, int64_t> layers_kept_float(const std::vector<TargetGroup>& ranking, int64_t keep,
                                                 const std::vector<std::string>& targets) {
  if (keep < 0) throw UserError("--keep-float must be at least 0", ExitCode::Usage);
  if (keep > static_cast<int64_t>(ranking.size())) {
    throw UserError(fmt::format("--keep-float {} exceeds the {} ranked groups", keep, ranking.size()), ExitCode::Usage);
  }
  const std::set<std::string> target_set(targets.begin(), targets.end());
  std::map<std::string, int64_t> kept;
  for (int64_t r = 0; r < keep; ++r) {
    for (const auto& path : ranking[static_cast<size_t>(r)].paths) {
      if (!target_set.count(path)) {
        throw UserError(fmt::format("the sensitivity ranking names '{}', which is not a target of this selection; "
                                    "rank the same model and selection",
                                    path),
                        ExitCode::Usage);
      }
      kept.emplace(path, r + 1);
    }
  }
  return kept;
}

void mark_kept_float(std::vector<LinearDecision>& decisions, const std::map<std::string, int64_t>& kept) {
  for (auto& decision : decisions) {
    auto found = kept.find(decision.path);
    if (found == kept.end() || !decision.target) continue;
    decision.target = false;
    decision.rule = Rule::KeptFloat;
    decision.detail = fmt::format("kept in floating point by sensitivity (rank {})", found->second);
  }
}

std::string layers_environment_line(const Config& config, const std::vector<LinearDecision>& decisions) {
  std::string layers;
  for (const auto& decision : decisions) {
    if (decision.target) layers += (layers.empty() ? "" : ",") + decision.path;
  }
  std::string line = fmt::format("export {}SCOPE='{}' {}LAYERS='{}'", kEnvironmentPrefix, config.get("scope"),
                                 kEnvironmentPrefix, layers);
  if (config.get_bool("include-action-head")) line += fmt::format(" {}INCLUDE_ACTION_HEAD=1", kEnvironmentPrefix);
  return line;
}

}  // namespace duquant
