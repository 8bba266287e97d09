// CUDA-graph capture and replay of a TorchScript method (include/duquant/cuda_graph.h). The
// argument checks and error texts are plain C++ (tested without a GPU); the capture itself needs
// LibTorch's CUDA part and is compiled where the project builds its CUDA kernels.
#include "duquant/cuda_graph.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <optional>
#include <sstream>

#include "duquant/errors.h"
#include "duquant/ops.h"

#if DUQUANT_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace duquant {
namespace {

constexpr const char* kHereMarker = "<--- HERE";

std::string input_name(const ModelInputs& inputs, size_t index) {
  return index < inputs.names.size() ? inputs.names[index] : fmt::format("input {}", index);
}

// The tensors Module::to(device) moves: parameters and buffers of every submodule.
template <typename Visit>
void for_each_model_tensor(const torch::jit::Module& model, Visit visit) {
  for (const auto& parameter : model.named_parameters(/*recurse=*/true)) visit("parameter", parameter.name, parameter.value);
  for (const auto& buffer : model.named_buffers(/*recurse=*/true)) visit("buffer", buffer.name, buffer.value);
}

}  // namespace

std::string GraphInputSignature::describe() const {
  return fmt::format("{} [{}] on {}", c10::toString(dtype), fmt::join(sizes, ", "), device.str());
}

GraphInputSignature signature_of(const std::string& name, const torch::jit::IValue& value) {
  if (!value.isTensor()) {
    throw UserError(fmt::format("input '{}' is a {}, not a tensor; a CUDA graph takes tensor inputs only: run "
                                "without --cuda-graph",
                                name, value.tagKind()));
  }
  const auto& tensor = value.toTensor();
  return {name, tensor.sizes().vec(), tensor.scalar_type(), tensor.device()};
}

void check_replay_inputs(const std::vector<GraphInputSignature>& captured,
                         const std::vector<torch::jit::IValue>& inputs) {
  if (inputs.size() != captured.size()) {
    std::vector<std::string> names;
    for (const auto& signature : captured) names.push_back(signature.name);
    throw UserError(fmt::format("{} inputs given, the CUDA graph was captured with {} ({}); give the same inputs",
                                inputs.size(), captured.size(), fmt::join(names, ", ")));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto given = signature_of(captured[i].name, inputs[i]);
    if (given.sizes != captured[i].sizes || given.dtype != captured[i].dtype || given.device != captured[i].device) {
      throw UserError(fmt::format("input '{}' is {}, the CUDA graph was captured for {}; a graph replays fixed "
                                  "shapes, dtypes and devices: capture again for these inputs",
                                  captured[i].name, given.describe(), captured[i].describe()));
    }
  }
}

c10::Device check_capturable(const torch::jit::Module& model, const ModelInputs& inputs) {
  std::optional<c10::Device> device;
  auto require_on_one_gpu = [&](const std::string& what, const c10::Device& where, const std::string& fix) {
    if (!where.is_cuda()) {
      throw UserError(fmt::format("{} is on {}; a CUDA graph needs everything on one GPU: {}", what, where.str(), fix));
    }
    if (device && *device != where) {
      throw UserError(fmt::format("{} is on {}, other tensors on {}; a CUDA graph runs on one GPU: {}", what,
                                  where.str(), device->str(), fix));
    }
    device = where;
  };
  for_each_model_tensor(model, [&](const char* kind, const std::string& name, const torch::Tensor& tensor) {
    // Empty tensors (an absent bias) are never read by a kernel.
    if (tensor.numel() == 0) return;
    require_on_one_gpu(fmt::format("the model's {} '{}'", kind, name), tensor.device(),
                       "move the model with --device cuda (Module::to(device)) before capturing");
  });
  for (size_t i = 0; i < inputs.values.size(); ++i) {
    const auto signature = signature_of(input_name(inputs, i), inputs.values[i]);
    require_on_one_gpu(fmt::format("input '{}'", signature.name), signature.device,
                       "move the inputs to the model's device before capturing");
  }
  if (!device) throw UserError("the model has no tensors and no inputs; there is nothing to capture in a CUDA graph");
  return *device;
}

std::string describe_capture_failure(const std::string& interpreter_error) {
  // The traceback's innermost frame comes last; its marker line underlines the failing call with
  // '~' in the columns of the code line just above it.
  std::vector<std::string> lines;
  std::istringstream stream(interpreter_error);
  for (std::string line; std::getline(stream, line);) lines.push_back(line);
  std::string call;
  for (size_t i = lines.size(); i-- > 1;) {
    const auto& marker = lines[i];
    if (marker.find(kHereMarker) == std::string::npos) continue;
    const auto first = marker.find('~');
    const auto last = marker.rfind('~');
    const auto& code = lines[i - 1];
    if (first != std::string::npos && first < code.size()) call = code.substr(first, std::min(last + 1, code.size()) - first);
    break;
  }
  const std::string message = interpreter_message(interpreter_error);
  const std::string where = call.empty() ? "" : fmt::format(" in {}", call);
  return fmt::format("the model failed while being captured into a CUDA graph{}: {}; an op that synchronises with "
                     "the host or uses CPU tensors cannot be captured: run without --cuda-graph",
                     where, message);
}

struct CudaGraphRunner::State {
#if DUQUANT_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph;  // declared first: destroyed after the tensors of its pool
#endif
  torch::jit::Module model;
  c10::Device device = c10::kCPU;
  std::vector<GraphInputSignature> signatures;
  std::vector<torch::jit::IValue> static_inputs;
  torch::jit::IValue output;
};

