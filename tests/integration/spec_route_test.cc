// The route of a job spec, against a real lomo-coordinator: it enters once (lomoctl's request,
// REST, or gRPC), is validated there and stored as canonical YAML beside the text submitted, goes
// to the worker in the Assignment, and becomes the job.yaml the training child parses. An integer
// that needs all 64 bits (a seed of 2^63 - 1, which a double cannot hold: the nearest is 2^63)
// arrives unchanged at the end of every way in.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "client/commands.h"
#include "jobspec/job_spec.h"
#include "jobspec/proto/spec_proto.h"
#include "tests/integration/coordinator_harness.h"
#include "tests/integration/test_support.h"

namespace lomo::server::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr uint64_t kSeed = std::numeric_limits<int64_t>::max();  // 2^63 - 1
constexpr const char* kSeedText = "9223372036854775807";
static_assert(static_cast<uint64_t>(static_cast<double>(kSeed)) != kSeed,
              "the seed must be one a double cannot hold, or the test proves nothing");

// A valid job file (YAML, as a user writes it) with the seed.
std::string job_yaml() {
  return std::string("name: seeded\n") +
         "model: {path: /models/tiny}\n"
         "data: {train: [train.txt]}\n"
         "training:\n"
         "  steps: 10\n"
         "  seed: " +
         kSeedText + "\n";
}

