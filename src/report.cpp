#include "duquant/report.h"

#include <fmt/format.h>
#include <fmt/ostream.h>

#include <algorithm>
#include <cmath>

namespace duquant {
namespace {

std::string rule_name(Rule rule) {
  switch (rule) {
    case Rule::Selected: return "selected";
    case Rule::OutsideScope: return "outside_scope";
    case Rule::NotInLayerList: return "not_in_layers";
    case Rule::NotIncluded: return "not_included";
    case Rule::Excluded: return "excluded";
    case Rule::ActionHead: return "action_head";
    case Rule::AlreadyQuantized: return "already_quantized";
    case Rule::KeptFloat: return "kept_float";
  }
  return "unknown";
}

// JSON has no NaN: the data-free errors are written as null.
nlohmann::json number_or_null(double value) { return std::isfinite(value) ? nlohmann::json(value) : nlohmann::json(); }

}  // namespace

void print_configuration(const Config& config, std::ostream& out) {
  out << "[DUQUANT] Configuration (flags override OPENPI_DUQUANT_* environment variables):\n";
  for (const auto& line : config.describe()) out << line << "\n";
}

int64_t count_targets(const std::vector<LinearDecision>& decisions) {
  int64_t targets = 0;
  for (const auto& decision : decisions) targets += decision.target ? 1 : 0;
  return targets;
}

void print_matched_count(const std::vector<LinearDecision>& decisions, std::ostream& out) {
  fmt::print(out, "[DUQUANT] Matched Linear layers: {}\n", count_targets(decisions));
}

void print_selection(const std::vector<LinearDecision>& decisions, const QuantizeRecipe& recipe, std::ostream& out) {
  print_matched_count(decisions, out);
  for (const auto& d : decisions) {
    if (d.target) {
      fmt::print(out, "[DUQUANT][DRYRUN] {}: Linear({}->{}) -> {} [{}]\n", d.path, d.in_features, d.out_features,
                 recipe.describe(d.path, d.in_features), d.detail);
    } else {
      fmt::print(out, "[DUQUANT][SKIP] {}: Linear({}->{}) {}\n", d.path, d.in_features, d.out_features, d.detail);
    }
  }
  print_component_table(decisions, out);
  fmt::print(out, "[DUQUANT] Dry-run total layers listed: {}\n", count_targets(decisions));
}

void print_component_table(const std::vector<LinearDecision>& decisions, std::ostream& out) {
  const auto counts = count_by_component(decisions);
  fmt::print(out, "[DUQUANT] {:<18} {:>8} {:>8}\n", "component", "Linear", "targets");
  int64_t all_linear = 0, all_targets = 0;
  for (auto component : all_components()) {
    const auto [linear, targets] = counts.at(component);
    all_linear += linear;
    all_targets += targets;
    fmt::print(out, "[DUQUANT] {:<18} {:>8} {:>8}\n", component_name(component), linear, targets);
  }
  fmt::print(out, "[DUQUANT] {:<18} {:>8} {:>8}\n", "TOTAL", all_linear, all_targets);
}

void print_stage_table(const StageTimes& stages, double wall_seconds, std::ostream& out) {
  const double share = wall_seconds > 0 ? 100.0 / wall_seconds : 0.0;
  for (size_t i = 0; i < kStageCount; ++i) {
    const double seconds = stages.seconds[i];
    fmt::print(out, "[DUQUANT] stage {:<17} {:>8.2f} s {:>5.1f} %\n", stage_name(static_cast<Stage>(i)), seconds,
               seconds * share);
  }
  const double rest = wall_seconds - stages.total();
  fmt::print(out, "[DUQUANT] stage {:<17} {:>8.2f} s {:>5.1f} %\n", "other", rest, rest * share);
  fmt::print(out, "[DUQUANT] total {:.1f} s, peak RSS {:.2f} GiB\n", wall_seconds,
             peak_resident_bytes() / 1073741824.0);
}

std::string replaced_line(const LayerReport& layer) {
  std::string line = fmt::format("[DUQUANT][REPLACED] {}: Linear({}->{}) -> DuQuantLinear {}", layer.path,
                                 layer.in_features, layer.out_features, layer.handling);
  line += fmt::format(" rot_steps=({},{}) peak/mean {:.1f}->{:.1f}", layer.rotation1_steps, layer.rotation2_steps,
                      layer.peak_to_mean_before, layer.peak_to_mean_after);
  if (std::isfinite(layer.layer_output_error)) line += fmt::format(" out_err={:.2e}", layer.layer_output_error);
  if (layer.weight_rounding == "gptq" && std::isfinite(layer.weight_output_error)) {
    line += fmt::format(" w_err gptq {:.2e} (nearest {:.2e})", layer.weight_output_error, layer.nearest_output_error);
  }
  if (!layer.shares_input_with.empty()) line += fmt::format(" (transform shared with {})", layer.shares_input_with);
  return line;
}

nlohmann::json selection_json(const Config& config, const std::vector<LinearDecision>& decisions,
                              const QuantizeRecipe& recipe) {
  nlohmann::json json;
  for (const auto& s : config.settings()) {
    json["config"].push_back({{"key", s.key}, {"value", s.value}, {"source", s.source}, {"environment",
                              s.environment.empty() ? "" : std::string(kEnvironmentPrefix) + s.environment}});
  }
  for (const auto& [name, value] : config.ignored_environment()) json["ignored_environment"][name] = value;
  json["layers"] = nlohmann::json::array();
  for (const auto& d : decisions) {
    nlohmann::json layer = {{"path", d.path},          {"in_features", d.in_features},
                            {"out_features", d.out_features}, {"bias", d.has_bias},
                            {"component", component_name(d.component)}, {"target", d.target},
                            {"rule", rule_name(d.rule)}, {"reason", d.detail}};
    if (d.target) layer["handling"] = recipe.describe(d.path, d.in_features);
    json["layers"].push_back(layer);
  }
  for (const auto& [component, counts] : count_by_component(decisions)) {
    json["summary"][component_name(component)] = {{"linear", counts.first}, {"targets", counts.second}};
  }
  json["targets"] = count_targets(decisions);
  return json;
}

nlohmann::json quantize_report_json(const Config& config, const QuantizeResult& result,
                                    const std::vector<LinearDecision>& decisions, const std::string& input_path,
                                    const std::string& output_path) {
  nlohmann::json json;
  json["input"] = input_path;
  json["output"] = output_path;
  json["data_free"] = result.data_free;
  json["calibration_row_limit"] = result.calibration_row_limit;
  for (size_t i = 0; i < kStageCount; ++i) {
    json["stages"][stage_name(static_cast<Stage>(i))] = result.stages.seconds[i];
  }
  json["peak_rss_bytes"] = peak_resident_bytes();
  json["observed_row_limit"] = result.observed_row_limit;
  json["calibration_observations"] = result.observations;
  // Errors are measured on every 8th sampled row, held out from all fitting.
  json["error_rows"] = "held-out calibration rows (every 8th sampled row)";
  json["target_memory"] = {{"bf16_bytes", result.bf16_bytes}, {"w4a8_bytes", result.w4a8_bytes},
                           {"ratio", static_cast<double>(result.bf16_bytes) / std::max<int64_t>(result.w4a8_bytes, 1)}};
  for (const auto& s : config.settings()) json["config"][s.key] = {{"value", s.value}, {"source", s.source}};
  for (const auto& [component, counts] : count_by_component(decisions)) {
    json["summary"][component_name(component)] = {{"linear", counts.first}, {"targets", counts.second}};
  }
  json["layers"] = nlohmann::json::array();
  for (const auto& layer : result.layers) {
    json["layers"].push_back({{"path", layer.path},
                              {"in_features", layer.in_features},
                              {"out_features", layer.out_features},
                              {"padded_in_features", layer.padded_in_features},
                              {"weight_bits", layer.weight_bits},
                              {"handling", layer.handling},
                              {"shares_input_with", layer.shares_input_with},
                              {"rotation1_steps", layer.rotation1_steps},
                              {"rotation2_steps", layer.rotation2_steps},
                              {"activation_peak_to_mean_before", layer.peak_to_mean_before},
                              {"activation_peak_to_mean_after", layer.peak_to_mean_after},
                              {"weight_rounding", layer.weight_rounding},
                              {"weight_quantization_error", number_or_null(layer.weight_output_error)},
                              {"weight_quantization_error_nearest", number_or_null(layer.nearest_output_error)},
                              {"weight_quantization_error_fit", number_or_null(layer.fit_output_error)},
                              {"weight_quantization_error_fit_nearest", number_or_null(layer.nearest_fit_output_error)},
                              {"gptq_dampening", layer.gptq_dampening},
                              {"gptq_rows", layer.gptq_rows},
                              {"heldout_rows", layer.heldout_rows},
                              {"layer_output_error", number_or_null(layer.layer_output_error)},
                              {"mean_clip_ratio", layer.mean_clip_ratio},
                              {"calibration_rows", layer.calibration_rows},
                              {"calibration_tokens", layer.calibration_tokens}});
  }
  json["layers_replaced"] = result.layers.size();
  return json;
}

}  // namespace duquant
