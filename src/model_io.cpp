#include "duquant/model_io.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>

#include "duquant/errors.h"
#include "duquant/magnitude_scan.h"

namespace duquant {
namespace {

std::string first_line(const std::string& text) {
  const auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

}  // namespace

std::string interpreter_message(const std::string& text) {
  std::string best, line;
  std::istringstream lines(text);
  while (std::getline(lines, line)) {
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (line.rfind("RuntimeError: ", 0) == 0) return line.substr(14);
    best = line;
  }
  return best;
}

namespace {

bool starts_with_zip_magic(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  char magic[4] = {};
  file.read(magic, 4);
  return file.gcount() == 4 && magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4;
}

void require_readable_file(const std::string& path, const std::string& what) {
  if (!path_exists(path)) {
    throw UserError(fmt::format("{} '{}' does not exist; check the path", what, path));
  }
  if (is_directory(path)) {
    throw UserError(fmt::format("{} '{}' is a directory; give the .pt file inside it", what, path));
  }
  if (!starts_with_zip_magic(path)) {
    throw UserError(fmt::format("{} '{}' is not a TorchScript archive (no zip header); write it with "
                                "torch.jit.save(torch.jit.script(model) or torch.jit.trace(...))",
                                what, path));
  }
}

torch::jit::Module load_archive(const std::string& path, const std::string& what) {
  require_readable_file(path, what);
  try {
    return torch::jit::load(path, torch::kCPU);
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    if (message.find("constants.pkl") != std::string::npos || message.find("code/") != std::string::npos ||
        message.find("version") != std::string::npos) {
      throw UserError(fmt::format("{} '{}' is a zip archive but not TorchScript (a torch.save file?); export it "
                                  "with torch.jit.script or torch.jit.trace and torch.jit.save",
                                  what, path));
    }
    if (message.find("Unknown builtin op: duquant") != std::string::npos) {
      throw UserError(fmt::format("{} '{}' needs the duquant operator library; load libduquant_ops.so first",
                                  what, path));
    }
    throw UserError(fmt::format("{} '{}' is corrupt or truncated ({}); re-export or re-copy it", what, path,
                                first_line(message)));
  }
}

}  // namespace

torch::jit::Module load_model(const std::string& path) {
  auto model = load_archive(path, "model");
  if (model.named_children().size() == 0 && model.named_parameters().size() == 0 &&
      model.named_buffers().size() == 0) {
    throw UserError(fmt::format("model '{}' has no submodules (a frozen TorchScript model?); quantize the "
                                "unfrozen model and freeze afterwards",
                                path));
  }
  return model;
}

ModelInputs load_inputs(const std::string& path) {
  auto container = load_archive(path, "inputs file");
  if (!container.hasattr("arg_names")) {
    throw UserError(fmt::format("inputs file '{}' has no 'arg_names' attribute; write it with "
                                "scripts/make_pi0.py or as a scripted container with buffers arg0..argN-1",
                                path));
  }
  ModelInputs inputs;
  for (const auto& name : container.attr("arg_names").toListRef()) inputs.names.push_back(name.toStringRef());
  for (size_t i = 0; i < inputs.names.size(); ++i) {
    const std::string slot = fmt::format("arg{}", i);
    if (!container.hasattr(slot)) {
      throw UserError(fmt::format("inputs file '{}' names {} arguments but has no '{}'", path, inputs.names.size(),
                                  slot));
    }
    const auto value = container.attr(slot);
    if (value.isTensor()) {
      const auto tensor = value.toTensor();
      if (!all_finite(tensor)) {
        throw UserError(fmt::format("inputs file '{}': {} contains NaN or Inf; give finite inputs", path,
                                    inputs.names[i]));
      }
    }
    inputs.values.push_back(value);
  }
  return inputs;
}

namespace {

constexpr const char* kInputsSuffix = ".inputs.pt";

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The `*.inputs.pt` files directly inside `directory`, sorted by name (POSIX readdir: see the
// note on std::filesystem in model_io.h).
std::vector<std::string> inputs_files_in(const std::string& directory) {
  std::unique_ptr<DIR, int (*)(DIR*)> handle(opendir(directory.c_str()), closedir);
  if (!handle) {
    throw UserError(fmt::format("cannot read directory '{}': {}; check its permissions", directory,
                                std::strerror(errno)));
  }
  std::vector<std::string> names;
  while (const dirent* entry = readdir(handle.get())) {
    const std::string name = entry->d_name;
    if (ends_with(name, kInputsSuffix) && !is_directory(directory + "/" + name)) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  std::vector<std::string> files;
  for (const auto& name : names) files.push_back(directory + "/" + name);
  return files;
}

}  // namespace

std::vector<Observation> load_observations(const std::vector<std::string>& paths) {
  std::vector<std::string> files;
  for (const auto& path : paths) {
    if (!path_exists(path)) {
      throw UserError(fmt::format("calibration inputs '{}' do not exist; give an inputs file or a directory of "
                                  "*{} files",
                                  path, kInputsSuffix));
    }
    if (is_directory(path)) {
      const auto inside = inputs_files_in(path);
      if (inside.empty()) {
        throw UserError(fmt::format("calibration directory '{}' holds no *{} file; write observations with "
                                    "scripts/make_pi0.py --calib-observations N",
                                    path, kInputsSuffix));
      }
      files.insert(files.end(), inside.begin(), inside.end());
    } else {
      files.push_back(path);
    }
  }
  if (files.empty()) throw UserError("no calibration inputs given; pass --calib FILE or --calib DIRECTORY");
  std::vector<Observation> observations;
  for (const auto& file : files) {
    observations.push_back({file, load_inputs(file)});
    if (observations.back().inputs.names != observations.front().inputs.names) {
      throw UserError(fmt::format("calibration inputs '{}' ({}) and '{}' ({}) are not inputs of the same model; "
                                  "give observations of one model",
                                  file, fmt::join(observations.back().inputs.names, ", "), files.front(),
                                  fmt::join(observations.front().inputs.names, ", ")));
    }
  }
  return observations;
}

std::string forward_signature(const torch::jit::Module& model) {
  const auto& schema = model.get_method("forward").function().getSchema();
  std::vector<std::string> args;
  for (size_t i = 1; i < schema.arguments().size(); ++i) {
    args.push_back(fmt::format("{}: {}", schema.arguments()[i].name(), schema.arguments()[i].type()->str()));
  }
  return fmt::format("forward({})", fmt::join(args, ", "));
}

ModelInputs inputs_on(const ModelInputs& inputs, const torch::Device& device) {
  ModelInputs moved = inputs;
  for (auto& value : moved.values) {
    if (value.isTensor()) value = value.toTensor().to(device);
  }
  return moved;
}

torch::jit::IValue run_forward(torch::jit::Module& model, const ModelInputs& inputs) {
  torch::NoGradGuard no_grad;
  const auto& schema = model.get_method("forward").function().getSchema();
  const size_t expected = schema.arguments().size() - 1;
  size_t required = 0;
  for (size_t i = 1; i < schema.arguments().size(); ++i) required += schema.arguments()[i].default_value() ? 0 : 1;
  if (inputs.values.size() < required || inputs.values.size() > expected) {
    throw UserError(fmt::format("the inputs ({}) do not fit the model's {}: {} given, {} expected; generate "
                                "inputs for this model",
                                fmt::join(inputs.names, ", "), forward_signature(model), inputs.values.size(),
                                expected));
  }
  try {
    return model.forward(inputs.values);
  } catch (const c10::Error& error) {
    throw UserError(fmt::format("the model's {} failed on the inputs ({}): {}; give inputs of the shapes this model "
                                "was exported for",
                                forward_signature(model), fmt::join(inputs.names, ", "),
                                interpreter_message(error.what_without_backtrace())));
  } catch (const std::exception& error) {
    throw UserError(fmt::format("the model's {} failed on the inputs ({}): {}; give inputs of the shapes this model "
                                "was exported for",
                                forward_signature(model), fmt::join(inputs.names, ", "),
                                interpreter_message(error.what())));
  }
}

void use_one_shot_executor() { torch::jit::setGraphExecutorOptimize(false); }

bool path_exists(const std::string& path) {
  struct stat info {};
  return stat(path.c_str(), &info) == 0;
}

bool is_directory(const std::string& path) {
  struct stat info {};
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

int64_t file_size_bytes(const std::string& path) {
  struct stat info {};
  return stat(path.c_str(), &info) == 0 ? static_cast<int64_t>(info.st_size) : -1;
}

std::string parent_directory(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

void check_writable(const std::string& path) {
  const std::string directory = parent_directory(path);
  if (!is_directory(directory)) {
    throw UserError(fmt::format("cannot write '{}': directory '{}' does not exist; create it first", path,
                                directory));
  }
  if (is_directory(path)) {
    throw UserError(fmt::format("cannot write '{}': it is a directory; give a file name", path));
  }
  if (access(directory.c_str(), W_OK) != 0) {
    throw UserError(fmt::format("cannot write '{}': directory '{}' is not writable; choose another output path",
                                path, directory));
  }
}

void check_free_space(const std::string& path, uint64_t bytes) {
  const std::string directory = parent_directory(path);
  struct statvfs file_system {};
  if (statvfs(directory.c_str(), &file_system) != 0) return;  // check_writable reports the directory
  const uint64_t free_bytes = static_cast<uint64_t>(file_system.f_bavail) * file_system.f_frsize;
  if (free_bytes < bytes) {
    throw UserError(fmt::format("cannot write '{}': it needs about {:.1f} MiB and '{}' has {:.1f} MiB free; free "
                                "some disk space or write elsewhere",
                                path, bytes / 1048576.0, directory, free_bytes / 1048576.0));
  }
}

uint64_t tensor_bytes(const torch::jit::Module& model) {
  std::set<const void*> seen;
  uint64_t bytes = 0;
  const auto add = [&](const torch::Tensor& tensor) {
    if (tensor.defined() && tensor.has_storage() && seen.insert(tensor.storage().data()).second) {
      bytes += tensor.storage().nbytes();
    }
  };
  // Every attribute of the module and its submodules: parameters and buffers are attributes too.
  for (const auto& attribute : model.named_attributes()) {
    if (attribute.value.isTensor()) add(attribute.value.toTensor());
  }
  return bytes;
}

bool same_file(const std::string& first, const std::string& second) {
  struct stat a {}, b {};
  return stat(first.c_str(), &a) == 0 && stat(second.c_str(), &b) == 0 && a.st_dev == b.st_dev &&
         a.st_ino == b.st_ino;
}

namespace {

// Paths to remove when a terminating signal arrives. The handler may only call async-signal-safe
// functions (unlink, signal, raise), so the paths live in fixed static buffers; a slot's path is
// complete before `in_use` publishes it.
constexpr int kRemoveSlots = 8;
constexpr size_t kMaxPathBytes = 4096;
struct RemoveSlot {
  char path[kMaxPathBytes];
  volatile std::sig_atomic_t in_use;
};
RemoveSlot remove_slots[kRemoveSlots];
// SIGABRT too: an exception escaping libtorch's archive writer ends the process by abort().
constexpr int kTerminatingSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGABRT};

extern "C" void remove_registered_files_and_reraise(int signal_number) {
  for (auto& slot : remove_slots) {
    if (slot.in_use) unlink(slot.path);
  }
  // SA_RESETHAND restored the default action; the signal is blocked inside this handler, so it is
  // delivered, and ends the process, as soon as the handler returns.
  raise(signal_number);
}

void install_signal_handlers_once() {
  static std::atomic<bool> installed{false};
  if (installed.exchange(true)) return;
  for (int signal_number : kTerminatingSignals) {
    struct sigaction previous {};
    if (sigaction(signal_number, nullptr, &previous) != 0) continue;
    // A signal the parent chose to ignore (nohup, a background job) stays ignored.
    if (previous.sa_handler == SIG_IGN) continue;
    struct sigaction action {};
    action.sa_handler = remove_registered_files_and_reraise;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESETHAND;
    sigaction(signal_number, &action, nullptr);
  }
}

}  // namespace

RemoveOnSignal::RemoveOnSignal(const std::string& path) : slot_(-1) {
  install_signal_handlers_once();
  if (path.size() >= kMaxPathBytes) {
    throw UserError(fmt::format("path '{}...' is longer than {} bytes; choose a shorter output path",
                                path.substr(0, 64), kMaxPathBytes - 1));
  }
  for (int i = 0; i < kRemoveSlots; ++i) {
    if (remove_slots[i].in_use) continue;
    std::memcpy(remove_slots[i].path, path.c_str(), path.size() + 1);
    remove_slots[i].in_use = 1;
    slot_ = i;
    return;
  }
  throw std::logic_error("duquant: more than 8 files registered for removal on a signal");
}

RemoveOnSignal::~RemoveOnSignal() {
  if (slot_ >= 0) remove_slots[slot_].in_use = 0;
}

namespace {

template <typename Writer>
void write_atomically(const std::string& path, Writer&& write) {
  check_writable(path);
  const std::string temporary = fmt::format("{}.tmp{}", path, getpid());
  RemoveOnSignal remove_temporary_on_signal(temporary);
  try {
    write(temporary);
  } catch (...) {
    std::remove(temporary.c_str());
    throw;
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    std::remove(temporary.c_str());
    throw UserError(fmt::format("cannot write '{}': {}", path, reason));
  }
}

}  // namespace

void save_model_atomically(const torch::jit::Module& model, const std::string& path) {
  // Every storage plus the code and pickles (a few MiB).
  check_free_space(path, tensor_bytes(model) + (uint64_t{16} << 20));
  write_atomically(path, [&](const std::string& temporary) {
    try {
      model.save(temporary);
    } catch (const c10::Error& error) {
      throw UserError(fmt::format("cannot write '{}': {}", path, first_line(error.what_without_backtrace())));
    }
  });
}

void write_text_atomically(const std::string& text, const std::string& path) {
  write_atomically(path, [&](const std::string& temporary) {
    std::ofstream file(temporary);
    file << text;
    file.close();
    if (!file) throw UserError(fmt::format("cannot write '{}' (disk full?)", path));
  });
}

}  // namespace duquant
