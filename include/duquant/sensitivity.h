// Layer sensitivity and float fallback. The model is quantized once; then, for each target group
// (one layer index of one component of select.h: "expert attention layer 3"), a model with only
// that group's W4A8 layers swapped in (src/swap.cpp shares every tensor, so this is cheap) runs the
// evaluation inputs, and its end-to-end output error against the float model ranks the groups.
// Keeping the worst groups in floating point (QuantVLA, arXiv 2602.20309, keeps attention
// projections in float) is then a selection of layers, reproducible with OPENPI_DUQUANT_LAYERS.
#pragma once

#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "duquant/config.h"
#include "duquant/model_io.h"
#include "duquant/select.h"

namespace duquant {

struct TargetGroup {
  std::string name;          // "LLM MLP layer 4"; the component name alone without a layer index
  Component component = Component::Other;
  int64_t layer_index = -1;  // N of "...layers.N...", -1 when the path has none
  std::vector<std::string> paths;  // model order
};

// Targets grouped by (component, layer index), groups in model order of their first layer.
std::vector<TargetGroup> target_groups(const std::vector<std::string>& targets);

struct GroupSensitivity {
  TargetGroup group;
  double end_to_end_error = 0;  // relative L2 of the outputs with only this group quantized
  int64_t bf16_bytes = 0;       // the group's weights and biases in bf16
  int64_t w4a8_bytes = 0;       // the group's W4A8 buffers (shared transforms counted once)
};

struct KeptFloatPoint {
  int64_t kept_groups = 0;     // the worst groups of the ranking kept in floating point
  int64_t kept_layers = 0;
  double end_to_end_error = 0;
  int64_t target_bytes = 0;    // target memory: kept groups in bf16 + the rest in W4A8
};

struct SensitivityResult {
  std::vector<GroupSensitivity> ranked;  // worst (largest error) first
  double all_quantized_error = 0;        // every target quantized
  std::vector<KeptFloatPoint> curve;     // empty unless asked for
  int64_t evaluation_observations = 0;
  int64_t forwards = 0;  // model forwards on the evaluation inputs, the float model's included
  double seconds = 0;
};

// Progress after each evaluation: what was evaluated, its end-to-end error, done, total.
using SensitivityCallback =
    std::function<void(const std::string& what, double end_to_end_error, size_t done, size_t total)>;

// The curve's default points: K = 0, 1, ..., 16, then doubling, and the number of groups.
std::vector<int64_t> default_curve_points(int64_t groups);

// UserError (usage) unless every point is a number of groups from 0 to `groups`.
void check_curve_points(const std::vector<int64_t>& points, int64_t groups);

// `quantized` is `original` with every target W4A8 (quantize_model's result, or the model that
// `duquant quantize` wrote with the same selection). Errors are relative L2 of all outputs of
// `evaluation` stacked, against the float model's. `curve_points`: the K of the error with the K
// worst groups kept float (each in 0..groups; empty: no curve). One forward per group, one with
// every group quantized and one per K other than 0 and all groups.
SensitivityResult measure_sensitivity(const torch::jit::Module& original, const torch::jit::Module& quantized,
                                      const std::vector<std::string>& targets,
                                      const std::vector<Observation>& evaluation,
                                      const std::vector<int64_t>& curve_points,
                                      const SensitivityCallback& progress = {});

// Checks that `quantized` has a W4A8 layer at every target and at no other path, so that its
// "every group quantized" forward is the selection's; UserError (usage) naming the first mismatch.
void check_quantizes_exactly(const torch::jit::Module& quantized, const std::vector<std::string>& targets,
                             const std::string& quantized_path);

// `original` with the W4A8 layers of `quantized` at `paths` swapped in (tensors shared).
torch::jit::Module with_quantized_layers(const torch::jit::Module& original, const torch::jit::Module& quantized,
                                         const std::set<std::string>& paths);

nlohmann::json sensitivity_json(const SensitivityResult& result, const std::string& model_path);

// The ranking of a sensitivity JSON (worst first). UserError when the file is missing or not one.
std::vector<TargetGroup> read_sensitivity_ranking(const std::string& path);

// Layers of the `keep` worst groups of `ranking` with their rank (1 = worst), restricted to
// `targets`; UserError when a ranked layer is not a target (a ranking of another selection).
std::map<std::string, int64_t> layers_kept_float(const std::vector<TargetGroup>& ranking, int64_t keep,
                                                 const std::vector<std::string>& targets);

// Marks the layers of `kept` as not targets: Rule::KeptFloat, "kept in floating point by
// sensitivity (rank r)".
void mark_kept_float(std::vector<LinearDecision>& decisions, const std::map<std::string, int64_t>& kept);

// The shell line that selects exactly the targets of `decisions` in the fork's scripts (and in
// `duquant list`): "export OPENPI_DUQUANT_SCOPE='...' OPENPI_DUQUANT_LAYERS='a,b,...'".
std::string layers_environment_line(const Config& config, const std::vector<LinearDecision>& decisions);

}  // namespace duquant
