// The command line as a user's shell script sees it: the fork's log lines, exit codes, and a
// one-line error naming problem and fix for every bad input, with no partial output left behind.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <unistd.h>

#include <fstream>
#include <regex>

#include "test_support.h"

namespace duquant {
namespace {

using testing::fixture;
using testing::run_cli;

// Quoted for the shell.
const std::string kNoteExclude = "'" + testing::kNoteExclude + "'";

int count_lines_starting(const std::string& text, const std::string& prefix) {
  int count = 0;
  std::istringstream stream(text);
  std::string line;
  while (std::getline(stream, line)) count += line.rfind(prefix, 0) == 0;
  return count;
}

// Exactly one line of output, starting "duquant: error:".
void expect_one_line_error(const testing::CommandResult& result, int exit_code, const std::string& mention) {
  EXPECT_EQ(result.exit_code, exit_code) << result.output;
  EXPECT_EQ(count_lines_starting(result.output, "duquant: error: "), 1) << result.output;
  EXPECT_EQ(std::count(result.output.begin(), result.output.end(), '\n'), 1) << result.output;
  EXPECT_NE(result.output.find(mention), std::string::npos) << result.output;
}

TEST(Cli, ListPrintsForkLinesAndComponentTable) {
  const auto model = fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto result = run_cli("list " + model, "OPENPI_DUQUANT_EXCLUDE=" + kNoteExclude);
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("[DUQUANT] Matched Linear layers: 252\n"), std::string::npos);
  EXPECT_NE(result.output.find("[DUQUANT] Dry-run total layers listed: 252\n"), std::string::npos);
  EXPECT_EQ(count_lines_starting(result.output, "[DUQUANT][DRYRUN] "), 252);
  EXPECT_TRUE(std::regex_search(
      result.output, std::regex(R"(\[DUQUANT\]\[DRYRUN\] paligemma_with_expert\.paligemma\.model\.language_model\.layers\.0\.self_attn\.q_proj: Linear\(\d+->\d+\) -> W4 A8 duquant, block 128)")));
  EXPECT_TRUE(std::regex_search(result.output, std::regex(R"(\[DUQUANT\]\[SKIP\] \S+vision_tower\S+: Linear\(\d+->\d+\) excluded by 'vision_tower')")));
  EXPECT_TRUE(std::regex_search(result.output, std::regex(R"(\[DUQUANT\] LLM attention +72 +72)")));
  EXPECT_TRUE(std::regex_search(result.output, std::regex(R"(\[DUQUANT\] vision tower +162 +0)")));
  EXPECT_NE(result.output.find("exclude"), std::string::npos);
  EXPECT_NE(result.output.find("(env OPENPI_DUQUANT_EXCLUDE)"), std::string::npos);
}

TEST(Cli, FlagOverridesEnvironmentAndDryRunOfQuantizeWritesNothing) {
  const auto model = fixture("pi0_tiny_trace.pt");
  testing::require_fixture(model);
  const auto out = testing::temporary_directory("dryrun") + "/q.pt";
  const auto result = run_cli("quantize " + model + " -o " + out + " --dry-run --scope paligemma_with_expert.gemma_expert.",
                              "OPENPI_DUQUANT_SCOPE=nothing. OPENPI_DUQUANT_EXCLUDE=" + kNoteExclude);
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("[DUQUANT] Dry-run total layers listed: 126\n"), std::string::npos);
  EXPECT_NE(result.output.find("(flag --scope)"), std::string::npos);
  EXPECT_FALSE(testing::file_exists(out));
}

TEST(Cli, JsonListing) {
  const auto model = fixture("pi05_tiny_script.pt");
  testing::require_fixture(model);
  const auto result = run_cli("list --json " + model + " --exclude " + kNoteExclude);
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("\"targets\": 252"), std::string::npos);
  EXPECT_NE(result.output.find("\"rule\": \"excluded\""), std::string::npos);
}

TEST(Cli, NoMatchHasItsOwnExitCode) {
  const auto model = fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto result = run_cli("list " + model + " --include nothing_matches_this");
  EXPECT_EQ(result.exit_code, 3) << result.output;
  EXPECT_NE(result.output.find("[DUQUANT] Matched Linear layers: 0"), std::string::npos);
  EXPECT_NE(result.output.find("duquant: no Linear layer matched"), std::string::npos);
}

