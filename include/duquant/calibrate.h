// Calibration (DESIGN.md section 5): the model is rebuilt with every target replaced by an
// observing Linear that records per-channel max |x| and a bounded sample of token rows into its
// buffers, then does the plain linear; the inputs run under NoGradGuard; the buffers are read back
// and that copy is discarded.
#pragma once

#include <torch/script.h>

#include <map>
#include <string>
#include <vector>

#include "duquant/model_io.h"

namespace duquant {

struct LayerStatistics {
  torch::Tensor absmax;  // float32 [in_features]: max |x| over every calibration token
  torch::Tensor sample;  // float32 [rows, in_features]: every stride-th token over all calls, rows <= limit
  int64_t tokens = 0;    // calibration tokens seen
};

// Observes the inputs of `targets` over one forward of `model` on `inputs`, run on `device`; the
// statistics are on `device`, and the model is back where it was.
std::map<std::string, LayerStatistics> calibrate(const torch::jit::Module& model,
                                                 const std::vector<std::string>& targets, const ModelInputs& inputs,
                                                 int64_t sample_rows, const torch::Device& device = torch::kCPU);

// Targets that share one input (q/k/v, gate/up): same parent module and identical statistics.
// Groups keep model order; every target is in exactly one group.
std::vector<std::vector<std::string>> shared_input_groups(const std::vector<std::string>& targets,
                                                          const std::map<std::string, LayerStatistics>& statistics);

}  // namespace duquant
