// The error a user sees: one line naming the problem and the fix, and the exit code it maps to.
#pragma once

#include <stdexcept>
#include <string>

namespace duquant {

enum class ExitCode : int {
  Ok = 0,
  Failure = 1,       // bad input file, unsupported model, I/O error
  Usage = 2,         // bad flag, bad regex, bad option value
  NoTargets = 3,     // the selection matched no Linear layer
};

class UserError : public std::runtime_error {
 public:
  UserError(const std::string& message, ExitCode code = ExitCode::Failure)
      : std::runtime_error(message), code_(code) {}
  ExitCode code() const { return code_; }

 private:
  ExitCode code_;
};

}  // namespace duquant
