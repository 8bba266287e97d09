// Settings of the operator library: environment variables read at every call, so that a process
// can change them between calls (tests, benchmarks) and a CUDA-graph capture sees the value at
// capture time. Reading the environment is a host-side call that capture permits.
//   DUQUANT_CUDA_ROTATION      cuda-cores (default) | tensor-cores   (w4a8_linear_cuda.cu)
//   DUQUANT_REUSE_ACTIVATIONS  1 (default) | 0                        (activation_reuse.h)
#pragma once

#include <initializer_list>
#include <string>

namespace duquant::ops {

// The value of environment variable `name`, or `fallback` when it is unset or empty. A value
// outside `allowed` is an error naming the variable, the value and the choices.
std::string operator_setting(const char* name, std::initializer_list<const char*> allowed, const char* fallback);

}  // namespace duquant::ops
