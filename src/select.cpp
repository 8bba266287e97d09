// Selection with the openpi fork's rules (DESIGN.md section 2), in its order: Linear only; path
// starts with SCOPE; LAYERS (exact paths) when set, else INCLUDE re.search-matches and EXCLUDE
// does not; paths ending in action_out_proj only with INCLUDE_ACTION_HEAD=1.
#include "duquant/select.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <regex>
#include <set>

#include "duquant/errors.h"
#include "duquant/type_names.h"

namespace duquant {
namespace {

constexpr const char* kActionHeadSuffix = "action_out_proj";

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

const std::vector<Component>& all_components() {
  static const std::vector<Component> components = {Component::VisionTower,  Component::Projector,
                                                    Component::LlmAttention, Component::LlmMlp,
                                                    Component::ExpertAttention, Component::ExpertMlp,
                                                    Component::Other};
  return components;
}

std::string component_name(Component component) {
  switch (component) {
    case Component::VisionTower: return "vision tower";
    case Component::Projector: return "projector";
    case Component::LlmAttention: return "LLM attention";
    case Component::LlmMlp: return "LLM MLP";
    case Component::ExpertAttention: return "expert attention";
    case Component::ExpertMlp: return "expert MLP";
    case Component::Other: return "other";
  }
  return "other";
}

Component classify_component(const std::string& path) {
  if (contains(path, "vision_tower")) return Component::VisionTower;
  if (contains(path, "multi_modal_projector")) return Component::Projector;
  const bool attention = contains(path, ".self_attn.");
  const bool mlp = contains(path, ".mlp.");
  if (contains(path, "language_model.")) {
    if (attention) return Component::LlmAttention;
    if (mlp) return Component::LlmMlp;
  }
  if (contains(path, "gemma_expert.")) {
    if (attention) return Component::ExpertAttention;
    if (mlp) return Component::ExpertMlp;
  }
  return Component::Other;
}

SelectionRules SelectionRules::from_config(const Config& config) {
  SelectionRules rules;
  rules.scope = config.get("scope");
  if (!config.get("include").empty()) rules.include.emplace(config.get("include"), "INCLUDE");
  if (!config.get("exclude").empty()) rules.exclude.emplace(config.get("exclude"), "EXCLUDE");
  rules.layers = config.get_list("layers");
  rules.include_action_head = config.get_bool("include-action-head");
  return rules;
}

std::string unmangled_type_name(const torch::jit::Module& module) {
  static const std::regex mangle_part(R"(___torch_mangle_\d+\.)");
  const auto name = module.type()->name();
  return name ? std::regex_replace(name->qualifiedName(), mangle_part, "") : "";
}

bool is_linear(const torch::jit::Module& module) { return unmangled_type_name(module) == kLinearTypeName; }

torch::Tensor linear_bias(const torch::jit::Module& linear) {
  if (!linear.hasattr("bias")) return {};
  const auto bias = linear.attr("bias");
  return bias.isTensor() ? bias.toTensor() : torch::Tensor();
}

bool is_quantized_linear(const torch::jit::Module& module) {
  return unmangled_type_name(module) == kQuantizedLinearTypeName;
}

void detect_scope(Config& config, const torch::jit::Module& model) {
  if (!config.is_default("scope")) return;
  const std::string anchor = std::string(kScopeAnchor) + ".";
  std::set<std::string> prefixes;
  for (const auto& item : model.named_modules()) {
    // The first whole path component equal to the anchor ends the prefix.
    const std::string path = "." + item.name + ".";
    const auto position = path.find("." + anchor);
    if (position != std::string::npos) prefixes.insert(path.substr(1, position + anchor.size()));
  }
  if (prefixes.empty()) return;
  if (prefixes.size() > 1) {
    std::vector<std::string> quoted;
    for (const auto& prefix : prefixes) quoted.push_back("'" + prefix + "'");
    throw UserError(fmt::format("cannot detect the scope: {} module-path prefixes end in '{}' ({}); choose one with "
                                "--scope or OPENPI_DUQUANT_SCOPE",
                                prefixes.size(), anchor, fmt::join(quoted, ", ")),
                    ExitCode::Usage);
  }
  config.apply_detected("scope", *prefixes.begin());
}

std::vector<LinearDecision> select_linears(const torch::jit::Module& model, const SelectionRules& rules) {
  std::vector<LinearDecision> decisions;
  std::set<std::string> all_paths;
  std::map<std::string, std::string> path_types;
  bool scope_matches_something = rules.scope.empty();
  for (const auto& item : model.named_modules()) {
    all_paths.insert(item.name);
    path_types[item.name] = unmangled_type_name(item.value);
    if (item.name.rfind(rules.scope, 0) == 0 && !item.name.empty()) scope_matches_something = true;
    const bool linear = is_linear(item.value);
    const bool quantized = is_quantized_linear(item.value);
    if (!linear && !quantized) continue;

    LinearDecision decision;
    decision.path = item.name;
    decision.component = classify_component(item.name);
    if (linear) {
      const auto weight = item.value.attr("weight").toTensor();
      decision.out_features = weight.size(0);
      decision.in_features = weight.size(1);
      decision.has_bias = linear_bias(item.value).defined();
    } else {
      decision.in_features = item.value.attr("in_features").toInt();
      decision.out_features = item.value.attr("out_features").toInt();
      decision.has_bias = item.value.attr("bias").toTensor().numel() > 0;
    }

    auto decide = [&](Rule rule, std::string detail) {
      decision.rule = rule;
      decision.detail = std::move(detail);
      decision.target = rule == Rule::Selected;
    };
    if (quantized) {
      decide(Rule::AlreadyQuantized, "already a W4A8 layer");
    } else if (item.name.rfind(rules.scope, 0) != 0) {
      decide(Rule::OutsideScope, fmt::format("outside scope '{}'", rules.scope));
    } else if (!rules.layers.empty()) {
      const bool listed = std::find(rules.layers.begin(), rules.layers.end(), item.name) != rules.layers.end();
      if (listed) {
        decide(Rule::Selected, "in LAYERS");
      } else {
        decide(Rule::NotInLayerList, "not in LAYERS");
      }
    } else if (rules.include && !rules.include->search(item.name)) {
      decide(Rule::NotIncluded, "not matched by INCLUDE");
    } else if (auto keyword = rules.exclude ? rules.exclude->search(item.name) : std::nullopt) {
      decide(Rule::Excluded, fmt::format("excluded by '{}'", *keyword));
    } else {
      decide(Rule::Selected, rules.include ? "matched by INCLUDE" : "in scope");
    }
    if (decision.target && ends_with(item.name, kActionHeadSuffix) && !rules.include_action_head) {
      decide(Rule::ActionHead, "action head (set INCLUDE_ACTION_HEAD=1 to quantize it)");
    }
    decisions.push_back(std::move(decision));
  }

  if (!scope_matches_something) {
    throw UserError(fmt::format("scope '{}' matches no module path; set OPENPI_DUQUANT_SCOPE / --scope to a "
                                "prefix such as 'paligemma_with_expert.' (see `duquant list`)",
                                rules.scope),
                    ExitCode::Usage);
  }
  for (const auto& layer : rules.layers) {
    if (!all_paths.count(layer)) {
      throw UserError(fmt::format("LAYERS entry '{}' names no module of the model; use exact dotted paths as "
                                  "printed by `duquant list`",
                                  layer),
                      ExitCode::Usage);
    }
    const auto& type = path_types[layer];
    if (type != kLinearTypeName && type != kQuantizedLinearTypeName) {
      throw UserError(fmt::format("LAYERS entry '{}' is a {}, not an nn.Linear; only Linear layers can be "
                                  "quantized, remove it from LAYERS",
                                  layer, type),
                      ExitCode::Usage);
    }
  }
  return decisions;
}

std::map<Component, std::pair<int64_t, int64_t>> count_by_component(const std::vector<LinearDecision>& decisions) {
  std::map<Component, std::pair<int64_t, int64_t>> counts;
  for (auto component : all_components()) counts[component] = {0, 0};
  for (const auto& decision : decisions) {
    counts[decision.component].first += 1;
    counts[decision.component].second += decision.target ? 1 : 0;
  }
  return counts;
}

}  // namespace duquant
