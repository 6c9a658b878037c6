// The worker protocol against a real lomo-coordinator: test workers on real gRPC streams register,
// receive assignments, report states, send events and checkpoints, stop heartbeating, and get
// cancelled.
#include <gmock/gmock.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <optional>

#include "common/sha256.h"
#include "tests/integration/coordinator_harness.h"
#include "tests/integration/coordinator_test_fixture.h"

namespace lomo::server::testing {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::MessageDifferencer;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::SizeIs;

constexpr double kHeartbeatTimeout = 2.0;

class CoordinatorWorkerTest : public CoordinatorTest {
 protected:
  CoordinatorWorkerTest() : CoordinatorTest(kHeartbeatTimeout) {}

  v1::Job submit_ok(const std::string& name, int64_t priority = 0,
                    const std::string& device = "cpu") {
    v1::Job job;
    const grpc::Status status = submit(*jobs_, submit_request(name, priority, device), &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  std::unique_ptr<TestWorker> worker(const std::string& id,
                                     v1::DeviceKind kind = v1::DEVICE_KIND_CPU) {
    auto w = std::make_unique<TestWorker>(coordinator_->channel());
    const v1::Registered registered = w->register_as(id, kind);
    EXPECT_EQ(registered.worker_id(), id);
    EXPECT_EQ(registered.heartbeat_interval_ms(), 200);
    w->start_heartbeats(milliseconds(200));
    return w;
  }

  grpc::Status list_checkpoints(const std::string& job_id, v1::ListCheckpointsResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::ListCheckpointsRequest request;
    request.set_job_id(job_id);
    return jobs_->ListCheckpoints(&context, request, response);
  }

  // Every chunk of a checkpoint, reassembled by path; the status of the stream.
  grpc::Status download(const std::string& checkpoint_id, std::map<std::string, std::string>* files,
                        std::map<std::string, std::string>* digests) {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::DownloadCheckpointRequest request;
    request.set_checkpoint_id(checkpoint_id);
    auto reader = jobs_->DownloadCheckpoint(&context, request);
    v1::DownloadCheckpointResponse response;
    while (reader->Read(&response)) {
      const v1::FileChunk& chunk = response.chunk();
      std::string& data = (*files)[chunk.path()];
      EXPECT_EQ(chunk.offset(), static_cast<int64_t>(data.size())) << chunk.path();
      data += chunk.data();
      if (chunk.last_chunk_of_file()) (*digests)[chunk.path()] = chunk.sha256();
    }
    return reader->Finish();
  }

  // WorkerService.FetchCheckpoint as `worker_id` for (job_id, attempt): the checkpoint the first
  // message names, the files reassembled by path (each chunk checked), and the stream's status.
  grpc::Status fetch(const std::string& worker_id, const std::string& job_id, int64_t attempt,
                     v1::CheckpointInfo* info, std::map<std::string, std::string>* files) {
    info->Clear();
    files->clear();
    const auto stub = v1::WorkerService::NewStub(coordinator_->channel());
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::FetchCheckpointRequest request;
    request.set_worker_id(worker_id);
    request.set_job_id(job_id);
    request.set_attempt(attempt);
    auto reader = stub->FetchCheckpoint(&context, request);
    v1::FetchCheckpointResponse response;
    for (bool first = true; reader->Read(&response); first = false) {
      if (first) {
        *info = response.checkpoint();
        continue;
      }
      const v1::FileChunk& chunk = response.chunk();
      std::string& data = (*files)[chunk.path()];
      EXPECT_EQ(chunk.offset(), static_cast<int64_t>(data.size())) << chunk.path();
      data += chunk.data();
      if (chunk.last_chunk_of_file()) {
        EXPECT_EQ(chunk.sha256(), sha256_hex(data)) << chunk.path();
      }
    }
    return reader->Finish();
  }
};

TEST_F(CoordinatorWorkerTest, AssignmentEventsCheckpointsAndSuccess) {
  const v1::Job submitted = submit_ok("round-trip");
  auto w = worker("w1");
  const auto assignment = w->next_assignment(seconds(5));
  ASSERT_TRUE(assignment.has_value());
  EXPECT_EQ(assignment->job_id(), submitted.id());
  EXPECT_EQ(assignment->attempt(), 1);
  EXPECT_TRUE(MessageDifferencer::Equals(assignment->spec(), submitted.spec()));
  EXPECT_FALSE(assignment->canonical_spec().empty());
  EXPECT_EQ(assignment->canonical_spec(), submitted.canonical_spec());
  w->set_current(submitted.id(), 1);

  v1::Job job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_ASSIGNED, seconds(30));
  EXPECT_EQ(job.worker_id(), "w1");
  EXPECT_EQ(job.attempt(), 1);

  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));
  EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(job.has_start_time());

