// Selection rules (DESIGN.md section 2) against the user's verification note and the generated
// pi0/pi05 models.
#include <gtest/gtest.h>

#include <fstream>
#include <regex>
#include <sstream>

#include "duquant/config.h"
#include "duquant/errors.h"
#include "duquant/model_io.h"
#include "duquant/select.h"
#include "test_support.h"

namespace duquant {
namespace {

// The note's exclude regex (../shared/spec/vision_exclusion_verified.md).
using testing::kNoteExclude;

Config config_with(const std::map<std::string, std::string>& environment) {
  Config config = Config::defaults();
  config.apply_environment([&](const std::string& name) -> std::optional<std::string> {
    auto it = environment.find(name);
    return it == environment.end() ? std::nullopt : std::optional<std::string>(it->second);
  });
  return config;
}

TEST(PythonRegex, SearchIsUnanchoredAndReturnsTheKeywordGroup) {
  PythonRegex exclude(kNoteExclude, "EXCLUDE");
  EXPECT_EQ(exclude.search("a.vision_tower.b").value(), "vision_tower");
  EXPECT_EQ(exclude.search("lm_head").value(), "lm_head");
  EXPECT_FALSE(exclude.search("a.language_model.layers.0.self_attn.q_proj"));
  PythonRegex include("q_proj", "INCLUDE");
  EXPECT_TRUE(include.search("x.self_attn.q_proj.y"));  // search, not fullmatch
}

// The note's example-match table is acceptance data, except its one wrong claim: `embed_tokens`
// is *not* matched ("emb" must be a whole path component), DESIGN.md section 2.
TEST(PythonRegex, NoteExampleMatchTable) {
  std::ifstream note(std::string(DUQUANT_SPEC_DIR) + "/vision_exclusion_verified.md");
  ASSERT_TRUE(note) << "../shared/spec/vision_exclusion_verified.md not found";
  const std::regex row(R"(^\| `\.\.\.([a-z0-9_.]+)` \| [^|]*\b(Yes|No)\b[^|]*\|)");
  PythonRegex exclude(kNoteExclude, "EXCLUDE");
  int rows = 0;
  std::string line;
  while (std::getline(note, line)) {
    std::smatch match;
    if (!std::regex_search(line, match, row)) continue;
    ++rows;
    const std::string path = "paligemma_with_expert.paligemma.model." + match[1].str();
    const bool note_says_excluded = match[2] == "Yes";
    const bool excluded = exclude.search(path).has_value();
    if (match[1] == "embed_tokens") {
      EXPECT_TRUE(note_says_excluded);
      EXPECT_FALSE(excluded) << "the note's wrong claim: '.emb' does not match 'embed_tokens'";
    } else {
      EXPECT_EQ(excluded, note_says_excluded) << path;
    }
  }
  EXPECT_EQ(rows, 6);
}

TEST(PythonRegex, ComponentKeywordTrap) {
  PythonRegex fork_exclude(Config::defaults().get("exclude"), "EXCLUDE");
  PythonRegex note_exclude(kNoteExclude, "EXCLUDE");
  for (const auto* regex : {&fork_exclude, &note_exclude}) {
    EXPECT_FALSE(regex->search("paligemma_with_expert.paligemma.model.language_model.embed_tokens"));
    EXPECT_FALSE(regex->search("paligemma_with_expert.paligemma.model.language_model.layers.0.input_layernorm"));
    EXPECT_TRUE(regex->search("paligemma_with_expert.paligemma.model.language_model.norm"));
  }
}

TEST(PythonRegex, PythonOnlySyntax) {
  PythonRegex named("(?P<kind>q|k|v)_proj$", "INCLUDE");
  EXPECT_EQ(named.search("layers.0.self_attn.k_proj").value(), "k");
  EXPECT_FALSE(named.search("layers.0.self_attn.o_proj"));
  PythonRegex backreference(R"((?P<x>\d+)\.(?P=x)\.)", "INCLUDE");
  EXPECT_TRUE(backreference.search("layers.3.3.q"));
  EXPECT_FALSE(backreference.search("layers.3.4.q"));
  // Python's \Z is end of string only (PCRE2's would also match before a final newline).
  PythonRegex end("proj\\Z", "INCLUDE");
  EXPECT_TRUE(end.search("q_proj"));
  EXPECT_FALSE(end.search("q_proj\n"));
}

TEST(PythonRegex, InvalidPatternNamesThePosition) {
  try {
    PythonRegex bad("(q_proj|k_proj", "INCLUDE");
    FAIL() << "no error";
  } catch (const UserError& error) {
    EXPECT_EQ(error.code(), ExitCode::Usage);
    EXPECT_NE(std::string(error.what()).find("position 14"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("INCLUDE"), std::string::npos);
  }
}

TEST(Config, FlagsOverrideEnvironmentAndSourcesAreRecorded) {
  Config config = config_with({{"OPENPI_DUQUANT_EXCLUDE", "x"}, {"OPENPI_DUQUANT_BLOCK", "16"},
                               {"OPENPI_DUQUANT_ACT_PCT", "99.9"}});
  config.apply_flag("block", "64");
  EXPECT_EQ(config.get("exclude"), "x");
  EXPECT_EQ(config.get_int("block"), 64);
  const auto& settings = config.settings();
  auto source_of = [&](const std::string& key) {
    return std::find_if(settings.begin(), settings.end(), [&](const Setting& s) { return s.key == key; })->source;
  };
  EXPECT_EQ(source_of("exclude"), "env OPENPI_DUQUANT_EXCLUDE");
  EXPECT_EQ(source_of("block"), "flag --block");
  EXPECT_EQ(source_of("scope"), "default");
  ASSERT_EQ(config.ignored_environment().size(), 1u);
  EXPECT_EQ(config.ignored_environment()[0].first, "OPENPI_DUQUANT_ACT_PCT");
  config.apply_flag("block", "sixteen");
  EXPECT_THROW(config.get_int("block"), UserError);
}

class GeneratedModel : public ::testing::TestWithParam<std::string> {};

TEST_P(GeneratedModel, NoteExcludeGives252Targets) {
  const auto path = testing::fixture(GetParam());
  testing::require_fixture(path);
  const auto model = load_model(path);
  const auto decisions =
      select_linears(model, SelectionRules::from_config(config_with({{"OPENPI_DUQUANT_EXCLUDE", kNoteExclude}})));
  const auto counts = count_by_component(decisions);
  EXPECT_EQ(counts.at(Component::VisionTower), std::make_pair(int64_t{27 * 6}, int64_t{0}));
  EXPECT_EQ(counts.at(Component::Projector), std::make_pair(int64_t{1}, int64_t{0}));
  EXPECT_EQ(counts.at(Component::LlmAttention), std::make_pair(int64_t{72}, int64_t{72}));
  EXPECT_EQ(counts.at(Component::LlmMlp), std::make_pair(int64_t{54}, int64_t{54}));
  EXPECT_EQ(counts.at(Component::ExpertAttention), std::make_pair(int64_t{72}, int64_t{72}));
  EXPECT_EQ(counts.at(Component::ExpertMlp), std::make_pair(int64_t{54}, int64_t{54}));
  EXPECT_EQ(counts.at(Component::Other).second, 0);
  int64_t targets = 0;
  for (const auto& d : decisions) {
    targets += d.target;
    if (d.component == Component::VisionTower) {
      EXPECT_EQ(d.rule, Rule::Excluded) << d.path;
      EXPECT_NE(d.detail.find("vision_tower"), std::string::npos) << d.detail;
    }
    // lm_head never matches INCLUDE, which is checked before EXCLUDE (the fork's order).
    if (d.path.find("lm_head") != std::string::npos) EXPECT_EQ(d.rule, Rule::NotIncluded) << d.path;
  }
  EXPECT_EQ(targets, 252);
}

TEST_P(GeneratedModel, ForkDefaultsAlsoQuantizeTheVisionTower) {
  const auto path = testing::fixture(GetParam());
  testing::require_fixture(path);
  const auto decisions = select_linears(load_model(path), SelectionRules::from_config(config_with({})));
  const auto counts = count_by_component(decisions);
  EXPECT_EQ(counts.at(Component::VisionTower).second, 27 * 6);  // the fork's EXCLUDE keeps them in
  EXPECT_EQ(counts.at(Component::LlmAttention).second, 72);
}

TEST_P(GeneratedModel, LayersScopeAndActionHead) {
  const auto path = testing::fixture(GetParam());
  testing::require_fixture(path);
  const auto model = load_model(path);
  const std::string q = "paligemma_with_expert.paligemma.model.language_model.layers.3.self_attn.q_proj";
  const std::string vision = "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1";
  // LAYERS ignores include/exclude (the vision fc1 is chosen although EXCLUDE matches it).
  auto decisions = select_linears(
      model, SelectionRules::from_config(config_with({{"OPENPI_DUQUANT_LAYERS", q + ", " + vision},
                                                      {"OPENPI_DUQUANT_EXCLUDE", kNoteExclude}})));
  std::vector<std::string> targets;
  for (const auto& d : decisions) {
    if (d.target) targets.push_back(d.path);
  }
  EXPECT_EQ(targets, (std::vector<std::string>{vision, q}));

  // SCOPE narrows to the expert.
  decisions = select_linears(model, SelectionRules::from_config(config_with(
                                        {{"OPENPI_DUQUANT_SCOPE", "paligemma_with_expert.gemma_expert."}})));
  int64_t count = 0;
  for (const auto& d : decisions) {
    count += d.target;
    if (d.path.rfind("paligemma_with_expert.gemma_expert.", 0) != 0) EXPECT_EQ(d.rule, Rule::OutsideScope);
  }
  EXPECT_EQ(count, 126);

  // action_out_proj needs INCLUDE_ACTION_HEAD=1.
  auto rules_for = [&](const std::string& flag) {
    return SelectionRules::from_config(config_with({{"OPENPI_DUQUANT_SCOPE", ""},
                                                    {"OPENPI_DUQUANT_INCLUDE", "action_out_proj"},
                                                    {"OPENPI_DUQUANT_INCLUDE_ACTION_HEAD", flag}}));
  };
  auto find = [](const std::vector<LinearDecision>& ds) {
    return *std::find_if(ds.begin(), ds.end(), [](const LinearDecision& d) { return d.path == "action_out_proj"; });
  };
  EXPECT_EQ(find(select_linears(model, rules_for("0"))).rule, Rule::ActionHead);
  EXPECT_TRUE(find(select_linears(model, rules_for("1"))).target);
}

TEST_P(GeneratedModel, BadSelectionsAreRefused) {
  const auto path = testing::fixture(GetParam());
  testing::require_fixture(path);
  const auto model = load_model(path);
  EXPECT_THROW(select_linears(model, SelectionRules::from_config(config_with({{"OPENPI_DUQUANT_SCOPE", "policy.dit."}}))),
               UserError);
  EXPECT_THROW(select_linears(model, SelectionRules::from_config(config_with({{"OPENPI_DUQUANT_LAYERS", "no.such.layer"}}))),
               UserError);
  // A LAYERS entry naming a non-Linear module (an RMSNorm).
  EXPECT_THROW(select_linears(model, SelectionRules::from_config(config_with(
                                         {{"OPENPI_DUQUANT_LAYERS",
                                           "paligemma_with_expert.paligemma.model.language_model.norm"}}))),
               UserError);
}

TEST_P(GeneratedModel, ScopeDetectionFindsTheGeneratorsPrefix) {
  const auto path = testing::fixture(GetParam());
  testing::require_fixture(path);
  Config config = config_with({});
  detect_scope(config, load_model(path));
  EXPECT_EQ(config.get("scope"), "paligemma_with_expert.");
  EXPECT_FALSE(config.is_default("scope"));
}

INSTANTIATE_TEST_SUITE_P(Pi0Variants, GeneratedModel,
                         ::testing::Values("pi0_tiny_script.pt", "pi0_tiny_trace.pt", "pi05_tiny_script.pt",
                                           "pi05_tiny_trace.pt"),
                         [](const auto& info) {
                           std::string name = info.param.substr(0, info.param.size() - 3);
                           std::replace(name.begin(), name.end(), '.', '_');
                           return name;
                         });

// A module tree with the given dotted paths (every module a plain container; detection reads
// paths only).
torch::jit::Module module_tree(const std::vector<std::string>& paths) {
  auto make = [] {
    return torch::jit::Module(c10::QualifiedName("__torch__.Container"), std::make_shared<torch::jit::CompilationUnit>());
  };
  torch::jit::Module root = make();
  for (const auto& path : paths) {
    torch::jit::Module parent = root;
    std::stringstream parts(path);
    std::string name;
    while (std::getline(parts, name, '.')) {
      if (!parent.hasattr(name)) parent.register_module(name, make());
      parent = parent.attr(name).toModule();
    }
  }
  return root;
}

TEST(DetectScope, FindsLerobotsModelPrefix) {
  Config config = config_with({});
  detect_scope(config, module_tree({"model.paligemma_with_expert.paligemma.model", "model.action_in_proj"}));
  EXPECT_EQ(config.get("scope"), "model.paligemma_with_expert.");
  const auto lines = config.describe();
  EXPECT_TRUE(std::any_of(lines.begin(), lines.end(), [](const std::string& line) {
    return std::regex_search(line, std::regex(R"(^  scope += model\.paligemma_with_expert\.  \(detected\)$)"));
  })) << lines.front();
}

TEST(DetectScope, ExplicitEnvironmentOrFlagWins) {
  const auto tree = module_tree({"model.paligemma_with_expert.gemma_expert"});
  Config from_environment = config_with({{"OPENPI_DUQUANT_SCOPE", "model.paligemma_with_expert.gemma_expert."}});
  detect_scope(from_environment, tree);
  EXPECT_EQ(from_environment.get("scope"), "model.paligemma_with_expert.gemma_expert.");
  Config from_flag = config_with({});
  from_flag.apply_flag("scope", "");
  detect_scope(from_flag, tree);
  EXPECT_EQ(from_flag.get("scope"), "");
}

TEST(DetectScope, TwoCandidatePrefixesAreAUsageError) {
  Config config = config_with({});
  try {
    detect_scope(config, module_tree({"policy.paligemma_with_expert.x", "ema.paligemma_with_expert.x"}));
    FAIL() << "no error";
  } catch (const UserError& error) {
    EXPECT_EQ(error.code(), ExitCode::Usage);
    const std::string message = error.what();
    EXPECT_NE(message.find("'ema.paligemma_with_expert.'"), std::string::npos) << message;
    EXPECT_NE(message.find("'policy.paligemma_with_expert.'"), std::string::npos) << message;
    EXPECT_NE(message.find("--scope"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos);
  }
}

TEST(DetectScope, WithoutTheAnchorTheDefaultStays) {
  Config config = config_with({});
  // "xpaligemma_with_expert" is not a whole path component.
  detect_scope(config, module_tree({"encoder.xpaligemma_with_expert.layer"}));
  EXPECT_EQ(config.get("scope"), Config::defaults().get("scope"));
  EXPECT_TRUE(config.is_default("scope"));
}

}  // namespace
}  // namespace duquant
