// Accuracy features on the generated tiny pi0 (scripts/make_pi0.py writes pi0_tiny.calib/ with 16
// calibration observations and pi0_tiny.heldout.inputs.pt from seeds no observation uses):
// many-observation calibration, GPTQ in the pipeline, sensitivity ranking and float fallback.
// Every accuracy figure is measured on the held-out inputs.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "duquant/calibrate.h"
#include "duquant/errors.h"
#include "duquant/model_io.h"
#include "duquant/ops.h"
#include "duquant/quantize_model.h"
#include "duquant/select.h"
#include "duquant/sensitivity.h"
#include "test_config.h"
#include "test_support.h"

namespace duquant {
namespace {

using testing::kNoteExclude;

const std::string kCalibration = "pi0_tiny.calib";
const std::string kHeldOut = "pi0_tiny.heldout.inputs.pt";

using testing::test_config;

std::vector<std::string> targets_of(const std::vector<LinearDecision>& decisions) {
  std::vector<std::string> targets;
  for (const auto& d : decisions) {
    if (d.target) targets.push_back(d.path);
  }
  return targets;
}

double relative_error(const torch::Tensor& approximate, const torch::Tensor& exact) {
  return ((approximate.to(torch::kDouble) - exact.to(torch::kDouble)).norm() / exact.to(torch::kDouble).norm())
      .item<double>();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

TEST(ManyObservations, StatisticsEqualTheMaxAndUnionOfSingleObservationRuns) {
  const auto model_path = testing::fixture("pi0_tiny_script.pt");
  testing::require_fixture(model_path);
  const auto model = load_model(model_path);
  auto observations = load_observations({testing::fixture(kCalibration)});
  ASSERT_EQ(observations.size(), 16u);
  observations.resize(3);
  const auto config = test_config({});
  const auto targets = targets_of(select_linears(model, SelectionRules::from_config(config)));
  // A row limit above every layer's token count: no stride doubling, so the sample is every row.
  const int64_t unlimited = 1 << 20;
  // Every input sums its Hessian too (the widest tiny input is 1024).
  const ObserverLimits limits(unlimited, 1 << 20);
  const auto together = calibrate(model, targets, observations, limits);
  std::vector<std::map<std::string, LayerStatistics>> single;
  for (const auto& observation : observations) single.push_back(calibrate(model, targets, observation.inputs, limits));
  int summing = 0;
  for (const auto& path : targets) {
    const auto& joint = together.at(path);
    auto absmax = single[0].at(path).absmax;
    int64_t tokens = 0;
    std::vector<torch::Tensor> rows;
    for (const auto& run : single) {
      absmax = torch::maximum(absmax, run.at(path).absmax);
      tokens += run.at(path).tokens;
      rows.push_back(run.at(path).sample);
    }
    ASSERT_TRUE(torch::equal(joint.absmax, absmax)) << path;
    ASSERT_EQ(joint.tokens, tokens) << path;
    ASSERT_TRUE(torch::equal(joint.sample, torch::cat(rows))) << path;
    // The Hessian is the sum over every token of every observation: X^T X of the whole sample.
    if (!joint.hessian.defined()) continue;
    ++summing;
    const auto all_rows = joint.sample.to(torch::kDouble);
    ASSERT_TRUE(torch::allclose(joint.hessian.to(torch::kDouble), all_rows.t().matmul(all_rows), 1e-4, 1e-3)) << path;
  }
  // One summing observer per shared input: q/k/v and gate/up sum once, o_proj and down_proj alone
  // (o_proj has the width of q/k/v on the LLM, so width alone cannot tell them apart).
  EXPECT_EQ(summing, static_cast<int>(shared_input_groups(targets, together).size()));
  EXPECT_EQ(summing * 7, static_cast<int>(targets.size()) * 4);
  // Under a row budget the sample stays bounded and uniform over all observations' tokens:
  // every stride-th token of the union (the stride a power of two), in order.
  const std::string down = "paligemma_with_expert.gemma_expert.model.layers.3.mlp.down_proj";
  const auto bounded = calibrate(model, {down}, observations, 100).at(down);
  const auto all_rows = together.at(down).sample;
  ASSERT_LE(bounded.sample.size(0), 100);
  ASSERT_GT(bounded.sample.size(0), 50);
  const int64_t stride = (all_rows.size(0) + bounded.sample.size(0) - 1) / bounded.sample.size(0);
  EXPECT_TRUE(torch::equal(bounded.sample, all_rows.slice(0, 0, all_rows.size(0), stride)));
  // ...and holds only the kept rows in memory, not the calls' rows that the halving dropped.
  EXPECT_EQ(bounded.sample.storage().nbytes(), bounded.sample.nbytes());
}

TEST(ManyObservations, DirectoryFilesAndMismatchedModelsAreChecked) {
  const auto directory = testing::fixture(kCalibration);
  testing::require_fixture(directory);
  const auto from_directory = load_observations({directory});
  const auto from_files = load_observations({directory + "/obs_002.inputs.pt", directory + "/obs_000.inputs.pt"});
  EXPECT_EQ(from_directory.front().path, directory + "/obs_000.inputs.pt");
  EXPECT_EQ(from_directory.back().path, directory + "/obs_015.inputs.pt");
  EXPECT_EQ(from_files.front().path, directory + "/obs_002.inputs.pt");  // given order kept
  // Observations differ from each other and from the held-out inputs.
  const auto held_out = load_inputs(testing::fixture(kHeldOut));
  for (size_t i = 0; i < from_directory.size(); ++i) {
    EXPECT_FALSE(torch::equal(from_directory[i].inputs.values[0].toTensor(), held_out.values[0].toTensor()));
    if (i > 0) {
      EXPECT_FALSE(torch::equal(from_directory[i].inputs.values[3].toTensor(),
                                from_directory[i - 1].inputs.values[3].toTensor()));
    }
  }
  try {
    load_observations({directory, testing::fixture("pi05_tiny.inputs.pt")});
    FAIL() << "inputs of two models were accepted together";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("not inputs of the same model"), std::string::npos) << error.what();
  }
  const auto empty = testing::temporary_directory("empty_calib");
  EXPECT_THROW(load_observations({empty}), UserError);
}

// The closing-note table on tiny pi0, end-to-end on the held-out inputs: nearest/1 observation,
// nearest/16, gptq/16. GPTQ with 16 observations must at least halve the error of nearest/1, and
// on the rows its Hessian was built from be no worse than nearest rounding on the same grids for
// every one of the 252 layers (the report says which rounding was used).
TEST(GptqPipeline, HalvesTheHeldOutActionErrorAndNeverLosesOnItsFitRows) {
  const auto model_path = testing::fixture("pi0_tiny_script.pt");
  testing::require_fixture(model_path);
  auto model = load_model(model_path);
  const auto held_out = load_inputs(testing::fixture(kHeldOut));
  const auto reference = run_forward(model, held_out).toTensor();
  const auto all = load_observations({testing::fixture(kCalibration)});
  const std::vector<Observation> one = {all.front()};
  struct Row {
    std::string rounding;
    const std::vector<Observation>* observations;
    double end_to_end = 0, median_layer = 0;
    std::string worst_component;
  };
  std::vector<Row> rows = {{"nearest", &one}, {"nearest", &all}, {"gptq", &all}};
  for (auto& row : rows) {
    const auto config = test_config({{"weight-rounding", row.rounding}});
    auto result = quantize_model(model, select_linears(model, SelectionRules::from_config(config)),
                                 QuantizeRecipe::from_config(config), *row.observations);
    row.end_to_end = relative_error(run_forward(result.model, held_out).toTensor(), reference);
    if (row.rounding == "gptq") {
      int lower_held_out = 0;
      for (const auto& layer : result.layers) {
        EXPECT_EQ(layer.weight_rounding, "gptq");
        EXPECT_GT(layer.gptq_rows, layer.calibration_rows) << layer.path;
        EXPECT_GT(layer.heldout_rows, 0) << layer.path;
        EXPECT_LE(layer.fit_output_error, layer.nearest_fit_output_error * (1 + 1e-6)) << layer.path;
        lower_held_out += layer.weight_output_error < layer.nearest_output_error;
      }
      std::printf("[gptq] layers whose held-out weight error GPTQ lowers: %d of %zu\n", lower_held_out,
                  result.layers.size());
    }
    std::vector<double> errors;
    std::map<Component, std::vector<double>> by_component;
    for (const auto& layer : result.layers) {
      errors.push_back(layer.layer_output_error);
      by_component[classify_component(layer.path)].push_back(layer.layer_output_error);
    }
    row.median_layer = median(errors);
    double worst = -1;
    for (const auto& [component, values] : by_component) {
      if (median(values) > worst) {
        worst = median(values);
        row.worst_component = fmt::format("{} (median {:.2e})", component_name(component), worst);
      }
    }
    std::printf("[table] %-7s %2zu obs  e2e action rel-L2 %.4e  median layer rel-L2 %.4e  worst component %s\n",
                row.rounding.c_str(), row.observations->size(), row.end_to_end, row.median_layer,
                row.worst_component.c_str());
  }
  EXPECT_LE(rows[2].end_to_end, 0.5 * rows[0].end_to_end);
  EXPECT_LT(rows[2].median_layer, rows[1].median_layer);
}

// The Hessian summed over every token during calibration (minus the held-out rows) is the one the
// sampled rows give when the sample holds every token: GPTQ then chooses the same levels (bar
// near-ties the summation order can flip) and reports the same fit error. And with the default
// sample (fewer rows than tokens) it is built from more tokens than the sample has.
TEST(GptqPipeline, EveryTokenHessianEqualsTheRowsHessianWhenTheSampleHoldsEveryToken) {
  const auto model_path = testing::fixture("pi0_tiny_script.pt");
  testing::require_fixture(model_path);
  const auto model = load_model(model_path);
  auto observations = load_observations({testing::fixture(kCalibration)});
  observations.resize(2);
  const std::map<std::string, std::string> one_layer = {{"scope", "paligemma_with_expert.gemma_expert.model.layers.9."},
                                                        {"gptq-rows", "1048576"}};
  auto flags = one_layer;
  flags["gptq-hessian-width"] = "0";
  const auto config_rows = test_config(flags);
  flags["gptq-hessian-width"] = "4096";
  const auto config_tokens = test_config(flags);
  const auto decisions = select_linears(model, SelectionRules::from_config(config_rows));
  const auto from_rows = quantize_model(model, decisions, QuantizeRecipe::from_config(config_rows), observations);
  const auto from_tokens = quantize_model(model, decisions, QuantizeRecipe::from_config(config_tokens), observations);
  ASSERT_EQ(from_rows.layers.size(), 7u);
  for (size_t i = 0; i < from_rows.layers.size(); ++i) {
    const auto& rows = from_rows.layers[i];
    const auto& tokens = from_tokens.layers[i];
    EXPECT_EQ(rows.gptq_rows, tokens.gptq_rows) << rows.path;
    EXPECT_EQ(tokens.gptq_rows, tokens.calibration_tokens - tokens.heldout_rows) << rows.path;
    EXPECT_NEAR(rows.fit_output_error, tokens.fit_output_error, 1e-2 * rows.fit_output_error) << rows.path;
    EXPECT_NEAR(rows.weight_output_error, tokens.weight_output_error, 1e-2 * rows.weight_output_error) << rows.path;
    const auto levels = [&](const QuantizeResult& result) {
      for (const auto& item : result.model.named_modules()) {
        if (item.name == rows.path) return ops::unpack_int4(item.value.attr("packed_weight").toTensor());
      }
      return torch::Tensor();
    };
    const double same = levels(from_rows).eq(levels(from_tokens)).to(torch::kDouble).mean().item<double>();
    EXPECT_GT(same, 0.99) << rows.path;
  }

  auto defaults = test_config({{"scope", one_layer.at("scope")}});
  const auto sampled = quantize_model(model, decisions, QuantizeRecipe::from_config(defaults), observations);
  for (const auto& layer : sampled.layers) {
    EXPECT_EQ(layer.gptq_rows, layer.calibration_tokens - layer.heldout_rows) << layer.path;
    EXPECT_LE(layer.fit_output_error, layer.nearest_fit_output_error * (1 + 1e-6)) << layer.path;
  }
}

// A group made deliberately hard to quantize: in expert MLP layer 9, hidden unit 0 is switched
// off (its gate/up rows zeroed, so its down_proj input is exactly 0) and its down_proj column set
// 1000x larger than any weight. The float model barely changes, but every down_proj row's int4
// grid now spans that column, so all other weights of the row collapse onto few levels. The
// sensitivity ranking must put that group first.
TEST(Sensitivity, RanksADeliberatelyHardGroupFirst) {
  const auto model_path = testing::fixture("pi0_tiny_script.pt");
  testing::require_fixture(model_path);
  auto model = load_model(model_path);
  const std::string mlp = "paligemma_with_expert.gemma_expert.model.layers.9.mlp.";
  {
    torch::NoGradGuard no_grad;
    std::map<std::string, torch::jit::Module> modules;
    for (const auto& item : model.named_modules()) modules.emplace(item.name, item.value);
    modules.at(mlp + "gate_proj").attr("weight").toTensor()[0].zero_();
    modules.at(mlp + "up_proj").attr("weight").toTensor()[0].zero_();
    auto down = modules.at(mlp + "down_proj").attr("weight").toTensor();
    down.select(1, 0).fill_(1000 * down.abs().max().item<double>());
  }
  const auto observations = load_observations({testing::fixture(kCalibration)});
  const std::vector<Observation> evaluation = {{kHeldOut, load_inputs(testing::fixture(kHeldOut))}};
  // The expert's 36 groups (18 layers x {attention, MLP}) keep the test short; the CLI test below
  // ranks all 72 of the note's selection.
  const auto config = test_config({{"weight-rounding", "nearest"}, {"scope", "paligemma_with_expert.gemma_expert."}});
  const auto decisions = select_linears(model, SelectionRules::from_config(config));
  const auto targets = targets_of(decisions);
  const auto quantized = quantize_model(model, decisions, QuantizeRecipe::from_config(config), observations);
  const auto result = measure_sensitivity(model, quantized.model, targets, evaluation, default_curve_points(36));
  ASSERT_EQ(result.ranked.size(), 36u);
  std::printf("[sensitivity] worst: %s %.3e, second: %s %.3e, all quantized %.3e\n",
              result.ranked[0].group.name.c_str(), result.ranked[0].end_to_end_error,
              result.ranked[1].group.name.c_str(), result.ranked[1].end_to_end_error, result.all_quantized_error);
  EXPECT_EQ(result.ranked[0].group.name, "expert MLP layer 9");
  EXPECT_EQ(result.ranked[0].group.paths.size(), 3u);
  // Keeping that one group float removes most of the damage; keeping all is exact.
  ASSERT_GE(result.curve.size(), 2u);
  EXPECT_EQ(result.curve[0].kept_groups, 0);
  EXPECT_DOUBLE_EQ(result.curve[0].end_to_end_error, result.all_quantized_error);
  EXPECT_LT(result.curve[1].end_to_end_error, 0.5 * result.curve[0].end_to_end_error);
  EXPECT_EQ(result.curve.back().kept_groups, 36);
  EXPECT_EQ(result.curve.back().end_to_end_error, 0.0);
  // Memory of each point: kept groups in bf16, the rest in W4A8. (At tiny widths the 128x128
  // rotations outweigh the int4 savings, so no ordering is asserted; the full-size ratio is ~3.5x.)
  int64_t all_bf16 = 0, all_w4a8 = 0;
  for (const auto& group : result.ranked) {
    all_bf16 += group.bf16_bytes;
    all_w4a8 += group.w4a8_bytes;
  }
  EXPECT_EQ(result.curve.front().target_bytes, all_w4a8);
  EXPECT_EQ(result.curve.back().target_bytes, all_bf16);
  EXPECT_EQ(result.curve[1].target_bytes, all_w4a8 - result.ranked[0].w4a8_bytes + result.ranked[0].bf16_bytes);
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream file(path);
  EXPECT_TRUE(file.good()) << path;
  return nlohmann::json::parse(file);
}

// `sensitivity --quantized Q` ranks with the model `duquant quantize` wrote instead of quantizing
// again (on the full-size pi0 that saves a 40-minute quantize): the same errors as quantizing in
// place, only the curve points asked for, and a model of another selection refused.
TEST(Sensitivity, OfASavedQuantizedModelMatchesQuantizingInPlace) {
  const auto model = testing::fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto directory = testing::temporary_directory("sensitivity_saved");
  // Expert layer 9 alone: two groups (attention, MLP) keep the four runs short.
  const std::string environment = "OPENPI_DUQUANT_EXCLUDE='" + kNoteExclude +
                                  "' OPENPI_DUQUANT_SCOPE='paligemma_with_expert.gemma_expert.model.layers.9.'";
  const std::string calibration = " --calib " + testing::fixture(kCalibration + "/obs_000.inputs.pt") + " --calib " +
                                  testing::fixture(kCalibration + "/obs_001.inputs.pt");
  const std::string recipe = " --rotation-steps 64 --weight-rounding nearest";
  const std::string held_out = " --inputs " + testing::fixture(kHeldOut);
  const auto quantized = directory + "/q.pt";

  const auto in_place = testing::run_cli(
      "sensitivity " + model + calibration + held_out + recipe + " --curve 0,1,2 --json " + directory + "/a.json",
      environment);
  ASSERT_EQ(in_place.exit_code, 0) << in_place.output;
  const auto quantize = testing::run_cli("quantize " + model + " -o " + quantized + calibration + recipe, environment);
  ASSERT_EQ(quantize.exit_code, 0) << quantize.output;
  const auto saved = testing::run_cli(
      "sensitivity " + model + " --quantized " + quantized + held_out + " --curve 1 --json " + directory + "/b.json",
      environment);
  ASSERT_EQ(saved.exit_code, 0) << saved.output;
  EXPECT_NE(saved.output.find("[DUQUANT] quantized layers from " + quantized), std::string::npos) << saved.output;
  // One progress line per forward: every group quantized, 2 groups, the K = 1 point.
  EXPECT_NE(saved.output.find("[DUQUANT][SENSITIVITY]   4/4 1 worst groups kept float"), std::string::npos)
      << saved.output;

  const auto expected = read_json(directory + "/a.json");
  const auto actual = read_json(directory + "/b.json");
  ASSERT_EQ(actual["ranking"].size(), 2u);
  ASSERT_EQ(expected["ranking"].size(), 2u);
  auto close = [](double a, double b) { return std::abs(a - b) <= 1e-6 * std::max(std::abs(a), std::abs(b)); };
  EXPECT_TRUE(close(actual["all_quantized_relative_l2"], expected["all_quantized_relative_l2"]));
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_EQ(actual["ranking"][r]["name"], expected["ranking"][r]["name"]);
    EXPECT_TRUE(close(actual["ranking"][r]["relative_l2_only_this_group_quantized"],
                      expected["ranking"][r]["relative_l2_only_this_group_quantized"]))
        << actual["ranking"][r].dump() << " vs " << expected["ranking"][r].dump();
    EXPECT_EQ(actual["ranking"][r]["w4a8_bytes"], expected["ranking"][r]["w4a8_bytes"]);
  }
  ASSERT_EQ(actual["kept_float_curve"].size(), 1u);
  ASSERT_EQ(expected["kept_float_curve"].size(), 3u);
  EXPECT_EQ(actual["kept_float_curve"][0]["kept_groups"], 1);
  EXPECT_TRUE(close(actual["kept_float_curve"][0]["relative_l2"], expected["kept_float_curve"][1]["relative_l2"]));
  // K = 0 is the every-group forward and K = 2 (all groups) the float model: no extra forward.
  EXPECT_EQ(expected["forwards"], 5);
  EXPECT_EQ(expected["kept_float_curve"][2]["relative_l2"], 0.0);

