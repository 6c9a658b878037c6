// The public API of a real lomo-coordinator process: JobService over gRPC, the same messages over
// REST/JSON, the health and reflection services, and a graceful SIGTERM.
#include <gmock/gmock.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/integration/coordinator_harness.h"

namespace lomo::server::testing {
namespace {

using google::protobuf::util::MessageDifferencer;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::SizeIs;

class CoordinatorApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    coordinator_ = std::make_unique<CoordinatorProcess>(ProcessOptions(dir_.path() / "data"));
    jobs_ = coordinator_->jobs();
  }
  void TearDown() override {
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  v1::Job submit_ok(const std::string& name, int64_t priority = 0) {
    v1::Job job;
    const grpc::Status status = submit(*jobs_, submit_request(name, priority), &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  v1::ListJobsResponse list(const std::vector<v1::JobState>& states, int page_size,
                            const std::string& token, grpc::Status* status = nullptr) {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::ListJobsRequest request;
    for (v1::JobState state : states) request.add_states(state);
    request.set_page_size(page_size);
    request.set_page_token(token);
    v1::ListJobsResponse response;
    const grpc::Status result = jobs_->ListJobs(&context, request, &response);
    if (status != nullptr) {
      *status = result;
    } else {
      EXPECT_TRUE(result.ok()) << result.error_message();
    }
    return response;
  }

  static std::vector<std::string> ids(const v1::ListJobsResponse& response) {
    std::vector<std::string> out;
    for (const v1::Job& job : response.jobs()) out.push_back(job.id());
    return out;
  }

  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
};

TEST_F(CoordinatorApiTest, SubmitGetListCancel) {
  const v1::Job first = submit_ok("first", 1);
  const v1::Job second = submit_ok("second", 2);
  const v1::Job third = submit_ok("third", 3);
  EXPECT_EQ(first.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(first.name(), "first");
  EXPECT_EQ(third.priority(), 3);
  EXPECT_TRUE(first.has_create_time());
  EXPECT_NE(first.id(), second.id());

  v1::Job got;
  ASSERT_TRUE(get(*jobs_, second.id(), &got).ok());
  EXPECT_EQ(got.id(), second.id());
  EXPECT_TRUE(MessageDifferencer::Equals(got.spec(), second.spec()));
  EXPECT_EQ(got.state(), v1::JOB_STATE_QUEUED);

  // Newest first, two per page.
  const v1::ListJobsResponse page1 = list({}, 2, "");
  EXPECT_THAT(ids(page1), ElementsAre(third.id(), second.id()));
  ASSERT_FALSE(page1.next_page_token().empty());
  const v1::ListJobsResponse page2 = list({}, 2, page1.next_page_token());
  EXPECT_THAT(ids(page2), ElementsAre(first.id()));
  EXPECT_TRUE(page2.next_page_token().empty());

  v1::Job cancelled;
  ASSERT_TRUE(cancel(*jobs_, second.id(), &cancelled).ok());
  EXPECT_EQ(cancelled.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_TRUE(cancelled.has_end_time());
  ASSERT_TRUE(cancel(*jobs_, second.id(), &cancelled).ok()) << "cancelling twice is not an error";

  EXPECT_THAT(ids(list({v1::JOB_STATE_QUEUED}, 0, "")), ElementsAre(third.id(), first.id()));
  EXPECT_THAT(ids(list({v1::JOB_STATE_CANCELLED}, 0, "")), ElementsAre(second.id()));
  EXPECT_THAT(ids(list({v1::JOB_STATE_CANCELLED, v1::JOB_STATE_QUEUED}, 0, "")), SizeIs(3));

  // The history: submitted, then cancelled.
  const std::vector<v1::JobEvent> events = all_events(*jobs_, second.id());
  ASSERT_THAT(events, SizeIs(2));
  EXPECT_EQ(events[0].sequence(), 1);
  EXPECT_EQ(events[0].state_change().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(events[1].sequence(), 2);
  EXPECT_EQ(events[1].state_change().state(), v1::JOB_STATE_CANCELLED);
}

TEST_F(CoordinatorApiTest, ErrorsAreStatusesWithContext) {
  v1::Job job;
  grpc::Status status = get(*jobs_, "job-missing", &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("job job-missing not found"));
  EXPECT_EQ(get(*jobs_, "", &job).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(cancel(*jobs_, "job-missing", nullptr).error_code(), grpc::StatusCode::NOT_FOUND);

  list({}, 10, "garbage", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("page_token"));
  list({v1::JOB_STATE_UNSPECIFIED}, 10, "", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("states[0]"));

  EXPECT_THROW(all_events(*jobs_, "job-missing"), std::runtime_error) << "WatchJob: NOT_FOUND";
  {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::WatchJobRequest request;
    request.set_job_id("job-missing");
    request.set_follow(true);
    auto reader = jobs_->WatchJob(&context, request);
    v1::WatchJobResponse response;
    EXPECT_FALSE(reader->Read(&response));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }

  v1::SubmitJobRequest empty;
  status = submit(*jobs_, empty, &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("spec: required"));
}

TEST_F(CoordinatorApiTest, InvalidSpecIsRejectedWithTheFieldPathOverGrpc) {
  v1::SubmitJobRequest request = submit_request("bad");
  (*(*request.mutable_spec()->mutable_fields())["optimizer"]
        .mutable_struct_value()
        ->mutable_fields())["lr"]
      .set_number_value(-1);
  v1::Job job;
  grpc::Status status = submit(*jobs_, request, &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("optimizer.lr: must be > 0, got -1"));
  EXPECT_THAT(status.error_message(), ::testing::Not(HasSubstr("(line")));

  request = submit_request("bad");
  (*(*request.mutable_spec()->mutable_fields())["training"]
        .mutable_struct_value()
        ->mutable_fields())["stepz"]
      .set_number_value(3);
  status = submit(*jobs_, request, &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("training.stepz"));

  // Nothing was stored.
  EXPECT_THAT(list({}, 0, "").jobs(), SizeIs(0));
}

TEST_F(CoordinatorApiTest, AGangJobIsQueuedAndSaysWhyItWaits) {
  // resources.world_size 2: a gang of two workers. With no worker connected, it waits for them
  // and says so; a world size below 1 is no job at all.
  v1::SubmitJobRequest request = submit_request("two ranks");
  auto& fields = *request.mutable_spec()->mutable_fields();
  (*fields["training"].mutable_struct_value()->mutable_fields())["batch_size"].set_number_value(2);
  auto& resources = *fields["resources"].mutable_struct_value()->mutable_fields();
  resources["world_size"].set_number_value(2);
  v1::Job job;
  grpc::Status status = submit(*jobs_, request, &job);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  EXPECT_THAT(job.assignments(), SizeIs(0));
  ASSERT_TRUE(get(*jobs_, job.id(), &job).ok());
  EXPECT_EQ(job.wait_reason(),
            "needs 2 cpu workers, 0 connected: waiting for more to connect (jobs behind it are "
            "served meanwhile)");
  EXPECT_THAT(list({}, 0, "").jobs(0).wait_reason(), HasSubstr("needs 2 cpu workers"));

  resources["world_size"].set_number_value(0);
  status = submit(*jobs_, request, nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("resources.world_size"));
  EXPECT_THAT(list({}, 0, "").jobs(), SizeIs(1));
}

TEST_F(CoordinatorApiTest, InvalidSpecIsRejectedWithTheFieldPathOverRest) {
  const HttpResult result =
      http_request(*coordinator_, "POST", "/v1/jobs",
                   R"({"spec": {"model": {"path": "/m"}, "data": {"train": ["a.txt"]},
                   "optimizer": {"lr": -1}}})");
  EXPECT_EQ(result.status, 400);
  const auto body = nlohmann::json::parse(result.body);
  EXPECT_EQ(body["code"], 3);
  EXPECT_THAT(body["message"].get<std::string>(), HasSubstr("optimizer.lr: must be > 0, got -1"));

  const HttpResult not_json = http_request(*coordinator_, "POST", "/v1/jobs", "{spec: nope");
  EXPECT_EQ(not_json.status, 400);
  EXPECT_EQ(nlohmann::json::parse(not_json.body)["code"], 3);
}

TEST_F(CoordinatorApiTest, RestServesTheSameMessagesAsGrpc) {
  const HttpResult created =
      http_request(*coordinator_, "POST", "/v1/jobs",
                   R"({"spec": {"name": "rest-job", "priority": 4, "model": {"path": "/m"},
                   "data": {"train": ["a.txt"]}, "training": {"steps": 5}}})");
  ASSERT_EQ(created.status, 200) << created.body;
  v1::SubmitJobResponse submitted;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(created.body, &submitted).ok());
  const std::string id = submitted.job().id();
  EXPECT_EQ(submitted.job().name(), "rest-job");
  EXPECT_EQ(submitted.job().priority(), 4);

  // GET /v1/jobs/{id} is GetJobResponse in protobuf's JSON mapping: the same JSON document as the
  // gRPC answer prints as (a Struct's keys come in no fixed order, so documents are compared).
  v1::Job job;
  ASSERT_TRUE(get(*jobs_, id, &job).ok());
  v1::GetJobResponse expected;
  *expected.mutable_job() = job;
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  std::string expected_json;
  ASSERT_TRUE(google::protobuf::util::MessageToJsonString(expected, &expected_json, options).ok());
  const HttpResult got = http_request(*coordinator_, "GET", "/v1/jobs/" + id);
  EXPECT_EQ(got.status, 200);
  EXPECT_EQ(nlohmann::json::parse(got.body), nlohmann::json::parse(expected_json));

  const HttpResult listed =
      http_request(*coordinator_, "GET", "/v1/jobs?states=queued&page_size=5");
  ASSERT_EQ(listed.status, 200);
  v1::ListJobsResponse list;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(listed.body, &list).ok());
  ASSERT_EQ(list.jobs_size(), 1);
  EXPECT_EQ(list.jobs(0).id(), id);
  EXPECT_EQ(http_request(*coordinator_, "GET", "/v1/jobs?states=bogus").status, 400);

  const HttpResult events = http_request(*coordinator_, "GET", "/v1/jobs/" + id + "/events");
  ASSERT_EQ(events.status, 200);
  v1::WatchJobResponse first_event;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(
                  events.body.substr(0, events.body.find('\n')), &first_event)
                  .ok());
  EXPECT_EQ(first_event.event().sequence(), 1);
  EXPECT_EQ(first_event.job().id(), id);