  ASSERT_TRUE(w->send_metrics(submitted.id(), 1, 10, 2.5, 1000));
  ASSERT_TRUE(w->send_metrics(submitted.id(), 1, 20, 2.25, 1200));
  ASSERT_TRUE(wait_until(
      [&] { return get(*jobs_, submitted.id(), &job).ok() && job.progress().step() == 20; },
      seconds(5)));
  EXPECT_DOUBLE_EQ(job.progress().loss(), 2.25);
  EXPECT_DOUBLE_EQ(job.progress().tokens_per_second(), 1200);
  EXPECT_EQ(job.progress().total_steps(), 100);

  // A correct checkpoint: several chunks, a subdirectory, an empty file.
  std::string weights(2500, '\0');
  for (size_t i = 0; i < weights.size(); ++i) weights[i] = static_cast<char>(i * 31 + 7);
  const std::map<std::string, std::string> files = {
      {"model.safetensors", weights}, {"config.json", R"({"a": 1})"}, {"state/empty.txt", ""}};
  auto ack = w->upload_checkpoint(submitted.id(), 1, 20, files);
  ASSERT_TRUE(ack.has_value());
  EXPECT_TRUE(ack->committed()) << ack->error();
  EXPECT_EQ(ack->step(), 20);

  // A corrupted one is rejected with the reason and never listed.
  ack = w->upload_checkpoint(submitted.id(), 1, 30, files, 1000, "model.safetensors");
  ASSERT_TRUE(ack.has_value());
  EXPECT_FALSE(ack->committed());
  EXPECT_THAT(ack->error(), HasSubstr("model.safetensors: SHA-256 mismatch"));
  // So is a path that leaves the checkpoint.
  ack = w->upload_checkpoint(submitted.id(), 1, 40, {{"../../escape", "x"}});
  ASSERT_TRUE(ack.has_value());
  EXPECT_FALSE(ack->committed());
  EXPECT_THAT(ack->error(), HasSubstr("must be relative"));

  v1::ListCheckpointsResponse checkpoints;
  ASSERT_TRUE(list_checkpoints(submitted.id(), &checkpoints).ok());
  ASSERT_THAT(checkpoints.checkpoints(), SizeIs(1));
  const v1::CheckpointInfo& info = checkpoints.checkpoints(0);
  EXPECT_EQ(info.checkpoint_id(), submitted.id() + "/step-00000020");
  EXPECT_EQ(info.step(), 20);
  EXPECT_EQ(info.size_bytes(),
            static_cast<int64_t>(weights.size() + files.at("config.json").size()));
  EXPECT_THAT(info.files(), SizeIs(3));
  EXPECT_TRUE(info.has_commit_time());
  const fs::path root = dir_.path() / "data" / "checkpoints" / submitted.id();
  EXPECT_TRUE(fs::exists(root / "step-00000020" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(root / "step-00000030"));
  for (const auto& entry : fs::directory_iterator(root)) {  // the rejected upload left nothing
    EXPECT_FALSE(entry.path().filename().string().starts_with(".tmp-step-00000030"))
        << entry.path();
  }

  std::map<std::string, std::string> downloaded, digests;
  const grpc::Status status = download(info.checkpoint_id(), &downloaded, &digests);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(downloaded, files);
  for (const auto& [path, data] : files) EXPECT_EQ(digests[path], sha256_hex(data)) << path;
  EXPECT_EQ(download(submitted.id() + "/step-00000030", &downloaded, &digests).error_code(),
            grpc::StatusCode::NOT_FOUND);

  // The checkpoint is in the job's history; the worker's own events too.
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_SUCCEEDED));
  job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_SUCCEEDED, seconds(30));
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(job.has_end_time());
  const std::vector<v1::JobEvent> events = all_events(*jobs_, submitted.id());
  std::vector<std::string> kinds;
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].sequence(), static_cast<int64_t>(i + 1));
    if (events[i].has_state_change()) {
      kinds.push_back(v1::JobState_Name(events[i].state_change().state()));
    } else if (events[i].has_metrics()) {
      kinds.push_back("metrics");
    } else if (events[i].has_log()) {
      kinds.push_back("log");
    } else if (events[i].has_checkpoint()) {
      kinds.push_back("checkpoint");
    }
  }
  EXPECT_THAT(kinds, ::testing::ElementsAre("JOB_STATE_QUEUED", "JOB_STATE_ASSIGNED",
                                            "JOB_STATE_RUNNING", "metrics", "log", "metrics", "log",
                                            "checkpoint", "JOB_STATE_SUCCEEDED"));

  const grpc::Status too_late = cancel(*jobs_, submitted.id(), nullptr);
  EXPECT_EQ(too_late.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(too_late.error_message(), HasSubstr("has already ended: SUCCEEDED"));

  // Idle again: the next job goes to the same worker.
  w->set_current("", 0);
  const v1::Job next = submit_ok("next");
  const auto second = w->next_assignment(seconds(5));
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->job_id(), next.id());
}

