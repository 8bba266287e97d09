#include "duquant/recipe.h"

#include <fmt/format.h>

#include <algorithm>

#include "duquant/errors.h"
#include "w4a8_layout.h"

namespace duquant {
namespace {

void check_weight_bits(int64_t bits, const std::string& where) {
  if (bits < 1 || bits > layout::kWeightBits) {
    throw UserError(fmt::format("{}: {} weight bits are not supported; the W4A8 kernels store 1..{} bit weights",
                                where, bits, layout::kWeightBits),
                    ExitCode::Usage);
  }
}

}  // namespace

QuantizeRecipe QuantizeRecipe::from_config(const Config& config) {
  QuantizeRecipe recipe;
  try {
    recipe.transform.method = parse_method(config.get("method"));
  } catch (const std::exception&) {
    throw UserError(fmt::format("method '{}' is unknown; use rtn, smooth or duquant", config.get("method")),
                    ExitCode::Usage);
  }
  recipe.transform.block_size = config.get_int("block");
  const auto block = recipe.transform.block_size;
  if (block < 2 || (block & (block - 1)) != 0 || block > 1024) {
    throw UserError(fmt::format("block = {} is not a power of two in 2..1024; use e.g. 128 (paper) or 16 (fork)",
                                block),
                    ExitCode::Usage);
  }
  recipe.transform.rotation_steps = config.get_int("rotation-steps");
  recipe.transform.permute = config.get_bool("permute");
  recipe.transform.alpha = config.get_double("alpha");
  if (recipe.transform.alpha < 0 || recipe.transform.alpha > 1) {
    throw UserError(fmt::format("alpha = {} is outside [0, 1]", recipe.transform.alpha), ExitCode::Usage);
  }
  recipe.transform.seed = static_cast<uint64_t>(config.get_int("seed"));

  recipe.weights.bits = config.get_int("wbits-default");
  check_weight_bits(recipe.weights.bits, "WBITS_DEFAULT");
  recipe.weights.group_size = config.get_int("group-size");
  if (recipe.weights.group_size > 0 && recipe.weights.group_size % layout::kInFeatureAlignment != 0) {
    throw UserError(fmt::format("group-size = {} must be a multiple of {} (0: per output channel)",
                                recipe.weights.group_size, layout::kInFeatureAlignment),
                    ExitCode::Usage);
  }
  if (config.get("weight-clip") != "search") {
    const double ratio = config.get_double("weight-clip");
    if (ratio <= 0 || ratio > 1) {
      throw UserError(fmt::format("weight-clip = {} must be 'search' or a ratio in (0, 1]", ratio), ExitCode::Usage);
    }
    recipe.weights.clip_ratios = {ratio};
  }
  for (const auto& entry : config.get_list("wbits")) {
    const auto colon = entry.rfind(':');
    if (colon == std::string::npos) {
      throw UserError(fmt::format("WBITS entry '{}' is not 'path:bits'", entry), ExitCode::Usage);
    }
    int64_t bits = 0;
    try {
      bits = std::stoll(entry.substr(colon + 1));
    } catch (const std::exception&) {
      throw UserError(fmt::format("WBITS entry '{}' has no integer bit width", entry), ExitCode::Usage);
    }
    check_weight_bits(bits, "WBITS entry '" + entry + "'");
    recipe.layer_bits[entry.substr(0, colon)] = bits;
  }

  recipe.act_bits = config.get_int("abits");
  if (recipe.act_bits > layout::kActivationBits || recipe.act_bits == 1) {
    throw UserError(fmt::format("abits = {} is not supported; use 2..{} (or <= 0 for floating-point activations)",
                                recipe.act_bits, layout::kActivationBits),
                    ExitCode::Usage);
  }
  recipe.act_clip = config.get_double("act-clip");
  if (recipe.act_clip <= 0 || recipe.act_clip > 1) {
    throw UserError(fmt::format("act-clip = {} must be in (0, 1]", recipe.act_clip), ExitCode::Usage);
  }
  recipe.calibration_rows = config.get_int("calib-rows");
  if (recipe.calibration_rows < 1) {
    throw UserError("calib-rows must be at least 1", ExitCode::Usage);
  }
  const auto& rounding = config.get("weight-rounding");
  if (rounding == "nearest") {
    recipe.weight_rounding = WeightRounding::Nearest;
  } else if (rounding == "gptq") {
    recipe.weight_rounding = WeightRounding::Gptq;
  } else {
    throw UserError(fmt::format("weight-rounding '{}' is unknown; use nearest or gptq", rounding), ExitCode::Usage);
  }
  recipe.gptq_rows = config.get_int("gptq-rows");
  if (recipe.gptq_rows < 1) throw UserError("gptq-rows must be at least 1", ExitCode::Usage);
  recipe.gptq_hessian_width = config.get_int("gptq-hessian-width");
  if (recipe.gptq_hessian_width < 0) throw UserError("gptq-hessian-width must be 0 or more", ExitCode::Usage);
  recipe.gptq.dampening = config.get_double("gptq-dampening");
  if (!(recipe.gptq.dampening > 0 && recipe.gptq.dampening <= 10)) {
    throw UserError(fmt::format("gptq-dampening = {} must be in (0, 10] (a fraction of mean diag(H))",
                                recipe.gptq.dampening),
                    ExitCode::Usage);
  }
  recipe.gptq.activation_order = config.get_bool("gptq-act-order");
  return recipe;
}

std::string weight_rounding_name(WeightRounding rounding) {
  return rounding == WeightRounding::Gptq ? "gptq" : "nearest";
}

int64_t QuantizeRecipe::observed_rows() const {
  return weight_rounding == WeightRounding::Gptq ? std::max(calibration_rows, gptq_rows) : calibration_rows;
}

int64_t QuantizeRecipe::hessian_max_features() const {
  return weight_rounding == WeightRounding::Gptq ? gptq_hessian_width : 0;
}

int64_t QuantizeRecipe::weight_bits(const std::string& path) const {
  auto it = layer_bits.find(path);
  return it == layer_bits.end() ? weights.bits : it->second;
}

std::string QuantizeRecipe::describe(const std::string& path, int64_t in_features) const {
  const bool rotates = transform.method == Method::DuQuant;
  const int64_t block = rotates ? transform.block_size : 0;
  const int64_t padded = layout::padded_in_features(in_features, block);
  std::string text = fmt::format("W{} A{} {}", weight_bits(path), act_bits > 0 ? std::to_string(act_bits) : "16",
                                 method_name(transform.method));
  if (rotates) text += fmt::format(", block {}", block);
  if (padded != in_features) {
    text += fmt::format(", in_features {} zero-padded to {}", in_features, padded);
  }
  if (rotates) text += fmt::format(" ({} blocks)", padded / block);
  return text;
}

}  // namespace duquant
