// The worker daemon (`lomo-worker serve`) as a real process against a fake coordinator on
// loopback: registration, heartbeats, running an assignment in a child process, relaying its
// metrics and logs, uploading checkpoints, cancel, crashes, SIGKILL of the child, SIGTERM of the
// daemon, reconnecting, and /metrics. The end-to-end tests with lomo-coordinator are in
// control_plane_test.cc.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>
#include <optional>
#include <regex>

#include "common/checkpoint_layout.h"
#include "common/sha256.h"
#include "tests/integration/fake_coordinator.h"
#include "tests/integration/test_support.h"

namespace lomo::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

const fs::path kWorker = LOMO_WORKER_BIN;
const fs::path kSourceDir = LOMO_SOURCE_DIR;

class WorkerDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = tiny_model(kWorker);
    coordinator_ = std::make_unique<FakeCoordinator>();
  }
  void TearDown() override {
    if (worker_ && worker_->running()) worker_->terminate(seconds(20));
    if (HasFailure() || std::getenv("LOMO_TEST_VERBOSE") != nullptr) {
      std::cerr << "worker log:\n" << read_file(log()) << "\n";
    }
  }

  fs::path log() const { return scratch_.path() / "worker.log"; }
  fs::path work_dir() const { return scratch_.path() / "work"; }

  void start_worker(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv{
        kWorker.string(), "serve",       "--coordinator",  coordinator_->address(),
        "--device",       "cpu",         "--work-dir",     work_dir().string(),
        "--worker-id",    "test-worker", "--cancel-grace", "5"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    worker_ = start_program(argv, log(), {"OMP_NUM_THREADS=1"});
    ASSERT_TRUE(coordinator_->wait_registered(1, seconds(20))) << read_file(log());
  }

  // The pid of the training child, from the daemon's log.
  int training_pid() {
    static const std::regex pattern(R"(training in pid (\d+))");
    std::smatch match;
    int pid = 0;
    EXPECT_TRUE(wait_until(
        [&] {
          const std::string text = read_file(log());
          if (std::regex_search(text, match, pattern)) pid = std::stoi(match[1].str());
          return pid != 0;
        },
        seconds(60)))
        << "no training child in the daemon's log";
    return pid;
  }

  int64_t metrics_events(const std::string& job_id) {
    int64_t count = 0;
    for (const auto& e : coordinator_->events(job_id)) count += e.has_metrics() ? 1 : 0;
    return count;
  }

  ScratchDir scratch_{"lomo-worker-daemon-test"};
  fs::path model_;
  std::unique_ptr<FakeCoordinator> coordinator_;
  std::unique_ptr<ChildProcess> worker_;
};

TEST_F(WorkerDaemonTest, RegistersItsDeviceAndHeartbeatsAtTheIntervalItIsGiven) {
  start_worker();
  const auto registration = coordinator_->wait_registered(1, seconds(1));
  ASSERT_TRUE(registration);
  EXPECT_EQ(registration->worker_id(), "test-worker");
  EXPECT_EQ(registration->device().kind(), lomo::v1::DEVICE_KIND_CPU);
  EXPECT_GT(registration->device().memory_bytes(), 0);
  EXPECT_FALSE(registration->device().name().empty());
  // The coordinator is on loopback, so the route to it starts at 127.0.0.1: that is where gang
  // peers (on this host) reach this worker's trainer.
  EXPECT_EQ(registration->advertise_address(), "127.0.0.1");
  // Interval 200 ms: five beats within three seconds leaves room for a loaded machine.
  EXPECT_TRUE(wait_until([&] { return coordinator_->heartbeats() >= 5; }, seconds(3)));
}

TEST_F(WorkerDaemonTest, AnAdvertiseAddressGivenOnTheCommandLineIsTheOneRegistered) {
  start_worker({"--advertise-address", "10.1.2.3"});
  const auto registration = coordinator_->wait_registered(1, seconds(1));
  ASSERT_TRUE(registration);
  EXPECT_EQ(registration->advertise_address(), "10.1.2.3");
}

