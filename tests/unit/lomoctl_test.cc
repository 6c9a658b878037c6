// lomoctl's pieces (client/): where the coordinator's address comes from, how errors read, the
// spec as a Struct, argument parsing, and what the progress display shows.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "apiclient/lomo_client.h"
#include "client/commands.h"
#include "client/config.h"
#include "client/eta.h"
#include "client/help.h"
#include "client/local_mode.h"
#include "client/render.h"
#include "jobspec/job_spec.h"
#include "jobspec/proto/spec_proto.h"

namespace lomo::client {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct TempDir {
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lomoctl-test-XXXXXX").string();
    path = ::mkdtemp(pattern.data());
  }
  ~TempDir() { fs::remove_all(path); }
  fs::path path;
};

TEST(LomoctlConfigTest, FlagBeatsEnvironmentBeatsFileBeatsDefault) {
  TempDir dir;
  const fs::path file = dir.path / "lomoctl.yaml";
  EXPECT_EQ(resolve_config(std::nullopt, nullptr, file).coordinator, "127.0.0.1:7070");
  std::ofstream(file) << "coordinator: file-host:1\ntimeout_seconds: 2.5\n";
  const LomoctlConfig from_file = resolve_config(std::nullopt, nullptr, file);
  EXPECT_EQ(from_file.coordinator, "file-host:1");
  EXPECT_EQ(from_file.coordinator_source, file.string());
  EXPECT_DOUBLE_EQ(from_file.timeout_seconds, 2.5);
  EXPECT_EQ(resolve_config(std::nullopt, "env-host:2", file).coordinator, "env-host:2");
  EXPECT_EQ(resolve_config(std::nullopt, "", file).coordinator, "file-host:1");
  EXPECT_EQ(resolve_config("flag-host:3", "env-host:2", file).coordinator, "flag-host:3");
}

TEST(LomoctlConfigTest, AnUnknownKeyIsRejectedNamingTheFile) {
  TempDir dir;
  const fs::path file = dir.path / "lomoctl.yaml";
  std::ofstream(file) << "coordinater: typo:1\n";
  try {
    resolve_config(std::nullopt, nullptr, file);
    FAIL() << "no exception";
  } catch (const ConfigError& e) {
    EXPECT_THAT(e.what(), HasSubstr(file.string()));
    EXPECT_THAT(e.what(), HasSubstr("coordinater: unknown key"));
  }
}

TEST(LomoctlErrorsTest, AnUnreachableCoordinatorGetsTheHint) {
  const grpc::Status refused(grpc::StatusCode::UNAVAILABLE,
                             "failed to connect to all addresses; last error: UNKNOWN: "
                             "ipv4:127.0.0.1:7070: Failed to connect to remote host: Connection "
                             "refused");
  EXPECT_EQ(describe_status(refused, "127.0.0.1:7070"),
            "cannot reach the coordinator at 127.0.0.1:7070 (connection refused); is "
            "lomo-coordinator running? set --coordinator or LOMO_COORDINATOR");
  const grpc::Status rejected(grpc::StatusCode::INVALID_ARGUMENT,
                              "job spec: optimizer.lr: must be > 0, got -1");
  EXPECT_EQ(describe_status(rejected, "x:1"), "job spec: optimizer.lr: must be > 0, got -1");
}

