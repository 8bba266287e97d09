// Settings of the operator library (operator_settings.h).
#include "operator_settings.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace duquant::ops {

std::string operator_setting(const char* name, std::initializer_list<const char*> allowed, const char* fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  bool valid = false;
  std::string choices;
  for (const char* choice : allowed) {
    valid = valid || std::string(value) == choice;
    choices += choices.empty() ? choice : std::string(" or ") + choice;
  }
  TORCH_CHECK(valid, "duquant: ", name, "=", value, " is not a valid setting; set it to ", choices, " (default ",
              fallback, ")");
  return value;
}

}  // namespace duquant::ops
