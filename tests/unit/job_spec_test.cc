#include "jobspec/job_spec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace lomo {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

// Every field set to something other than its default, except resources.device: its only other
// value (cuda) is refused until the CUDA backend exists.
constexpr const char* kFullYaml = R"(# a comment, as people write them
name: llama-7b-alpaca
priority: -3
model:
  path: /models/llama-7b
tokenizer:
  kind: auto
  path: /models/llama-7b/tokenizer.model
data:
  format: chat
  train:
    - data/a.jsonl
    - data/b.jsonl
  eval: data/eval.jsonl
  eval_format: multiple_choice
  max_length: 2048
  chat_template: llama-3
  train_on_prompt: true
  packing: true
  shuffle: false
  token_dtype: uint32
  on_bad_record: skip
optimizer:
  name: adalomo
  lr: 5.0e-4
  schedule: cosine
  warmup_steps: 0
  warmup_ratio: 0.03
  weight_decay: 0.01
  weight_decay_on_norms: true
  clip_grad_norm: 1.0
  clip_grad_value: 5
  stochastic_rounding: true
  beta1: 0.8
  beta2: 0.95
  eps: 1e-6
  adalomo:
    eps1: 1e-29
    eps2: 2e-3
    clip_threshold: 2.0
    decay_rate: -0.5
precision:
  dtype: bf16
  loss_scale:
    initial: 1024
    growth_interval: 500
    factor: 4
    min: 0.5
training:
  batch_size: 16
  epochs: 3
  gradient_accumulation_steps: 1
  activation_checkpointing: true
  seed: 18446744073709551615
  eval_every: 200
  eval_batches: 4
  checkpoint_every: 1000
  log_every: 5
output:
  dir: out/alpaca
resources:
  world_size: 1
  device: cpu
  max_restarts: 2
)";

// The same spec as the REST API sends it.
constexpr const char* kFullJson = R"({
  "name": "llama-7b-alpaca", "priority": -3,
  "model": {"path": "/models/llama-7b"},
  "tokenizer": {"kind": "auto", "path": "/models/llama-7b/tokenizer.model"},
  "data": {"format": "chat", "train": ["data/a.jsonl", "data/b.jsonl"],
           "eval": ["data/eval.jsonl"], "eval_format": "multiple_choice", "max_length": 2048,
           "chat_template": "llama-3", "train_on_prompt": true, "packing": true, "shuffle": false,
           "token_dtype": "uint32", "on_bad_record": "skip"},
  "optimizer": {"name": "adalomo", "lr": 5.0e-4, "schedule": "cosine", "warmup_steps": 0,
                "warmup_ratio": 0.03, "weight_decay": 0.01, "weight_decay_on_norms": true,
                "clip_grad_norm": 1.0, "clip_grad_value": 5, "stochastic_rounding": true,
                "beta1": 0.8, "beta2": 0.95, "eps": 1E-6,
                "adalomo": {"eps1": 1e-29, "eps2": 2e-3, "clip_threshold": 2.0,
                            "decay_rate": -0.5}},
  "precision": {"dtype": "bf16",
                "loss_scale": {"initial": 1024, "growth_interval": 500, "factor": 4, "min": 0.5}},
  "training": {"batch_size": 16, "epochs": 3, "steps": null, "gradient_accumulation_steps": 1,
	       "activation_checkpointing": true, "seed": 18446744073709551615,
	       "eval_every": 200, "eval_batches": 4, "checkpoint_every": 1000, "log_every": 5},
  "output": {"dir": "out/alpaca"},
  "resources": {"world_size": 1, "device": "cpu", "max_restarts": 2}
})";

// The smallest spec that runs: the three required things.
constexpr const char* kMinimalYaml = R"(model: {path: m}
data: {train: [a.txt]}
training: {steps: 10}
)";

JobSpec minimal_spec() {
  JobSpec spec;
  spec.model.path = "m";
  spec.data.train = {"a.txt"};
  spec.training.steps = 10;
  return spec;
}

// The minimal spec with some top-level sections replaced (or, with value "", removed).
std::string with_sections(const std::map<std::string, std::string>& sections) {
  std::map<std::string, std::string> all = {
      {"model", "{path: m}"}, {"data", "{train: [a.txt]}"}, {"training", "{steps: 10}"}};
  for (const auto& [key, value] : sections) all[key] = value;
  std::string text;
  for (const auto& [key, value] : all) {
    if (!value.empty()) text += key + ": " + value + "\n";
  }
  return text;
}

// The error that parsing `text` throws; fails the test when it parses.
JobSpecError parse_error(const std::string& text) {
  try {
    parse_job_spec(text, "job.yaml");
  } catch (const JobSpecError& error) {
    return error;
  }
  ADD_FAILURE() << "parsed without error:\n" << text;
  return JobSpecError("job.yaml", "", "(no error)");
}

JobSpecError override_error(JobSpec spec, const std::string& assignment) {
  try {
    apply_job_spec_override(spec, assignment);
  } catch (const JobSpecError& error) {
    return error;
  }
  ADD_FAILURE() << "override applied without error: " << assignment;
  return JobSpecError("override", "", "(no error)");
}