CudaGraphRunner::CudaGraphRunner(std::unique_ptr<State> state) : state_(std::move(state)) {}
CudaGraphRunner::~CudaGraphRunner() = default;

const std::vector<GraphInputSignature>& CudaGraphRunner::input_signatures() const { return state_->signatures; }
const torch::jit::IValue& CudaGraphRunner::output() const { return state_->output; }

#if DUQUANT_WITH_CUDA

namespace {

// After a failed capture_end (the capture was invalidated, cudaStreamEndCapture failed before
// CUDAGraph released its allocator routing): stop routing allocations to the graph's pool, give
// the pool back, and clear the non-sticky capture error so later CUDA calls are not blamed for it.
void abandon_capture(const c10::Device& device, const c10::MempoolId_t& pool) {
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device.index(), pool);
    c10::cuda::CUDACachingAllocator::releasePool(device.index(), pool);
  } catch (const c10::Error&) {
    // Best effort: the capture error is what the user needs to see.
  }
  (void)cudaGetLastError();
}

std::string first_line_of(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

std::unique_ptr<CudaGraphRunner> CudaGraphRunner::capture(const torch::jit::Module& model,
                                                          const ModelInputs& example_inputs,
                                                          const CudaGraphOptions& options) {
  if (!torch::cuda::is_available()) {
    throw UserError("no CUDA device is available for a CUDA graph; run without --cuda-graph");
  }
  if (options.warmup_calls < 1) {
    throw UserError("a CUDA graph needs at least one warm-up call before capture", ExitCode::Usage);
  }
  if (!model.find_method(options.method)) {
    throw UserError(fmt::format("the model has no method '{}' to capture", options.method), ExitCode::Usage);
  }
  auto state = std::make_unique<State>();
  state->model = model;
  state->device = check_capturable(model, example_inputs);
  const c10::cuda::CUDAGuard device_guard(state->device);
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < example_inputs.values.size(); ++i) {
    state->signatures.push_back(signature_of(input_name(example_inputs, i), example_inputs.values[i]));
    state->static_inputs.emplace_back(example_inputs.values[i].toTensor().clone());
  }
  auto method = state->model.get_method(options.method);

  // Warm-up and capture run on a side stream, as torch.cuda.graph does: capture needs a stream
  // other than the default one, and the side stream waits for the copies of the static inputs.
  const auto current = c10::cuda::getCurrentCUDAStream(state->device.index());
  const auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, state->device.index());
  at::cuda::CUDAEvent inputs_ready;
  inputs_ready.record(current);
  inputs_ready.block(side);
  {
    const c10::cuda::CUDAStreamGuard stream_guard(side);
    for (int call = 0; call < options.warmup_calls; ++call) {
      try {
        method(state->static_inputs);
      } catch (const std::exception& error) {  // c10::Error from an op, or the interpreter's own
        throw UserError(fmt::format("the model's {} failed on the inputs before capture: {}; check the inputs with "
                                    "duquant run without --cuda-graph",
                                    options.method, interpreter_message(error.what())));
      }
    }
  }
  torch::cuda::synchronize(state->device.index());

  state->graph = std::make_unique<at::cuda::CUDAGraph>();
  const auto pool = at::cuda::graph_pool_handle();
  std::string failure;
  {
    const c10::cuda::CUDAStreamGuard stream_guard(side);
    state->graph->capture_begin(pool);
    try {
      state->output = method(state->static_inputs);
    } catch (const c10::Error& error) {
      failure = describe_capture_failure(error.what_without_backtrace());
    } catch (const std::exception& error) {  // the interpreter rethrows op errors as its own type
      failure = describe_capture_failure(error.what());
    }
    try {
      state->graph->capture_end();
    } catch (const c10::Error& error) {
      abandon_capture(state->device, pool);
      if (failure.empty()) failure = describe_capture_failure(first_line_of(error.what_without_backtrace()));
    }
    // The W4A8 op's remembered activations (ops.h) are tensors of the graph's pool: let go of them.
    ops::forget_reusable_activations();
  }
  if (!failure.empty()) throw UserError(failure);
  // Replays run on whatever stream is current then; this one must not overtake the capture's
  // stream (nothing ran on it during capture, but the warm-up's frees are ordered through it).
  at::cuda::CUDAEvent captured;
  captured.record(side);
  captured.block(current);
  return std::unique_ptr<CudaGraphRunner>(new CudaGraphRunner(std::move(state)));
}

const torch::jit::IValue& CudaGraphRunner::replay(const std::vector<torch::jit::IValue>& inputs) {
  check_replay_inputs(state_->signatures, inputs);
  const c10::cuda::CUDAGuard device_guard(state_->device);
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < inputs.size(); ++i) state_->static_inputs[i].toTensor().copy_(inputs[i].toTensor());
  return replay();
}

const torch::jit::IValue& CudaGraphRunner::replay() {
  const c10::cuda::CUDAGuard device_guard(state_->device);
  state_->graph->replay();
  return state_->output;
}

#else  // a build without the CUDA toolkit: nothing can be captured

std::unique_ptr<CudaGraphRunner> CudaGraphRunner::capture(const torch::jit::Module&, const ModelInputs&,
                                                          const CudaGraphOptions&) {
  throw UserError("this duquant was built without CUDA support; rebuild it with the CUDA toolkit installed, or run "
                  "without --cuda-graph");
}

const torch::jit::IValue& CudaGraphRunner::replay(const std::vector<torch::jit::IValue>& inputs) {
  check_replay_inputs(state_->signatures, inputs);
  return replay();
}

const torch::jit::IValue& CudaGraphRunner::replay() {
  throw UserError("this duquant was built without CUDA support; run without --cuda-graph");
}

#endif

}  // namespace duquant
