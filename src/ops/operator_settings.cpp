// Settings of the operator library (operator_settings.h).
#include "operator_settings.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace duquant::ops {

std::string operator_setting(const char* name, std::initializer_list<const char*> allowed, const char* fallback) {
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

CudaRotationPath cuda_rotation_path() {
  const std::string path = operator_setting("DUQUANT_CUDA_ROTATION", {"cuda-cores", "tensor-cores", "cublas"},
                                            "cuda-cores");
  if (path == "tensor-cores") return CudaRotationPath::kTensorCores;
  if (path == "cublas") return CudaRotationPath::kCublas;
  return CudaRotationPath::kCudaCores;
}

CudaGemmPath cuda_gemm_path() {
  return operator_setting("DUQUANT_CUDA_GEMM", {"mma-sync", "cublaslt"}, "mma-sync") == "cublaslt"
             ? CudaGemmPath::kCublasLt
             : CudaGemmPath::kMmaSync;
}

}  // namespace duquant::ops