TEST(JobSpecTest, FullExampleParsesToEveryValue) {
  const JobSpec spec = parse_job_spec(kFullYaml, "full.yaml");
  EXPECT_EQ(spec.name, "llama-7b-alpaca");
  EXPECT_EQ(spec.priority, -3);
  EXPECT_EQ(spec.model.path, "/models/llama-7b");
  EXPECT_EQ(spec.tokenizer.kind, "auto");
  EXPECT_EQ(spec.tokenizer.path, "/models/llama-7b/tokenizer.model");
  EXPECT_EQ(spec.data.format, "chat");
  EXPECT_THAT(spec.data.train, ElementsAre("data/a.jsonl", "data/b.jsonl"));
  EXPECT_THAT(spec.data.eval, ElementsAre("data/eval.jsonl"));  // one string: a one-element list
  EXPECT_EQ(spec.data.eval_format, "multiple_choice");
  EXPECT_EQ(spec.data.max_length, 2048);
  EXPECT_EQ(spec.data.chat_template, "llama-3");
  EXPECT_TRUE(spec.data.train_on_prompt);
  EXPECT_TRUE(spec.data.packing);
  EXPECT_FALSE(spec.data.shuffle);
  EXPECT_EQ(spec.data.token_dtype, "uint32");
  EXPECT_EQ(spec.data.on_bad_record, "skip");
  const OptimizerSpec& o = spec.optimizer;
  EXPECT_EQ(o.name, "adalomo");
  // Decimal text parses to the nearest double, so exact equality with the same literal holds.
  EXPECT_EQ(o.lr, 5.0e-4);
  EXPECT_EQ(o.schedule, "cosine");
  EXPECT_EQ(o.warmup_steps, 0);
  EXPECT_EQ(o.warmup_ratio, 0.03);
  EXPECT_EQ(o.weight_decay, 0.01);
  EXPECT_TRUE(o.weight_decay_on_norms);
  EXPECT_EQ(o.clip_grad_norm, 1.0);
  EXPECT_EQ(o.clip_grad_value, 5.0);
  EXPECT_TRUE(o.stochastic_rounding);
  EXPECT_EQ(o.beta1, 0.8);
  EXPECT_EQ(o.beta2, 0.95);
  EXPECT_EQ(o.eps, 1e-6);
  EXPECT_EQ(o.adalomo.eps1, 1e-29);
  EXPECT_EQ(o.adalomo.eps2, 2e-3);
  EXPECT_EQ(o.adalomo.clip_threshold, 2.0);
  EXPECT_EQ(o.adalomo.decay_rate, -0.5);
  EXPECT_EQ(spec.precision.dtype, "bf16");
  EXPECT_EQ(spec.precision.loss_scale.initial, 1024.0);
  EXPECT_EQ(spec.precision.loss_scale.growth_interval, 500);
  EXPECT_EQ(spec.precision.loss_scale.factor, 4.0);
  EXPECT_EQ(spec.precision.loss_scale.min, 0.5);
  const TrainingSpec& t = spec.training;
  EXPECT_EQ(t.batch_size, 16);
  EXPECT_EQ(t.steps, std::nullopt);
  EXPECT_EQ(t.epochs, 3);
  EXPECT_EQ(t.gradient_accumulation_steps, 1);
  EXPECT_TRUE(t.activation_checkpointing);
  EXPECT_EQ(t.seed, std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(t.eval_every, 200);
  EXPECT_EQ(t.eval_batches, 4);
  EXPECT_EQ(t.checkpoint_every, 1000);
  EXPECT_EQ(t.log_every, 5);
  EXPECT_EQ(spec.output.dir, "out/alpaca");
  EXPECT_EQ(spec.resources.world_size, 1);
  EXPECT_EQ(spec.resources.device, "cpu");
  EXPECT_EQ(spec.resources.max_restarts, 2);
}

TEST(JobSpecTest, AbsentFieldsTakeTheDeclaredDefaults) {
  EXPECT_EQ(parse_job_spec(kMinimalYaml, "minimal.yaml"), minimal_spec());
  // Empty and null sections are the same as absent ones.
  EXPECT_EQ(parse_job_spec(std::string(kMinimalYaml) + "optimizer:\nprecision: ~\nresources: {}\n",
                           "minimal.yaml"),
            minimal_spec());
  const JobSpec spec = parse_job_spec(kMinimalYaml, "minimal.yaml");
  EXPECT_EQ(spec.optimizer.name, "lomo");
  EXPECT_EQ(spec.optimizer.clip_grad_norm, std::nullopt);
  EXPECT_EQ(spec.precision.loss_scale.initial, 65536.0);
  EXPECT_EQ(spec.training.gradient_accumulation_steps, 1);
  EXPECT_TRUE(spec.data.eval.empty());
  EXPECT_EQ(spec.data.format, "text");
  EXPECT_EQ(spec.data.eval_format, std::nullopt);
  EXPECT_EQ(spec.data.chat_template, std::nullopt);
  EXPECT_FALSE(spec.data.train_on_prompt);
  EXPECT_FALSE(spec.data.packing);
  EXPECT_TRUE(spec.data.shuffle);
  EXPECT_EQ(spec.data.token_dtype, "uint16");
  EXPECT_EQ(spec.data.on_bad_record, "fail");
  EXPECT_EQ(spec.resources.max_restarts, 3);
  EXPECT_EQ(spec.resources.collective_timeout_seconds, 600);
}

TEST(JobSpecTest, CollectiveTimeoutRoundTripsAndStaysWithinASecondAndADay) {
  const JobSpec spec = parse_job_spec(
      with_sections({{"resources", "{collective_timeout_seconds: 45}"}}), "job.yaml");
  EXPECT_EQ(spec.resources.collective_timeout_seconds, 45);
  EXPECT_THAT(job_spec_to_yaml(spec), HasSubstr("  collective_timeout_seconds: 45\n"));
  EXPECT_EQ(parse_job_spec(job_spec_to_yaml(spec), "canonical.yaml"), spec);
  EXPECT_THAT(parse_error(with_sections({{"resources", "{collective_timeout_seconds: 0}"}})).what(),
              HasSubstr("resources.collective_timeout_seconds: must be >= 1, got 0"));
  EXPECT_THAT(
      parse_error(with_sections({{"resources", "{collective_timeout_seconds: 86401}"}})).what(),
      HasSubstr("resources.collective_timeout_seconds: must be <= 86400 (a day), got 86401"));
}

// Every canonical spec stored before restarts existed says "retries: 0": such a job must still
// restore, and means what it did then (never restarted).
TEST(JobSpecTest, RetriesIsReadAsTheFormerNameOfMaxRestarts) {
  EXPECT_EQ(parse_job_spec(std::string(kMinimalYaml) + "resources: {retries: 0}\n", "old.yaml")
                .resources.max_restarts,
            0);
  EXPECT_EQ(parse_job_spec(std::string(kMinimalYaml) + "resources: {max_restarts: 7}\n", "new.yaml")
                .resources.max_restarts,
            7);
  const std::string canonical = job_spec_to_yaml(
      parse_job_spec(std::string(kMinimalYaml) + "resources: {retries: 2}\n", "old.yaml"));
  EXPECT_THAT(canonical, HasSubstr("  max_restarts: 2\n"));
  EXPECT_THAT(canonical, Not(HasSubstr("retries")));
}

TEST(JobSpecTest, JsonFormParsesLikeYaml) {
  EXPECT_EQ(parse_job_spec(kFullJson, "request body"), parse_job_spec(kFullYaml, "full.yaml"));
}

TEST(JobSpecTest, NullUnsetsOptionalFieldsAndEmptiesEvalData) {
  const JobSpec spec =
      parse_job_spec(with_sections({{"optimizer", "{clip_grad_norm: null, clip_grad_value: ~}"},
                                    {"data", "{train: a.txt, eval: null}"}}),
                     "job.yaml");
  EXPECT_EQ(spec.optimizer.clip_grad_norm, std::nullopt);
  EXPECT_EQ(spec.optimizer.clip_grad_value, std::nullopt);
  EXPECT_THAT(spec.data.train, ElementsAre("a.txt"));
  EXPECT_TRUE(spec.data.eval.empty());
}

TEST(JobSpecTest, AnyScalarIsAString) {
  // File and run names may look like numbers or booleans; quoted or not, they are strings.
  const JobSpec spec = parse_job_spec(
      with_sections(
          {{"name", "2024"}, {"model", "{path: true}"}, {"data", "{train: [1, '0.5', \"null\"]}"}}),
      "job.yaml");
  EXPECT_EQ(spec.name, "2024");
  EXPECT_EQ(spec.model.path, "true");
  EXPECT_THAT(spec.data.train, ElementsAre("1", "0.5", "null"));
}

TEST(JobSpecTest, NumbersAcceptEveryDecimalSpelling) {
  const JobSpec spec = parse_job_spec(
      with_sections({{"optimizer", "{lr: .5, eps: 1E-3, weight_decay: +0, beta1: 0., beta2: 5e-1}"},
                     {"priority", "+7"}}),
      "job.yaml");
  EXPECT_EQ(spec.optimizer.lr, 0.5);
  EXPECT_EQ(spec.optimizer.eps, 1e-3);
  EXPECT_EQ(spec.optimizer.weight_decay, 0.0);
  EXPECT_EQ(spec.optimizer.beta1, 0.0);
  EXPECT_EQ(spec.optimizer.beta2, 0.5);
  EXPECT_EQ(spec.priority, 7);
}

// training.eval_prompts: a list of non-empty prompts (at most 16), eval_max_new_tokens in
// [1, 4096]; a spec without them keeps its canonical text (no new keys).
TEST(JobSpecTest, EvalPromptsAreReadValidatedAndLeftOutWhenUnused) {
  const JobSpec spec = parse_job_spec(
      "model: {path: m}\ndata: {train: [t.txt]}\n"
      "training: {steps: 2, eval_prompts: [\"Once upon\", \"2 + 2 =\"], eval_max_new_tokens: 5}\n",
      "samples.yaml");
  EXPECT_EQ(spec.training.eval_prompts, (std::vector<std::string>{"Once upon", "2 + 2 ="}));
  EXPECT_EQ(spec.training.eval_max_new_tokens, 5);
  EXPECT_EQ(job_spec_to_yaml(minimal_spec()).find("eval_prompts"), std::string::npos);
  EXPECT_EQ(job_spec_to_yaml(minimal_spec()).find("eval_max_new_tokens"), std::string::npos);
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"eval_prompts: [a, \"\"]", "training.eval_prompts[1]"},
      {"eval_max_new_tokens: 0", "training.eval_max_new_tokens"},
      {"eval_max_new_tokens: 4097", "training.eval_max_new_tokens"},
      {"eval_prompts: [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q]", "at most 16 prompts"},
  };
  for (const auto& [line, message] : bad) {
    try {
      parse_job_spec(
          "model: {path: m}\ndata: {train: [t.txt]}\ntraining:\n  steps: 2\n  " + line + "\n",
          "bad.yaml");
      ADD_FAILURE() << line << " was accepted";
    } catch (const JobSpecError& e) {
      EXPECT_THAT(e.what(), HasSubstr(message)) << line;
    }
  }
}

