// The CLI and API in their ecosystem's conventions, against real processes on loopback:
// `lomoctl --output json` prints what REST returns, REST takes both spellings of its query
// parameters and refuses unknown ones, grpc.health.v1 answers per service, and every binary
// answers --help and --version.
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "client/eta.h"
#include "client/render.h"
#include "tests/integration/coordinator_harness.h"
#include "tests/integration/test_support.h"

namespace lomo::server::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

const std::string kLomoctl = LOMO_LOMOCTL_BIN;

class CliApiConventionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    coordinator_ = std::make_unique<CoordinatorProcess>(ProcessOptions(dir_.path() / "data"));
    jobs_ = coordinator_->jobs();
  }
  void TearDown() override {
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  v1::Job submit_ok(const std::string& name) {
    v1::Job job;
    const grpc::Status status = submit(*jobs_, submit_request(name), &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  // `lomoctl --output json ARGS...` against this coordinator, parsed.
  nlohmann::json lomoctl_json(const std::vector<std::string>& args) {
    std::vector<std::string> argv{kLomoctl, "--coordinator", coordinator_->grpc_address(),
                                  "--output", "json"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::string output;
    const ExitStatus status = lomo::testing::run_program(argv, &output, seconds(60));
    EXPECT_TRUE(status.success()) << status.describe() << ": " << output;
    return nlohmann::json::parse(output, nullptr, /*allow_exceptions=*/false);
  }

  nlohmann::json rest_json(const std::string& path) {
    const HttpResult result = http_request(*coordinator_, "GET", path);
    EXPECT_EQ(result.status, 200) << path << ": " << result.body;
    return nlohmann::json::parse(result.body, nullptr, /*allow_exceptions=*/false);
  }

  // A job that ran on a test worker, has progress and a committed checkpoint, and has ended, so
  // that nothing about it changes between two reads.
  std::string finished_job_with_a_checkpoint() {
    const v1::Job submitted = submit_ok("json-parity");
    TestWorker worker(coordinator_->channel());
    worker.register_as("w-json");
    worker.start_heartbeats(milliseconds(200));
    EXPECT_TRUE(worker.next_assignment(seconds(10)).has_value());
    worker.set_current(submitted.id(), 1);
    EXPECT_TRUE(worker.report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
    EXPECT_TRUE(worker.send_metrics(submitted.id(), 1, 20, 2.25, 1200));
    const auto ack = worker.upload_checkpoint(
        submitted.id(), 1, 20,
        {{"model.safetensors", std::string(2000, 'w')}, {"config.json", "{}"}});
    EXPECT_TRUE(ack.has_value() && ack->committed());
    EXPECT_TRUE(worker.report(submitted.id(), 1, v1::JOB_STATE_SUCCEEDED));
    wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_SUCCEEDED, seconds(30));
    return submitted.id();
  }

  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
};

TEST_F(CliApiConventionsTest, LomoctlJsonIsTheRestJsonOfTheSameMessage) {
  const std::string id = finished_job_with_a_checkpoint();
  submit_ok("queued-one");

  // lomoctl get prints GET /v1/jobs/ID's GetJobResponse: the Job under "job" (docs/openapi.yaml).
  const nlohmann::json response = lomoctl_json({"get", id});
  EXPECT_EQ(response, rest_json("/v1/jobs/" + id));
  ASSERT_EQ(response.size(), 1u) << response.dump();
  const nlohmann::json& got = response["job"];
  EXPECT_EQ(got["workerId"], "w-json");  // protobuf's JSON names, not the .proto's
  EXPECT_EQ(got["progress"]["totalSteps"], "100");
  EXPECT_FALSE(got.contains("worker_id"));

  const nlohmann::json checkpoints = lomoctl_json({"checkpoints", id});
  EXPECT_EQ(checkpoints, rest_json("/v1/jobs/" + id + "/checkpoints"));
  ASSERT_EQ(checkpoints["checkpoints"].size(), 1u);
  EXPECT_TRUE(checkpoints["checkpoints"][0].contains("checkpointId"));

  const nlohmann::json listed = lomoctl_json({"list"});
  EXPECT_EQ(listed["jobs"], rest_json("/v1/jobs?pageSize=50")["jobs"]);
  EXPECT_EQ(listed["jobs"].size(), 2u);
}

// submit and cancel answer as POST /v1/jobs and POST /v1/jobs/ID:cancel do: {"job": {...}}.
TEST_F(CliApiConventionsTest, LomoctlSubmitAndCancelPrintTheRestResponses) {
  const fs::path file = dir_.path() / "job.yaml";
  std::ofstream(file) << "name: json-submit\nmodel: {path: /models/tiny}\n"
                         "data: {train: [train.txt]}\ntraining: {steps: 10}\n"
                         "resources: {device: cpu, max_restarts: 0}\n";
  const nlohmann::json submitted = lomoctl_json({"submit", file.string()});
  ASSERT_TRUE(submitted.is_object() && submitted.size() == 1u && submitted.contains("job"))
      << submitted.dump();
  const std::string id = submitted["job"]["id"];
  EXPECT_EQ(submitted["job"]["name"], "json-submit");
  EXPECT_EQ(submitted["job"]["state"], "JOB_STATE_QUEUED");

  const nlohmann::json cancelled = lomoctl_json({"cancel", id});
  ASSERT_TRUE(cancelled.is_object() && cancelled.size() == 1u) << cancelled.dump();
  EXPECT_EQ(cancelled["job"]["state"], "JOB_STATE_CANCELLED");
  // Cancelling an ended job changes nothing: REST answers with the same CancelJobResponse.
  const HttpResult again = http_request(*coordinator_, "POST", "/v1/jobs/" + id + ":cancel");
  ASSERT_EQ(again.status, 200) << again.body;
  EXPECT_EQ(cancelled, nlohmann::json::parse(again.body));
  EXPECT_EQ(cancelled, rest_json("/v1/jobs/" + id));
}

TEST_F(CliApiConventionsTest, GetShowsTheEtaWatchWouldShowSmoothedOverTheJobsMetrics) {
  const v1::Job submitted = submit_ok("eta");
  TestWorker worker(coordinator_->channel());
  worker.register_as("w-eta");
  worker.start_heartbeats(milliseconds(200));
  ASSERT_TRUE(worker.next_assignment(seconds(10)).has_value());
  worker.set_current(submitted.id(), 1);
  ASSERT_TRUE(worker.report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));
  // Spaced so that the ETA is seconds, not "0s"; the expectation is computed from the events'
  // own times, so the spacing need not be exact.
  for (int64_t step : {10, 20, 30, 40}) {
    ASSERT_TRUE(worker.send_metrics(submitted.id(), 1, step, 2.0, 1000));
    std::this_thread::sleep_for(milliseconds(300));
  }
  std::vector<v1::JobEvent> events;
  ASSERT_TRUE(wait_until(
      [&] {
        events = all_events(*jobs_, submitted.id());
        return std::count_if(events.begin(), events.end(),
                             [](const v1::JobEvent& e) { return e.has_metrics(); }) == 4;
      },
      seconds(10)));
  client::EtaEstimator expected;
  for (const v1::JobEvent& e : events) {
    if (e.has_metrics()) {
      expected.observe(e.metrics().step(), e.time().seconds() + e.time().nanos() * 1e-9);
    }
  }
  ASSERT_TRUE(expected.eta_seconds(100));
  std::string output;
  const ExitStatus status = lomo::testing::run_program(
      {kLomoctl, "--coordinator", coordinator_->grpc_address(), "get", submitted.id()}, &output,
      seconds(60));
  EXPECT_TRUE(status.success()) << output;
  EXPECT_THAT(output, HasSubstr("step 40/100"));
  EXPECT_THAT(output, HasSubstr(", ETA " + client::format_duration(*expected.eta_seconds(100))))
      << output;
}

TEST_F(CliApiConventionsTest, RestTakesPageSizeAndPageTokenInBothSpellings) {
  for (int i = 0; i < 3; ++i) submit_ok("page-" + std::to_string(i));
  for (const auto& [size, token] :
       {std::pair{"page_size", "page_token"}, std::pair{"pageSize", "pageToken"},
        std::pair{"pageSize", "page_token"}}) {
    SCOPED_TRACE(std::string(size) + " + " + token);
    const nlohmann::json first = rest_json(std::string("/v1/jobs?") + size + "=2");
    ASSERT_EQ(first["jobs"].size(), 2u);
    const std::string next = first["nextPageToken"];
    ASSERT_FALSE(next.empty());
    const nlohmann::json second =
        rest_json(std::string("/v1/jobs?") + size + "=2&" + token + "=" + next);
    ASSERT_EQ(second["jobs"].size(), 1u);
    EXPECT_NE(second["jobs"][0]["id"], first["jobs"][0]["id"]);
    EXPECT_NE(second["jobs"][0]["id"], first["jobs"][1]["id"]);
  }
  const HttpResult bad = http_request(*coordinator_, "GET", "/v1/jobs?pageSize=-1");
  EXPECT_EQ(bad.status, 400);
  EXPECT_THAT(bad.body, HasSubstr("pageSize: must be in"));  // the name the client wrote
}

TEST_F(CliApiConventionsTest, RestRefusesUnknownQueryParametersNamingThem) {
  const std::string id = submit_ok("strict").id();
  const HttpResult typo = http_request(*coordinator_, "GET", "/v1/jobs?pagesize=2&colour=red");
  EXPECT_EQ(typo.status, 400);
  const nlohmann::json error = nlohmann::json::parse(typo.body);
  EXPECT_EQ(error["code"], 3);  // INVALID_ARGUMENT
  EXPECT_THAT(error["message"].get<std::string>(),
              HasSubstr(R"(unknown query parameter "colour", "pagesize")"));
  EXPECT_THAT(error["message"].get<std::string>(), HasSubstr("page_size/pageSize"));

  const HttpResult both = http_request(*coordinator_, "GET", "/v1/jobs?page_size=1&pageSize=2");
  EXPECT_EQ(both.status, 400);
  EXPECT_THAT(both.body, HasSubstr("page_size and pageSize name one parameter"));

  for (const auto& [method, path] : {std::pair{"GET", "/v1/jobs/" + id + "?view=full"},
                                     std::pair{"GET", "/v1/jobs/" + id + "/checkpoints?x=1"},
                                     std::pair{"GET", "/v1/jobs/" + id + "/events?after=3"},
                                     std::pair{"POST", "/v1/jobs/" + id + ":cancel?force=true"}}) {
    const HttpResult refused = http_request(*coordinator_, method, path);
    EXPECT_EQ(refused.status, 400) << method << " " << path << ": " << refused.body;
    EXPECT_THAT(refused.body, HasSubstr("unknown query parameter")) << path;
  }
  // The refused cancel did nothing; the known spellings still work.
  EXPECT_EQ(rest_json("/v1/jobs/" + id)["job"]["state"], "JOB_STATE_QUEUED");
  const HttpResult events =
      http_request(*coordinator_, "GET", "/v1/jobs/" + id + "/events?afterSequence=0");
  EXPECT_EQ(events.status, 200) << events.body;
}

// HealthCheckRequest{service} and the status of its HealthCheckResponse, without generated stubs
// (grpc.health.v1 is not installed as C++ headers; the messages are a few bytes).
grpc::Status health_check(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                          int* serving_status) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue queue;
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  std::string request_bytes;
  if (!service.empty()) {
    request_bytes = std::string("\x0a") + static_cast<char>(service.size()) + service;
  }
  grpc::Slice slice(request_bytes);
  const grpc::ByteBuffer request(&slice, 1);
  auto call = stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &queue);
  call->StartCall();
  grpc::ByteBuffer response;
  grpc::Status status;
  call->Finish(&response, &status, nullptr);
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(queue.Next(&tag, &ok) && ok);
  std::vector<grpc::Slice> slices;
  (void)response.Dump(&slices);
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // status is field 1, a varint: "\x08\x01" is SERVING, no bytes at all UNKNOWN (0).
  *serving_status = bytes.size() == 2 && bytes[0] == '\x08' ? bytes[1] : 0;
  queue.Shutdown();
  while (queue.Next(&tag, &ok)) {
  }
  return status;
}

