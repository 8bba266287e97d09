// Reading and writing the files the tool works on, with one-line errors that name the fix.
#pragma once

#include <torch/script.h>

#include <string>
#include <vector>

namespace duquant {

// Loads a TorchScript archive on the CPU. UserError for a missing file, a file that is not a
// TorchScript archive (including torch.save pickles), a corrupt/truncated archive, or a model
// the tool cannot rewrite (frozen: no submodules left).
torch::jit::Module load_model(const std::string& path);

// Example/calibration inputs: a TorchScript container module with buffers arg0..argN-1 in
// forward order and a List[str] attribute arg_names (written by scripts/make_pi0.py).
struct ModelInputs {
  std::vector<std::string> names;
  std::vector<torch::jit::IValue> values;
};
ModelInputs load_inputs(const std::string& path);

// The TorchScript interpreter reports a failing op as a multi-line traceback whose useful part is
// the last "RuntimeError: ..." (or last non-empty) line; this returns that line's message.
std::string interpreter_message(const std::string& text);

// Calibration observations (one inputs file = one observation). Each path is an inputs file or a
// directory, which stands for every `*.inputs.pt` file directly inside it, sorted by name.
// Observations keep the order of `paths`. UserError for a missing path, a directory without
// inputs files, or files whose argument names disagree (they must all be inputs of one model).
struct Observation {
  std::string path;
  ModelInputs inputs;
};
std::vector<Observation> load_observations(const std::vector<std::string>& paths);

// The same inputs with every tensor on `device` (other values as they are).
ModelInputs inputs_on(const ModelInputs& inputs, const torch::Device& device);

// "forward(images: Tensor, tokens: Tensor, ...)" of the model, for error messages.
std::string forward_signature(const torch::jit::Module& model);

// Runs model.forward on the inputs under NoGradGuard; a mismatch becomes a UserError that names
// the expected signature and the given inputs.
torch::jit::IValue run_forward(torch::jit::Module& model, const ModelInputs& inputs);

// TorchScript's default (profiling) executor profiles the first call of a graph and re-optimises
// it on the second: seconds on the unrolled 10-step pi0 graph, which a one-shot run (calibration,
// `run`, `verify`) never amortises. This turns graph optimisation off for the whole process, so
// every call runs the graph as exported (DESIGN.md section 5).
void use_one_shot_executor();

// Fails early (before any work) when `path` cannot be written; writes go to a temporary file in
// the same directory and are renamed over `path` only when complete.
void check_writable(const std::string& path);
// Fails when the file system of `path` has less than `bytes` free (a model archive cut short by a
// full disk would otherwise end the process inside libtorch's writer).
void check_free_space(const std::string& path, uint64_t bytes);
// The bytes of every distinct tensor storage a module holds: what its archive needs at least.
uint64_t tensor_bytes(const torch::jit::Module& model);

// POSIX file queries. std::filesystem is avoided on purpose: libtorch.so exports its own bundled
// copy of libstdc++'s filesystem symbols, which interpose on ours and crash (remove_all).
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
int64_t file_size_bytes(const std::string& path);
std::string parent_directory(const std::string& path);  // "." when the path has no directory part
// True when both paths name one existing file (same device and inode): the same path, a symbolic
// link to it or a hard link.
bool same_file(const std::string& first, const std::string& second);

// While an instance lives, SIGINT, SIGTERM and SIGHUP first remove `path`, then take their default
// action (the process ends with the signal as its status). The temporary files of the *_atomically
// writers are registered this way, so an interrupt never leaves a partial or stray file; a caller
// registers a file it has written but must not keep alone (the report while its model is written).
class RemoveOnSignal {
 public:
  explicit RemoveOnSignal(const std::string& path);
  ~RemoveOnSignal();
  RemoveOnSignal(const RemoveOnSignal&) = delete;
  RemoveOnSignal& operator=(const RemoveOnSignal&) = delete;

 private:
  int slot_;
};

void save_model_atomically(const torch::jit::Module& model, const std::string& path);
void write_text_atomically(const std::string& text, const std::string& path);

}  // namespace duquant
