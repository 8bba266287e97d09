#include "duquant/stage_times.h"

#include <sys/resource.h>

namespace duquant {

std::string stage_name(Stage stage) {
  switch (stage) {
    case Stage::Load: return "load";
    case Stage::Calibration: return "calibration";
    case Stage::RotationSearch: return "rotation search";
    case Stage::Permutation: return "permutation";
    case Stage::WeightTransform: return "weight transform";
    case Stage::ClipSearch: return "clip search";
    case Stage::Rounding: return "rounding";
    case Stage::Packing: return "packing";
    case Stage::LayerCheck: return "layer check";
    case Stage::Swap: return "swap";
    case Stage::Save: return "save";
  }
  return "unknown";
}

int64_t peak_resident_bytes() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

}  // namespace duquant
