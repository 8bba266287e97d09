// Settings, their defaults and provenance. The fork's defaults are kept except SCOPE (the fork's
// "policy.dit." matches nothing in pi0; its LIBERO scripts set "paligemma_with_expert.") and BLOCK
// (the fork's 16 loses accuracy against the paper's 128: DESIGN.md section 4).
#include "duquant/config.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "duquant/errors.h"

namespace duquant {
namespace {

constexpr const char* kForkInclude =
    ".*(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj).*";
constexpr const char* kForkExclude = "(?:^|\\.)(norm|ln|layernorm|emb)(?:\\.|$)";

// Fork knobs of its own fake-quant recipe, with no counterpart here; reported when set.
const std::vector<std::string> kForkOnlyVariables = {"CALIB_STEPS", "ACT_PCT", "LS", "ROW_ROT", "BLOCK_OUT",
                                                     "PACKDIR"};

std::string trim(const std::string& text) {
  const auto first = text.find_first_not_of(" \t\n");
  if (first == std::string::npos) return "";
  const auto last = text.find_last_not_of(" \t\n");
  return text.substr(first, last - first + 1);
}

}  // namespace

Config Config::defaults() {
  Config config;
  auto add = [&](std::string key, std::string environment, std::string value, std::string help) {
    config.settings_.push_back({std::move(key), std::move(environment), std::move(value), "default", std::move(help)});
  };
  add("scope", "SCOPE", "paligemma_with_expert.", "module path prefix a target must start with");
  add("include", "INCLUDE", kForkInclude, "regex (Python re.search) a target path must match");
  add("exclude", "EXCLUDE", kForkExclude, "regex (Python re.search) a target path must not match");
  add("layers", "LAYERS", "", "comma-separated exact module paths; when set, include/exclude are ignored");
  add("include-action-head", "INCLUDE_ACTION_HEAD", "0", "1: also quantize paths ending in action_out_proj");
  add("dry-run", "DRYRUN", "0", "1: list the selection, write nothing");
  add("wbits-default", "WBITS_DEFAULT", "4", "weight bits (1..4; stored as int4)");
  add("wbits", "WBITS", "", "per-layer weight bits, 'path:bits,...'");
  add("abits", "ABITS", "8", "activation bits (2..8); <= 0 keeps activations in floating point");
  add("block", "BLOCK", "128", "rotation block size, a power of two (fork default 16)");
  add("permute", "PERMUTE", "1", "1: zigzag permutation between the two rotations");
  add("method", "", "duquant", "rtn (no transform) | smooth (smoothing only) | duquant");
  add("rotation-steps", "", "256", "greedy rotation steps N per rotation");
  add("alpha", "", "0.6", "smoothing strength");
  add("group-size", "", "0", "weight quantization group along in_features; 0: per output channel");
  add("weight-clip", "", "search", "'search' (per-channel, by output error on calibration) or a fixed ratio");
  add("act-clip", "", "1.0", "activation clipping ratio of the per-token absmax");
  add("calib-rows", "", "256", "calibration token rows the rotation and clipping searches learn from, per layer");
  add("weight-rounding", "", "gptq", "int4 levels on the clipping grids: gptq (arXiv 2210.17323) or nearest");
  add("gptq-rows", "", "2048", "calibration token rows kept per layer for GPTQ's Hessian (1 in 8 held out)");
  add("gptq-hessian-width", "", "4096",
      "inputs up to this wide sum GPTQ's Hessian over every calibration token (K x K float32 each); wider ones "
      "use the gptq-rows sample; 0: the sample for all");
  add("gptq-dampening", "", "0.01", "GPTQ dampening, a fraction of mean diag(H) added to the diagonal");
  add("gptq-act-order", "", "1", "1: GPTQ rounds columns by decreasing diag(H) (activation order); 0: in column order");
  add("seed", "", "0", "seed of the random orthogonal matrices");
  return config;
}

Setting& Config::find(const std::string& key) {
  auto it = std::find_if(settings_.begin(), settings_.end(), [&](const Setting& s) { return s.key == key; });
  if (it == settings_.end()) throw std::logic_error("duquant: unknown setting " + key);
  return *it;
}

const Setting& Config::find(const std::string& key) const { return const_cast<Config*>(this)->find(key); }

void Config::apply_environment(const std::function<std::optional<std::string>(const std::string&)>& lookup) {
  for (auto& setting : settings_) {
    if (setting.environment.empty()) continue;
    const std::string name = std::string(kEnvironmentPrefix) + setting.environment;
    if (auto value = lookup(name)) {
      setting.value = *value;
      setting.source = "env " + name;
    }
  }
  for (const auto& variable : kForkOnlyVariables) {
    const std::string name = std::string(kEnvironmentPrefix) + variable;
    if (auto value = lookup(name)) ignored_.emplace_back(name, *value);
  }
}

void Config::apply_flag(const std::string& key, const std::string& value) {
  auto& setting = find(key);
  setting.value = value;
  setting.source = "flag --" + key;
}

void Config::apply_detected(const std::string& key, const std::string& value) {
  auto& setting = find(key);
  setting.value = value;
  setting.source = "detected";
}

bool Config::is_default(const std::string& key) const { return find(key).source == "default"; }

const std::string& Config::get(const std::string& key) const { return find(key).value; }

int64_t Config::get_int(const std::string& key) const {
  const auto& setting = find(key);
  try {
    size_t used = 0;
    const int64_t value = std::stoll(setting.value, &used);
    if (used == trim(setting.value).size()) return value;
  } catch (const std::exception&) {
  }
  throw UserError(fmt::format("{} = '{}' ({}) is not an integer; give a whole number", key, setting.value,
                              setting.source),
                  ExitCode::Usage);
}

double Config::get_double(const std::string& key) const {
  const auto& setting = find(key);
  try {
    size_t used = 0;
    const double value = std::stod(setting.value, &used);
    if (used == trim(setting.value).size()) return value;
  } catch (const std::exception&) {
  }
  throw UserError(fmt::format("{} = '{}' ({}) is not a number", key, setting.value, setting.source),
                  ExitCode::Usage);
}

bool Config::get_bool(const std::string& key) const {
  const auto& setting = find(key);
  const std::string value = trim(setting.value);
  if (value == "1" || value == "true" || value == "True") return true;
  if (value == "0" || value == "false" || value == "False" || value.empty()) return false;
  throw UserError(fmt::format("{} = '{}' ({}) is not a boolean; use 1 or 0", key, setting.value, setting.source),
                  ExitCode::Usage);
}

std::vector<std::string> Config::get_list(const std::string& key) const {
  std::vector<std::string> items;
  std::stringstream stream(get(key));
  std::string item;
  while (std::getline(stream, item, ',')) {
    item = trim(item);
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

std::vector<std::string> Config::describe() const {
  std::vector<std::string> lines;
  size_t width = 0;
  for (const auto& s : settings_) width = std::max(width, s.key.size());
  for (const auto& s : settings_) {
    lines.push_back(fmt::format("  {:<{}} = {}  ({})", s.key, width, s.value.empty() ? "''" : s.value, s.source));
  }
  for (const auto& [name, value] : ignored_) {
    lines.push_back(fmt::format("  {} = {}  (ignored: a knob of the fork's fake-quant recipe)", name, value));
  }
  return lines;
}

}  // namespace duquant
