// Steps 1-5 of duquant::w4a8_linear (include/duquant/ops.h): smoothing, zero padding, block
// rotation 1, permutation, block rotation 2. The CPU kernel and the quantizer both call this,
// so calibration sees exactly the activations the deployed layer quantizes.
#include "duquant/ops.h"

namespace duquant::ops {
namespace {

// [T, K] @ (I_{K/b} kron R): view as [T * K/b, b] and multiply every block by the same R.
torch::Tensor rotate_blocks(const torch::Tensor& x, const torch::Tensor& rotation) {
  const int64_t block = rotation.size(0);
  TORCH_CHECK(x.size(1) % block == 0, "duquant: padded in_features ", x.size(1),
              " is not a multiple of the rotation block ", block);
  return rotate_rows(x.reshape({x.size(0) * (x.size(1) / block), block}), rotation.to(x.dtype()))
      .view({x.size(0), x.size(1)});
}

}  // namespace

torch::Tensor apply_online_transform(const torch::Tensor& x, const torch::Tensor& smooth_inv,
                                     const torch::Tensor& rotation1, const torch::Tensor& permutation,
                                     const torch::Tensor& rotation2, int64_t padded_in_features) {
  TORCH_CHECK(x.dim() == 2, "duquant: apply_online_transform expects [tokens, in_features], got ", x.sizes());
  const int64_t in_features = x.size(1);
  TORCH_CHECK(padded_in_features >= in_features, "duquant: padded in_features ", padded_in_features,
              " < in_features ", in_features);
  // float64 input stays float64 (transform tests check invariants to high precision).
  const auto dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  torch::Tensor out;
  if (smooth_inv.numel() > 0) {
    TORCH_CHECK(smooth_inv.numel() == in_features, "duquant: smooth_inv has ", smooth_inv.numel(),
                " entries for ", in_features, " input features");
    // One pass: x is promoted to `dtype` (exactly) inside the product.
    out = x * smooth_inv.to(dtype);
  } else {
    out = x.to(dtype);
  }
  if (padded_in_features > in_features) {
    out = torch::constant_pad_nd(out, {0, padded_in_features - in_features});
  }
  if (rotation1.numel() > 0) out = rotate_blocks(out, rotation1);
  if (permutation.numel() > 0) out = out.index_select(1, permutation.to(torch::kLong));
  if (rotation2.numel() > 0) out = rotate_blocks(out, rotation2);
  return out.contiguous();
}

}  // namespace duquant::ops
