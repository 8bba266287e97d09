// The one entry point: quantize the selected Linear layers of a TorchScript model.
//   calibrate (observe inputs) -> transform (DuQuant, per shared input) -> quantize/pack weights
//   -> swap the targets for W4A8Linear modules.
#pragma once

#include <torch/script.h>

#include <functional>
#include <string>
#include <vector>

#include "duquant/calibrate.h"
#include "duquant/model_io.h"
#include "duquant/recipe.h"
#include "duquant/select.h"
#include "duquant/stage_times.h"

namespace duquant {

struct LayerReport {
  std::string path;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t padded_in_features = 0;
  int64_t weight_bits = 4;
  std::string handling;       // QuantizeRecipe::describe
  std::string shares_input_with;  // first layer of the group sharing this layer's transform
  int64_t rotation1_steps = 0;
  int64_t rotation2_steps = 0;
  double peak_to_mean_before = 0;
  double peak_to_mean_after = 0;
  // Weight rounding error ||X~ (W~ - deq)^T|| / ||X~ W~^T|| on held-out calibration rows (every
  // 8th sampled row, never used for fitting); NaN data-free or without held-out rows.
  std::string weight_rounding;     // "nearest" or "gptq"
  double weight_output_error = 0;  // the rounding used, held-out rows
  double nearest_output_error = 0;  // nearest rounding on the same grids, held-out rows (gptq only, else = above)
  double fit_output_error = 0;     // the rounding used, on the rows GPTQ was fitted to (gptq only, else NaN)
                                   // (from the Hessian where it was summed over every token)
  double nearest_fit_output_error = 0;  // nearest on those rows (gptq only, else NaN)
  double gptq_dampening = 0;       // relative dampening GPTQ finally used (0: nearest)
  double layer_output_error = 0;   // W4A8 layer vs float layer on the held-out rows
  double mean_clip_ratio = 1;
  int64_t calibration_rows = 0;    // sampled token rows the transform and clipping were learnt from
  int64_t gptq_rows = 0;           // token rows GPTQ's Hessian was built from (recipe.h: every token but the
                                   // held-out rows up to gptq_hessian_width, else the sampled fit rows)
  int64_t heldout_rows = 0;        // rows the errors above are measured on
  int64_t calibration_tokens = 0;  // tokens observed (absmax covers all of them)
};

struct QuantizeResult {
  torch::jit::Module model;
  std::vector<LayerReport> layers;
  // Wall time per stage (Load and Save are the caller's: the CLI adds them before the report).
  StageTimes stages;
  int64_t calibration_row_limit = 0;
  int64_t observed_row_limit = 0;  // rows kept per layer by the observers (max of the searches' budgets)
  int64_t observations = 0;        // calibration observations (forwards)
  bool data_free = false;
  // Memory of the target layers: their weights and biases in bf16, and every buffer of the W4A8
  // layers (transform tensors shared by q/k/v or gate/up counted once).
  int64_t bf16_bytes = 0;
  int64_t w4a8_bytes = 0;
};

// How the pipeline runs (not what it computes: that is the QuantizeRecipe).
struct PipelineOptions {
  // Where calibration, the transform, the clip search and the rounding run, as tensor ops. With a
  // CUDA device the model visits the device for calibration and is back on the CPU afterwards;
  // the result is a CPU model either way, equal up to floating-point rounding.
  torch::Device device = torch::kCPU;
  // Drop each target's floating-point weight from `model` as soon as its W4A8 layer exists, so
  // that peak memory stays near the size of the input model (the CLI, which never uses the
  // original again). `model` must not be run afterwards.
  bool release_original_weights = false;
};

// Called after each layer is quantized (for the per-layer log line and progress).
using LayerCallback = std::function<void(const LayerReport&, size_t done, size_t total)>;

// `calibration` null: data-free mode (no smoothing statistics: unit activation statistics, fixed
// clipping; documented as less accurate). The original model is left untouched and usable.
QuantizeResult quantize_model(const torch::jit::Module& model, const std::vector<LinearDecision>& decisions,
                              const QuantizeRecipe& recipe, const ModelInputs* calibration,
                              const LayerCallback& on_layer = {}, const PipelineOptions& pipeline = {});
// Many observations (load_observations); empty: data-free. Statistics accumulate over one forward
// per observation (calibrate.h); `on_observation` reports calibration progress.
QuantizeResult quantize_model(const torch::jit::Module& model, const std::vector<LinearDecision>& decisions,
                              const QuantizeRecipe& recipe, const std::vector<Observation>& calibration,
                              const LayerCallback& on_layer = {}, const ObservationCallback& on_observation = {},
                              const PipelineOptions& pipeline = {});

}  // namespace duquant