TEST(Cli, BadInputs) {
  const auto model = fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto dir = testing::temporary_directory("badinputs");

  expect_one_line_error(run_cli("list " + dir + "/missing.pt"), 1, "does not exist");

  std::ofstream(dir + "/text.pt") << "not a model\n";
  expect_one_line_error(run_cli("list " + dir + "/text.pt"), 1, "not a TorchScript archive");

  {  // a truncated archive: the first half of a real one
    std::ifstream in(model, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(dir + "/truncated.pt", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  expect_one_line_error(run_cli("list " + dir + "/truncated.pt"), 1, "corrupt or truncated");

  expect_one_line_error(run_cli("list " + model + " --exclude '(norm|ln'"), 2, "position");
  expect_one_line_error(run_cli("list " + model + " --layers no.such.layer"), 2, "names no module");
  expect_one_line_error(run_cli("list " + model + " --scope policy.dit."), 2, "matches no module path");
  expect_one_line_error(run_cli("list " + model + " --block 100"), 2, "power of two");
  expect_one_line_error(run_cli("list " + model + " --wbits-default 8"), 2, "weight bits");

  expect_one_line_error(run_cli("list " + model + " --no-such-flag"), 2, "no-such-flag");

  expect_one_line_error(run_cli("quantize " + model + " -o /nonexistent_dir/q.pt --calib x"), 1,
                        "directory '/nonexistent_dir' does not exist");
  expect_one_line_error(run_cli("quantize " + model + " -o " + dir + "/q.pt --calib x --data-free"), 2, "exclude each other");
  expect_one_line_error(run_cli("quantize " + model + " -o " + dir + "/q.pt"), 2, "--calib");
  EXPECT_FALSE(testing::file_exists(dir + "/q.pt"));
}

// The fork's per-layer and total lines that LIBERO scripts grep, the report, and a flag turning off
// a switch that the environment turned on.
TEST(Cli, QuantizeWritesForkLinesModelAndReport) {
  const auto model = fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto dir = testing::temporary_directory("quantize");
  const std::string expert = "paligemma_with_expert.gemma_expert.model.layers.2.";
  const auto result = run_cli("quantize " + model + " -o " + dir + "/q.pt --calib " + fixture("pi0_tiny.inputs.pt") +
                                  " --dry-run=0 --rotation-steps 16 --layers " + expert + "self_attn.q_proj," + expert +
                                  "self_attn.k_proj," + expert + "self_attn.v_proj," + expert + "mlp.down_proj",
                              "OPENPI_DUQUANT_DRYRUN=1");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("[DUQUANT] Matched Linear layers: 4\n"), std::string::npos);
  EXPECT_NE(result.output.find("[DUQUANT] Total layers replaced: 4\n"), std::string::npos);
  EXPECT_EQ(count_lines_starting(result.output, "[DUQUANT][REPLACED] "), 4);
  EXPECT_TRUE(std::regex_search(
      result.output,
      std::regex(R"(\[DUQUANT\]\[REPLACED\] paligemma_with_expert\.gemma_expert\.model\.layers\.2\.mlp\.down_proj: Linear\(\d+->\d+\) -> DuQuantLinear W4 A8 duquant)")));
  EXPECT_TRUE(std::regex_search(result.output, std::regex(R"(k_proj: .*\(transform shared with \S+q_proj\))")));
  EXPECT_TRUE(testing::file_exists(dir + "/q.pt"));
  std::ifstream report(dir + "/q.report.json");
  ASSERT_TRUE(report) << "no report next to the model";
  const std::string json((std::istreambuf_iterator<char>(report)), std::istreambuf_iterator<char>());
  for (const auto* key : {"\"layers_replaced\": 4", "\"rotation1_steps\"", "\"activation_peak_to_mean_before\"",
                          "\"weight_quantization_error\"", "\"target_memory\"", "\"calibration_rows\"",
                          "\"peak_rss_bytes\""}) {
    EXPECT_NE(json.find(key), std::string::npos) << key;
  }
  // The per-stage table, on stdout and in the report, covers the whole run from load to save.
  for (const auto* stage : {"load", "calibration", "rotation search", "permutation", "weight transform",
                            "clip search", "rounding", "packing", "layer check", "swap", "save"}) {
    EXPECT_TRUE(std::regex_search(result.output, std::regex("\\[DUQUANT\\] stage " + std::string(stage) +
                                                             " +[0-9.]+ s")))
        << stage;
    EXPECT_NE(json.find("\"" + std::string(stage) + "\": "), std::string::npos) << stage;
  }
  EXPECT_TRUE(std::regex_search(result.output, std::regex(R"(\[DUQUANT\] total [0-9.]+ s, peak RSS [0-9.]+ GiB)")));
}

// `run`: the device and graph flags refuse what cannot work in one line; --repeat reports the
// first call and the steady state separately.
TEST(Cli, RunRefusesBadDeviceGraphAndRepeatFlags) {
  const auto model = fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto inputs = " --inputs " + fixture("pi0_tiny.inputs.pt");
  expect_one_line_error(run_cli("run " + model + inputs + " --device tpu"), 2, "use auto, cpu or cuda");
  expect_one_line_error(run_cli("run " + model + inputs + " --device cpu --cuda-graph"), 2,
                        "--cuda-graph needs --device cuda");
  expect_one_line_error(run_cli("run " + model + inputs + " --repeat 0"), 2, "--repeat: Value 0 not in range 1 to");
}

TEST(Cli, RunCudaGraphWithoutAGpuIsRefused) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a CUDA device is present";
  const auto model = fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  expect_one_line_error(run_cli("run " + model + " --inputs " + fixture("pi0_tiny.inputs.pt") + " --cuda-graph"), 1,
                        "--cuda-graph needs a CUDA device and none is available");
}

TEST(Cli, RunRepeatReportsTheFirstCallsAndTheMedianOfTheRest) {
  const auto model = fixture("pi0_tiny_script.pt");
  testing::require_fixture(model);
  const auto result = run_cli("run " + model + " --inputs " + fixture("pi0_tiny.inputs.pt") + " --repeat 2");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  // --device auto: the CPU here, CUDA on a GPU machine.
  EXPECT_TRUE(std::regex_search(result.output, std::regex(R"(\[DUQUANT\] ran \S+ on (cpu|cuda): output )")))
      << result.output;
  EXPECT_TRUE(std::regex_search(
      result.output, std::regex(R"(\[DUQUANT\] 2 calls: first [0-9.]+ ms, then median [0-9.]+ ms \(min [0-9.]+, max [0-9.]+\) over 1 call\n)")))
      << result.output;  // --repeat keeps the profiling executor; --executor one-shot times the first three calls without it.
  EXPECT_TRUE(std::regex_search(result.output,
                                std::regex(R"(\[DUQUANT\] profiling executor, calls 1: [0-9.]+ ms, 2: [0-9.]+ ms\n)")))
      << result.output;
  const auto one_shot =
      run_cli("run " + model + " --inputs " + fixture("pi0_tiny.inputs.pt") + " --repeat 3 --executor one-shot");
  ASSERT_EQ(one_shot.exit_code, 0) << one_shot.output;
  EXPECT_TRUE(std::regex_search(
      one_shot.output, std::regex(R"(\[DUQUANT\] one-shot executor, calls 1: [0-9.]+ ms, 2: [0-9.]+ ms, 3: [0-9.]+ ms\n)")))
      << one_shot.output;
  expect_one_line_error(run_cli("run " + model + " --inputs " + fixture("pi0_tiny.inputs.pt") + " --executor jit"), 2,
                        "--executor");
}

// duquant_bench (next to the CLI in the build directory): the end-to-end comparison needs all three
// files and a GPU; without one it is refused in one line, while the operator table alone skips.
TEST(Cli, BenchEndToEndNeedsItsThreeFilesAndAGpu) {
  auto run_bench = [](const std::string& arguments) { return testing::run_program(testing::bench_program(), arguments); };
  const auto partial = run_bench("--model a.pt --inputs b.pt");
  EXPECT_EQ(partial.exit_code, 2) << partial.output;
  EXPECT_EQ(partial.output, "duquant_bench: error: --model, --quantized and --inputs go together\n");
  if (torch::cuda::is_available()) GTEST_SKIP() << "a CUDA device is present";
  const auto end_to_end = run_bench("--model a.pt --quantized b.pt --inputs c.pt");
  EXPECT_EQ(end_to_end.exit_code, 1) << end_to_end.output;
  EXPECT_EQ(end_to_end.output, "duquant_bench: error: the end-to-end benchmark needs a CUDA device and none is available\n");
  const auto operator_table = run_bench("--tokens 1");
  EXPECT_EQ(operator_table.exit_code, 0) << operator_table.output;
  EXPECT_EQ(operator_table.output, "no CUDA device: benchmark skipped\n");
}

// The original is never replaced. Each refusal comes before any work: the model here is not even
// TorchScript, so an error about loading it would mean the check came too late.
class OverwriteRefusal : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = testing::temporary_directory("overwrite");
    model = dir + "/model.pt";
    std::ofstream(model) << "the user's original model\n";
  }
  std::string model_bytes() const {
    std::ifstream in(model, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  void expect_refused(const std::string& arguments, const std::string& mention) {
    expect_one_line_error(run_cli("quantize " + model + " " + arguments + " --calib " + dir + "/calib.pt"), 2, mention);
    EXPECT_EQ(model_bytes(), "the user's original model\n");
  }
  std::string dir, model;
};

TEST_F(OverwriteRefusal, OutputThatIsTheInputPath) { expect_refused("-o " + model, "is the input model"); }

TEST_F(OverwriteRefusal, OutputThatIsASymbolicLinkToTheInput) {
  ASSERT_EQ(symlink(model.c_str(), (dir + "/link.pt").c_str()), 0);
  expect_refused("-o " + dir + "/link.pt", "is the input model");
}

TEST_F(OverwriteRefusal, OutputThatIsAHardLinkToTheInput) {
  ASSERT_EQ(link(model.c_str(), (dir + "/hard.pt").c_str()), 0);
  expect_refused("-o " + dir + "/hard.pt", "is the input model");
}

TEST_F(OverwriteRefusal, OutputThroughAnotherSpellingOfThePath) {
  expect_refused("-o " + dir + "/./model.pt", "is the input model");
}

TEST_F(OverwriteRefusal, ReportPathThatIsTheInput) {
  expect_refused("-o " + dir + "/q.pt --report " + model, "the report");
  EXPECT_FALSE(testing::file_exists(dir + "/q.pt"));
}

TEST_F(OverwriteRefusal, ReportPathThatIsTheOutput) {
  expect_refused("-o " + dir + "/q.pt --report " + dir + "/q.pt", "is the output model");
}

// An ambiguous scope is a one-line usage error naming both candidates.
TEST(Cli, AmbiguousScopeDetectionIsAOneLineError) {
  const auto dir = testing::temporary_directory("ambiguous");
  auto make = [] {
    return torch::jit::Module(c10::QualifiedName("__torch__.Container"), std::make_shared<torch::jit::CompilationUnit>());
  };
  torch::jit::Module root = make(), first = make(), second = make();
  first.register_module("paligemma_with_expert", make());
  second.register_module("paligemma_with_expert", make());
  root.register_module("policy", first);
  root.register_module("ema", second);
  root.save(dir + "/two.pt");
  expect_one_line_error(run_cli("list " + dir + "/two.pt"), 2, "cannot detect the scope");
}

// verify runs the quantized model, keeps only its W4A8 layers, then runs the original: the output
// format other tools parse stays, and a wrong pair of models is a one-line error.
TEST(Cli, VerifyReportsEndToEndAndPerLayerErrors) {
  const auto model = fixture("pi0_tiny_script.pt");
  const auto inputs = fixture("pi0_tiny.inputs.pt");
  testing::require_fixture(model);
  const auto dir = testing::temporary_directory("verify");
  const std::string expert = "paligemma_with_expert.gemma_expert.model.layers.4.";
  const auto quantized = run_cli("quantize " + model + " -o " + dir + "/q.pt --calib " + inputs +
                                 " --rotation-steps 16 --layers " + expert + "mlp.gate_proj," + expert + "mlp.up_proj," +
                                 expert + "mlp.down_proj");
  ASSERT_EQ(quantized.exit_code, 0) << quantized.output;
  const auto result = run_cli("verify " + model + " " + dir + "/q.pt --inputs " + inputs + " --json " + dir + "/e.json");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  std::smatch match;
  ASSERT_TRUE(std::regex_search(result.output, match,
                                std::regex(R"(\[DUQUANT\]\[VERIFY\] end-to-end: relative L2 (\S+), cosine (\S+), max abs)")))
      << result.output;
  const double relative_l2 = std::stod(match[1]);
  EXPECT_GT(relative_l2, 0.0);  // three W4A8 layers change the actions, a little
  EXPECT_LT(relative_l2, 0.2);
  EXPECT_EQ(count_lines_starting(result.output, "  " + expert + "mlp."), 3) << result.output;
  EXPECT_TRUE(testing::file_exists(dir + "/e.json"));

  expect_one_line_error(run_cli("verify " + model + " " + dir + "/q.pt --inputs " + inputs + " --device tpu"), 2,
                        "use auto, cpu or cuda");
  if (!torch::cuda::is_available()) {
    expect_one_line_error(run_cli("verify " + model + " " + dir + "/q.pt --inputs " + inputs + " --device cuda"), 1,
                          "no CUDA device is available");
  } else {
    // On a GPU both forwards run on CUDA (the W4A8 kernels instead of the CPU reference): the
    // figures agree with the CPU's up to the kernels' rounding.
    const auto on_cuda = run_cli("verify " + model + " " + dir + "/q.pt --inputs " + inputs + " --device cuda");
    ASSERT_EQ(on_cuda.exit_code, 0) << on_cuda.output;
    ASSERT_TRUE(std::regex_search(
        on_cuda.output, match, std::regex(R"(\[DUQUANT\]\[VERIFY\] end-to-end: relative L2 (\S+), cosine (\S+), max abs)")));
    EXPECT_NEAR(std::stod(match[1]), relative_l2, 0.25 * relative_l2);
  }
  expect_one_line_error(run_cli("verify " + dir + "/q.pt " + model + " --inputs " + inputs), 1, "has no W4A8 layers");
  expect_one_line_error(run_cli("verify " + fixture("pi05_tiny_script.pt") + " " + dir + "/q.pt --inputs " + inputs), 1,
                        "the inputs");
}

}  // namespace
}  // namespace duquant
