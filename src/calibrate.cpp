#include "duquant/calibrate.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "duquant/errors.h"
#include "duquant/magnitude_scan.h"
#include "duquant/select.h"
#include "duquant/swap.h"
#include "duquant/type_names.h"

namespace duquant {
namespace {

std::vector<ScriptModuleClass::Attribute> observer_attributes() {
  auto tensor = c10::TensorType::get();
  return {{"weight", tensor, true},  {"bias", tensor, true},  {"has_bias", c10::BoolType::get()},
          {"absmax", tensor, true},  {"sample", tensor, true}, {"sample_limit", c10::IntType::get()},
          {"tokens", c10::IntType::get()}, {"stride", c10::IntType::get()},
          {"hessian", tensor, true}, {"sums_hessian", c10::BoolType::get()}, {"previous_input", tensor, true},
          {"calls", c10::IntType::get()}, {"hessian_calls", c10::IntType::get()}};
}

// The row sample is bounded and uniform over every token of every call: it keeps the tokens whose
// running index is a multiple of `stride`, and when it overflows it keeps every other row and
// doubles the stride, which leaves exactly the multiples of the new stride. So the 10 expert
// steps, and every observation of a many-observation calibration, are covered evenly from first
// to last, whatever the limit. Rows are kept in the input's own dtype (exact, and half the memory
// of float32 for a bf16 model), and compact: the halving keeps a strided view of its input, which
// would hold every row of the call alive (4x the kept rows for a prefix of 816 tokens).
// The Hessian sums x^T x of every token in float32: GPTQ then fits every calibration token, not
// just the sample (a 2048-wide input sampled at 2048 rows has H nearly singular, and GPTQ overfits
// those rows). q/k/v (and gate/up) are called one after the other on one input, so the observers
// share `previous_input`, the column sums of the last input summed by any of them: an observer
// whose input equals it skips, and only the first of a shared input pays the K x K memory and the
// T K^2 product. An observer that skipped on some calls and summed on others has an incomplete
// Hessian and reports none (its layer falls back to the row sample).
constexpr const char* kObserverForward = R"(    flat = x.detach().reshape(-1, x.size(-1))
    self.absmax = torch.maximum(self.absmax, torch.amax(torch.abs(flat), [0], False).float())
    first = (self.stride - self.tokens % self.stride) % self.stride
    self.sample = torch.cat([self.sample, flat[first::self.stride]], 0)
    self.tokens = self.tokens + flat.size(0)
    while self.sample.size(0) > self.sample_limit:
        self.sample = self.sample[::2]
        self.stride = self.stride * 2
    self.sample = self.sample.contiguous()
    self.calls = self.calls + 1
    if self.sums_hessian:
        rows = flat.float()
        column_sums = torch.sum(rows, [0])
        if not torch.equal(self.previous_input, column_sums):
            self.previous_input.resize_([column_sums.size(0)]).copy_(column_sums)
            if self.hessian.numel() == 0:
                self.hessian = torch.zeros([rows.size(1), rows.size(1)], dtype=rows.dtype, device=rows.device)
            self.hessian.addmm_(rows.t(), rows)
            self.hessian_calls = self.hessian_calls + 1
    bias: Optional[Tensor] = None
    if self.has_bias:
        bias = self.bias
    return torch.linear(x, self.weight, bias)
)";

std::string parent_path(const std::string& path) {
  const auto dot = path.rfind('.');
  return dot == std::string::npos ? "" : path.substr(0, dot);
}

}  // namespace

std::map<std::string, LayerStatistics> calibrate(const torch::jit::Module& model,
                                                 const std::vector<std::string>& targets, const ModelInputs& inputs,
                                                 const ObserverLimits& limits, const torch::Device& device) {
  return calibrate(model, targets, std::vector<Observation>{{"", inputs}}, limits, {}, device);
}