  // Refused: a model quantized with another selection, both sources, a point beyond the groups.
  const auto other_scope = testing::run_cli("sensitivity " + model + " --quantized " + quantized + held_out,
                                            "OPENPI_DUQUANT_EXCLUDE='" + kNoteExclude +
                                                "' OPENPI_DUQUANT_SCOPE='paligemma_with_expert.gemma_expert.'");
  EXPECT_EQ(other_scope.exit_code, 2) << other_scope.output;
  EXPECT_NE(other_scope.output.find("duquant: error: '" + quantized + "' leaves target"), std::string::npos)
      << other_scope.output;
  const auto both = testing::run_cli("sensitivity " + model + " --quantized " + quantized + calibration + held_out,
                                     environment);
  EXPECT_EQ(both.exit_code, 2) << both.output;
  EXPECT_NE(both.output.find("--calib and --quantized both given"), std::string::npos) << both.output;
  const auto beyond = testing::run_cli("sensitivity " + model + " --quantized " + quantized + held_out + " --curve 3",
                                       environment);
  EXPECT_EQ(beyond.exit_code, 2) << beyond.output;
  EXPECT_NE(beyond.output.find("--curve 3: a point is a number of groups kept float, 0 to 2"), std::string::npos)
      << beyond.output;
}

std::string line_starting(const std::string& text, const std::string& prefix) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind(prefix, 0) == 0) return line;
  }
  return "";
}

