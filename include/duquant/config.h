// Effective configuration: every setting with its value and where the value came from
// (tool default, an OPENPI_DUQUANT_* environment variable, or a command-line flag, which wins).
// DESIGN.md section 2 lists the fork's variables; the tool keeps their names and meaning.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace duquant {

struct Setting {
  std::string key;          // flag name without dashes, e.g. "exclude"
  std::string environment;  // OPENPI_DUQUANT_* variable, empty when the fork has none
  std::string value;
  std::string source;       // "default", "env OPENPI_DUQUANT_X", "flag --x", "detected"
  std::string help;
};

class Config {
 public:
  // Every setting the tool knows, at the tool's defaults.
  static Config defaults();

  // Reads OPENPI_DUQUANT_* through `lookup` (getenv in the CLI, a map in tests). Fork-specific
  // variables the tool does not implement are recorded in ignored_environment().
  void apply_environment(const std::function<std::optional<std::string>(const std::string&)>& lookup);
  void apply_flag(const std::string& key, const std::string& value);
  // A value the tool found in the model (the scope, select.h detect_scope); source "detected".
  void apply_detected(const std::string& key, const std::string& value);
  // True while neither the environment nor a flag has set `key`.
  bool is_default(const std::string& key) const;

  const std::string& get(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_double(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::vector<std::string> get_list(const std::string& key) const;  // comma-separated, trimmed

  const std::vector<Setting>& settings() const { return settings_; }
  const std::vector<std::pair<std::string, std::string>>& ignored_environment() const { return ignored_; }

  // Lines "  key = value  (source)" for the log.
  std::vector<std::string> describe() const;

 private:
  Setting& find(const std::string& key);
  const Setting& find(const std::string& key) const;
  std::vector<Setting> settings_;
  std::vector<std::pair<std::string, std::string>> ignored_;
};

// Environment variable prefix of the openpi fork.
inline constexpr const char* kEnvironmentPrefix = "OPENPI_DUQUANT_";

}  // namespace duquant