TEST(JobSpecTest, RoundTripsThroughCanonicalYaml) {
  std::vector<JobSpec> specs = {minimal_spec(), parse_job_spec(kFullYaml, "full.yaml")};
  // Strings the emitter must quote to keep them strings, numbers that need every digit.
  JobSpec tricky = minimal_spec();
  tricky.name = "null";
  tricky.model.path = "a: b # not a comment";
  tricky.tokenizer.path = "";
  tricky.data.train = {"123",         "true",       "~",          "- x",
                       "[y]",         " padded ",   "tab\there",  "line\nbreak",
                       "caf\xc3\xa9", "\"quoted\"", "back\\slash"};
  tricky.data.eval = {"yes", "0x10", "1e3"};
  tricky.data.format = "chat";
  tricky.data.chat_template = "chatml";
  tricky.data.eval_format = "multiple_choice";
  tricky.tokenizer.kind = "auto";
  tricky.output.dir = "'single'";
  tricky.optimizer.lr = 0.1;
  tricky.optimizer.eps = 1.0 / 3.0;
  tricky.optimizer.adalomo.eps1 = 4.9e-324;  // the smallest subnormal
  tricky.optimizer.weight_decay = 1.7976931348623157e308;
  tricky.optimizer.clip_grad_value = 1e-300;
  tricky.priority = std::numeric_limits<int64_t>::min();
  tricky.training.steps = std::numeric_limits<int64_t>::max();
  tricky.training.seed = 0;
  tricky.training.eval_prompts = {"true", "line\nbreak", "- x"};
  tricky.training.eval_max_new_tokens = 7;
  specs.push_back(tricky);
  JobSpec only_tokens = minimal_spec();  // eval_max_new_tokens set without prompts
  only_tokens.training.eval_max_new_tokens = 9;
  specs.push_back(only_tokens);
  for (const JobSpec& spec : specs) {
    const std::string yaml = job_spec_to_yaml(spec);
    EXPECT_EQ(parse_job_spec(yaml, "canonical.yaml"), spec) << yaml;
    // Canonical: writing what was read gives the same text.
    EXPECT_EQ(job_spec_to_yaml(parse_job_spec(yaml, "canonical.yaml")), yaml);
  }
}

// The canonical JSON carries the same spec: every string stays a string, every number keeps all
// its digits (a seed of 2^64 - 1 included), and parsing it gives the spec back exactly.
TEST(JobSpecTest, RoundTripsThroughCanonicalJson) {
  JobSpec full = parse_job_spec(kFullYaml, "full.yaml");
  JobSpec tricky = minimal_spec();
  tricky.name = "123";
  tricky.model.path = "quote \" backslash \\ tab\t newline\n bell\x07 delete\x7f caf\xc3\xa9";
  tricky.data.train = {"true", "null", "1e3", "[x]"};
  tricky.tokenizer.path = "";
  tricky.optimizer.lr = 0.1;
  tricky.optimizer.adalomo.eps1 = 4.9e-324;
  tricky.optimizer.weight_decay = 1.7976931348623157e308;
  tricky.priority = std::numeric_limits<int64_t>::min();
  tricky.training.steps = std::numeric_limits<int64_t>::max();
  tricky.training.seed = std::numeric_limits<uint64_t>::max();
  for (const JobSpec& spec : {minimal_spec(), full, tricky}) {
    const std::string json = job_spec_to_json(spec);
    EXPECT_EQ(json.find('\n'), std::string::npos) << "one line: " << json;
    EXPECT_EQ(parse_job_spec(json, "canonical.json"), spec) << json;
  }
  EXPECT_THAT(job_spec_to_json(tricky),
              AllOf(HasSubstr("\"seed\":18446744073709551615"), HasSubstr("\"name\":\"123\""),
                    HasSubstr("\"priority\":-9223372036854775808")));
}

TEST(JobSpecTest, CanonicalYamlNamesEveryFieldAndNullForUnset) {
  const std::string yaml = job_spec_to_yaml(minimal_spec());
  for (const char* line :
       {"name: \"\"", "priority: 0", "  path: m", "  kind: bytes", "  train: [a.txt]", "  eval: []",
        "  max_length: 512", "  lr: 0.001", "  clip_grad_norm: null", "    eps1: 1e-30",
        "    decay_rate: -0.8", "    initial: 65536", "  steps: 10", "  epochs: null", "  seed: 1",
        "  dir: out/run", "  device: cpu", "  max_restarts: 3"}) {
    EXPECT_THAT(yaml, HasSubstr(std::string(line) + "\n"));
  }
  for (const char* line :
       {"  eval_format: null", "  chat_template: null", "  train_on_prompt: false",
        "  packing: false", "  shuffle: true", "  token_dtype: uint16", "  on_bad_record: fail"}) {
    EXPECT_THAT(yaml, HasSubstr(std::string(line) + "\n"));
  }
}

