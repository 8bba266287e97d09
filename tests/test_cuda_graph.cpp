// The CUDA-graph runner (include/duquant/cuda_graph.h). Without a GPU: the refusals (inputs that
// differ from the captured ones, a model or inputs off the GPU, no CUDA device) and the error text
// of a forward that fails under capture, built from a real TorchScript traceback. With a GPU: the
// tiny pi0 quantized to W4A8 captured whole, replays equal to eager calls, on new inputs too, and
// a forward that synchronises with the host is refused naming the op.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <string>

#include "duquant/cuda_graph.h"
#include "duquant/errors.h"
#include "duquant/model_io.h"
#include "duquant/select.h"
#include "test_support.h"
#include "w4a8_cuda.h"

namespace duquant {
namespace {

#define SKIP_WITHOUT_CUDA_KERNELS()                                                                 \
  do {                                                                                              \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";                             \
    if (!ops::cuda::cuda_kernels_available()) GTEST_SKIP() << "operator library built without CUDA"; \
  } while (false)

// The message of the UserError `call` throws ("" and a test failure when it throws none).
template <typename Call>
std::string user_error_of(Call call) {
  try {
    call();
  } catch (const UserError& error) {
    const std::string message = error.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << "not one line: " << message;
    return message;
  }
  ADD_FAILURE() << "no UserError thrown";
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::vector<GraphInputSignature> captured_signatures() {
  return {signature_of("images", torch::zeros({1, 3, 8, 8}, torch::kBFloat16)),
          signature_of("tokens", torch::zeros({1, 12}, torch::kLong))};
}

TEST(CudaGraphReplayInputs, MatchingInputsAreAccepted) {
  const std::vector<torch::jit::IValue> inputs = {torch::ones({1, 3, 8, 8}, torch::kBFloat16),
                                                  torch::ones({1, 12}, torch::kLong)};
  EXPECT_NO_THROW(check_replay_inputs(captured_signatures(), inputs));
}

TEST(CudaGraphReplayInputs, AnotherShapeIsRefusedNamingInputAndBothShapes) {
  const auto message = user_error_of([] {
    check_replay_inputs(captured_signatures(), {torch::ones({1, 3, 8, 8}, torch::kBFloat16), torch::ones({1, 20}, torch::kLong)});
  });
  EXPECT_TRUE(contains(message, "input 'tokens' is Long [1, 20] on cpu")) << message;
  EXPECT_TRUE(contains(message, "captured for Long [1, 12] on cpu")) << message;
  EXPECT_TRUE(contains(message, "capture again")) << message;
}

TEST(CudaGraphReplayInputs, AnotherDtypeIsRefused) {
  const auto message = user_error_of([] {
    check_replay_inputs(captured_signatures(), {torch::ones({1, 3, 8, 8}, torch::kFloat), torch::ones({1, 12}, torch::kLong)});
  });
  EXPECT_TRUE(contains(message, "input 'images' is Float [1, 3, 8, 8]")) << message;
  EXPECT_TRUE(contains(message, "captured for BFloat16 [1, 3, 8, 8]")) << message;
}

TEST(CudaGraphReplayInputs, AnotherDeviceIsRefused) {
  // Only the signature names a CUDA device: no GPU is needed to compare devices.
  GraphInputSignature on_gpu{"state", {1, 32}, torch::kFloat, c10::Device("cuda:0")};
  const auto message = user_error_of([&] { check_replay_inputs({on_gpu}, {torch::ones({1, 32})}); });
  EXPECT_TRUE(contains(message, "input 'state' is Float [1, 32] on cpu, the CUDA graph was captured for Float [1, 32] on cuda:0"))
      << message;
}

TEST(CudaGraphReplayInputs, AnotherNumberOfInputsIsRefusedListingTheCapturedOnes) {
  const auto message = user_error_of([] { check_replay_inputs(captured_signatures(), {torch::ones({1, 12})}); });
  EXPECT_TRUE(contains(message, "1 inputs given, the CUDA graph was captured with 2 (images, tokens)")) << message;
}

TEST(CudaGraphReplayInputs, NonTensorInputIsRefused) {
  const auto message = user_error_of([] { signature_of("steps", torch::jit::IValue(int64_t{10})); });
  EXPECT_TRUE(contains(message, "input 'steps' is a Int, not a tensor")) << message;
}

// A scripted module with one parameter-like buffer and a forward on one tensor.
torch::jit::Module scaled_module(const torch::Tensor& scale) {
  torch::jit::Module module("Scaled");
  module.register_buffer("scale", scale);
  module.define(R"(
def forward(self, x):
    return x * self.scale
)");
  return module;
}

ModelInputs one_input(const torch::Tensor& x) { return {{"x"}, {x}}; }

TEST(CudaGraphCapturable, ModelOnTheCpuIsRefusedNamingTheTensor) {
  const auto model = scaled_module(torch::ones({4}));
  const auto message = user_error_of([&] { check_capturable(model, one_input(torch::ones({4}))); });
  EXPECT_TRUE(contains(message, "the model's buffer 'scale' is on cpu")) << message;
  EXPECT_TRUE(contains(message, "--device cuda")) << message;
}

TEST(CudaGraphCapturable, EmptyBuffersAreNotCheckedButInputsAre) {
  // An absent bias is an empty buffer wherever it lives; the input on the CPU is the problem here.
  const auto model = scaled_module(torch::empty({0}));
  const auto message = user_error_of([&] { check_capturable(model, one_input(torch::ones({4}))); });
  EXPECT_TRUE(contains(message, "input 'x' is on cpu")) << message;
}

TEST(CudaGraphCapture, FailureNamesTheFailingCallItsMessageAndTheWayOut) {
  // A real interpreter traceback: torch.narrow past the end fails inside a submodule.
  torch::jit::Module inner("Inner");
  inner.define(R"(
def forward(self, x):
    y = x * 2
    return torch.narrow(y, 0, 5, 1)
)");
  torch::jit::Module outer("Outer");
  outer.register_module("inner", inner);
  outer.define(R"(
def forward(self, x):
    return self.inner.forward(x) + 1
)");
  std::string traceback;
  try {
    outer.forward({torch::ones({2, 3})});
  } catch (const std::exception& error) {  // the interpreter rethrows as its own exception type
    traceback = error.what();
  }
  ASSERT_TRUE(contains(traceback, "<--- HERE")) << traceback;
  const auto message = describe_capture_failure(traceback);
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  EXPECT_TRUE(contains(message, "captured into a CUDA graph in torch.narrow: ")) << message;
  EXPECT_TRUE(contains(message, "start out of range")) << message;
  EXPECT_TRUE(contains(message, "run without --cuda-graph")) << message;
}

TEST(CudaGraphCapture, FailureWithoutATracebackStillGivesTheMessage) {
  const auto message = describe_capture_failure("CUDA error: operation not permitted when stream is capturing");
  EXPECT_EQ(message, "the model failed while being captured into a CUDA graph: CUDA error: operation not permitted "
                     "when stream is capturing; an op that synchronises with the host or uses CPU tensors cannot be "
                     "captured: run without --cuda-graph");
}

TEST(CudaGraphCapture, WithoutACudaDeviceCaptureIsRefused) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a CUDA device is present";
  const auto model = scaled_module(torch::ones({4}));
  const auto message = user_error_of([&] { CudaGraphRunner::capture(model, one_input(torch::ones({4}))); });
  EXPECT_TRUE(contains(message, "run without --cuda-graph")) << message;
}

// ---------------------------------------------------------------------------------------------
// On a GPU

// The tiny pi0 fixture quantized to W4A8 (all 252 targets of the user's note) by the CLI, on the GPU.
struct QuantizedTinyPi0 {
  torch::jit::Module model;
  ModelInputs inputs;
};

QuantizedTinyPi0 quantized_tiny_pi0_on_gpu() {
  const auto original = testing::fixture("pi0_tiny_script.pt");
  const auto inputs_path = testing::fixture("pi0_tiny.inputs.pt");
  const auto output = testing::temporary_directory("cuda_graph") + "/pi0_w4a8.pt";
  const auto result = testing::run_cli("quantize " + original + " -o " + output + " --calib " + inputs_path +
                                       " --rotation-steps 32 --exclude '" + testing::kNoteExclude + "'");
  if (result.exit_code != 0) throw std::runtime_error("quantize failed: " + result.output);
  QuantizedTinyPi0 quantized{load_model(output), load_inputs(inputs_path)};
  quantized.model.to(torch::kCUDA);
  for (auto& value : quantized.inputs.values) value = value.toTensor().to(torch::kCUDA);
  return quantized;
}

double relative_max_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  const auto a = actual.to(torch::kDouble), e = expected.to(torch::kDouble);
  return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item<double>();
}

TEST(CudaGraphGpu, CapturedW4A8Pi0ReplaysItsEagerOutputAndFollowsNewInputs) {
  SKIP_WITHOUT_CUDA_KERNELS();
  testing::require_fixture(testing::fixture("pi0_tiny_script.pt"));
  auto quantized = quantized_tiny_pi0_on_gpu();
  int64_t w4a8_layers = 0;
  for (const auto& item : quantized.model.named_modules()) w4a8_layers += is_quantized_linear(item.value);
  ASSERT_EQ(w4a8_layers, 252);

  auto runner = CudaGraphRunner::capture(quantized.model, quantized.inputs);
  const auto replayed = runner->replay(quantized.inputs.values).toTensor().clone();
  const auto eager = run_forward(quantized.model, quantized.inputs).toTensor();
  // Same kernels on the same shapes: equal up to cuBLAS algorithm choices of the float layers.
  EXPECT_LE(relative_max_difference(replayed, eager), 1e-5);

  // New observation: every floating-point input changed (images, state, noise).
  ModelInputs next = quantized.inputs;
  for (auto& value : next.values) {
    const auto tensor = value.toTensor();
    if (tensor.is_floating_point()) value = (tensor * 0.5 + 0.25).to(tensor.scalar_type());
  }
  const auto next_eager = run_forward(quantized.model, next).toTensor();
  const auto next_replayed = runner->replay(next.values).toTensor();
  EXPECT_LE(relative_max_difference(next_replayed, next_eager), 1e-5);
  EXPECT_GT(relative_max_difference(next_eager, eager), 1e-3) << "the new inputs must change the output";
  // The static output is the tensor the replays write into.
  EXPECT_EQ(next_replayed.data_ptr(), runner->output().toTensor().data_ptr());
}

TEST(CudaGraphGpu, ReplayRefusesInputsOfAnotherShape) {
  SKIP_WITHOUT_CUDA_KERNELS();
  const auto model = [] {
    auto module = scaled_module(torch::full({4}, 3.0f));
    module.to(torch::kCUDA);
    return module;
  }();
  auto runner = CudaGraphRunner::capture(model, one_input(torch::ones({2, 4}, torch::kCUDA)));
  EXPECT_TRUE(torch::equal(runner->replay({torch::full({2, 4}, 2.0f, torch::kCUDA)}).toTensor().cpu(),
                           torch::full({2, 4}, 6.0f)));
  const auto message = user_error_of([&] { runner->replay({torch::ones({3, 4}, torch::kCUDA)}); });
  EXPECT_TRUE(contains(message, "input 'x' is Float [3, 4] on cuda:0, the CUDA graph was captured for Float [2, 4]"))
      << message;
}

TEST(CudaGraphGpu, ForwardThatSynchronisesWithTheHostIsRefusedAndCudaStaysUsable) {
  SKIP_WITHOUT_CUDA_KERNELS();
  // bool(tensor) copies the value to the host: fine eagerly, illegal while capturing.
  torch::jit::Module module("Synchronising");
  module.define(R"(
def forward(self, x):
    if bool(x.sum() > 0):
        return x * 2
    return x
)");
  module.to(torch::kCUDA);
  const auto message = user_error_of([&] { CudaGraphRunner::capture(module, one_input(torch::ones({4}, torch::kCUDA))); });
  EXPECT_TRUE(contains(message, "captured into a CUDA graph")) << message;
  EXPECT_TRUE(contains(message, "run without --cuda-graph")) << message;
  // The failed capture is cleaned up: ordinary CUDA work and a new capture still succeed.
  EXPECT_EQ(torch::ones({8}, torch::kCUDA).sum().item<float>(), 8.0f);
  auto runner = CudaGraphRunner::capture(scaled_module(torch::full({4}, 3.0f).to(torch::kCUDA)),
                                         one_input(torch::ones({4}, torch::kCUDA)));
  EXPECT_TRUE(torch::equal(runner->replay().toTensor().cpu(), torch::full({4}, 3.0f)));
}

}  // namespace
}  // namespace duquant
