// Reuse of the int8 activations of one duquant::w4a8_linear call by the next calls that quantize
// the same input with the same transform.
//
// Why: the quantizer computes one transform per shared input (q/k/v of an attention layer,
// gate/up of an MLP: quantize_model.cpp calls compute_transform once per group) and gives the
// group's layers the very same smoothing, rotation and permutation tensors, which a saved model
// stores once; the model then calls those layers one after another on the very same x. Steps 1-6
// of ops.h give them identical int8 activations, so computing those once per group removes two of
// three transforms in attention and one of two in the MLP, with a bitwise identical result.
//
// A call reuses the activations of the previous call on the same thread (one entry per thread)
// when
//  * x is the same tensor (TensorImpl) at the same version -- an in-place change of x bumps its
//    version counter -- and not an inference tensor (those keep no version counter: never reused);
//  * each transform tensor is the same tensor at the same version, or both are empty (step
//    skipped);
//  * padded K, group size, activation bits, clip and the path that computes them are equal (the
//    CUDA rotation paths differ by rounding ties), and so are the stream and the capture: the
//    CUDA kernel passes the current stream and the id of the graph capture in progress on it (0:
//    none), so that a captured call never reads activations computed outside its capture, nor one
//    capture those of another. (The device is x's, so x decides it.)
// The entry holds references to x and to the transform tensors, so that none of them can be freed
// and its address reused while the entry exists. DUQUANT_REUSE_ACTIVATIONS=0 turns reuse off
// (operator_settings.h).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>

#include "w4a8_cpu_reference.h"

namespace duquant::ops {

struct ActivationRequest {
  torch::Tensor x;  // the op's own x argument: its identity and version are compared, not its values
  torch::Tensor smooth_inv;
  torch::Tensor rotation1;
  torch::Tensor permutation;
  torch::Tensor rotation2;
  int64_t padded_in_features = 0;
  int64_t group_size = 0;
  int64_t act_bits = 0;
  double act_clip = 0.0;
  int64_t stream = 0;    // CUDA: the current stream's id
  uint64_t capture = 0;  // CUDA: the id of the capture in progress on it, 0 when none
  int path = 0;          // CUDA: how the activations are computed (DUQUANT_CUDA_ROTATION's path)
};

// The activations of the previous call on this thread when `request` matches it, else
// `quantize()`, remembered for the next call.
cpu_reference::QuantizedActivations reuse_or_quantize(
    const ActivationRequest& request, const std::function<cpu_reference::QuantizedActivations()>& quantize);

}  // namespace duquant::ops