TEST(JobSpecTest, OverridesSetScalarsListsAndNull) {
  JobSpec spec = minimal_spec();
  apply_job_spec_override(spec, "optimizer.lr=3e-4");
  EXPECT_EQ(spec.optimizer.lr, 3e-4);
  apply_job_spec_override(spec, "data.train=[a.txt, b.txt]");
  EXPECT_THAT(spec.data.train, ElementsAre("a.txt", "b.txt"));
  apply_job_spec_override(spec, "data.eval=c.txt");
  EXPECT_THAT(spec.data.eval, ElementsAre("c.txt"));
  apply_job_spec_override(spec, "optimizer.clip_grad_norm=1.5");
  EXPECT_EQ(spec.optimizer.clip_grad_norm, 1.5);
  apply_job_spec_override(spec, "optimizer.clip_grad_norm=null");
  EXPECT_EQ(spec.optimizer.clip_grad_norm, std::nullopt);
  apply_job_spec_override(spec, "name=a=b");  // the first '=' separates
  EXPECT_EQ(spec.name, "a=b");
  apply_job_spec_override(spec, "optimizer.adalomo.decay_rate=-0.6");
  EXPECT_EQ(spec.optimizer.adalomo.decay_rate, -0.6);
  apply_job_spec_override(spec, "training.activation_checkpointing=true");
  EXPECT_TRUE(spec.training.activation_checkpointing);
}

TEST(JobSpecTest, OverridingASectionResetsItsUnnamedFields) {
  JobSpec spec = minimal_spec();
  spec.optimizer.adalomo.eps2 = 0.5;
  apply_job_spec_override(spec, "optimizer.adalomo={eps1: 1e-20}");
  EXPECT_EQ(spec.optimizer.adalomo.eps1, 1e-20);
  EXPECT_EQ(spec.optimizer.adalomo.eps2, AdaLomoSpec{}.eps2);
  // A later override may name a field of the replaced section.
  apply_job_spec_override(spec, "optimizer.adalomo.eps2=0.25");
  EXPECT_EQ(spec.optimizer.adalomo.eps2, 0.25);
}

TEST(JobSpecTest, OverridesAreValidatedTogether) {
  // steps -> epochs passes through "both" or "neither", each invalid on its own.
  JobSpec spec = minimal_spec();
  EXPECT_EQ(override_error(spec, "training.epochs=2").field(), "training.epochs");
  EXPECT_EQ(override_error(spec, "training.steps=null").field(), "training.steps");
  apply_job_spec_overrides(spec, {"training.steps=null", "training.epochs=2"});
  EXPECT_EQ(spec.training.steps, std::nullopt);
  EXPECT_EQ(spec.training.epochs, 2);
}

// lomo-worker train and lomoctl read JOB.yaml with its --set overrides in one call: the file is
// read, every override applied, and the whole validated once, so overrides that need each other
// pass in either order and the file need not be valid on its own.
TEST(JobSpecTest, FileOverridesThatDependOnEachOtherPassInEitherOrder) {
  const std::string text = with_sections({{"tokenizer", "{kind: auto}"}});
  const std::vector<std::string> chat = {"data.format=chat", "data.chat_template=llama-3"};
  for (const auto& overrides : {chat, std::vector<std::string>{chat[1], chat[0]}}) {
    const JobSpec spec = parse_job_spec(text, "job.yaml", overrides);
    EXPECT_EQ(spec.data.format, "chat");
    EXPECT_EQ(spec.data.chat_template, "llama-3");
  }
  // The template alone is invalid (format is not chat): the test above is not passing for
  // another reason. Format chat alone is valid: the template is then the model's own (auto).
  EXPECT_THROW(parse_job_spec(text, "job.yaml", {chat[1]}), JobSpecError);
  EXPECT_EQ(parse_job_spec(text, "job.yaml", {chat[0]}).data.chat_template, std::nullopt);
  EXPECT_EQ(
      parse_job_spec(text, "job.yaml", {chat[0], "data.chat_template=auto"}).data.chat_template,
      "auto");
  // A file without training.steps, completed by an override.
  const JobSpec completed =
      parse_job_spec(with_sections({{"training", ""}}), "job.yaml", {"training.steps=7"});
  EXPECT_EQ(completed.training.steps, 7);
}

TEST(JobSpecTest, FileOverrideProblemsNameTheOverrideOrTheFileLine) {
  try {
    parse_job_spec(std::string(kMinimalYaml) + "optimizer: {lr: 0}\n", "job.yaml",
                   {"training.batch_size=0", "optimizer.lr=0.5"});
    ADD_FAILURE() << "parsed an invalid spec";
  } catch (const JobSpecError& error) {
    ASSERT_EQ(error.problems().size(), 1u) << error.what();
    EXPECT_STREQ(error.what(),
                 "override \"training.batch_size=0\": training.batch_size: must be >= 1, got 0");
  }
  try {
    parse_job_spec(std::string(kMinimalYaml) + "optimizer: {lr: 0}\n", "job.yaml",
                   {"training.batch_size=2"});
    ADD_FAILURE() << "parsed an invalid spec";
  } catch (const JobSpecError& error) {
    EXPECT_STREQ(error.what(), "job.yaml: optimizer.lr: must be > 0, got 0 (line 4)");
  }
}

TEST(JobSpecTest, EveryValueProblemIsReportedWithItsPath) {
  try {
    parse_job_spec(with_sections({{"optimizer", "{lr: -1, beta1: 2}"},
                                  {"training", "{steps: 0, batch_size: 0}"},
                                  {"resources", "{device: tpu, world_size: 2}"}}),
                   "job.yaml");
    ADD_FAILURE() << "parsed an invalid spec";
  } catch (const JobSpecError& error) {
    std::vector<std::string> fields;
    for (const JobSpecProblem& p : error.problems()) fields.push_back(p.field);
    EXPECT_THAT(fields, ElementsAre("optimizer.lr", "optimizer.beta1", "training.batch_size",
                                    "training.steps", "resources.device"));
    EXPECT_EQ(error.field(), "optimizer.lr");
    // One line per problem, each as a single error would read.
    EXPECT_THAT(error.what(), StartsWith("job.yaml: optimizer.lr: must be > 0, got -1 (line "));
    EXPECT_THAT(error.what(), HasSubstr("\njob.yaml: training.steps: must be >= 1, got 0"));
    EXPECT_THAT(error.what(),
                HasSubstr("\njob.yaml: resources.device: must be one of cpu, cuda; got \"tpu\""));
  }
}

