// TorchScript qualified class names the tool recognises or creates (mangling parts removed).
#pragma once

namespace duquant {

inline constexpr const char* kLinearTypeName = "__torch__.torch.nn.modules.linear.Linear";
// The replacement layer (src/swap.cpp) and the calibration observer (src/calibrate.cpp).
inline constexpr const char* kQuantizedLinearTypeName = "__torch__.duquant.W4A8Linear";
inline constexpr const char* kObserverTypeName = "__torch__.duquant.LinearObserver";

}  // namespace duquant