  const HttpResult cancelled = http_request(*coordinator_, "POST", "/v1/jobs/" + id + ":cancel");
  ASSERT_EQ(cancelled.status, 200) << cancelled.body;
  v1::CancelJobResponse cancel;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(cancelled.body, &cancel).ok());
  EXPECT_EQ(cancel.job().state(), v1::JOB_STATE_CANCELLED);

  // A finished job's followed stream ends by itself after the last event.
  const HttpResult history =
      http_request(*coordinator_, "GET", "/v1/jobs/" + id + "/events?follow=true&after_sequence=1");
  ASSERT_EQ(history.status, 200);
  EXPECT_EQ(std::count(history.body.begin(), history.body.end(), '\n'), 1) << history.body;
  EXPECT_THAT(history.body, HasSubstr("JOB_STATE_CANCELLED"));

  const HttpResult checkpoints =
      http_request(*coordinator_, "GET", "/v1/jobs/" + id + "/checkpoints");
  EXPECT_EQ(checkpoints.status, 200);
  EXPECT_EQ(nlohmann::json::parse(checkpoints.body)["checkpoints"].size(), 0u);

  const HttpResult missing = http_request(*coordinator_, "GET", "/v1/jobs/job-nope");
  EXPECT_EQ(missing.status, 404);
  EXPECT_EQ(nlohmann::json::parse(missing.body)["code"], 5);
  EXPECT_EQ(http_request(*coordinator_, "GET", "/v1/jobs/job-nope/events").status, 404);
  const HttpResult finished = http_request(*coordinator_, "POST", "/v1/jobs/" + id + ":cancel");
  EXPECT_EQ(finished.status, 200) << "cancelling a cancelled job again is fine";
  const HttpResult nowhere = http_request(*coordinator_, "GET", "/v2/anything");
  EXPECT_EQ(nowhere.status, 404);
  EXPECT_EQ(nlohmann::json::parse(nowhere.body)["code"], 5);
  EXPECT_EQ(http_request(*coordinator_, "GET", "/healthz").status, 200);
}

