// A compiled regular expression with Python `re.search` semantics, on PCRE2 (whose syntax is a
// superset of Python's: (?P<name>...), (?P=name), lookarounds, \A and \Z handled below).
#pragma once

#include <memory>
#include <optional>
#include <string>

namespace duquant {

class PythonRegex {
 public:
  // Throws UserError(Usage) naming the pattern, the PCRE2 message and the error offset.
  PythonRegex(const std::string& pattern, const std::string& what);
  ~PythonRegex();
  PythonRegex(PythonRegex&&) noexcept;
  PythonRegex& operator=(PythonRegex&&) noexcept;

  const std::string& pattern() const { return pattern_; }

  // re.search: the first match anywhere in `text`, or nullopt. Returns the first capture group
  // that took part in the match when there is one (the keyword of "(?:^|\.)(norm|...)(?:\.|$)"),
  // else the whole match.
  std::optional<std::string> search(const std::string& text) const;

 private:
  std::string pattern_;
  struct Compiled;
  std::unique_ptr<Compiled> compiled_;
};

}  // namespace duquant