TEST_F(WorkerDaemonTest, RunsAnAssignmentRelaysProgressAndCommitsTheFinalCheckpointBeforeSuccess) {
  start_worker();
  ASSERT_TRUE(coordinator_->assign("job-1", 1, tiny_job_struct(kSourceDir, model_, 20, 10)));
  const auto status = coordinator_->wait_terminal("job-1", seconds(90));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_SUCCEEDED) << status->reason();
  EXPECT_TRUE(coordinator_->wait_state("job-1", lomo::v1::JOB_STATE_RUNNING, milliseconds(0)));

  // Every step's metrics, the evaluation, and the child's output lines arrived.
  const auto events = coordinator_->events("job-1");
  std::vector<int64_t> steps;
  bool eval = false, done_line = false;
  for (const auto& e : events) {
    if (e.has_metrics()) {
      steps.push_back(e.metrics().step());
      EXPECT_EQ(e.metrics().total_steps(), 20);
      EXPECT_GT(e.metrics().tokens_per_second(), 0);
      EXPECT_GT(e.metrics().peak_memory_bytes().at("total"), 0);
    }
    eval = eval || e.has_eval();
    done_line = done_line || (e.has_log() && e.log().text().rfind("done: 20 steps", 0) == 0);
    EXPECT_TRUE(e.has_time());
  }
  std::vector<int64_t> expected(20);
  for (int i = 0; i < 20; ++i) expected[i] = i + 1;
  EXPECT_EQ(steps, expected);
  EXPECT_TRUE(eval);
  EXPECT_TRUE(done_line);

  // Both checkpoints were committed, byte for byte what the trainer wrote, and the final one
  // before SUCCEEDED was reported.
  const auto committed = coordinator_->committed("job-1");
  ASSERT_EQ(committed.count(20), 1u);
  const fs::path local = work_dir() / "jobs/job-1/attempt-1/out/checkpoints/step-00000020";
  size_t files = 0;
  for (const auto& entry : fs::recursive_directory_iterator(local)) {
    if (!entry.is_regular_file()) continue;
    ++files;
    const std::string relative = fs::relative(entry.path(), local).generic_string();
    ASSERT_EQ(committed.at(20).count(relative), 1u) << relative;
    EXPECT_EQ(committed.at(20).at(relative), read_file(entry.path())) << relative;
  }
  EXPECT_EQ(files, committed.at(20).size());
  EXPECT_THAT(committed.at(20), ::testing::Contains(::testing::Key("model.safetensors")));
  const auto statuses = coordinator_->statuses();
  size_t succeeded_at = 0;
  for (size_t i = 0; i < statuses.size(); ++i) {
    if (statuses[i].state() == lomo::v1::JOB_STATE_SUCCEEDED) succeeded_at = i;
  }
  EXPECT_LE(coordinator_->statuses_before_commit(20), succeeded_at);

  // The job's spec went to the child with output.dir moved into the attempt directory.
  EXPECT_THAT(read_file(work_dir() / "jobs/job-1/attempt-1/job.yaml"),
              HasSubstr((work_dir() / "jobs/job-1/attempt-1/out").string()));
  // Idle again: the heartbeat names no job.
  EXPECT_TRUE(
      wait_until([&] { return coordinator_->last_heartbeat().job_id().empty(); }, seconds(5)));
}

TEST_F(WorkerDaemonTest, CancelStopsTheTrainingWithinSecondsAndReportsCancelled) {
  start_worker();
  ASSERT_TRUE(coordinator_->assign("job-c", 1, tiny_job_struct(kSourceDir, model_, 100000, 0)));
  ASSERT_TRUE(wait_until([&] { return metrics_events("job-c") >= 3; }, seconds(60)));
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(coordinator_->cancel("job-c", 1));
  const auto status = coordinator_->wait_terminal("job-c", seconds(20));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_CANCELLED) << status->reason();
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(10));
  EXPECT_TRUE(
      wait_until([&] { return coordinator_->last_heartbeat().job_id().empty(); }, seconds(5)));
}

