// Calibration (DESIGN.md section 5): the model is rebuilt with every target replaced by an
// observing Linear that records per-channel max |x| and a bounded sample of token rows into its
// buffers, then does the plain linear; the inputs run under NoGradGuard; the buffers are read back
// and that copy is discarded.
#pragma once

#include <torch/script.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "duquant/model_io.h"

namespace duquant {

struct LayerStatistics {
  torch::Tensor absmax;  // float32 [in_features]: max |x| over every calibration token
  // [rows, in_features] in the dtype of the layer's input (bf16 for a bf16 model: lossless, half
  // the memory of float32): every stride-th token over all calls of all observations, rows <= limit.
  torch::Tensor sample;
  int64_t tokens = 0;    // calibration tokens seen
  // float32 [in_features, in_features]: sum of x^T x over every calibration token (GPTQ's Hessian
  // before the transform), kept by the first observer of each shared input (src/calibrate.cpp);
  // undefined for the others and for inputs wider than ObserverLimits::hessian_max_features.
  torch::Tensor hessian;
};

// What each observer keeps.
struct ObserverLimits {
  ObserverLimits(int64_t sample_rows, int64_t hessian_max_features = 0)  // NOLINT: a row count converts
      : sample_rows(sample_rows), hessian_max_features(hessian_max_features) {}
  int64_t sample_rows;           // rows of the uniform token sample
  // Inputs up to this wide also sum x^T x over every token (K x K float32 per shared input:
  // q/k/v and gate/up sum once); 0: none.
  int64_t hessian_max_features;
};

// Called after each observation's forward (progress on a terminal).
using ObservationCallback = std::function<void(size_t done, size_t total)>;

// Observes the inputs of `targets` over one forward of `model` per observation, all on the same
// observing copy, run on `device`: absmax is the element-wise max over every observation, the row
// sample stays uniform over every token of every observation (stride doubling,
// src/calibrate.cpp), the Hessian sums over every token, and memory stays bounded by `limits`
// whatever the number of observations. The statistics are on `device`; the model is back on the CPU.
std::map<std::string, LayerStatistics> calibrate(const torch::jit::Module& model,
                                                 const std::vector<std::string>& targets,
                                                 const std::vector<Observation>& observations, const ObserverLimits& limits,
                                                 const ObservationCallback& on_observation = {},
                                                 const torch::Device& device = torch::kCPU);
// One observation.
std::map<std::string, LayerStatistics> calibrate(const torch::jit::Module& model,
                                                 const std::vector<std::string>& targets, const ModelInputs& inputs,
                                                 const ObserverLimits& limits, const torch::Device& device = torch::kCPU);

// Targets that share one input (q/k/v, gate/up): same parent module and identical statistics.
// Groups keep model order; every target is in exactly one group.
std::vector<std::vector<std::string>> shared_input_groups(const std::vector<std::string>& targets,
                                                          const std::map<std::string, LayerStatistics>& statistics);

}  // namespace duquant