TEST(JobSpecTest, AWorldSizeThatDividesTheGlobalBatchIsAccepted) {
  // The spec allows any world size >= 1 that divides batch_size (lomo-worker train --nproc runs
  // it on one host; the coordinator refuses world_size > 1 at submission on its own).
  const JobSpec spec = parse_job_spec(
      with_sections({{"training", "{steps: 10, batch_size: 8}"}, {"resources", "{world_size: 4}"}}),
      "job.yaml");
  EXPECT_EQ(spec.resources.world_size, 4);
}

TEST(JobSpecTest, AWorldSizeBelowOneIsRefused) {
  try {
    parse_job_spec(with_sections({{"resources", "{world_size: 0}"}}), "job.yaml");
    ADD_FAILURE() << "parsed a spec with world_size 0";
  } catch (const JobSpecError& error) {
    EXPECT_EQ(error.field(), "resources.world_size");
  }
}

TEST(JobSpecTest, EveryTypeProblemIsReportedBeforeAnyValueRule) {
  try {
    // Two fields of the wrong type, an unknown key, and a value rule broken (lr): the value rule
    // is not checked while fields do not read, since its verdict could rest on a default.
    parse_job_spec(with_sections({{"optimizer", "{lr: -1, beta1: high}"},
                                  {"training", "{steps: ten, stepz: 3}"},
                                  {"data", "{train: [a.txt, [b.txt]]}"}}),
                   "job.yaml");
    ADD_FAILURE() << "parsed an invalid spec";
  } catch (const JobSpecError& error) {
    std::vector<std::string> fields;
    for (const JobSpecProblem& p : error.problems()) fields.push_back(p.field);
    EXPECT_THAT(fields, ElementsAre("data.train[1]", "optimizer.beta1", "training.stepz",
                                    "training.steps"));
  }
}

TEST(JobSpecTest, MatmulPrecisionDefaultsToAutoAndRoundTrips) {
  EXPECT_EQ(minimal_spec().precision.matmul, "auto");
  const JobSpec spec = parse_job_spec(with_sections({{"precision", "{matmul: bf16}"}}), "job.yaml");
  EXPECT_EQ(spec.precision.matmul, "bf16");
  EXPECT_THAT(job_spec_to_yaml(spec), HasSubstr("  matmul: bf16\n"));
  EXPECT_EQ(parse_job_spec(job_spec_to_yaml(spec), "canonical.yaml"), spec);
}

TEST(JobSpecTest, ACudaJobOfOneRankIsAccepted) {
  const JobSpec spec = parse_job_spec(with_sections({{"resources", "{device: cuda}"}}), "job.yaml");
  EXPECT_EQ(spec.resources.device, "cuda");
}

// A GPU gang: each rank on a GPU of its own, gradients over NCCL (worker/worker_main.cc).
TEST(JobSpecTest, ACudaGangIsAccepted) {
  const JobSpec spec =
      parse_job_spec(with_sections({{"training", "{steps: 10, batch_size: 8}"},
                                    {"resources", "{device: cuda, world_size: 2}"}}),
                     "job.yaml");
  EXPECT_EQ(spec.resources.device, "cuda");
  EXPECT_EQ(spec.resources.world_size, 2);
}

TEST(JobSpecTest, RejectedOverrideLeavesTheSpecUnchanged) {
  JobSpec spec = minimal_spec();
  const JobSpecError error = override_error(spec, "optimizer.lr=-1");
  EXPECT_EQ(error.field(), "optimizer.lr");
  EXPECT_THAT(error.what(), StartsWith("override \"optimizer.lr=-1\": optimizer.lr: must be > 0"));
  EXPECT_THROW(apply_job_spec_overrides(spec, {"optimizer.lr=0.5", "optimizer.lr=-1"}),
               JobSpecError);
  EXPECT_EQ(spec, minimal_spec());
}

TEST(JobSpecTest, OverrideRejectsUnknownPathsAndBadValues) {
  const JobSpec spec = minimal_spec();
  JobSpecError error = override_error(spec, "optimizer.lrr=1");
  EXPECT_EQ(error.field(), "optimizer.lrr");
  EXPECT_THAT(error.what(), HasSubstr("unknown key (known: name, lr, schedule,"));
  EXPECT_EQ(override_error(spec, "optimiser.lr=1").field(), "optimiser");
  EXPECT_EQ(override_error(spec, "optimizer.lr.value=1").field(), "optimizer.lr.value");
  EXPECT_EQ(override_error(spec, "optimizer..lr=1").field(), "optimizer.");
  EXPECT_THAT(override_error(spec, "optimizer.lr").what(), HasSubstr("expected FIELD=VALUE"));
  EXPECT_THAT(override_error(spec, "=1").what(), HasSubstr("expected FIELD=VALUE"));
  EXPECT_THAT(override_error(spec, "optimizer.lr='3e-4'").what(),
              HasSubstr("optimizer.lr: expected a number, got the string \"3e-4\""));
  EXPECT_THAT(override_error(spec, "optimizer.lr=").what(),
              HasSubstr("optimizer.lr: expected a number, got null"));
  EXPECT_THAT(override_error(spec, "data.train=[a.txt").what(), HasSubstr("invalid YAML"));
  EXPECT_THAT(override_error(spec, "optimizer={lrr: 1}").what(),
              HasSubstr("optimizer.lrr: unknown key"));
}

TEST(JobSpecTest, ExampleFilesParse) {
  const fs::path examples = fs::path(LOMO_SOURCE_DIR) / "examples";
  const JobSpec lomo = load_job_spec((examples / "tiny-lomo.yaml").string());
  EXPECT_EQ(lomo.optimizer.name, "lomo");
  EXPECT_EQ(lomo.model.path, "out/tiny-llama");
  EXPECT_EQ(lomo.training.steps, 150);
  const JobSpec adalomo = load_job_spec((examples / "tiny-adalomo.yaml").string());
  EXPECT_EQ(adalomo.optimizer.name, "adalomo");
  // Every path the examples read exists in the repository (the model is made by run_local.sh).
  for (const JobSpec* spec : {&lomo, &adalomo}) {
    for (const auto* list : {&spec->data.train, &spec->data.eval}) {
      for (const std::string& path : *list) {
        EXPECT_TRUE(fs::exists(fs::path(LOMO_SOURCE_DIR) / path)) << path;
      }
    }
  }
}

TEST(JobSpecTest, EveryExampleParsesAndNamesDataThatExists) {
  int examples = 0;
  for (const auto& entry : fs::directory_iterator(fs::path(LOMO_SOURCE_DIR) / "examples")) {
    if (entry.path().extension() != ".yaml") continue;
    ++examples;
    const JobSpec spec = load_job_spec(entry.path().string());
    for (const auto* list : {&spec.data.train, &spec.data.eval}) {
      for (const std::string& path : *list) {
        EXPECT_TRUE(fs::exists(fs::path(LOMO_SOURCE_DIR) / path)) << entry.path() << ": " << path;
      }
    }
  }
  EXPECT_GE(examples, 4);
}