TEST_F(WorkerDaemonTest, AChildThatFailsIsReportedWithItsErrorMessage) {
  start_worker();
  const fs::path missing = scratch_.path() / "no-such-model";
  ASSERT_TRUE(coordinator_->assign(
      "job-f", 1, tiny_job_struct(kSourceDir, model_, 20, 0, {"model.path=" + missing.string()})));
  const auto status = coordinator_->wait_terminal("job-f", seconds(30));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status->reason(), HasSubstr("exited with code 1"));
  EXPECT_THAT(status->reason(), HasSubstr("lomo-worker train:"));
  EXPECT_THAT(status->reason(), HasSubstr(missing.string()));
  // The daemon survives and takes the next job.
  ASSERT_TRUE(coordinator_->assign("job-g", 1, tiny_job_struct(kSourceDir, model_, 5, 0)));
  const auto next = coordinator_->wait_terminal("job-g", seconds(60));
  ASSERT_TRUE(next);
  EXPECT_EQ(next->state(), lomo::v1::JOB_STATE_SUCCEEDED) << next->reason();
}

TEST_F(WorkerDaemonTest, ASpecThatDoesNotParseFailsNamingTheField) {
  start_worker();
  google::protobuf::Struct spec = tiny_job_struct(kSourceDir, model_, 20, 0);
  (*(*spec.mutable_fields())["optimizer"].mutable_struct_value()->mutable_fields())["lr"]
      .set_number_value(-1);
  ASSERT_TRUE(coordinator_->assign("job-s", 1, spec));
  const auto status = coordinator_->wait_terminal("job-s", seconds(20));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status->reason(), HasSubstr("optimizer.lr"));
}

TEST_F(WorkerDaemonTest, AChildKilledBySigkillIsReportedAsAFailureNamingTheSignal) {
  start_worker();
  ASSERT_TRUE(coordinator_->assign("job-k", 1, tiny_job_struct(kSourceDir, model_, 100000, 0)));
  const int pid = training_pid();
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_until([&] { return metrics_events("job-k") >= 1; }, seconds(60)));
  ::kill(pid, SIGKILL);
  const auto status = coordinator_->wait_terminal("job-k", seconds(20));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status->reason(), HasSubstr("killed by SIGKILL (out of memory?)"));
  EXPECT_TRUE(worker_->running());
}

TEST_F(WorkerDaemonTest, ALaterAttemptResumesFromTheJobsLastCommittedCheckpoint) {
  start_worker();
  const auto spec = tiny_job_struct(kSourceDir, model_, 100000, 5);
  ASSERT_TRUE(coordinator_->assign("job-a", 1, spec));
  const int pid = training_pid();
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_until([&] { return !coordinator_->committed("job-a").empty(); }, seconds(60)));
  ::kill(pid, SIGKILL);
  const auto failed = coordinator_->wait_terminal("job-a", seconds(30));
  ASSERT_TRUE(failed);
  ASSERT_EQ(failed->state(), lomo::v1::JOB_STATE_FAILED);
  // The runner reports only after its last upload: the newest committed step is final now.
  const int64_t resume_step = coordinator_->committed("job-a").rbegin()->first;
  const size_t events_before = coordinator_->events("job-a").size();

  ASSERT_TRUE(coordinator_->assign("job-a", 2, spec));
  std::vector<lomo::v1::JobEvent> events;
  ASSERT_TRUE(wait_until(
      [&] {
        events = coordinator_->events("job-a");
        for (size_t i = events_before; i < events.size(); ++i) {
          if (events[i].has_metrics()) return true;
        }
        return false;
      },
      seconds(60)));
  bool resumed_line = false;
  int64_t first_step = 0;
  for (size_t i = events_before; i < events.size(); ++i) {
    if (events[i].has_log() &&
        events[i].log().text().find("resuming from the job's committed checkpoint at step " +
                                    std::to_string(resume_step)) != std::string::npos) {
      resumed_line = true;
    }
    if (events[i].has_metrics() && first_step == 0) first_step = events[i].metrics().step();
  }
  EXPECT_TRUE(resumed_line);
  EXPECT_EQ(first_step, resume_step + 1);
  // The checkpoint came over the worker protocol, asked for by this worker for its own attempt.
  const auto fetch = coordinator_->last_fetch();
  ASSERT_TRUE(fetch);
  EXPECT_EQ(fetch->job_id(), "job-a");
  EXPECT_EQ(fetch->attempt(), 2);
  const auto registered = coordinator_->wait_registered(1, seconds(1));
  ASSERT_TRUE(registered);
  EXPECT_EQ(fetch->worker_id(), registered->worker_id());
  ASSERT_TRUE(coordinator_->cancel("job-a", 2));
  EXPECT_TRUE(wait_until(
      [&] {
        for (const auto& s : coordinator_->statuses()) {
          if (s.attempt() == 2 && s.state() == lomo::v1::JOB_STATE_CANCELLED) return true;
        }
        return false;
      },
      seconds(20)));
}

