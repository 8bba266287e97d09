// Python `re.search` on PCRE2. PCRE2 accepts Python's named groups (?P<name>...) and
// backreferences (?P=name); the one Python escape with another meaning in PCRE2 is \Z (Python:
// end of string only; PCRE2: also before a final newline), rewritten to \z before compiling.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "duquant/python_regex.h"

#include <fmt/format.h>
#include <pcre2.h>

#include "duquant/errors.h"

namespace duquant {

struct PythonRegex::Compiled {
  pcre2_code* code = nullptr;
  ~Compiled() { pcre2_code_free(code); }
};

namespace {

std::string translate_python_escapes(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size());
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '\\' && i + 1 < pattern.size()) {
      out += pattern[i];
      out += pattern[i + 1] == 'Z' ? 'z' : pattern[i + 1];
      ++i;
    } else {
      out += pattern[i];
    }
  }
  return out;
}

}  // namespace

PythonRegex::PythonRegex(const std::string& pattern, const std::string& what)
    : pattern_(pattern), compiled_(std::make_unique<Compiled>()) {
  const std::string translated = translate_python_escapes(pattern);
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  compiled_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.c_str()), translated.size(), 0,
                                  &error_code, &error_offset, nullptr);
  if (compiled_->code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    throw UserError(fmt::format("invalid {} regex '{}': {} at position {}; fix the pattern (Python re syntax)", what,
                                pattern, reinterpret_cast<const char*>(message), error_offset),
                    ExitCode::Usage);
  }
}

PythonRegex::~PythonRegex() = default;
PythonRegex::PythonRegex(PythonRegex&&) noexcept = default;
PythonRegex& PythonRegex::operator=(PythonRegex&&) noexcept = default;

std::optional<std::string> PythonRegex::search(const std::string& text) const {
  pcre2_match_data* match = pcre2_match_data_create_from_pattern(compiled_->code, nullptr);
  const int rc = pcre2_match(compiled_->code, reinterpret_cast<PCRE2_SPTR>(text.c_str()), text.size(), 0, 0, match,
                             nullptr);
  std::optional<std::string> result;
  if (rc > 0) {
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
    int group = 0;
    for (int g = 1; g < rc; ++g) {
      if (ovector[2 * g] != PCRE2_UNSET) {
        group = g;
        break;
      }
    }
    result = text.substr(ovector[2 * group], ovector[2 * group + 1] - ovector[2 * group]);
  } else if (rc != PCRE2_ERROR_NOMATCH) {
    pcre2_match_data_free(match);
    throw UserError(fmt::format("regex '{}' failed on '{}' (PCRE2 error {})", pattern_, text, rc));
  }
  pcre2_match_data_free(match);
  return result;
}

}  // namespace duquant
