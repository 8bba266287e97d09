#include "duquant/quantize_model.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>

#include "duquant/calibrate.h"
#include "duquant/errors.h"
#include "duquant/gptq.h"
#include "duquant/magnitude_scan.h"
#include "duquant/ops.h"
#include "duquant/swap.h"

namespace duquant {
namespace {

// FNV-1a: a per-layer seed that is the same on every platform (std::hash is not specified).
uint64_t path_seed(uint64_t seed, const std::string& path) {
  uint64_t hash = 1469598103934665603ull ^ seed;
  for (unsigned char c : path) hash = (hash ^ c) * 1099511628211ull;
  return hash;
}

double relative_error(const torch::Tensor& approximate, const torch::Tensor& exact) {
  const double norm = exact.to(torch::kDouble).norm().item<double>();
  const double difference = (approximate.to(torch::kDouble) - exact.to(torch::kDouble)).norm().item<double>();
  return norm > 0 ? difference / norm : difference;
}

// Data-free mode: no activation statistics. Unit channel maxima with alpha = 1 make smoothing the
// identity, and a seeded Gaussian sample drives the rotations, so outliers are spread only as a
// random rotation would (QuaRot-like); clipping uses the first fixed ratio. Less accurate.
LayerStatistics synthetic_statistics(int64_t in_features, int64_t rows, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  LayerStatistics stats;
  stats.absmax = torch::ones({in_features});
  stats.sample = at::normal(0.0, 1.0, {rows, in_features}, generator);
  stats.tokens = 0;
  return stats;
}

// Every kHeldOutEvery-th sampled row is held out from all fitting (rotation, clipping, GPTQ)
// and only measures the layer's error: the report's figures are then not the fit's own.
constexpr int64_t kHeldOutEvery = 8;

struct SampleSplit {
  torch::Tensor fit;       // float32 rows the transform, clipping and GPTQ learn from
  torch::Tensor held_out;  // float32 rows only measured on (may be empty)
};

SampleSplit split_sample(const torch::Tensor& sample) {
  const auto rows = sample.to(torch::kFloat);
  const int64_t count = rows.size(0);
  if (count < kHeldOutEvery) return {rows, rows.slice(0, 0, 0)};
  const auto index = torch::arange(count, torch::TensorOptions().dtype(torch::kLong).device(rows.device()));
  const auto held_out = (index % kHeldOutEvery) == (kHeldOutEvery - 1);
  return {rows.index({~held_out}), rows.index({held_out})};
}

// At most `limit` rows spread evenly over `rows` (every ceil(T / limit)-th): the searches keep
// their own row budget while the sample stays uniform over every token of every observation.
torch::Tensor uniform_rows(const torch::Tensor& rows, int64_t limit) {
  const int64_t count = rows.size(0);
  if (count <= limit) return rows;
  const int64_t stride = (count + limit - 1) / limit;
  return rows.slice(0, 0, count, stride);
}

// ||X (W - deq)^T|| / ||X W^T|| on fixed rows X for several dequantized weights, X W^T computed
// once; NaN without rows.
class OutputErrorProbe {
 public:
  OutputErrorProbe(const torch::Tensor& rows, const torch::Tensor& weight) : rows_(rows) {
    if (rows_.defined() && rows_.size(0) > 0) reference_ = ops::multiply_by_transpose(rows_, weight);
  }
  double operator()(const torch::Tensor& dequantized) const {
    if (!reference_.defined()) return std::numeric_limits<double>::quiet_NaN();
    return relative_error(ops::multiply_by_transpose(rows_, dequantized), reference_);
  }

 private:
  torch::Tensor rows_, reference_;
};

// The same error from a Hessian H = X^T X instead of the rows X: ||X D^T||^2 = sum((D H) * D), so
// the error over every token GPTQ fitted is measured without keeping those tokens.
class HessianErrorProbe {
 public:
  HessianErrorProbe(const torch::Tensor& hessian, const torch::Tensor& weight)
      : hessian_(hessian), weight_(weight), reference_(squared_norm(weight)) {}
  double operator()(const torch::Tensor& dequantized) const {
    return std::sqrt(squared_norm(dequantized - weight_) / reference_);
  }

