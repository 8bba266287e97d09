// Settings of the operator library (operator_settings.h).
#include "operator_settings.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <utility>

namespace duquant::ops {

std::string operator_setting(const char* name, const std::vector<const char*>& allowed, const char* fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  bool valid = false;
  std::string choices;
  for (const char* choice : allowed) {
    valid = valid || std::string(value) == choice;
    choices += choices.empty() ? choice : std::string(" or ") + choice;
  }
  TORCH_CHECK(valid, "duquant: ", name, "=", value, " is not a valid setting; set it to ", choices, " (default ",
              fallback, ")");
  return value;
}

namespace {

// Each path's name, the default first: the one list the variable is parsed and printed from.
template <typename Path>
using PathNames = std::vector<std::pair<const char*, Path>>;

const PathNames<CudaRotationPath>& rotation_path_names() {
  static const PathNames<CudaRotationPath> names = {{"cuda-cores", CudaRotationPath::kCudaCores},
                                                    {"tensor-cores", CudaRotationPath::kTensorCores},
                                                    {"cublas", CudaRotationPath::kCublas}};
  return names;
}

const PathNames<CudaGemmPath>& gemm_path_names() {
  static const PathNames<CudaGemmPath> names = {{"mma-sync", CudaGemmPath::kMmaSync},
                                                {"cublaslt", CudaGemmPath::kCublasLt}};
  return names;
}

template <typename Path>
Path read_path(const char* variable, const PathNames<Path>& names) {
  std::vector<const char*> allowed;
  for (const auto& [name, path] : names) allowed.push_back(name);
  const std::string value = operator_setting(variable, allowed, allowed.front());
  for (const auto& [name, path] : names) {
    if (value == name) return path;
  }
  return names.front().second;  // not reached: operator_setting returns one of `allowed`
}

template <typename Path>
const char* name_in(const PathNames<Path>& names, Path path) {
  for (const auto& [name, named] : names) {
    if (named == path) return name;
  }
  return "unknown";
}

constexpr const char* kCudaRotationVariable = "DUQUANT_CUDA_ROTATION";
constexpr const char* kCudaGemmVariable = "DUQUANT_CUDA_GEMM";

}  // namespace

CudaRotationPath cuda_rotation_path() { return read_path(kCudaRotationVariable, rotation_path_names()); }

const char* name_of(CudaRotationPath path) { return name_in(rotation_path_names(), path); }

CudaGemmPath cuda_gemm_path() { return read_path(kCudaGemmVariable, gemm_path_names()); }

const char* name_of(CudaGemmPath path) { return name_in(gemm_path_names(), path); }

std::string cuda_paths_in_effect() {
  return std::string("rotations ") + name_of(cuda_rotation_path()) + " (" + kCudaRotationVariable +
         "), integer product " + name_of(cuda_gemm_path()) + " (" + kCudaGemmVariable + ")";
}

}  // namespace duquant::ops