TEST_F(WorkerDaemonTest, SigtermCheckpointsUploadsReportsAndExits) {
  start_worker();
  ASSERT_TRUE(coordinator_->assign("job-t", 1, tiny_job_struct(kSourceDir, model_, 100000, 0)));
  ASSERT_TRUE(wait_until([&] { return metrics_events("job-t") >= 3; }, seconds(60)));
  worker_->send_signal(SIGTERM);
  const auto exit = worker_->wait_for(seconds(60));
  ASSERT_TRUE(exit) << "the daemon did not exit after SIGTERM";
  EXPECT_TRUE(exit->success()) << exit->describe();
  const auto status = coordinator_->wait_terminal("job-t", seconds(1));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status->reason(), HasSubstr("interrupted: the worker was shut down"));
  // A drain, not a failure: the coordinator queues the job again without using its budget.
  EXPECT_TRUE(status->preempted());
  EXPECT_TRUE(status->draining());
  // The checkpoint of the step it stopped at is on the coordinator.
  const auto committed = coordinator_->committed("job-t");
  ASSERT_EQ(committed.size(), 1u);
  EXPECT_GE(committed.begin()->first, 3);
  EXPECT_THAT(status->reason(), HasSubstr("step " + std::to_string(committed.begin()->first)));
}

// Issue 10: an attempt the coordinator calls stale (the job moved on while this worker was away)
// is stopped at once (SIGKILL, not the SIGTERM that would write a checkpoint) and nothing of it
// is uploaded; a plain cancel of the same job would have committed one (test above).
TEST_F(WorkerDaemonTest, AStaleAttemptIsKilledWithoutWritingOrUploadingACheckpoint) {
  start_worker();
  ASSERT_TRUE(coordinator_->assign("job-s", 1, tiny_job_struct(kSourceDir, model_, 100000, 0)));
  ASSERT_TRUE(wait_until([&] { return metrics_events("job-s") >= 3; }, seconds(60)));
  const int child = training_pid();
  lomo::v1::CoordinatorMessage stale;
  stale.mutable_cancel()->set_job_id("job-s");
  stale.mutable_cancel()->set_attempt(1);
  stale.mutable_cancel()->set_stale(true);
  ASSERT_TRUE(coordinator_->send(stale));
  ASSERT_TRUE(coordinator_->wait_terminal("job-s", seconds(20)).has_value());
  EXPECT_TRUE(wait_until([&] { return ::kill(child, 0) != 0; }, seconds(10)));
  EXPECT_TRUE(coordinator_->committed("job-s").empty()) << "a stale attempt uploaded a checkpoint";
  EXPECT_THAT(read_file(log()), HasSubstr("job-s attempt 1 is stale"));
  EXPECT_TRUE(
      wait_until([&] { return coordinator_->last_heartbeat().job_id().empty(); }, seconds(5)));
}

