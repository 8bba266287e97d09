// Capturing one whole forward of a TorchScript model (bf16 original or W4A8) into a CUDA graph and
// replaying it. Without a graph, pi0's ~10k kernel launches per call cost more host time than the
// kernels take (DESIGN.md section 7), so end-to-end latency is measured and served under graphs.
//
// What a graph fixes at capture: the input shapes, dtypes and device, the model's weights (read
// in place: changing a buffer's values in place is seen by the next replay, replacing a buffer or
// moving the model is not), and the output tensors, which every replay overwrites. Capture again
// for other input shapes, another device or a reloaded model.
#pragma once

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

#include "duquant/model_io.h"

namespace duquant {

// One input as a graph was captured for it; a replay must give the same.
struct GraphInputSignature {
  std::string name;
  std::vector<int64_t> sizes;
  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device = c10::kCPU;

  std::string describe() const;  // "BFloat16 [1, 3, 224, 224] on cuda:0"
};

// UserError unless `value` is a tensor (a graph copies new inputs into fixed tensors).
GraphInputSignature signature_of(const std::string& name, const torch::jit::IValue& value);

// UserError (one line, naming the input, what was captured and what was given) unless `inputs`
// match `captured` in number, shape, dtype and device.
void check_replay_inputs(const std::vector<GraphInputSignature>& captured,
                         const std::vector<torch::jit::IValue>& inputs);

// UserError unless every non-empty parameter and buffer of `model` and every input is a tensor on
// one CUDA device; returns that device. Reads metadata only.
c10::Device check_capturable(const torch::jit::Module& model, const ModelInputs& inputs);

// The one-line error for a forward that failed while being captured: the TorchScript call that
// failed (the innermost "<--- HERE" of the interpreter's traceback), its message, and the way out.
std::string describe_capture_failure(const std::string& interpreter_error);

struct CudaGraphOptions {
  std::string method = "forward";  // the model method to capture
  int warmup_calls = 3;            // eager calls on a side stream before capture
};

class CudaGraphRunner {
 public:
  // Copies `example_inputs` into static input tensors, calls the method `warmup_calls` times on a
  // side stream (TorchScript's executor profiles and optimises on its first calls; the W4A8 op
  // raises its shared-memory limits on its first; the caching allocator fills), then captures one
  // call into a CUDA graph with its own memory pool. UserError when no CUDA device is present,
  // the model or an input is not on one CUDA device, or the forward fails eagerly or under capture.
  static std::unique_ptr<CudaGraphRunner> capture(const torch::jit::Module& model, const ModelInputs& example_inputs,
                                                  const CudaGraphOptions& options = {});
  ~CudaGraphRunner();
  CudaGraphRunner(const CudaGraphRunner&) = delete;
  CudaGraphRunner& operator=(const CudaGraphRunner&) = delete;

  // Copies `inputs` into the static inputs (check_replay_inputs first) and replays on the current
  // stream. Returns the static output, valid until the next replay: clone what must be kept.
  const torch::jit::IValue& replay(const std::vector<torch::jit::IValue>& inputs);
  // Replays on the static inputs as they are (as captured, or as last copied in).
  const torch::jit::IValue& replay();

  const std::vector<GraphInputSignature>& input_signatures() const;
  const torch::jit::IValue& output() const;

 private:
  struct State;
  explicit CudaGraphRunner(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace duquant