class SpecRouteTest : public ::testing::Test {
 protected:
  void SetUp() override { start(); }
  void TearDown() override {
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  void start() {
    coordinator_ = std::make_unique<CoordinatorProcess>(ProcessOptions(dir_.path() / "data", 5));
    jobs_ = coordinator_->jobs();
  }

  v1::Job submit_ok(const v1::SubmitJobRequest& request) {
    v1::Job job;
    const grpc::Status status = submit(*jobs_, request, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  // The job as the store returns it (GetJob reads the store, not the scheduler's copy).
  v1::Job stored(const std::string& id) {
    v1::Job job;
    const grpc::Status status = get(*jobs_, id, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  // What a CPU worker is assigned next.
  v1::Assignment assignment() {
    worker_ = std::make_unique<TestWorker>(coordinator_->channel());
    worker_->register_as("w-spec");
    worker_->start_heartbeats(milliseconds(200));
    const auto assigned = worker_->next_assignment(seconds(10));
    if (!assigned) {
      ADD_FAILURE() << "no assignment within 10 s";
      return {};
    }
    return *assigned;
  }

  // The training child's view: the daemon reads the assignment's spec, moves output.dir into the
  // attempt, writes job_spec_to_yaml as job.yaml, and lomo-worker train parses that file.
  static JobSpec trainer_spec(const v1::Assignment& assignment) {
    JobSpec spec = assignment_job_spec(assignment, "assignment");
    spec.output.dir = "/work/jobs/j/attempt-1/out";
    return parse_job_spec(job_spec_to_yaml(spec), "job.yaml");
  }

  // Stored canonically and exactly; assigned; parsed by the trainer: the seed at every stop.
  void expect_seed_survives(const std::string& job_id) {
    const v1::Job job = stored(job_id);
    EXPECT_THAT(job.canonical_spec(), HasSubstr(std::string("  seed: ") + kSeedText + "\n"));
    EXPECT_EQ(stored_job_spec(job, "stored").training.seed, kSeed);
    const v1::Assignment assigned = assignment();
    ASSERT_EQ(assigned.job_id(), job_id);
    EXPECT_EQ(assigned.canonical_spec(), job.canonical_spec());
    EXPECT_EQ(trainer_spec(assigned).training.seed, kSeed);
  }

  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  std::unique_ptr<TestWorker> worker_;
};

TEST_F(SpecRouteTest, ASeedOf2To63Minus1SurvivesFromLomoctlToTheTrainer) {
  const fs::path file = dir_.path() / "job.yaml";
  std::ofstream(file) << job_yaml();
  std::string name;
  const v1::SubmitJobRequest request =
      client::load_submit_request(file.string(), {"training.steps=12"}, &name);
  EXPECT_EQ(name, "seeded");
  const v1::Job job = submit_ok(request);
  // The original is kept as written, its override beside it; the canonical form has both.
  EXPECT_EQ(stored(job.id()).original_spec(), job_yaml());
  EXPECT_THAT(stored(job.id()).spec_overrides(), ElementsAre("training.steps=12"));
  EXPECT_THAT(stored(job.id()).canonical_spec(), HasSubstr("  steps: 12\n"));
  expect_seed_survives(job.id());
}

TEST_F(SpecRouteTest, ASeedOf2To63Minus1SurvivesFromRestToTheTrainer) {
  const std::string body =
      R"({"spec": {"model": {"path": "/models/tiny"}, "data": {"train": ["train.txt"]},
                   "training": {"steps": 10, "seed": )" +
      std::string(kSeedText) + "}}}";
  const HttpResult created = http_request(*coordinator_, "POST", "/v1/jobs", body);
  ASSERT_EQ(created.status, 200) << created.body;
  const std::string id = nlohmann::json::parse(created.body)["job"]["id"];
  expect_seed_survives(id);
}

TEST_F(SpecRouteTest, ASeedOf2To63Minus1SurvivesFromGrpcSpecTextToTheTrainer) {
  v1::SubmitJobRequest request;
  request.set_spec_text(job_yaml());
  expect_seed_survives(submit_ok(request).id());
}

TEST_F(SpecRouteTest, TheCanonicalSpecSurvivesACoordinatorRestart) {
  v1::SubmitJobRequest request;
  request.set_spec_text(job_yaml());
  const v1::Job job = submit_ok(request);
  coordinator_->kill9();
  start();  // the same data directory: the job comes back from the store
  expect_seed_survives(job.id());
}

// The Struct form holds doubles: the documented limit that spec_text exists for. A number at or
// beyond 2^53 has already been rounded when it arrives, so the job is refused, naming the field,
// rather than run with another seed: both 2^63 - 1 (printed with an exponent) and 2^53 + 1 (whose
// double, 2^53, prints as plain digits and would otherwise pass as an integer).
TEST_F(SpecRouteTest, AStructCannotCarryTheSeedAndIsRefusedRatherThanRounded) {
  for (const uint64_t seed : {kSeed, (uint64_t{1} << 53) + 1}) {
    v1::SubmitJobRequest request = submit_request("struct");
    (*(*request.mutable_spec()->mutable_fields())["training"]
          .mutable_struct_value()
          ->mutable_fields())["seed"]
        .set_number_value(static_cast<double>(seed));
    v1::Job job;
    const grpc::Status status = submit(*jobs_, request, &job);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << seed;
    EXPECT_THAT(status.error_message(), HasSubstr("training.seed: a number this large")) << seed;
    EXPECT_THAT(status.error_message(), HasSubstr("spec_text")) << seed;
  }
}

// lomoctl submit --set a --set b: the coordinator applies the overrides together with the file and
// validates once, so two that need each other are accepted in either order.
TEST_F(SpecRouteTest, OverridesThatDependOnEachOtherAreAcceptedInEitherOrder) {
  const fs::path file = dir_.path() / "job.yaml";
  std::ofstream(file) << job_yaml() << "tokenizer: {kind: auto}\n";
  const std::vector<std::string> chat = {"data.format=chat", "data.chat_template=llama-3"};
  for (const auto& overrides : {chat, std::vector<std::string>{chat[1], chat[0]}}) {
    const v1::Job job = submit_ok(client::load_submit_request(file.string(), overrides, nullptr));
    const JobSpec spec = stored_job_spec(stored(job.id()), "stored");
    EXPECT_EQ(spec.data.format, "chat");
    EXPECT_EQ(spec.data.chat_template, "llama-3");
  }
}

// lomo-worker train JOB.yaml --set a --set b, the standalone entry point: the same rule. The model
// does not exist, so a run whose spec is accepted gets as far as loading it ("not a model
// directory"); a spec that is refused never starts.
TEST(WorkerTrainOverridesTest, OverridesThatDependOnEachOtherAreAcceptedInEitherOrder) {
  TempDir dir;
  const fs::path file = dir.path() / "job.yaml";
  std::ofstream(file) << "model: {path: " << (dir.path() / "no-model").string()
                      << "}\ntokenizer: {kind: auto}\ndata: {train: [a.jsonl]}\n"
                      << "training: {steps: 2}\noutput: {dir: " << (dir.path() / "out").string()
                      << "}\n";
  auto train = [&](const std::vector<std::string>& overrides, std::string* output) {
    std::vector<std::string> argv = {LOMO_WORKER_BIN, "train", file.string()};
    for (const std::string& o : overrides) argv.insert(argv.end(), {"--set", o});
    return lomo::testing::run_program(argv, output, seconds(60));
  };
  const std::vector<std::string> chat = {"data.format=chat", "data.chat_template=llama-3"};
  for (const auto& overrides : {chat, std::vector<std::string>{chat[1], chat[0]}}) {
    std::string output;
    EXPECT_FALSE(train(overrides, &output).success());
    EXPECT_THAT(output, HasSubstr("not a model directory")) << output;
    EXPECT_THAT(output, ::testing::Not(HasSubstr("data.chat_template:")));
    EXPECT_THAT(output, ::testing::Not(HasSubstr("data.format:")));
  }
  std::string output;
  EXPECT_FALSE(train({chat[1]}, &output).success());
  EXPECT_THAT(output, HasSubstr("override \"data.chat_template=llama-3\": data.chat_template: "
                                "only used with data.format (or data.eval_format) chat"));
  EXPECT_THAT(output, ::testing::Not(HasSubstr("not a model directory")));
}

TEST_F(SpecRouteTest, EveryProblemIsReportedWithItsFieldAndLine) {
  v1::SubmitJobRequest request;
  request.set_spec_text(
      "model: {path: m}\n"
      "data: {train: [a.txt]}\n"
      "optimizer: {lr: -1}\n"
      "training: {steps: 0}\n"
      "resources: {device: tpu, world_size: 2}\n");
  v1::Job job;
  const grpc::Status status = submit(*jobs_, request, &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(),
            "invalid job spec: optimizer.lr: must be > 0, got -1 (line 3); training.steps: must "
            "be >= 1, got 0 (line 4); resources.device: must be one of cpu, cuda; got \"tpu\" "
            "(line 5)");
}

TEST_F(SpecRouteTest, ACudaJobWaitsForACudaWorkerInsteadOfRunningOnTheCpu) {
  v1::Job job;
  ASSERT_TRUE(submit(*jobs_, submit_request("gpu", 0, "cuda"), &job).ok());
  v1::Job got;
  ASSERT_TRUE(get(*jobs_, job.id(), &got).ok());
  EXPECT_EQ(got.state(), v1::JOB_STATE_QUEUED);
  EXPECT_THAT(got.wait_reason(), HasSubstr("cuda"));
}

}  // namespace
}  // namespace lomo::server::testing
