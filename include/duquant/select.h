// Target selection (DESIGN.md section 2): which nn.Linear modules of a TorchScript model become
// W4A8 layers, and for every Linear the rule that decided it.
#pragma once

#include <torch/script.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "duquant/config.h"
#include "duquant/python_regex.h"

namespace duquant {

// pi0 components of the user's verification note, in report order.
enum class Component { VisionTower, Projector, LlmAttention, LlmMlp, ExpertAttention, ExpertMlp, Other };
const std::vector<Component>& all_components();
std::string component_name(Component component);
Component classify_component(const std::string& path);

struct SelectionRules {
  std::string scope;
  std::optional<PythonRegex> include;  // empty pattern: everything included
  std::optional<PythonRegex> exclude;  // empty pattern: nothing excluded
  std::vector<std::string> layers;     // when non-empty, include/exclude are ignored
  bool include_action_head = false;

  static SelectionRules from_config(const Config& config);
};

// KeptFloat: a target left in floating point by `--keep-float` (sensitivity.h).
enum class Rule { Selected, OutsideScope, NotInLayerList, NotIncluded, Excluded, ActionHead, AlreadyQuantized, KeptFloat };

struct LinearDecision {
  std::string path;
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool has_bias = false;
  Component component = Component::Other;
  bool target = false;
  Rule rule = Rule::Selected;
  std::string detail;  // human-readable reason, e.g. "excluded by 'vision_tower'"
};

// "__torch__.torch.nn.modules.linear.___torch_mangle_7.Linear" -> "__torch__.torch.nn.modules.linear.Linear"
std::string unmangled_type_name(const torch::jit::Module& module);
bool is_linear(const torch::jit::Module& module);
// The bias of an nn.Linear, or an undefined tensor: scripted Linears hold None, traced ones have no
// attribute at all when there is no bias.
torch::Tensor linear_bias(const torch::jit::Module& linear);
bool is_quantized_linear(const torch::jit::Module& module);

// The component of module paths under which openpi's pi0/pi0.5 tree lives (DESIGN.md section 3).
inline constexpr const char* kScopeAnchor = "paligemma_with_expert";

// With SCOPE at its default (neither environment nor flag set it), finds the unique module-path
// prefix that ends in "paligemma_with_expert." ("model.paligemma_with_expert." in lerobot, which
// nests the policy under `model`) and sets it as the scope, source "detected". Leaves the default
// when no path has that component (select_linears then reports the scope matching nothing); a
// UserError (usage) when several prefixes do.
void detect_scope(Config& config, const torch::jit::Module& model);

// Every Linear (and already-quantized layer) of `model`, in module order, with its decision.
// Throws UserError for a LAYERS entry that names no module or a non-Linear module, and for a scope
// that matches no module path.
std::vector<LinearDecision> select_linears(const torch::jit::Module& model, const SelectionRules& rules);

// Per component: (number of Linear layers, number of targets).
std::map<Component, std::pair<int64_t, int64_t>> count_by_component(const std::vector<LinearDecision>& decisions);

}  // namespace duquant