// One evaluation result as the worker daemon reports it; `accuracy` only for a multiple-choice
// eval.
bool send_eval(TestWorker& w, const std::string& job_id, int64_t step, double loss,
               std::optional<double> accuracy) {
  v1::WorkerMessage message;
  v1::JobEvents* events = message.mutable_events();
  events->set_job_id(job_id);
  events->set_attempt(1);
  v1::EvalResult* eval = events->add_events()->mutable_eval();
  eval->set_step(step);
  eval->set_loss(loss);
  if (accuracy) {
    eval->set_accuracy(*accuracy);
    eval->set_examples(8);
  }
  return w.send(message);
}

// The latest evaluation shows in the job's progress, over gRPC and REST alike: its loss and, for a
// multiple-choice eval, its accuracy; a later loss-only eval leaves no stale accuracy behind. The
// values are exact in binary, so they are compared exactly.
TEST_F(CoordinatorWorkerTest, TheLatestEvaluationsLossAndAccuracyShowInTheProgress) {
  const v1::Job submitted = submit_ok("eval");
  auto w = worker("w1");
  ASSERT_TRUE(w->next_assignment(seconds(5)).has_value());
  w->set_current(submitted.id(), 1);
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));

  ASSERT_TRUE(send_eval(*w, submitted.id(), 10, 1.75, 0.625));
  v1::Job job;
  ASSERT_TRUE(wait_until(
      [&] { return get(*jobs_, submitted.id(), &job).ok() && job.progress().eval_loss() == 1.75; },
      seconds(5)));
  ASSERT_TRUE(job.progress().has_eval_accuracy());
  EXPECT_EQ(job.progress().eval_accuracy(), 0.625);
  const HttpResult rest = http_request(*coordinator_, "GET", "/v1/jobs/" + submitted.id());
  ASSERT_EQ(rest.status, 200) << rest.body;
  v1::GetJobResponse from_rest;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(rest.body, &from_rest).ok()) << rest.body;
  EXPECT_EQ(from_rest.job().progress().eval_loss(), 1.75);
  ASSERT_TRUE(from_rest.job().progress().has_eval_accuracy()) << rest.body;
  EXPECT_EQ(from_rest.job().progress().eval_accuracy(), 0.625);

  ASSERT_TRUE(send_eval(*w, submitted.id(), 20, 1.5, std::nullopt));
  ASSERT_TRUE(wait_until(
      [&] { return get(*jobs_, submitted.id(), &job).ok() && job.progress().eval_loss() == 1.5; },
      seconds(5)));
  EXPECT_FALSE(job.progress().has_eval_accuracy());
}