std::map<std::string, LayerStatistics> calibrate(const torch::jit::Module& model,
                                                 const std::vector<std::string>& targets,
                                                 const std::vector<Observation>& observations, const ObserverLimits& limits,
                                                 const ObservationCallback& on_observation,
                                                 const torch::Device& device) {
  ScriptModuleClass observer_class(model._ivalue()->compilation_unit(), kObserverTypeName, observer_attributes(),
                                   kObserverForward);
  std::map<std::string, torch::jit::Module> observers;
  std::map<std::string, torch::jit::Module> modules;
  for (const auto& item : model.named_modules()) modules.emplace(item.name, item.value);
  const auto previous_input = torch::zeros({0});  // shared by every summing observer (see above)
  for (const auto& path : targets) {
    const auto& linear = modules.at(path);
    const auto weight = linear.attr("weight").toTensor();
    const auto bias = linear_bias(linear);
    const int64_t in_features = weight.size(1);
    observers.emplace(path, observer_class.instantiate(
                                method_names(linear),
                                {weight, bias.defined() ? bias : torch::empty({0}, weight.options()),
                                 bias.defined(), torch::zeros({in_features}),
                                 torch::zeros({0, in_features}, weight.options().requires_grad(false)),
                                 limits.sample_rows, int64_t{0}, int64_t{1}, torch::zeros({0, 0}),
                                 in_features <= limits.hessian_max_features, previous_input, int64_t{0}, int64_t{0}}));
  }
  auto observing = replace_submodules(model, observers);
  // Unchanged submodules are shared with `model`, so moving the observing copy moves them too;
  // it goes back to the CPU once the statistics are read.
  const bool moved = device != torch::Device(torch::kCPU);
  if (moved) observing.to(device);
  try {
    for (size_t i = 0; i < observations.size(); ++i) {
      try {
        run_forward(observing, inputs_on(observations[i].inputs, device));
      } catch (const UserError& error) {
        if (observations[i].path.empty()) throw;
        throw UserError(fmt::format("calibration observation '{}': {}", observations[i].path, error.what()),
                        error.code());
      }
      if (on_observation) on_observation(i + 1, observations.size());
    }
  } catch (...) {
    if (moved) observing.to(torch::kCPU);
    throw;
  }

  // The statistics leave their observers before the model goes back: Module::to moves a buffer in
  // place (Tensor::set_data), so a statistic still held by an observer would move to the CPU with it.
  std::map<std::string, LayerStatistics> statistics;
  for (auto& [path, observer] : observers) {
    LayerStatistics stats;
    stats.absmax = observer.attr("absmax").toTensor();
    stats.sample = observer.attr("sample").toTensor();
    stats.tokens = observer.attr("tokens").toInt();
    const int64_t calls = observer.attr("calls").toInt();
    if (calls > 0 && observer.attr("hessian_calls").toInt() == calls) stats.hessian = observer.attr("hessian").toTensor();
    for (const char* name : {"absmax", "sample", "hessian"}) observer.setattr(name, torch::empty({0}));
    statistics.emplace(path, std::move(stats));
  }
  if (moved) observing.to(torch::kCPU);

  for (const auto& [path, stats] : statistics) {
    if (stats.tokens == 0) {
      throw UserError(fmt::format("layer '{}' was not called by the model's forward on the given inputs; exclude "
                                  "it from the selection or give inputs that reach it",
                                  path));
    }
    if (!all_finite(stats.absmax)) {
      throw UserError(fmt::format("the input of layer '{}' contains NaN or Inf during calibration; check the "
                                  "model weights and the calibration inputs",
                                  path));
    }
  }
  return statistics;
}

std::vector<std::vector<std::string>> shared_input_groups(const std::vector<std::string>& targets,
                                                          const std::map<std::string, LayerStatistics>& statistics) {
  std::vector<std::vector<std::string>> groups;
  for (const auto& path : targets) {
    const auto& stats = statistics.at(path);
    bool placed = false;
    for (auto& group : groups) {
      const auto& leader = statistics.at(group.front());
      if (parent_path(group.front()) == parent_path(path) && leader.tokens == stats.tokens &&
          torch::equal(leader.absmax, stats.absmax) && leader.sample.sizes() == stats.sample.sizes() &&
          torch::equal(leader.sample, stats.sample)) {
        group.push_back(path);
        placed = true;
        break;
      }
    }
    if (!placed) groups.push_back({path});
  }
  return groups;
}

}  // namespace duquant