// Unary and bidi calls without generated stubs: the health and reflection protos are not
// installed as C++ headers, and their wire format for these requests is a few bytes.
std::string to_string(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  (void)buffer.Dump(&slices);
  std::string out;
  for (const grpc::Slice& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

grpc::ByteBuffer to_buffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

bool next(grpc::CompletionQueue& queue) {
  void* tag = nullptr;
  bool ok = false;
  return queue.Next(&tag, &ok) && ok;
}

TEST_F(CoordinatorApiTest, HealthServiceAndReflectionAnswer) {
  grpc::GenericStub stub(coordinator_->channel());
  {
    grpc::CompletionQueue queue;
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    const grpc::ByteBuffer request = to_buffer("");  // HealthCheckRequest{service: ""}
    auto call = stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &queue);
    call->StartCall();
    grpc::ByteBuffer response;
    grpc::Status status;
    call->Finish(&response, &status, nullptr);
    ASSERT_TRUE(next(queue));
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(to_string(response), std::string("\x08\x01", 2));  // status: SERVING
    queue.Shutdown();
  }
  {
    grpc::CompletionQueue queue;
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    auto call = stub.PrepareCall(
        &context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &queue);
    call->StartCall(nullptr);
    ASSERT_TRUE(next(queue));
    call->Write(to_buffer(std::string("\x3a\x00", 2)), nullptr);  // list_services: ""
    ASSERT_TRUE(next(queue));
    grpc::ByteBuffer response;
    call->Read(&response, nullptr);
    ASSERT_TRUE(next(queue));
    const std::string bytes = to_string(response);
    EXPECT_THAT(bytes, HasSubstr("lomo.v1.JobService"));
    EXPECT_THAT(bytes, HasSubstr("lomo.v1.WorkerService"));
    EXPECT_THAT(bytes, HasSubstr("grpc.health.v1.Health"));
    call->WritesDone(nullptr);
    next(queue);
    grpc::Status status;
    call->Finish(&status, nullptr);
    next(queue);
    EXPECT_TRUE(status.ok()) << status.error_message();
    queue.Shutdown();
    while (next(queue)) {
    }
  }
}

TEST_F(CoordinatorApiTest, SigtermStopsGracefullyWithStreamsOpen) {
  const v1::Job job = submit_ok("watched");
  TestWorker worker(coordinator_->channel());
  worker.register_as("w-sigterm");
  worker.heartbeat();  // it runs nothing: ready for a job
  ASSERT_TRUE(worker.next_assignment(seconds(5)).has_value());

  // A followed watch of a running job never ends by itself.
  grpc::ClientContext context;
  context.set_deadline(deadline_in(30));
  v1::WatchJobRequest request;
  request.set_job_id(job.id());
  request.set_follow(true);
  auto watch = jobs_->WatchJob(&context, request);
  v1::WatchJobResponse response;
  ASSERT_TRUE(watch->Read(&response));

  std::thread reader([&] {
    while (watch->Read(&response)) {
    }
  });
  const auto start = Clock::now();
  EXPECT_EQ(coordinator_->terminate(seconds(15)), 0);
  // Well below the 15 s grace after which terminate() kills, with room for a loaded CI machine.
  EXPECT_LT(Clock::now() - start, seconds(10)) << "streams must not hold the shutdown";
  reader.join();
  const grpc::Status watch_status = watch->Finish();
  EXPECT_EQ(watch_status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(watch_status.error_message(), HasSubstr("after_sequence="));
  const auto closed = worker.wait_closed(seconds(5));
  ASSERT_TRUE(closed.has_value());
  EXPECT_EQ(closed->error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(coordinator_->log(), HasSubstr("stopped"));
}

}  // namespace
}  // namespace lomo::server::testing