TEST_F(CliApiConventionsTest, GrpcHealthIsReportedForEachServiceAndTheServer) {
  for (const std::string service : {"", "lomo.v1.JobService", "lomo.v1.WorkerService"}) {
    int serving = -1;
    const grpc::Status status = health_check(coordinator_->channel(), service, &serving);
    ASSERT_TRUE(status.ok()) << "\"" << service << "\": " << status.error_message();
    EXPECT_EQ(serving, 1) << "\"" << service << "\" is not SERVING";
  }
  int serving = -1;
  EXPECT_EQ(health_check(coordinator_->channel(), "lomo.v1.NoSuchService", &serving).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

// --- Every binary answers --help (its commands' too) and --version. ---

struct Invocation {
  std::vector<std::string> argv;
  std::string expect;  // a line of the output
};

std::vector<Invocation> help_invocations() {
  std::vector<Invocation> all{
      {{kLomoctl, "--help"}, "commands:"},
      {{LOMO_COORDINATOR_BIN, "--help"}, "usage: lomo-coordinator"},
      {{LOMO_WORKER_BIN, "--help"}, "lomo-worker COMMAND --help"},
      {{LOMO_WORKER_BIN, "train", "--help"}, "usage: lomo-worker train JOB.yaml"},
      {{LOMO_WORKER_BIN, "init-model", "--help"}, "usage: lomo-worker init-model DIR"},
      {{LOMO_WORKER_BIN, "generate", "--help"}, "lomo-worker generate --model DIR"},
      {{LOMO_WORKER_BIN, "serve", "--help"}, "lomo-worker serve --coordinator"},
  };
  for (const char* command : {"submit", "list", "get", "watch", "logs", "cancel", "checkpoints",
                              "download", "local", "generate"}) {
    all.push_back({{kLomoctl, command, "--help"}, std::string("usage: lomoctl ") + command});
    all.push_back({{kLomoctl, "help", command}, std::string("usage: lomoctl ") + command});
  }
  return all;
}

TEST(EveryBinary, AnswersHelpForItselfAndEachCommand) {
  for (const Invocation& call : help_invocations()) {
    std::string output;
    const ExitStatus status = lomo::testing::run_program(call.argv, &output, seconds(30));
    std::string shown;
    for (const std::string& arg : call.argv) shown += arg + " ";
    EXPECT_TRUE(status.success()) << shown << status.describe() << "\n" << output;
    EXPECT_THAT(output, HasSubstr(call.expect)) << shown;
  }
}

TEST(EveryBinary, AnswersVersionWithTheBuildsVersionAndRevision) {
  const std::vector<std::vector<std::string>> calls{{kLomoctl, "--version"},
                                                    {kLomoctl, "get", "--version"},
                                                    {LOMO_COORDINATOR_BIN, "--version"},
                                                    {LOMO_WORKER_BIN, "--version"},
                                                    {LOMO_WORKER_BIN, "train", "--version"},
                                                    {LOMO_WORKER_BIN, "serve", "--version"},
                                                    {LOMO_WORKER_BIN, "generate", "--version"},
                                                    {LOMO_WORKERD_BIN, "--version"}};
  for (const auto& argv : calls) {
    std::string output;
    const ExitStatus status = lomo::testing::run_program(argv, &output, seconds(30));
    EXPECT_TRUE(status.success()) << argv[0] << " " << argv[1] << ": " << status.describe();
    // "lomoctl 0.1.0 (revision 1a2b3c4d5e6f, Release, native)": one line, nothing else.
    static const std::regex kVersionLine(
        R"(lomo[-a-z]* [0-9]+\.[0-9]+\.[0-9]+ \(revision [0-9a-z]+, [A-Za-z]*, [-a-z0-9]+\)\n)");
    EXPECT_TRUE(std::regex_match(output, kVersionLine))
        << argv[0] << " " << argv[1] << ": " << output;
  }
}

}  // namespace
}  // namespace lomo::server::testing
