// One quantization recipe (in the manner of torchao's config objects): everything that decides
// what a target layer becomes, built from the effective Config.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "duquant/config.h"
#include "duquant/gptq.h"
#include "duquant/quantize.h"
#include "duquant/transform.h"

namespace duquant {

// How the int4 levels are chosen on the grids of the clipping search: nearest level, or GPTQ
// (src/gptq.cpp) from the layer's transformed calibration rows.
enum class WeightRounding { Nearest, Gptq };
std::string weight_rounding_name(WeightRounding rounding);

struct QuantizeRecipe {
  TransformOptions transform;
  WeightQuantOptions weights;                  // bits = WBITS_DEFAULT
  std::map<std::string, int64_t> layer_bits;   // WBITS overrides by exact path
  int64_t act_bits = 8;                        // <= 0: no activation quantization
  double act_clip = 1.0;
  int64_t calibration_rows = 256;             // rows the rotation and clipping searches learn from
  WeightRounding weight_rounding = WeightRounding::Gptq;
  GptqOptions gptq;
  int64_t gptq_rows = 2048;                    // rows GPTQ's Hessian is built from (its own budget)
  // Inputs up to this wide build GPTQ's Hessian from every calibration token instead (summed
  // during calibration); the LLM down_proj input (16384: 1 GiB per Hessian) stays on the rows.
  int64_t gptq_hessian_width = 4096;

  // Rows each layer's observer keeps: the larger budget of the searches in use.
  int64_t observed_rows() const;
  // Inputs whose observers also sum the Hessian over every token (0 without GPTQ).
  int64_t hessian_max_features() const;

  // UserError(Usage) for out-of-range values (bits, block not a power of two, ...).
  static QuantizeRecipe from_config(const Config& config);
  int64_t weight_bits(const std::string& path) const;
  // "W4 A8 duquant, block 128: 16 blocks" / "... in_features 1152 zero-padded to 1280 (10 blocks)"
  std::string describe(const std::string& path, int64_t in_features) const;
};

}  // namespace duquant
