// Wall time per stage of the quantize pipeline: the report's "stages" table and the quantize
// benchmark's breakdown. Each stage function returns the time it spent with its result, and the
// pipeline adds them up, so there is no global timer state.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace duquant {

enum class Stage {
  Load,             // reading the model and the calibration inputs
  Calibration,      // forwards of the observing model
  RotationSearch,   // smoothing and the two greedy block rotations (DuQuant steps 1, 2, 4)
  Permutation,      // the zigzag permutation (step 3)
  WeightTransform,  // W~ = W diag(s) (I kron R1) P (I kron R2) (step 5)
  ClipSearch,       // per-channel clipping ratio by output error (step 6)
  Rounding,         // the final integer levels on the chosen grid
  Packing,          // int4 nibbles in the kernel layout
  LayerCheck,       // the deployed operator against the float layer on calibration rows
  Swap,             // the type-splitting rebuild with W4A8 modules
  Save,             // writing the TorchScript archive and the report
};
inline constexpr std::size_t kStageCount = static_cast<std::size_t>(Stage::Save) + 1;

std::string stage_name(Stage stage);

// The process's peak resident set size so far (getrusage), in bytes.
int64_t peak_resident_bytes();

struct StageTimes {
  std::array<double, kStageCount> seconds{};

  double& operator[](Stage stage) { return seconds[static_cast<std::size_t>(stage)]; }
  double operator[](Stage stage) const { return seconds[static_cast<std::size_t>(stage)]; }
  StageTimes& operator+=(const StageTimes& other) {
    for (std::size_t i = 0; i < kStageCount; ++i) seconds[i] += other.seconds[i];
    return *this;
  }
  double total() const {
    double sum = 0;
    for (double s : seconds) sum += s;
    return sum;
  }
};

// Adds the wall time from construction to destruction to one stage.
class StageTimer {
 public:
  StageTimer(StageTimes& times, Stage stage) : times_(times), stage_(stage), start_(Clock::now()) {}
  ~StageTimer() { times_[stage_] += std::chrono::duration<double>(Clock::now() - start_).count(); }
  StageTimer(const StageTimer&) = delete;
  StageTimer& operator=(const StageTimer&) = delete;

 private:
  using Clock = std::chrono::steady_clock;
  StageTimes& times_;
  Stage stage_;
  Clock::time_point start_;
};

}  // namespace duquant
