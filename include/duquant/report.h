// What the tool prints and writes: the fork's [DUQUANT] log lines (LIBERO scripts grep them, so
// their text is fixed), the per-component summary of the user's note, and JSON for scripts.
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <string>
#include <vector>

#include "duquant/config.h"
#include "duquant/quantize_model.h"
#include "duquant/recipe.h"
#include "duquant/select.h"

namespace duquant {

void print_configuration(const Config& config, std::ostream& out);

// "[DUQUANT] Matched Linear layers: N", one line per Linear ("[DUQUANT][DRYRUN] path: Linear(in->out) ..."
// for targets, "[DUQUANT][SKIP] ..." with the deciding rule for the others), the component table and
// "[DUQUANT] Dry-run total layers listed: N".
void print_selection(const std::vector<LinearDecision>& decisions, const QuantizeRecipe& recipe, std::ostream& out);
void print_component_table(const std::vector<LinearDecision>& decisions, std::ostream& out);
int64_t count_targets(const std::vector<LinearDecision>& decisions);
void print_matched_count(const std::vector<LinearDecision>& decisions, std::ostream& out);  // the fork's line

// "[DUQUANT] stage <name> <seconds> s (<share> %)" per stage, the unaccounted rest, the wall total and
// the peak resident memory of the process.
void print_stage_table(const StageTimes& stages, double wall_seconds, std::ostream& out);

std::string replaced_line(const LayerReport& layer);  // "[DUQUANT][REPLACED] path: Linear(..) -> DuQuantLinear W4 A8 ..."

nlohmann::json selection_json(const Config& config, const std::vector<LinearDecision>& decisions,
                              const QuantizeRecipe& recipe);
nlohmann::json quantize_report_json(const Config& config, const QuantizeResult& result,
                                    const std::vector<LinearDecision>& decisions, const std::string& input_path,
                                    const std::string& output_path);

}  // namespace duquant