// The W4A8 layers of a saved model (loading it needs the operator library, which this binary links).
std::set<std::string> quantized_layers(const std::string& path) {
  std::set<std::string> layers;
  for (const auto& item : load_model(path).named_modules()) {
    if (is_quantized_linear(item.value)) layers.insert(item.name);
  }
  return layers;
}

std::set<std::string> listed_targets(const std::string& environment, const std::string& model) {
  const auto listing = testing::run_cli("list --json " + model, environment);
  EXPECT_EQ(listing.exit_code, 0) << listing.output.substr(0, 2000);
  const auto json = nlohmann::json::parse(listing.output);
  std::set<std::string> targets;
  for (const auto& layer : json["layers"]) {
    if (layer["target"].get<bool>()) targets.insert(layer["path"].get<std::string>());
  }
  return targets;
}

// `--keep-float 4` (ranking measured on the calibration observations): the output loads and runs,
// keeps exactly 4 groups float, and the printed env line selects exactly its W4A8 layers in
// `duquant list`. The ranking written by `duquant sensitivity` drives the dry run, which says for
// each layer left float that sensitivity decided it.
TEST(KeepFloat, OutputRunsAndTheEnvLineSelectsTheSameLayers) {
  const auto model = testing::fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto directory = testing::temporary_directory("keep_float");
  const auto output = directory + "/q.pt";
  const std::string environment = "OPENPI_DUQUANT_EXCLUDE='" + kNoteExclude + "'";
  // Two observations, given as two --calib files: the ranking is measured on them (72 groups x 2
  // forwards), which keeps this test short.
  const auto quantize = testing::run_cli("quantize " + model + " -o " + output + " --calib " +
                                             testing::fixture(kCalibration + "/obs_000.inputs.pt") + " --calib " +
                                             testing::fixture(kCalibration + "/obs_001.inputs.pt") +
                                             " --keep-float 4 --rotation-steps 64",
                                         environment);
  ASSERT_EQ(quantize.exit_code, 0) << quantize.output;
  const auto export_line = line_starting(quantize.output, "export OPENPI_DUQUANT_");
  ASSERT_FALSE(export_line.empty()) << quantize.output;
  EXPECT_NE(quantize.output.find("calibrating on 2 observation(s)"), std::string::npos) << quantize.output;
  EXPECT_NE(quantize.output.find("[DUQUANT][KEPT] "), std::string::npos);
  EXPECT_NE(quantize.output.find("kept in floating point by sensitivity (rank 1)"), std::string::npos);

  const auto layers = quantized_layers(output);
  const auto listed = listed_targets(export_line.substr(std::string("export ").size()), model);
  EXPECT_EQ(listed, layers);
  EXPECT_LT(layers.size(), 252u);
  EXPECT_GE(layers.size(), 252u - 4 * 4);  // a group is at most 4 layers (q, k, v, o)
  const auto run = testing::run_cli("run " + output + " --inputs " + testing::fixture(kHeldOut));
  EXPECT_EQ(run.exit_code, 0) << run.output;

  const auto json = directory + "/sensitivity.json";
  const auto sensitivity = testing::run_cli("sensitivity " + model + " --calib " + testing::fixture(kCalibration) +
                                                " --inputs " + testing::fixture(kHeldOut) + " --json " + json +
                                                " --rotation-steps 64 --weight-rounding nearest",
                                            environment);
  ASSERT_EQ(sensitivity.exit_code, 0) << sensitivity.output;
  EXPECT_NE(sensitivity.output.find("[DUQUANT][SENSITIVITY] end-to-end error with the K worst groups"),
            std::string::npos);
  const auto ranking = read_sensitivity_ranking(json);
  ASSERT_EQ(ranking.size(), 72u);
  const auto dry_run = testing::run_cli("quantize " + model + " --dry-run --keep-float 2 --sensitivity " + json,
                                        environment);
  ASSERT_EQ(dry_run.exit_code, 0) << dry_run.output;
  for (const auto& path : ranking[0].paths) {
    EXPECT_NE(dry_run.output.find("[DUQUANT][SKIP] " + path + ": "), std::string::npos) << path;
  }
  EXPECT_NE(dry_run.output.find("kept in floating point by sensitivity (rank 2)"), std::string::npos);
  const size_t kept = ranking[0].paths.size() + ranking[1].paths.size();
  EXPECT_NE(dry_run.output.find(fmt::format("[DUQUANT] Dry-run total layers listed: {}\n", 252 - kept)),
            std::string::npos);
  const auto dry_line = line_starting(dry_run.output, "export OPENPI_DUQUANT_");
  EXPECT_EQ(listed_targets(dry_line.substr(std::string("export ").size()), model).size(), 252 - kept);
  // Evaluating on a calibration input is refused.
  const auto leaked = testing::run_cli("sensitivity " + model + " --calib " + testing::fixture("pi0_tiny.inputs.pt") +
                                       " --inputs " + testing::fixture("pi0_tiny.inputs.pt"),
                                       environment);
  EXPECT_EQ(leaked.exit_code, 2) << leaked.output;
}

}  // namespace
}  // namespace duquant