// A checkpoint file that changes between the trainer's commit and the upload (bit rot, another
// process) is refused by the daemon against the checkpoint's manifest: no commit reaches the
// coordinator, and the job's end and its log name the file. The daemon is paused (SIGSTOP) while
// the trainer, told to stop, writes its last checkpoint; the test corrupts it, then lets the
// daemon go on.
TEST_F(WorkerDaemonTest, ACheckpointCorruptedBeforeItsUploadIsRefusedNamingTheFile) {
  start_worker();
  ASSERT_TRUE(coordinator_->assign("job-c", 1, tiny_job_struct(kSourceDir, model_, 100000, 0)));
  ASSERT_TRUE(wait_until([&] { return metrics_events("job-c") >= 3; }, seconds(60)));
  const int pid = training_pid();
  ASSERT_GT(pid, 0);
  worker_->send_signal(SIGSTOP);
  ::kill(pid, SIGTERM);  // the trainer checkpoints the step it is at, reports, and exits
  const fs::path attempt = work_dir() / "jobs/job-c/attempt-1";
  ASSERT_TRUE(wait_until(
      [&] {
        return read_file(attempt / "protocol.jsonl").find("\"outcome\"") != std::string::npos;
      },
      seconds(60)))
      << "the trainer wrote no outcome";
  std::optional<fs::path> checkpoint;
  ASSERT_NO_THROW(checkpoint = read_latest_checkpoint(attempt / "out/checkpoints"));
  ASSERT_TRUE(checkpoint);
  ASSERT_TRUE(fs::exists(*checkpoint / "lomo_manifest.json"));
  std::string weights = read_file(*checkpoint / "model.safetensors");
  weights[weights.size() - 5] ^= 0x10;
  std::ofstream(*checkpoint / "model.safetensors", std::ios::binary | std::ios::trunc) << weights;
  worker_->send_signal(SIGCONT);

  const auto status = coordinator_->wait_terminal("job-c", seconds(60));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status->reason(), HasSubstr("no longer matches its lomo_manifest.json"));
  EXPECT_THAT(status->reason(), HasSubstr("model.safetensors"));
  EXPECT_TRUE(coordinator_->committed("job-c").empty());
  EXPECT_TRUE(coordinator_->commit_answers().empty()) << "a commit reached the coordinator";
  bool logged = false;
  for (const auto& e : coordinator_->events("job-c")) {
    logged =
        logged || (e.has_log() && e.log().text().find("model.safetensors") != std::string::npos &&
                   e.log().text().find("lomo_manifest.json") != std::string::npos);
  }
  EXPECT_TRUE(logged) << "no event names the corrupted file";
}

TEST_F(WorkerDaemonTest, ARejectedCheckpointIsRetriedAndTheJobStillSucceeds) {
  start_worker();
  coordinator_->reject_commits(1);
  ASSERT_TRUE(coordinator_->assign("job-r", 1, tiny_job_struct(kSourceDir, model_, 10, 0)));
  const auto status = coordinator_->wait_terminal("job-r", seconds(60));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_SUCCEEDED) << status->reason();
  const auto answers = coordinator_->commit_answers();
  ASSERT_EQ(answers.size(), 2u);
  EXPECT_FALSE(answers[0].second);
  EXPECT_TRUE(answers[1].second);
}

TEST_F(WorkerDaemonTest, ACheckpointRejectedEveryTimeFailsTheJobWithTheReason) {
  start_worker();
  coordinator_->reject_commits(100);
  ASSERT_TRUE(coordinator_->assign("job-x", 1, tiny_job_struct(kSourceDir, model_, 5, 0)));
  const auto status = coordinator_->wait_terminal("job-x", seconds(60));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status->reason(), HasSubstr("rejected by the test"));
}

// Ended attempts leave their directories for debugging, the newest --keep-attempts of them; older
// ones are removed once a later attempt has delivered its results. An attempt whose checkpoint the
// coordinator never committed is never removed (it may be all that is left of its training).
TEST_F(WorkerDaemonTest, OldAttemptDirectoriesAreRemovedButNeverOneWithAnUncommittedCheckpoint) {
  start_worker({"--keep-attempts", "1"});
  const auto attempt_dir = [&](const std::string& job) {
    return work_dir() / "jobs" / job / "attempt-1";
  };
  coordinator_->reject_commits(100);
  ASSERT_TRUE(coordinator_->assign("job-x", 1, tiny_job_struct(kSourceDir, model_, 5, 0)));
  const auto rejected = coordinator_->wait_terminal("job-x", seconds(60));
  ASSERT_TRUE(rejected);
  ASSERT_EQ(rejected->state(), lomo::v1::JOB_STATE_FAILED);
  coordinator_->reject_commits(0);
  for (const std::string job : {"job-a", "job-b"}) {
    ASSERT_TRUE(coordinator_->assign(job, 1, tiny_job_struct(kSourceDir, model_, 5, 0)));
    const auto status = coordinator_->wait_terminal(job, seconds(60));
    ASSERT_TRUE(status);
    ASSERT_EQ(status->state(), lomo::v1::JOB_STATE_SUCCEEDED) << status->reason();
  }
  // job-a's directory goes once job-b's results are delivered; job-b's is the one kept.
  EXPECT_TRUE(wait_until([&] { return !fs::exists(work_dir() / "jobs" / "job-a"); }, seconds(20)))
      << "job-a's attempt directory was not removed";
  EXPECT_TRUE(fs::exists(attempt_dir("job-b") / "delivered"));
  EXPECT_TRUE(fs::exists(attempt_dir("job-b") / "out" / "checkpoints"));
  // job-x's checkpoint never reached the coordinator: its directory stays, unmarked.
  EXPECT_TRUE(fs::is_directory(attempt_dir("job-x") / "out" / "checkpoints"));
  EXPECT_FALSE(fs::exists(attempt_dir("job-x") / "delivered"));
  // The line follows the removal: wait for it rather than race the daemon's log write.
  EXPECT_TRUE(wait_until(
      [&] { return read_file(log()).find("removed old attempt directory") != std::string::npos; },
      seconds(10)))
      << read_file(log());
}