TEST_F(CoordinatorWorkerTest, MissedHeartbeatsFailTheJobWithTheReason) {
  const v1::Job submitted = submit_ok("silent");
  auto w = worker("w-silent");
  const auto assignment = w->next_assignment(seconds(5));
  ASSERT_TRUE(assignment.has_value());
  w->set_current(submitted.id(), 1);
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));

  // The stream stays open; only the heartbeats stop.
  w->stop_heartbeats();
  const auto stopped = Clock::now();
  const v1::Job job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_FAILED, seconds(30));
  ASSERT_EQ(job.state(), v1::JOB_STATE_FAILED);
  const double waited = std::chrono::duration<double>(Clock::now() - stopped).count();
  EXPECT_LT(waited, kHeartbeatTimeout * 1.5 + 0.5) << "detected within the timeout (+ scan period)";
  EXPECT_THAT(job.failure_reason(), HasSubstr("worker w-silent missed heartbeats for"));
  const auto closed = w->wait_closed(seconds(5));
  ASSERT_TRUE(closed.has_value()) << "the dead worker's stream is closed";
  EXPECT_EQ(closed->error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(CoordinatorWorkerTest, ADisconnectedWorkerFailsItsJobAfterTheTimeout) {
  const v1::Job submitted = submit_ok("vanishing");
  auto w = worker("w-gone");
  ASSERT_TRUE(w->next_assignment(seconds(5)).has_value());
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));
  w->disconnect();
  const v1::Job job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_FAILED, seconds(30));
  ASSERT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(job.failure_reason(), HasSubstr("worker w-gone missed heartbeats for"));
}

TEST_F(CoordinatorWorkerTest, AWorkerThatReconnectsInTimeKeepsItsJob) {
  const v1::Job submitted = submit_ok("blip");
  auto first = worker("w-blip");
  ASSERT_TRUE(first->next_assignment(seconds(5)).has_value());
  ASSERT_TRUE(first->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));
  first->disconnect();

  auto second = std::make_unique<TestWorker>(coordinator_->channel());
  second->register_as("w-blip");
  second->set_current(submitted.id(), 1);
  second->start_heartbeats(milliseconds(200));
  std::this_thread::sleep_for(std::chrono::duration<double>(kHeartbeatTimeout * 1.5));
  v1::Job job;
  ASSERT_TRUE(get(*jobs_, submitted.id(), &job).ok());
  EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(second->report(submitted.id(), 1, v1::JOB_STATE_SUCCEEDED));
  EXPECT_EQ(wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_SUCCEEDED, seconds(30)).state(),
            v1::JOB_STATE_SUCCEEDED);

  // Reconnecting without the job loses it at once, with the reason.
  const v1::Job other = submit_ok("lost");
  ASSERT_TRUE(second->next_assignment(seconds(5)).has_value());
  ASSERT_TRUE(second->report(other.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, other.id(), v1::JOB_STATE_RUNNING, seconds(30));
  second->disconnect();
  auto third = std::make_unique<TestWorker>(coordinator_->channel());
  third->register_as("w-blip");
  third->heartbeat();
  job = wait_for_state(*jobs_, other.id(), v1::JOB_STATE_FAILED, seconds(30));
  ASSERT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(job.failure_reason(), HasSubstr("reconnected without job " + other.id()));
}

TEST_F(CoordinatorWorkerTest, CancellationReachesTheWorker) {
  const v1::Job submitted = submit_ok("to-cancel");
  auto w = worker("w-cancel");
  ASSERT_TRUE(w->next_assignment(seconds(5)).has_value());
  w->set_current(submitted.id(), 1);
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));

  v1::Job job;
  const auto requested = Clock::now();
  ASSERT_TRUE(cancel(*jobs_, submitted.id(), &job).ok());
  EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING) << "until the worker confirms";
  const auto message = w->next_of(v1::CoordinatorMessage::kCancel, seconds(10));
  ASSERT_TRUE(message.has_value());
  // Pushed at once; the bound leaves a loaded 2-core CI machine room for scheduling delays.
  EXPECT_LT(Clock::now() - requested, seconds(5));
  EXPECT_EQ(message->cancel().job_id(), submitted.id());
  EXPECT_EQ(message->cancel().attempt(), 1);

  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_CANCELLED, "stopped at step 3"));
  job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_CANCELLED, seconds(30));
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED);
  const std::vector<v1::JobEvent> events = all_events(*jobs_, submitted.id());
  ASSERT_FALSE(events.empty());
  EXPECT_THAT(events.back().state_change().reason(), HasSubstr("cancelled by request"));
}

// The training process may exit with an error when it is stopped: with a cancel pending, that is
// the cancel taking effect, not a failure.
TEST_F(CoordinatorWorkerTest, ACancelledJobWhoseWorkerReportsAFailureIsCancelled) {
  const v1::Job submitted = submit_ok("cancel-then-fail");
  auto w = worker("w-cancel");
  ASSERT_TRUE(w->next_assignment(seconds(5)).has_value());
  w->set_current(submitted.id(), 1);
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(cancel(*jobs_, submitted.id(), nullptr).ok());
  ASSERT_TRUE(w->next_of(v1::CoordinatorMessage::kCancel, seconds(5)).has_value());
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_FAILED, "exited with signal 15"));
  const v1::Job job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_CANCELLED, seconds(10));
  EXPECT_THAT(job.failure_reason(), IsEmpty());
  const std::vector<v1::JobEvent> events = all_events(*jobs_, submitted.id());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().state_change().reason(), "cancelled by request; exited with signal 15");
}