TEST(JobSpecTest, LoadNamesTheFileInErrors) {
  const fs::path dir = fs::temp_directory_path() / ("lomo_job_spec_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const fs::path file = dir / "job.yaml";
  std::ofstream(file) << kMinimalYaml << "optimizer: {lr: 0}\n";
  try {
    load_job_spec(file.string());
    ADD_FAILURE() << "loaded an invalid spec";
  } catch (const JobSpecError& error) {
    EXPECT_THAT(error.what(), StartsWith(file.string() + ": optimizer.lr: must be > 0, got 0"));
    EXPECT_THAT(error.what(), HasSubstr("(line 4)"));
  }
  std::ofstream(file) << kMinimalYaml;
  EXPECT_EQ(load_job_spec(file.string()), minimal_spec());
  const std::string missing = (dir / "missing.yaml").string();
  EXPECT_THROW(
      {
        try {
          load_job_spec(missing);
        } catch (const JobSpecError& error) {
          EXPECT_THAT(error.what(), AllOf(StartsWith(missing + ": "), HasSubstr("cannot open")));
          throw;
        }
      },
      JobSpecError);
  EXPECT_THROW(load_job_spec(dir.string()), JobSpecError);
  fs::remove_all(dir);
}

TEST(JobSpecTest, SyntaxErrorsNameTheLine) {
  const JobSpecError error = parse_error("model:\n  path: m\ndata: {train: [a.txt}\n");
  EXPECT_EQ(error.field(), "");
  EXPECT_THAT(error.what(), AllOf(StartsWith("job.yaml: line "), HasSubstr("invalid YAML")));
}

TEST(JobSpecTest, DeepNestingIsRejectedNotACrash) {
  EXPECT_THAT(parse_error(std::string(100000, '[')).what(), StartsWith("job.yaml: "));
  EXPECT_THAT(parse_error("data: " + std::string(100000, '{')).what(), StartsWith("job.yaml: "));
  std::string nested;
  for (int i = 0; i < 3000; ++i) nested += "[";
  for (int i = 0; i < 3000; ++i) nested += "]";
  EXPECT_THAT(parse_error("model: " + nested).what(), HasSubstr("nested too deeply"));
}

TEST(JobSpecTest, MessagesPointAtTheLine) {
  const JobSpecError error =
      parse_error(std::string(kMinimalYaml) + "optimizer:\n  name: lomo\n  lr: -1\n");
  EXPECT_STREQ(error.what(), "job.yaml: optimizer.lr: must be > 0, got -1 (line 6)");
}

// ---------------------------------------------------------------------------------------------
// Every rejection rule: the error names the field (field() and what()) and says what is wrong.

struct Rejection {
  const char* test_name;
  std::string text;
  std::string field;
  std::string message;  // a part of what()
};

void PrintTo(const Rejection& r, std::ostream* os) { *os << r.field; }

class JobSpecRejectionTest : public ::testing::TestWithParam<Rejection> {};

TEST_P(JobSpecRejectionTest, NamesTheField) {
  const Rejection& c = GetParam();
  const JobSpecError error = parse_error(c.text);
  EXPECT_EQ(error.field(), c.field) << error.what();
  EXPECT_THAT(error.what(),
              AllOf(StartsWith("job.yaml: " + c.field + (c.field.empty() ? "" : ": ")),
                    HasSubstr(c.message)));
}

std::string s(const std::map<std::string, std::string>& sections) {
  return with_sections(sections);
}

const Rejection kRejections[] = {
    // Shape: unknown, duplicate and non-string keys; wrong node kinds; syntax.
    {"UnknownTopLevelKey", s({{"lr", "1"}}), "lr",
     "unknown key (known: name, priority, model, tokenizer, data, optimizer, precision, training, "
     "output, resources)"},
    {"UnknownOptimizerKey", s({{"optimizer", "{lrr: 1}"}}), "optimizer.lrr",
     "unknown key (known: name, lr, schedule, warmup_steps,"},
    {"UnknownAdaLomoKey", s({{"optimizer", "{adalomo: {eps3: 1}}"}}), "optimizer.adalomo.eps3",
     "unknown key (known: eps1, eps2, clip_threshold, decay_rate)"},
    {"UnknownLossScaleKey", s({{"precision", "{loss_scale: {init: 1}}"}}),
     "precision.loss_scale.init", "unknown key"},
    {"UnknownResourcesKey", s({{"resources", "{gpus: 8}"}}), "resources.gpus", "unknown key"},
    {"DuplicateKey", s({{"optimizer", "{lr: 1, lr: 2}"}}), "optimizer.lr", "duplicate key"},
    {"NonStringKey", s({{"optimizer", "{[1]: 2}"}}), "optimizer", "keys must be strings"},
    {"TopLevelList", "[1, 2]", "", "expected a map of sections"},
    {"TopLevelScalar", "hello", "", "expected a map of sections"},
    {"SectionIsAList", s({{"optimizer", "[lomo]"}}), "optimizer", "expected a map"},
    {"SectionIsAScalar", s({{"model", "out/tiny"}}), "model", "expected a map"},
    {"SyntaxError", "model: {path: m\n", "", "invalid YAML"},
    // yaml-cpp 0.7 alone loops forever on these (jbeder/yaml-cpp#1040).
    {"StrayComma", ",", "", "invalid YAML"},
    {"StrayCommaAfterADocument", std::string(kMinimalYaml) + "---\n,o\n", "", "invalid YAML"},
    {"TwoDocuments", std::string(kMinimalYaml) + "---\n" + kMinimalYaml, "",
     "expected one YAML document, found 2"},
    {"InvalidUtf8", s({{"name", "\"caf\\xe9\" "}, {"model", "{path: \xff}"}}), "model.path",
     "not valid UTF-8"},
    {"NulCharacter", s({{"model", "{path: \"a\\0b\"}"}}), "model.path", "NUL"},
    // Types: a string where a number belongs, a list where a map belongs, a float for an integer.
    {"NumberIsAString", s({{"optimizer", "{lr: fast}"}}), "optimizer.lr",
     "expected a number, got fast"},
    {"NumberIsQuoted", s({{"optimizer", "{lr: \"3e-4\"}"}}), "optimizer.lr",
     "expected a number, got the string \"3e-4\""},
    {"NumberIsAList", s({{"optimizer", "{lr: [1]}"}}), "optimizer.lr", "got a list"},
    {"NumberIsNull", s({{"optimizer", "{lr: null}"}}), "optimizer.lr", "got null"},
    {"NumberIsHuge", s({{"optimizer", "{lr: 1e999}"}}), "optimizer.lr", "out of the double"},
    {"IntegerIsAFloat", s({{"training", "{steps: 1.5}"}}), "training.steps",
     "expected an integer, got 1.5"},
    {"IntegerIsHuge", s({{"priority", "9223372036854775808"}}), "priority", "out of the 64-bit"},
    {"IntegerIsHex", s({{"priority", "0x10"}}), "priority", "expected an integer"},
    {"PriorityIsAFloat", s({{"priority", "1.5"}}), "priority", "expected an integer"},
    {"BoolIsYes", s({{"optimizer", "{weight_decay_on_norms: yes}"}}),
     "optimizer.weight_decay_on_norms", "expected true or false, got yes"},
    {"BoolIsANumber", s({{"training", "{steps: 1, activation_checkpointing: 1}"}}),
     "training.activation_checkpointing", "expected true or false"},
    {"StringIsAList", s({{"name", "[a]"}}), "name", "expected a string, got a list"},
    {"StringIsNull", s({{"tokenizer", "{path: }"}}), "tokenizer.path", "got null"},
    {"SeedIsNegative", s({{"training", "{steps: 1, seed: -1}"}}), "training.seed",
     "expected a non-negative integer"},
    {"SeedIsHuge", s({{"training", "{steps: 1, seed: 18446744073709551616}"}}), "training.seed",
     "out of range"},
    // model, tokenizer, data.
    {"ModelMissing", s({{"model", ""}}), "model.path", "required"},
    {"ModelPathEmpty", s({{"model", "{path: ''}"}}), "model.path", "required"},
    {"TokenizerKindUnknown", s({{"tokenizer", "{kind: sentencepiece}"}}), "tokenizer.kind",
     "must be one of bytes, auto; got \"sentencepiece\""},
    {"DataFormatUnknown", s({{"data", "{format: jsonl, train: [a.txt]}"}}), "data.format",
     "must be one of text, jsonl_text, alpaca, prompt_completion, chat, tokens; got \"jsonl\""},
    {"DataFormatEvalOnly", s({{"data", "{format: multiple_choice, train: [a.jsonl]}"}}),
     "data.format", "multiple_choice is an evaluation format"},
    {"DataEvalFormatUnknown", s({{"data", "{train: [a.txt], eval_format: choices}"}}),
     "data.eval_format", "must be one of text, jsonl_text"},
    {"DataChatTemplateUnknown",
     s({{"data", "{format: chat, chat_template: vicuna, train: [a.jsonl]}"}}), "data.chat_template",
     "must be one of auto, llama-2, llama-3, chatml; got \"vicuna\""},
    {"DataChatTemplateWithoutChat",
     s({{"data", "{format: alpaca, chat_template: chatml, train: [a.jsonl]}"}}),
     "data.chat_template", "only used with data.format (or data.eval_format) chat"},
    {"DataChatTemplateIsNotAString",
     s({{"data", "{format: chat, chat_template: [chatml], train: [a.jsonl]}"}}),
     "data.chat_template", "expected a string, got a list"},
    {"DataChatWithBytes", s({{"data", "{format: chat, chat_template: chatml, train: [a.jsonl]}"}}),
     "tokenizer.kind", "bytes has no special tokens"},
    {"DataTrainOnPromptWithoutPrompt",
     s({{"data", "{format: jsonl_text, train_on_prompt: true, train: [a.jsonl]}"}}),
     "data.train_on_prompt", "only used with formats alpaca, prompt_completion and chat"},
    {"DataPackingOfAStream", s({{"data", "{format: tokens, packing: true, train: [a.bin]}"}}),
     "data.packing", "already fills every row"},
    {"DataPackingIsNotABool", s({{"data", "{format: alpaca, packing: 1, train: [a.jsonl]}"}}),
     "data.packing", "expected true or false"},
    {"DataTokenDtypeUnknown", s({{"data", "{format: tokens, token_dtype: int32, train: [a]}"}}),
     "data.token_dtype", "must be one of uint16, uint32; got \"int32\""},
    {"DataOnBadRecordUnknown", s({{"data", "{on_bad_record: ignore, train: [a]}"}}),
     "data.on_bad_record", "must be one of fail, skip; got \"ignore\""},
    {"DataTrainMissing", s({{"data", "{eval: [b.txt]}"}}), "data.train", "required"},
    {"DataMissing", s({{"data", ""}}), "data.train", "required"},
    {"DataTrainEmptyList", s({{"data", "{train: []}"}}), "data.train", "required"},
    {"DataTrainIsAMap", s({{"data", "{train: {a: b}}"}}), "data.train",
     "expected a list of strings, got a map"},
    {"DataTrainElementIsAList", s({{"data", "{train: [a.txt, [b.txt]]}"}}), "data.train[1]",
     "expected a string"},
    {"DataTrainElementEmpty", s({{"data", "{train: [a.txt, '']}"}}), "data.train[1]",
     "non-empty path"},
    {"DataEvalElementEmpty", s({{"data", "{train: [a.txt], eval: ['']}"}}), "data.eval[0]",
     "non-empty path"},
    {"MaxLengthOne", s({{"data", "{train: [a.txt], max_length: 1}"}}), "data.max_length",
     "must be >= 2, got 1"},
    // optimizer.
    {"OptimizerNameUnknown", s({{"optimizer", "{name: adam}"}}), "optimizer.name",
     "must be one of lomo, adalomo, sgd, adamw"},
    {"LrZero", s({{"optimizer", "{lr: 0}"}}), "optimizer.lr", "must be > 0, got 0"},
    {"LrNegative", s({{"optimizer", "{lr: -1e-3}"}}), "optimizer.lr", "must be > 0, got -0.001"},
    {"LrInfinite", s({{"optimizer", "{lr: .inf}"}}), "optimizer.lr", "must be a finite number"},
    {"LrNaN", s({{"optimizer", "{lr: .nan}"}}), "optimizer.lr", "must be a finite number"},
    {"ScheduleUnknown", s({{"optimizer", "{schedule: step}"}}), "optimizer.schedule",
     "must be one of constant, linear, cosine"},
    {"WarmupStepsNegative", s({{"optimizer", "{warmup_steps: -1}"}}), "optimizer.warmup_steps",
     "must be >= 0"},
    {"WarmupRatioOne", s({{"optimizer", "{warmup_ratio: 1}"}}), "optimizer.warmup_ratio",
     "must be in [0, 1)"},
    {"WarmupRatioNegative", s({{"optimizer", "{warmup_ratio: -0.1}"}}), "optimizer.warmup_ratio",
     "must be in [0, 1)"},
    {"WarmupBoth", s({{"optimizer", "{warmup_steps: 10, warmup_ratio: 0.1}"}}),
     "optimizer.warmup_ratio", "set only one of optimizer.warmup_steps and optimizer.warmup_ratio"},
    {"WeightDecayNegative", s({{"optimizer", "{weight_decay: -0.01}"}}), "optimizer.weight_decay",
     "must be >= 0"},
    {"ClipGradNormZero", s({{"optimizer", "{clip_grad_norm: 0}"}}), "optimizer.clip_grad_norm",
     "must be > 0"},
    {"ClipGradValueNegative", s({{"optimizer", "{clip_grad_value: -1}"}}),
     "optimizer.clip_grad_value", "must be > 0"},
    {"StochasticRoundingWithoutBf16", s({{"optimizer", "{stochastic_rounding: true}"}}),
     "optimizer.stochastic_rounding", "needs precision.dtype bf16"},
    {"StochasticRoundingWithFp16",
     s({{"optimizer", "{stochastic_rounding: true}"}, {"precision", "{dtype: fp16}"}}),
     "optimizer.stochastic_rounding", "not \"fp16\""},
    {"Beta1One", s({{"optimizer", "{beta1: 1}"}}), "optimizer.beta1", "must be in [0, 1)"},
    {"Beta2Negative", s({{"optimizer", "{beta2: -0.5}"}}), "optimizer.beta2", "must be in [0, 1)"},
    {"EpsZero", s({{"optimizer", "{eps: 0}"}}), "optimizer.eps", "must be > 0"},
    {"AdaLomoEps1Zero", s({{"optimizer", "{adalomo: {eps1: 0}}"}}), "optimizer.adalomo.eps1",
     "must be > 0"},
    {"AdaLomoEps2Negative", s({{"optimizer", "{adalomo: {eps2: -1e-3}}"}}),
     "optimizer.adalomo.eps2", "must be > 0"},
    {"AdaLomoClipThresholdZero", s({{"optimizer", "{adalomo: {clip_threshold: 0}}"}}),
     "optimizer.adalomo.clip_threshold", "must be > 0"},
    {"AdaLomoDecayRateZero", s({{"optimizer", "{adalomo: {decay_rate: 0}}"}}),
     "optimizer.adalomo.decay_rate", "must be < 0, got 0"},
    {"AdaLomoDecayRatePositive", s({{"optimizer", "{adalomo: {decay_rate: 0.8}}"}}),
     "optimizer.adalomo.decay_rate", "must be < 0"},
    // precision.
    {"DtypeUnknown", s({{"precision", "{dtype: fp8}"}}), "precision.dtype",
     "must be one of fp32, bf16, fp16"},
    {"MatmulUnknown", s({{"precision", "{matmul: tf32}"}}), "precision.matmul",
     "must be one of auto, fp32, bf16; got \"tf32\""},
    {"LossScaleInitialZero", s({{"precision", "{loss_scale: {initial: 0}}"}}),
     "precision.loss_scale.initial", "must be > 0"},
    {"LossScaleGrowthIntervalZero", s({{"precision", "{loss_scale: {growth_interval: 0}}"}}),
     "precision.loss_scale.growth_interval", "must be >= 1"},
    {"LossScaleFactorOne", s({{"precision", "{loss_scale: {factor: 1}}"}}),
     "precision.loss_scale.factor", "must be > 1"},
    {"LossScaleMinZero", s({{"precision", "{loss_scale: {min: 0}}"}}), "precision.loss_scale.min",
     "must be > 0"},
    {"LossScaleMinAboveInitial", s({{"precision", "{loss_scale: {initial: 8, min: 16}}"}}),
     "precision.loss_scale.min", "must be <= precision.loss_scale.initial (8), got 16"},
    // training.
    {"BatchSizeZero", s({{"training", "{steps: 1, batch_size: 0}"}}), "training.batch_size",
     "must be >= 1"},
    {"NeitherStepsNorEpochs", s({{"training", "{batch_size: 4}"}}), "training.steps",
     "required: set training.steps or training.epochs"},
    {"TrainingMissing", s({{"training", ""}}), "training.steps", "required"},
    {"BothStepsAndEpochs", s({{"training", "{steps: 10, epochs: 1}"}}), "training.epochs",
     "set only one of training.steps and training.epochs"},
    {"StepsZero", s({{"training", "{steps: 0}"}}), "training.steps", "must be >= 1"},
    {"EpochsNegative", s({{"training", "{epochs: -1}"}}), "training.epochs", "must be >= 1"},
    {"StepsQuoted", s({{"training", "{steps: '10'}"}}), "training.steps",
     "expected an integer, got the string \"10\""},
    {"GradientAccumulation", s({{"training", "{steps: 10, gradient_accumulation_steps: 4}"}}),
     "training.gradient_accumulation_steps",
     "must be 1, got 4: fused optimizers (LOMO, AdaLomo) update each parameter during backward, "
     "so gradients of several micro-batches cannot be summed before the update; increase "
     "training.batch_size instead"},
    {"GradientAccumulationWithSgd",
     s({{"optimizer", "{name: sgd}"}, {"training", "{steps: 10, gradient_accumulation_steps: 2}"}}),
     "training.gradient_accumulation_steps", "same with each"},
    {"GradientAccumulationZero", s({{"training", "{steps: 10, gradient_accumulation_steps: 0}"}}),
     "training.gradient_accumulation_steps", "must be 1, got 0"},
    {"EvalEveryNegative", s({{"training", "{steps: 10, eval_every: -1}"}}), "training.eval_every",
     "must be >= 0"},
    {"EvalBatchesZero", s({{"training", "{steps: 10, eval_batches: 0}"}}), "training.eval_batches",
     "must be >= 1"},
    {"CheckpointEveryNegative", s({{"training", "{steps: 10, checkpoint_every: -5}"}}),
     "training.checkpoint_every", "must be >= 0"},
    {"LogEveryZero", s({{"training", "{steps: 10, log_every: 0}"}}), "training.log_every",
     "must be >= 1"},
    // output, resources.
    {"OutputDirEmpty", s({{"output", "{dir: \"\"}"}}), "output.dir", "non-empty"},
    {"WorldSizeZero", s({{"resources", "{world_size: 0}"}}), "resources.world_size",
     "must be >= 1, got 0"},
    {"BatchSizeNotDivisibleByWorldSize",
     s({{"training", "{steps: 10, batch_size: 6}"}, {"resources", "{world_size: 4}"}}),
     "training.batch_size",
     "must be divisible by resources.world_size (4), got 6: training.batch_size is the global "
     "batch"},
    {"PackingWithSeveralRanks",
     s({{"data", "{format: alpaca, train: [a.jsonl], packing: true}"},
        {"resources", "{world_size: 2}"}}),
     "data.packing", "not available with resources.world_size > 1 yet"},
    {"DeviceUnknown", s({{"resources", "{device: tpu}"}}), "resources.device",
     "must be one of cpu, cuda; got \"tpu\""},
    {"MaxRestartsNegative", s({{"resources", "{max_restarts: -1}"}}), "resources.max_restarts",
     "must be >= 0"},
    {"MaxRestartsNotAnInteger", s({{"resources", "{max_restarts: 1.5}"}}), "resources.max_restarts",
     "expected an integer"},
    {"RetriesAndMaxRestartsTogether", s({{"resources", "{retries: 1, max_restarts: 2}"}}),
     "resources.retries", "renamed to resources.max_restarts; give only max_restarts"},
};

INSTANTIATE_TEST_SUITE_P(EveryRule, JobSpecRejectionTest, ::testing::ValuesIn(kRejections),
                         [](const ::testing::TestParamInfo<Rejection>& info) {
                           return std::string(info.param.test_name);
                         });

}  // namespace
}  // namespace lomo