TEST(LomoctlErrorsTest, ARealClientAgainstAClosedPortFailsFastWithTheHint) {
  ClientOptions options;
  options.address = "127.0.0.1:1";  // nothing listens on port 1 without root
  Client client(options);
  const auto start = std::chrono::steady_clock::now();
  try {
    client.get_job("x");
    FAIL() << "no exception";
  } catch (const ClientError& e) {
    EXPECT_TRUE(e.unreachable());
    EXPECT_THAT(e.what(), HasSubstr("cannot reach the coordinator at 127.0.0.1:1"));
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(SpecStructTest, TheStructParsesBackToTheSameSpec) {
  JobSpec spec = load_job_spec(std::string(LOMO_SOURCE_DIR) + "/examples/tiny-adalomo.yaml");
  apply_job_spec_overrides(spec, {"name=007", "training.steps=20", "optimizer.clip_grad_norm=1.5"});
  const google::protobuf::Struct value = job_spec_to_struct(spec);
  const auto& fields = value.fields();
  EXPECT_EQ(fields.at("name").string_value(), "007");  // leading zeros: a string, not 7
  EXPECT_EQ(fields.at("training").struct_value().fields().at("steps").number_value(), 20);
  EXPECT_TRUE(fields.at("training").struct_value().fields().at("epochs").has_null_value());
  EXPECT_TRUE(
      fields.at("optimizer").struct_value().fields().at("stochastic_rounding").has_bool_value());
  EXPECT_EQ(parse_job_spec(struct_to_json(value), "round trip"), spec);
}

// lomoctl submit/local send the file's text as written, with the overrides beside it; they are
// checked here first, applied together and validated once, so overrides that need each other
// pass in either order.
TEST(SubmitRequestTest, CarriesTheFileTextAndOverridesValidatedTogether) {
  TempDir dir;
  const std::string text =
      "name: chat-job\nmodel: {path: m}\ntokenizer: {kind: auto}\ndata: {train: [a.jsonl]}\n"
      "training: {steps: 5, seed: 9223372036854775807}\n";
  std::ofstream(dir.path / "job.yaml") << text;
  const std::string file = (dir.path / "job.yaml").string();
  const std::vector<std::string> chat = {"data.format=chat", "data.chat_template=llama-3"};
  for (const auto& overrides : {chat, std::vector<std::string>{chat[1], chat[0]}}) {
    std::string name;
    const lomo::v1::SubmitJobRequest request = load_submit_request(file, overrides, &name);
    EXPECT_EQ(name, "chat-job");
    EXPECT_EQ(request.spec_text(), text);
    EXPECT_THAT(request.overrides(), ::testing::ElementsAreArray(overrides));
    EXPECT_FALSE(request.has_spec()) << "the exact text, not a Struct of doubles";
  }
  try {
    // The file's tokenizer.kind auto becomes a problem only with the override's chat format.
    load_submit_request(file, {"tokenizer.kind=bytes", "data.format=chat", "optimizer.lr=-1"},
                        nullptr);
    FAIL() << "accepted";
  } catch (const JobSpecError& e) {
    EXPECT_THAT(e.what(), HasSubstr("tokenizer.kind: bytes has no special tokens"));
    EXPECT_THAT(e.what(),
                HasSubstr("\noverride \"optimizer.lr=-1\": optimizer.lr: must be > 0, got -1"));
  }
}

TEST(ParseArgsTest, SeparatesPositionalsValuesAndSwitches) {
  const ParsedArgs args = parse_args({"job.yaml", "--set", "a=1", "--set=b=2", "--watch"}, "submit",
                                     {"--set"}, {"--watch"});
  EXPECT_THAT(args.positional, ::testing::ElementsAre("job.yaml"));
  EXPECT_THAT(args.all("--set"), ::testing::ElementsAre("a=1", "b=2"));
  EXPECT_TRUE(args.has("--watch"));
  EXPECT_THROW(parse_args({"--nope"}, "submit", {"--set"}, {}), UsageError);
  EXPECT_THROW(parse_args({"--set"}, "submit", {"--set"}, {}), UsageError);
}

TEST(RenderTest, StatesDurationsAndSizes) {
  EXPECT_EQ(state_name(lomo::v1::JOB_STATE_RUNNING), "RUNNING");
  EXPECT_EQ(parse_state("succeeded"), lomo::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(parse_state("JOB_STATE_FAILED"), lomo::v1::JOB_STATE_FAILED);
  EXPECT_FALSE(parse_state("finished"));
  EXPECT_EQ(exit_code_for(lomo::v1::JOB_STATE_SUCCEEDED), 0);
  EXPECT_EQ(exit_code_for(lomo::v1::JOB_STATE_FAILED), 1);
  EXPECT_EQ(exit_code_for(lomo::v1::JOB_STATE_CANCELLED), 2);
  EXPECT_EQ(format_duration(42), "42s");
  EXPECT_EQ(format_duration(187), "3:07");
  EXPECT_EQ(format_duration(3723), "1:02:03");
  EXPECT_EQ(format_bytes(812), "812 B");
  EXPECT_EQ(format_bytes(3 * 1048576 + 209715), "3.2 MiB");
}

TEST(RenderTest, TheProgressBarShowsStepLossThroughputAndEta) {
  ProgressTracker tracker;
  lomo::v1::TrainingMetrics m;
  m.set_total_steps(20);
  m.set_step(2);
  m.set_loss(3.0);
  m.set_tokens_per_second(1000);
  tracker.observe(m, 100.0);
  EXPECT_FALSE(tracker.progress().eta_seconds);  // one point gives no rate
  m.set_step(10);
  m.set_loss(2.3456);
  tracker.observe(m, 108.0);  // 1 s a step, 10 steps left
  ASSERT_TRUE(tracker.progress().eta_seconds);
  EXPECT_DOUBLE_EQ(*tracker.progress().eta_seconds, 10.0);
  const std::string bar = progress_bar_line(tracker.progress(), 100);
  EXPECT_EQ(bar, "[###############---------------]  10/20  loss 2.3456  1000 tok/s  ETA 10s");
  EXPECT_LE(progress_bar_line(tracker.progress(), 50).size(), 50u);
  EXPECT_EQ(progress_plain_line(tracker.progress()),
            "step 10/20  loss 2.3456  1000 tok/s  ETA 10s");
}

// Values printed by tqdm's own tqdm.std.EMA(smoothing=0.3) fed the same inputs in Python;
// 1e-12: the same arithmetic in another order may differ in the last bits.
constexpr double kTqdmTolerance = 1e-12;

TEST(EtaTest, TheMovingAverageIsTqdmsBiasCorrectedEma) {
  ExponentialMovingAverage ema(0.3);
  EXPECT_EQ(ema.value(), 0.0);
  ema.add(1);
  EXPECT_NEAR(ema.value(), 1.0, kTqdmTolerance);  // not 0.3: the start-up bias is removed
  ema.add(2);
  EXPECT_NEAR(ema.value(), 1.588235294117647, kTqdmTolerance);
  ema.add(3);
  EXPECT_NEAR(ema.value(), 2.2328767123287667, kTqdmTolerance);
}

// Ten 1 s steps, one 11 s step (a checkpoint being written), three 1 s steps: tqdm's rate
// (EMA of seconds / EMA of steps) moves to 4.06 s a step and back, where the rate since the
// start would jump to 1.9 and stay high, and the last step's would jump to 11.
TEST(EtaTest, OneSlowStepMovesTheEtaAsTqdmDoes) {
  EtaEstimator eta;
  double t = 1000.0;
  eta.observe(0, t);
  EXPECT_FALSE(eta.eta_seconds(100));  // one point gives no rate
  int64_t step = 0;
  auto advance = [&](double seconds) {
    t += seconds;
    eta.observe(++step, t);
    return *eta.eta_seconds(100) / static_cast<double>(100 - step);  // seconds per step
  };
  for (int i = 0; i < 10; ++i) EXPECT_NEAR(advance(1.0), 1.0, kTqdmTolerance);
  EXPECT_NEAR(advance(11.0), 4.0605164094377155, kTqdmTolerance);
  EXPECT_NEAR(advance(1.0), 3.129474670501668, kTqdmTolerance);
  EXPECT_NEAR(advance(1.0), 2.4843820306010866, kTqdmTolerance);
  EXPECT_NEAR(advance(1.0), 2.0360265712470436, kTqdmTolerance);
}

TEST(EtaTest, UpdatesOfSeveralStepsWeighByTheirStepsAndAResumeStartsAgain) {
  EtaEstimator eta;
  eta.observe(0, 0.0);
  const std::vector<std::pair<int64_t, double>> updates{{2, 2.0}, {1, 1.0}, {3, 6.0}, {1, 0.5}};
  const std::vector<double> tqdm{1.0, 1.0, 1.6410256410256412, 1.374181478016838};
  int64_t step = 0;
  double t = 0.0;
  for (size_t i = 0; i < updates.size(); ++i) {
    step += updates[i].first;
    t += updates[i].second;
    eta.observe(step, t);
    EXPECT_NEAR(*eta.eta_seconds(step + 10), 10 * tqdm[i], 10 * kTqdmTolerance) << i;
  }
  eta.observe(step, t + 5.0);  // the same step again: no duration to average
  EXPECT_NEAR(*eta.eta_seconds(step + 10), 10 * tqdm.back(), 10 * kTqdmTolerance);
  eta.observe(3, t + 6.0);  // a new attempt resumed from an earlier checkpoint
  EXPECT_FALSE(eta.eta_seconds(100));
  eta.observe(5, t + 16.0);
  EXPECT_NEAR(*eta.eta_seconds(100), 95 * 5.0, 1e-9);
}

TEST(HelpTest, EveryCommandHasASynopsisFlagsAndAnExample) {
  for (const char* command : {"submit", "list", "get", "watch", "logs", "cancel", "checkpoints",
                              "download", "local", "generate"}) {
    const std::optional<std::string> help = command_help(command);
    ASSERT_TRUE(help) << command;
    EXPECT_THAT(*help, ::testing::StartsWith(std::string("usage: lomoctl ") + command)) << command;
    EXPECT_THAT(*help, HasSubstr("example")) << command;
    EXPECT_THAT(*help, HasSubstr("--output text|json")) << command;  // the global flags
  }
  EXPECT_FALSE(command_help("frobnicate"));
}

// A job of world size 2 as the coordinator reports it: rank -> worker in Job.assignments.
lomo::v1::Job gang_job(lomo::v1::JobState state, std::vector<std::string> workers) {
  lomo::v1::Job job;
  job.set_id("j-1");
  job.set_state(state);
  for (size_t r = 0; r < workers.size(); ++r) {
    auto* a = job.add_assignments();
    a->set_rank(static_cast<int32_t>(r));
    a->set_worker_id(workers[r]);
  }
  if (!workers.empty()) job.set_worker_id(workers[0]);
  return job;
}

TEST(RenderTest, AGangShowsEveryRanksWorkerInRankOrder) {
  const lomo::v1::Job job = gang_job(lomo::v1::JOB_STATE_RUNNING, {"w-a", "w-b"});
  EXPECT_EQ(gang_lines(job), (std::vector<std::string>{"rank 0  w-a", "rank 1  w-b"}));
  EXPECT_EQ(workers_cell(job), "w-a,w-b");
  const lomo::v1::Job five = gang_job(lomo::v1::JOB_STATE_RUNNING, {"w0", "w1", "w2", "w3", "w4"});
  EXPECT_EQ(workers_cell(five), "w0,w1,w2 +2");
  // One rank: the worker alone, as before gangs existed.
  const lomo::v1::Job single = gang_job(lomo::v1::JOB_STATE_RUNNING, {"w-a"});
  EXPECT_TRUE(gang_lines(single).empty());
  EXPECT_EQ(workers_cell(single), "w-a");
}

TEST(RenderTest, AQueuedJobSaysWhyItWaits) {
  lomo::v1::Job job = gang_job(lomo::v1::JOB_STATE_QUEUED, {});
  EXPECT_EQ(workers_cell(job), "-");
  job.set_wait_reason("waiting for 2 idle cpu workers, 1 idle");
  EXPECT_EQ(workers_cell(job), "(waiting for 2 idle cpu workers, 1 idle)");
  // A long reason is cut in the table (lomoctl get shows it whole).
  job.set_wait_reason(
      "needs 4 cpu workers, 2 connected: waiting for more to connect (jobs behind it are served "
      "meanwhile)");
  EXPECT_EQ(workers_cell(job), "(needs 4 cpu workers, 2 connected: waiting for more to connec...)");
}

TEST(RenderTest, GetListsEveryEndedAttemptAndHowItEnded) {
  lomo::v1::Job job = gang_job(lomo::v1::JOB_STATE_SUCCEEDED, {"w-a"});
  EXPECT_TRUE(attempt_lines(job).empty()) << "a job whose attempts never ended shows none";
  lomo::v1::JobAttempt* first = job.add_attempts();
  first->set_attempt(1);
  first->set_state(lomo::v1::JOB_STATE_FAILED);
  first->set_step(12);
  first->set_restarted(true);
  first->set_reason("rank 1 (worker w-b): training process killed by SIGKILL");
  for (const char* worker : {"w-a", "w-b"}) first->add_assignments()->set_worker_id(worker);
  lomo::v1::JobAttempt* second = job.add_attempts();
  second->set_attempt(2);
  second->set_state(lomo::v1::JOB_STATE_SUCCEEDED);
  second->set_step(20);
  second->add_assignments()->set_worker_id("w-c\x1b");
  EXPECT_EQ(attempt_lines(job),
            (std::vector<std::string>{"1  FAILED at step 12 on w-a,w-b, restarted: rank 1 (worker "
                                      "w-b): training process killed by SIGKILL",
                                      "2  SUCCEEDED at step 20 on w-c\\x1b"}));
}

TEST(RenderTest, ControlCharactersFromTheServerAreEscaped) {
  // A worker id or reason that would clear the screen and move the cursor if printed as is.
  EXPECT_EQ(terminal_text("a\x1b[2Jb\nc\x7f"), "a\\x1b[2Jb\\x0ac\\x7f");
  EXPECT_EQ(terminal_text("h\xc3\xa9llo"), "h\xc3\xa9llo");  // UTF-8 is text, not control
  lomo::v1::Job job = gang_job(lomo::v1::JOB_STATE_RUNNING, {"w\r0",
                                                             "w\x1b"
                                                             "1"});
  EXPECT_EQ(gang_lines(job), (std::vector<std::string>{"rank 0  w\\x0d0", "rank 1  w\\x1b1"}));
  EXPECT_EQ(workers_cell(job), "w\\x0d0,w\\x1b1");
  job = gang_job(lomo::v1::JOB_STATE_QUEUED, {});
  job.set_wait_reason("wait\x1b[0m");
  EXPECT_EQ(workers_cell(job), "(wait\\x1b[0m)");
}

TEST(RenderTest, JsonOutputCarriesTheGangAndTheWaitReason) {
  lomo::v1::Job job = gang_job(lomo::v1::JOB_STATE_RUNNING, {"w-a", "w-b"});
  const std::string running = message_to_json(job, false);
  EXPECT_THAT(running, HasSubstr(R"("assignments":[{"rank":0,"workerId":"w-a"},)"
                                 R"({"rank":1,"workerId":"w-b"}])"));
  job = gang_job(lomo::v1::JOB_STATE_QUEUED, {});
  job.set_wait_reason("waiting for 2 idle cpu workers, 1 idle");
  EXPECT_THAT(message_to_json(job, false),
              HasSubstr(R"("waitReason":"waiting for 2 idle cpu workers, 1 idle")"));
}

TEST(LocalModeTest, ReadsTheCoordinatorsReadyFile) {
  TempDir dir;
  const fs::path ready = dir.path / "ready";
  EXPECT_FALSE(read_ready_address(ready));
  std::ofstream(ready) << R"({"grpc": "127.0.0.1:4242", "htt)";
  EXPECT_FALSE(read_ready_address(ready));  // still being written
  std::ofstream(ready) << R"({"grpc": "127.0.0.1:4242", "http": "127.0.0.1:4243"})";
  EXPECT_EQ(read_ready_address(ready), "127.0.0.1:4242");
}

TEST(LocalModeTest, FindsProgramsByFlagThenCandidatesAndSaysWhereItLooked) {
  TempDir dir;
  const fs::path program = dir.path / "lomo-thing";
  std::ofstream(program) << "#!/bin/sh\n";
  fs::permissions(program, fs::perms::owner_all);
  EXPECT_EQ(find_program("lomo-thing", std::nullopt, "LOMO_TEST_UNSET_VAR", {program}), program);
  EXPECT_EQ(find_program("lomo-thing", program.string(), "LOMO_TEST_UNSET_VAR", {}), program);
  try {
    find_program("lomo-no-such-program", std::nullopt, "LOMO_TEST_UNSET_VAR",
                 {dir.path / "missing"});
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr((dir.path / "missing").string()));
    EXPECT_THAT(e.what(), HasSubstr("LOMO_TEST_UNSET_VAR"));
  }
}

TEST(LocalModeTest, WorkersDefaultToTheSpecsWorldSizeAndSetItWhenTheSpecDoesNot) {
  EXPECT_EQ(plan_local_gang(std::nullopt, 1).workers, 1);
  EXPECT_TRUE(plan_local_gang(std::nullopt, 1).overrides.empty());
  EXPECT_EQ(plan_local_gang(std::nullopt, 3).workers, 3);  // the spec asks for a gang of 3
  EXPECT_TRUE(plan_local_gang(std::nullopt, 3).overrides.empty());
  const LocalGangPlan two = plan_local_gang("2", 1);
  EXPECT_EQ(two.workers, 2);
  EXPECT_EQ(two.overrides, std::vector<std::string>{"resources.world_size=2"});
  EXPECT_TRUE(plan_local_gang("3", 3).overrides.empty());
  EXPECT_TRUE(plan_local_gang("1", 1).overrides.empty());
}

// The message of the UsageError plan_local_gang throws, or "" when it throws none.
std::string gang_plan_error(const std::optional<std::string>& workers, int64_t world_size) {
  try {
    plan_local_gang(workers, world_size);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

TEST(LocalModeTest, AWorkerCountThatCannotBeRightIsRefusedClearly) {
  EXPECT_THAT(gang_plan_error("0", 1), HasSubstr("--workers 0: expected 1 to 64"));
  EXPECT_THAT(gang_plan_error("-2", 1), HasSubstr("--workers -2: expected 1 to 64"));
  EXPECT_THAT(gang_plan_error("100000", 1), HasSubstr("--workers 100000: expected 1 to 64"));
  EXPECT_THAT(gang_plan_error("two", 1), HasSubstr("--workers"));
  EXPECT_THAT(gang_plan_error("2", 3),
              HasSubstr("--workers 2 differs from the spec's resources.world_size 3"));
  EXPECT_THAT(gang_plan_error(std::nullopt, 1000),
              HasSubstr("resources.world_size 1000 is more than the 64 workers"));
}

TEST(LocalModeTest, OpenMpThreadsAreSharedOutUnlessTheUserSetThem) {
  EXPECT_EQ(threads_per_local_worker(1, 16, nullptr), std::nullopt);  // as before: every core
  EXPECT_EQ(threads_per_local_worker(2, 16, nullptr), 8);
  EXPECT_EQ(threads_per_local_worker(3, 16, nullptr), 5);
  EXPECT_EQ(threads_per_local_worker(4, 2, nullptr), 1);  // at least one each
  EXPECT_EQ(threads_per_local_worker(2, 16, ""), 8);      // set but empty: not a choice
  EXPECT_EQ(threads_per_local_worker(2, 16, "3"), std::nullopt);
}

TEST(LocalModeTest, EachWorkerHasItsOwnIdWorkDirectoryAndLog) {
  const fs::path state = "/s";
  const auto one = local_worker_layouts(state, 1);
  ASSERT_EQ(one.size(), 1u);  // the names one worker always had
  EXPECT_EQ(one[0].id, "local-cpu");
  EXPECT_EQ(one[0].work_dir, state / "worker");
  EXPECT_EQ(one[0].log, state / "worker.log");
  const auto three = local_worker_layouts(state, 3);
  ASSERT_EQ(three.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    const std::string n = std::to_string(i);
    EXPECT_EQ(three[i].id, "local-cpu-" + n);
    EXPECT_EQ(three[i].work_dir, state / ("worker-" + n));
    EXPECT_EQ(three[i].log, state / ("worker-" + n + ".log"));
  }
}

}  // namespace
}  // namespace lomo::client
