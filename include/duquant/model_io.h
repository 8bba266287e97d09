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

// Calibration observations (one inputs file = one observation). Each path is an inputs file or a
// directory, which stands for every `*.inputs.pt` file directly inside it, sorted by name.
// Observations keep the order of `paths`. UserError for a missing path, a directory without
// inputs files, or files whose argument names disagree (they must all be inputs of one model).
struct Observation {
  std::string path;
  ModelInputs inputs;
};
std::vector<Observation> load_observations(const std::vector<std::string>& paths);

// "forward(images: Tensor, tokens: Tensor, ...)" of the model, for error messages.
std::string forward_signature(const torch::jit::Module& model);

// Runs model.forward on the inputs under NoGradGuard; a mismatch becomes a UserError that names
// the expected signature and the given inputs.
torch::jit::IValue run_forward(torch::jit::Module& model, const ModelInputs& inputs);

// Fails early (before any work) when `path` cannot be written; writes go to a temporary file in
// the same directory and are renamed over `path` only when complete.
void check_writable(const std::string& path);

// POSIX file queries. std::filesystem is avoided on purpose: libtorch.so exports its own bundled
// copy of libstdc++'s filesystem symbols, which interpose on ours and crash (remove_all).
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
int64_t file_size_bytes(const std::string& path);
std::string parent_directory(const std::string& path);  // "." when the path has no directory part
void save_model_atomically(const torch::jit::Module& model, const std::string& path);
void write_text_atomically(const std::string& text, const std::string& path);

}  // namespace duquant