// A worker gets no job until a heartbeat says it runs nothing (it may still be stopping an
// attempt the coordinator has forgotten); the daemon sends one at once, so this costs a new
// worker at most one heartbeat interval.
TEST_F(CoordinatorWorkerTest, AWorkerGetsNoJobBeforeAHeartbeatSaysItRunsNothing) {
  const v1::Job submitted = submit_ok("waits for a heartbeat");
  TestWorker w(coordinator_->channel());
  w.register_as("w-quiet");
  EXPECT_FALSE(w.next_assignment(milliseconds(500)).has_value());
  v1::Job job;
  ASSERT_TRUE(get(*jobs_, submitted.id(), &job).ok());
  EXPECT_EQ(job.wait_reason(), "waiting for 1 idle cpu worker, 0 idle");
  ASSERT_TRUE(w.heartbeat());
  const auto assignment = w.next_assignment(seconds(5));
  ASSERT_TRUE(assignment.has_value());
  EXPECT_EQ(assignment->job_id(), submitted.id());
}

TEST_F(CoordinatorWorkerTest, ACancelledJobWhoseWorkerDiesIsCancelled) {
  const v1::Job submitted = submit_ok("cancel-then-die");
  auto w = worker("w-dies");
  ASSERT_TRUE(w->next_assignment(seconds(5)).has_value());
  ASSERT_TRUE(cancel(*jobs_, submitted.id(), nullptr).ok());
  ASSERT_TRUE(w->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
  w->disconnect();
  const v1::Job job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_CANCELLED, seconds(30));
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED);
}

TEST_F(CoordinatorWorkerTest, QueuedJobsAreServedByPriorityAcrossTwoWorkers) {
  const v1::Job low = submit_ok("low", 1);
  const v1::Job high = submit_ok("high", 9);
  const v1::Job mid = submit_ok("mid", 5);
  auto a = worker("w-a");
  const auto first = a->next_assignment(seconds(5));
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->job_id(), high.id());
  auto b = worker("w-b");
  const auto second = b->next_assignment(seconds(5));
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->job_id(), mid.id());
  EXPECT_FALSE(a->next_assignment(milliseconds(300)).has_value()) << "a is busy";

  ASSERT_TRUE(b->report(mid.id(), 1, v1::JOB_STATE_SUCCEEDED));
  const auto third = b->next_assignment(seconds(5));
  ASSERT_TRUE(third.has_value());
  EXPECT_EQ(third->job_id(), low.id());
}

// A cuda job cannot be submitted until the CUDA backend exists (spec_route_test); that a GPU job
// goes only to a GPU worker is the scheduler's rule, checked in coordinator_scheduler_test. Here,
// through the real coordinator: a CPU job is never given to a GPU worker, even an idle one.
TEST_F(CoordinatorWorkerTest, JobsGoOnlyToWorkersWithTheirDeviceKind) {
  auto gpu = worker("w-gpu", v1::DEVICE_KIND_CUDA);
  const v1::Job cpu_job = submit_ok("cpu", 0, "cpu");
  EXPECT_FALSE(gpu->next_assignment(milliseconds(500)).has_value()) << "a GPU worker got it";
  v1::Job job;
  ASSERT_TRUE(get(*jobs_, cpu_job.id(), &job).ok());
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  auto cpu = worker("w-cpu", v1::DEVICE_KIND_CPU);
  const auto assignment = cpu->next_assignment(seconds(5));
  ASSERT_TRUE(assignment.has_value());
  EXPECT_EQ(assignment->job_id(), cpu_job.id());
}

