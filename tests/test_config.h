// The recipe of the quantizer tests: the note's exclude regex (252 targets on pi0) and fewer greedy
// rotation steps than the CLI default, with per-test flags on top.
#pragma once

#include <map>
#include <string>

#include "duquant/config.h"
#include "test_support.h"

namespace duquant::testing {

inline Config test_config(const std::map<std::string, std::string>& flags) {
  Config config = Config::defaults();
  config.apply_flag("exclude", kNoteExclude);
  config.apply_flag("rotation-steps", "64");  // keeps the suite fast; the CLI default is the paper's 256
  for (const auto& [key, value] : flags) config.apply_flag(key, value);
  return config;
}

}  // namespace duquant::testing