 private:
  double squared_norm(const torch::Tensor& difference) const {
    return (difference.matmul(hessian_) * difference).sum().to(torch::kDouble).item<double>();
  }
  torch::Tensor hessian_, weight_;
  double reference_ = 0;
};

}  // namespace

QuantizeResult quantize_model(const torch::jit::Module& model, const std::vector<LinearDecision>& decisions,
                              const QuantizeRecipe& recipe, const ModelInputs* calibration,
                              const LayerCallback& on_layer, const PipelineOptions& pipeline) {
  std::vector<Observation> observations;
  if (calibration) observations.push_back({"", *calibration});
  return quantize_model(model, decisions, recipe, observations, on_layer, {}, pipeline);
}

QuantizeResult quantize_model(const torch::jit::Module& model, const std::vector<LinearDecision>& decisions,
                              const QuantizeRecipe& recipe, const std::vector<Observation>& observations,
                              const LayerCallback& on_layer, const ObservationCallback& on_observation,
                              const PipelineOptions& pipeline) {
  torch::NoGradGuard no_grad;
  const auto device = pipeline.device;
  const bool calibration = !observations.empty();
  std::vector<std::string> targets;
  for (const auto& decision : decisions) {
    if (decision.target) targets.push_back(decision.path);
  }
  if (targets.empty()) throw UserError("no Linear layer matched the selection; nothing to quantize", ExitCode::NoTargets);

  std::map<std::string, torch::jit::Module> linears;
  for (const auto& item : model.named_modules()) {
    if (is_quantized_linear(item.value)) {
      throw UserError(fmt::format("the model is already quantized ('{}' is a W4A8 layer); quantize the original "
                                  "floating-point model",
                                  item.name));
    }
    linears.emplace(item.name, item.value);
  }
  for (const auto& path : targets) {
    const auto weight = linears.at(path).attr("weight").toTensor();
    if (!all_finite(weight)) {
      throw UserError(fmt::format("layer '{}' has NaN or Inf weights; fix the checkpoint or exclude the layer", path));
    }
  }
  check_targets_replaceable(model, targets);

  QuantizeResult result;
  result.data_free = !calibration;
  result.calibration_row_limit = recipe.calibration_rows;
  result.observations = static_cast<int64_t>(observations.size());
  // Data-free: no rows to build a Hessian from, so nearest rounding.
  const bool gptq = calibration && recipe.weight_rounding == WeightRounding::Gptq;
  result.observed_row_limit = calibration ? recipe.observed_rows() : recipe.calibration_rows;
  std::map<std::string, LayerStatistics> statistics;
  std::vector<std::vector<std::string>> groups;
  TransformOptions transform_options = recipe.transform;
  WeightQuantOptions weight_options = recipe.weights;
  if (calibration) {
    StageTimer timer(result.stages, Stage::Calibration);
    statistics = calibrate(model, targets, observations,
                           ObserverLimits(result.observed_row_limit, recipe.hessian_max_features()), on_observation,
                           device);
    groups = shared_input_groups(targets, statistics);
  } else {
    transform_options.alpha = 1.0;
    weight_options.clip_ratios.resize(1);
    for (const auto& path : targets) {
      const int64_t in_features = linears.at(path).attr("weight").toTensor().size(1);
      auto stats = synthetic_statistics(in_features, recipe.calibration_rows, path_seed(recipe.transform.seed, path));
      stats.absmax = stats.absmax.to(device);
      stats.sample = stats.sample.to(device);
      statistics.emplace(path, std::move(stats));
      groups.push_back({path});
    }
  }
  W4A8LinearClass w4a8_class(model._ivalue()->compilation_unit());
  std::map<std::string, torch::jit::Module> replacements;
  size_t done = 0;
  for (const auto& group : groups) {
    const auto stats = statistics.at(group.front());
    // The one observer of the group that summed the Hessian over every token, if any (calibrate.h).
    torch::Tensor hessian;
    for (const auto& path : group) {
      if (statistics.at(path).hessian.defined()) hessian = statistics.at(path).hessian;
    }
    // The statistics of this group are not needed again: free them as we go, so the observed rows
    // (up to gptq-rows per layer) shrink while the quantized layers grow.
    for (const auto& path : group) statistics.erase(path);
    const auto split = calibration ? split_sample(stats.sample) : SampleSplit{stats.sample.to(torch::kFloat), {}};
    const auto search_rows = uniform_rows(split.fit, recipe.calibration_rows);
    // The weights in their stored dtype: each use converts what it reads (a float32 copy of a
    // gate/up pair alone is 256 MiB at full size).
    std::vector<torch::Tensor> weights;
    for (const auto& path : group) weights.push_back(linears.at(path).attr("weight").toTensor().to(device));
    TransformOptions options = transform_options;
    options.seed = path_seed(recipe.transform.seed, group.front());
    const LayerTransform transform = compute_transform(stats.absmax, search_rows, weights, options);
    result.stages += transform.times;
    for (const auto& tensor : {transform.smooth_inv, transform.rotation1, transform.permutation, transform.rotation2}) {
      if (tensor.defined()) result.w4a8_bytes += tensor.nbytes();
    }
    auto online = [&](const torch::Tensor& rows) {
      if (!rows.defined() || rows.size(0) == 0) return torch::Tensor();
      return ops::apply_online_transform(rows, transform.smooth_inv, transform.rotation1, transform.permutation,
                                         transform.rotation2, transform.padded_in_features);
    };
    const auto transformed_search = online(search_rows);
    const auto transformed_held_out = online(split.held_out);
    // GPTQ's Hessian and its factor: one per shared input (q/k/v, gate/up). From every calibration
    // token but the held-out rows where the observers summed it (H - X_h^T X_h, then transformed:
    // x~ = x A for the linear online transform, so H~ = A^T H A = online(online(H)^T), block
    // rotations applied to rows and columns, never a dense A); else from the sampled fit rows.
    torch::Tensor transformed_gptq, transformed_hessian;
    int64_t gptq_rows = 0;
    GptqFactor factor;
    if (gptq) {
      StageTimer timer(result.stages, Stage::Rounding);
      if (hessian.defined()) {
        auto fit_hessian = hessian;  // on `device` already, like every statistic (calibrate.h)
        if (split.held_out.size(0) > 0) fit_hessian = fit_hessian - split.held_out.t().matmul(split.held_out);
        transformed_hessian = online(online(fit_hessian).t().contiguous());
        gptq_rows = stats.tokens - split.held_out.size(0);
        factor = gptq_factor_of_hessian(transformed_hessian.clone(), recipe.gptq);
      } else {
        transformed_gptq = online(uniform_rows(split.fit, recipe.gptq_rows));
        gptq_rows = transformed_gptq.size(0);
        factor = gptq_factor(transformed_gptq, recipe.gptq);
      }
    }

    // The layers of the group hold the very same CPU transform tensors, whatever device computed
    // them: a saved model stores them once, and the op then computes the group's shared int8
    // activations once per call of the model (ops.h, activation reuse).
    W4A8LinearState shared_transform;
    shared_transform.smooth_inv = transform.smooth_inv;
    shared_transform.rotation1 = transform.rotation1;
    shared_transform.permutation = transform.permutation;
    shared_transform.rotation2 = transform.rotation2;
    shared_transform = shared_transform.to(torch::kCPU);

    for (size_t i = 0; i < group.size(); ++i) {
      const auto& path = group[i];
      const auto& linear = linears.at(path);
      WeightQuantOptions layer_weights = weight_options;
      layer_weights.bits = recipe.weight_bits(path);
      torch::Tensor transformed_weight;
      {
        StageTimer timer(result.stages, Stage::WeightTransform);
        transformed_weight = transform_weight(weights[i], transform);
      }
      const auto nearest =
          quantize_weight(transformed_weight, calibration ? transformed_search : torch::Tensor(), layer_weights);
      result.stages += nearest.times;
      QuantizedWeight quantized = nearest;
      if (gptq) {
        StageTimer timer(result.stages, Stage::Rounding);
        quantized = gptq_round(transformed_weight, nearest, layer_weights.bits, factor, recipe.gptq);
      }
      const auto bias = linear_bias(linear);
      const auto bias_float = bias.defined() ? bias.to(device, torch::kFloat) : torch::Tensor();

      W4A8LinearState state;
      state.smooth_inv = transform.smooth_inv;
      state.rotation1 = transform.rotation1;
      state.permutation = transform.permutation;
      state.rotation2 = transform.rotation2;
      state.packed_weight = quantized.packed;
      state.weight_scale = quantized.scale;
      state.weight_zero = quantized.zero;
      state.bias = bias_float;
      state.in_features = weights[i].size(1);
      state.out_features = weights[i].size(0);
      state.group_size = quantized.group_size;
      state.act_bits = recipe.act_bits;
      state.act_clip = recipe.act_clip;

      LayerReport report;
      report.path = path;
      report.in_features = state.in_features;
      report.out_features = state.out_features;
      report.padded_in_features = transform.padded_in_features;
      report.weight_bits = layer_weights.bits;
      report.handling = recipe.describe(path, state.in_features);
      report.shares_input_with = i == 0 ? "" : group.front();
      report.rotation1_steps = transform.rotation1_steps;
      report.rotation2_steps = transform.rotation2_steps;
      report.peak_to_mean_before = transform.peak_to_mean_before;
      report.peak_to_mean_after = transform.peak_to_mean_after;
      report.weight_rounding = weight_rounding_name(gptq ? WeightRounding::Gptq : WeightRounding::Nearest);
      {
        StageTimer timer(result.stages, Stage::LayerCheck);
        const auto dequantized = dequantize_weight(quantized).to(device);
        const OutputErrorProbe held_out_error(transformed_held_out, transformed_weight);
        report.weight_output_error = held_out_error(dequantized);
        std::function<double(const torch::Tensor&)> fit_error = OutputErrorProbe(transformed_gptq, transformed_weight);
        if (transformed_hessian.defined()) fit_error = HessianErrorProbe(transformed_hessian, transformed_weight);
        report.fit_output_error = fit_error(dequantized);
        if (gptq) {
          const auto nearest_dequantized = dequantize_weight(nearest).to(device);
          report.nearest_output_error = held_out_error(nearest_dequantized);
          report.nearest_fit_output_error = fit_error(nearest_dequantized);
        } else {
          report.nearest_output_error = report.weight_output_error;
          report.nearest_fit_output_error = report.fit_output_error;
        }
      }
      report.gptq_dampening = gptq ? factor.dampening : 0.0;
      report.mean_clip_ratio = quantized.mean_clip_ratio;
      report.calibration_rows = search_rows.size(0);
      report.gptq_rows = gptq_rows;
      report.heldout_rows = split.held_out.defined() ? split.held_out.size(0) : 0;
      report.calibration_tokens = stats.tokens;
      report.layer_output_error = std::numeric_limits<double>::quiet_NaN();
      if (report.heldout_rows > 0) {
        StageTimer timer(result.stages, Stage::LayerCheck);
        // The deployed operator on held-out rows against the float layer.
        const auto exact = torch::linear(split.held_out, weights[i].to(torch::kFloat), bias_float);
        report.layer_output_error = relative_error(state.forward(split.held_out), exact);
      }
      result.bf16_bytes += (weights[i].numel() + (bias.defined() ? bias.numel() : 0)) * 2;
      result.w4a8_bytes += state.packed_weight.nbytes() + state.weight_scale.nbytes() + state.weight_zero.nbytes() +
                           (state.bias.defined() ? state.bias.nbytes() : 0);
      W4A8LinearState saved = state.to(torch::kCPU);
      saved.smooth_inv = shared_transform.smooth_inv;
      saved.rotation1 = shared_transform.rotation1;
      saved.permutation = shared_transform.permutation;
      saved.rotation2 = shared_transform.rotation2;
      replacements.emplace(path, w4a8_class.instantiate(method_names(linear), saved));
      result.layers.push_back(report);
      if (on_layer) on_layer(report, ++done, targets.size());
    }
    // An empty tensor in the slot frees the weight; nothing reads it again (the target is
    // replaced, and check_targets_replaceable proved that only its forward used it).
    if (pipeline.release_original_weights) {
      for (const auto& path : group) linears.at(path).setattr("weight", torch::empty({0}));
    }
  }
  // Report in model order (groups can interleave when a parent holds several groups).
  std::map<std::string, size_t> order;
  for (size_t i = 0; i < targets.size(); ++i) order[targets[i]] = i;
  std::sort(result.layers.begin(), result.layers.end(),
            [&](const LayerReport& a, const LayerReport& b) { return order.at(a.path) < order.at(b.path); });
  {
    StageTimer timer(result.stages, Stage::Swap);
    result.model = replace_submodules(model, replacements);
  }
  return result;
}

}  // namespace duquant