TEST_F(CoordinatorWorkerTest, OnlyTheWorkerOwningTheAttemptFetchesTheNewestCheckpoint) {
  const v1::Job submitted = submit_ok("fetch");
  auto w1 = worker("w1");
  ASSERT_TRUE(w1->next_assignment(seconds(5)).has_value());
  w1->set_current(submitted.id(), 1);
  v1::CheckpointInfo info;
  std::map<std::string, std::string> files;
  // No checkpoint yet: the stream ends OK with nothing in it.
  grpc::Status status = fetch("w1", submitted.id(), 1, &info, &files);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_FALSE(info.has_commit_time());
  EXPECT_TRUE(files.empty());

  const std::map<std::string, std::string> step10 = {{"model.safetensors", std::string(3000, 'a')},
                                                     {"state/rng.json", "{}"}};
  const std::map<std::string, std::string> step20 = {{"model.safetensors", std::string(2500, 'b')},
                                                     {"state/rng.json", R"({"n": 2})"}};
  for (const auto& [step, content] : {std::pair{10, step10}, std::pair{20, step20}}) {
    const auto ack = w1->upload_checkpoint(submitted.id(), 1, step, content, 1000);
    ASSERT_TRUE(ack.has_value());
    ASSERT_TRUE(ack->committed()) << ack->error();
  }
  status = fetch("w1", submitted.id(), 1, &info, &files);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(info.checkpoint_id(), submitted.id() + "/step-00000020");
  EXPECT_EQ(info.step(), 20);
  EXPECT_THAT(info.files(), SizeIs(2));
  EXPECT_EQ(files, step20);

  // Anyone else is refused: another worker, the owner for another attempt, an unknown worker.
  auto w2 = worker("w2");
  EXPECT_EQ(fetch("w2", submitted.id(), 1, &info, &files).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(fetch("w1", submitted.id(), 2, &info, &files).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(fetch("nobody", submitted.id(), 1, &info, &files).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(files.empty());
}

TEST_F(CoordinatorWorkerTest, ReportsForStaleAttemptsOrOtherWorkersAreIgnored) {
  const v1::Job submitted = submit_ok("owned");
  auto owner = worker("w-owner");
  ASSERT_TRUE(owner->next_assignment(seconds(5)).has_value());
  auto stranger = worker("w-stranger");
  ASSERT_TRUE(stranger->report(submitted.id(), 1, v1::JOB_STATE_FAILED, "not mine"));
  ASSERT_TRUE(owner->report(submitted.id(), 7, v1::JOB_STATE_FAILED, "stale attempt"));
  auto ack = stranger->upload_checkpoint(submitted.id(), 1, 5, {{"a.bin", "x"}});
  ASSERT_TRUE(ack.has_value());
  EXPECT_FALSE(ack->committed());
  EXPECT_THAT(ack->error(), HasSubstr("is not assigned to worker w-stranger"));
  // The owner's own report is processed after these (stream order): still RUNNING-able.
  ASSERT_TRUE(owner->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  const v1::Job job = wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));
  EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(job.failure_reason(), "");
}

TEST_F(CoordinatorWorkerTest, WatchFollowsLiveEventsAndResumes) {
  const v1::Job submitted = submit_ok("watched");
  auto w = worker("w-watch");
  ASSERT_TRUE(w->next_assignment(seconds(5)).has_value());

  grpc::ClientContext context;
  context.set_deadline(deadline_in(20));
  v1::WatchJobRequest request;
  request.set_job_id(submitted.id());
  request.set_follow(true);
  auto watch = jobs_->WatchJob(&context, request);
  std::vector<int64_t> sequences;
  v1::WatchJobResponse response;
  std::thread reader([&] {
    while (watch->Read(&response)) sequences.push_back(response.event().sequence());
  });
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(w->send_metrics(submitted.id(), 1, 1, 3.0, 10));
  ASSERT_TRUE(w->report(submitted.id(), 1, v1::JOB_STATE_SUCCEEDED));
  reader.join();  // the stream ends by itself once the job has ended
  EXPECT_TRUE(watch->Finish().ok());
  EXPECT_EQ(sequences, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(response.job().state(), v1::JOB_STATE_SUCCEEDED);

  grpc::ClientContext resume_context;
  resume_context.set_deadline(deadline_in(10));
  request.set_after_sequence(4);
  auto resumed = jobs_->WatchJob(&resume_context, request);
  std::vector<int64_t> rest;
  while (resumed->Read(&response)) rest.push_back(response.event().sequence());
  EXPECT_TRUE(resumed->Finish().ok());
  EXPECT_EQ(rest, (std::vector<int64_t>{5, 6}));
}

}  // namespace
}  // namespace lomo::server::testing