TEST_F(WorkerDaemonTest, ReconnectsWhenTheCoordinatorComesBackAndDeliversTheOutcome) {
  start_worker();
  const int port = coordinator_->port();
  ASSERT_TRUE(coordinator_->assign("job-n", 1, tiny_job_struct(kSourceDir, model_, 60, 0)));
  ASSERT_TRUE(wait_until([&] { return metrics_events("job-n") >= 2; }, seconds(60)));
  coordinator_->shutdown();
  coordinator_.reset();
  std::this_thread::sleep_for(seconds(1));
  coordinator_ = std::make_unique<FakeCoordinator>(port);
  ASSERT_TRUE(coordinator_->wait_registered(1, seconds(30))) << "no reconnect";
  // The outcome reached the new coordinator with the final checkpoint (uploads restart on a new
  // connection).
  const auto status = coordinator_->wait_terminal("job-n", seconds(90));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_SUCCEEDED) << status->reason();
  EXPECT_EQ(coordinator_->committed("job-n").count(60), 1u);
}

TEST_F(WorkerDaemonTest, MetricsEndpointExposesTheTrainingSeries) {
  start_worker({"--metrics-listen", "127.0.0.1:0"});
  static const std::regex pattern(R"(metrics on port (\d+))");
  std::smatch match;
  const std::string text = read_file(log());
  ASSERT_TRUE(std::regex_search(text, match, pattern)) << text;
  const int port = std::stoi(match[1].str());
  ASSERT_TRUE(coordinator_->assign("job-m", 1, tiny_job_struct(kSourceDir, model_, 10, 0)));
  ASSERT_TRUE(coordinator_->wait_terminal("job-m", seconds(60)));
  // The daemon counts the outcome after it has reported it, so a scrape right after the terminal
  // status may still miss it: wait for the count rather than racing it.
  std::optional<std::string> body;
  ASSERT_TRUE(wait_until(
      [&] {
        body = http_get(port, "/metrics");
        return body &&
               body->find("lomo_worker_jobs_total{outcome=\"succeeded\"} 1") != std::string::npos;
      },
      seconds(30)))
      << (body ? *body : "no answer from /metrics");
  for (const char* series :
       {"lomo_worker_step_duration_seconds_bucket", "lomo_worker_step_duration_seconds_count 10",
        "lomo_worker_steps_total 10", "lomo_worker_tokens_total 5120", "lomo_worker_loss ",
        "lomo_worker_learning_rate ", "lomo_worker_loss_scale 1", "lomo_worker_grad_norm ",
        "lomo_worker_device_memory_peak_bytes{kind=\"total\"}",
        "lomo_worker_jobs_total{outcome=\"succeeded\"} 1", "lomo_worker_connected 1"}) {
    EXPECT_THAT(*body, HasSubstr(series));
  }
}

TEST_F(WorkerDaemonTest, AGpuIndexIsRejectedClearlyInABuildWithoutCuda) {
#ifdef LOMO_TEST_HAVE_CUDA
  GTEST_SKIP() << "this build has CUDA";
#endif
  std::string output;
  const ExitStatus status = run_program(
      {kWorker.string(), "serve", "--coordinator", coordinator_->address(), "--device", "0"},
      &output);
  EXPECT_EQ(status.code, 2);
  EXPECT_THAT(output, HasSubstr("built without CUDA"));
}

}  // namespace
}  // namespace lomo::testing
