// The control plane end to end: lomo-coordinator, `lomo-worker serve` and lomoctl as real
// processes on loopback, with the tiny model and a few steps so that each test takes seconds.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <thread>

#include "apiclient/lomo_client.h"
#include "client/local_mode.h"
#include "tests/integration/test_support.h"
#include "worker/engine/checkpoint_io.h"

namespace lomo::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

const fs::path kWorker = LOMO_WORKER_BIN;
const fs::path kLomoctl = LOMO_LOMOCTL_BIN;
const fs::path kCoordinator = LOMO_COORDINATOR_BIN;
const fs::path kSourceDir = LOMO_SOURCE_DIR;
// Short enough that a dead worker fails its job within seconds.
constexpr const char* kHeartbeatTimeoutSeconds = "3";
// The tiny model on one thread: the suite runs beside other builds and tests on few cores, where
// OpenMP's spinning threads slow everything down.
const std::vector<std::string> kEnv{"OMP_NUM_THREADS=1"};

bool terminal(lomo::v1::JobState s) {
  return s == lomo::v1::JOB_STATE_SUCCEEDED || s == lomo::v1::JOB_STATE_FAILED ||
         s == lomo::v1::JOB_STATE_CANCELLED;
}

class ControlPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = tiny_model(kWorker);
    start_coordinator(0);
    start_worker();
  }

  void TearDown() override {
    client_.reset();  // an idle channel would hold the coordinator's graceful shutdown
    if (worker_ && worker_->running()) worker_->terminate(seconds(20));
    if (coordinator_ && coordinator_->running()) coordinator_->terminate(seconds(20));
    if (HasFailure() || std::getenv("LOMO_TEST_VERBOSE") != nullptr) {
      std::cerr << "coordinator log:\n"
                << read_file(dir() / "coordinator.log") << "\n"
                << "worker log:\n"
                << read_file(dir() / "worker.log") << "\n";
      if (fs::exists(dir() / "watch.log")) {
        std::cerr << "watch output:\n" << read_file(dir() / "watch.log") << "\n";
      }
    }
  }

  const fs::path& dir() const { return scratch_.path(); }

  // `extra`: more flags (a later one overrides an earlier one).
  void start_coordinator(int port, const std::vector<std::string>& extra = {}) {
    const fs::path ready = dir() / "ready.json";
    fs::remove(ready);
    std::vector<std::string> argv = {
        kCoordinator.string(), "--data-dir", (dir() / "coordinator").string(), "--grpc-listen",
        "127.0.0.1:" + std::to_string(port), "--http-listen", "127.0.0.1:0", "--ready-file",
        ready.string(), "--heartbeat-timeout", kHeartbeatTimeoutSeconds, "--heartbeat-interval-ms",
        "200",
        // A killed worker's attempt ends after the heartbeat timeout here, not after the
        // default window made for the workers' 15 s backoff.
        "--reattach-window", kHeartbeatTimeoutSeconds};
    // A new store on the first start only: restarts open the existing one without --init.
    if (!fs::exists(dir() / "coordinator" / "coordinator.db")) argv.push_back("--init");
    argv.insert(argv.end(), extra.begin(), extra.end());
    coordinator_ = start_program(argv, dir() / "coordinator.log");
    std::optional<std::string> address;
    ASSERT_TRUE(wait_until(
        [&] { return (address = client::read_ready_address(ready)).has_value(); }, seconds(20)))
        << read_file(dir() / "coordinator.log");
    address_ = *address;
    client::ClientOptions options;
    options.address = address_;
    client_ = std::make_unique<client::Client>(options);
  }

  void start_worker() {
    worker_ = start_program(
        {kWorker.string(), "serve", "--coordinator", address_, "--device", "cpu", "--work-dir",
         (dir() / "worker").string(), "--worker-id", "e2e-worker", "--cancel-grace", "5"},
        dir() / "worker.log", kEnv);
  }

  // lomoctl against this coordinator; returns its exit code, output in `*output`.
  int lomoctl(std::vector<std::string> args, std::string* output,
              const std::vector<std::string>& env = {},
              milliseconds timeout = milliseconds(120000)) {
    args.insert(args.begin(), {kLomoctl.string(), "--coordinator", address_});
    std::vector<std::string> all_env = kEnv;
    all_env.insert(all_env.end(), env.begin(), env.end());
    const ExitStatus status = run_program(args, output, timeout, all_env);
    return status.signaled ? 128 + status.signal : status.code;
  }

  std::string submit(int steps, int checkpoint_every,
                     const std::vector<std::string>& overrides = {}) {
    const fs::path job = dir() / ("job-" + std::to_string(++jobs_) + ".yaml");
    std::ofstream(job) << tiny_job_yaml(kSourceDir, model_, steps, checkpoint_every, overrides);
    std::string output;
    EXPECT_EQ(lomoctl({"submit", job.string(), "--output", "json"}, &output), 0) << output;
    const auto json = nlohmann::json::parse(output, nullptr, false);
    // SubmitJobResponse, as REST answers: the Job under "job".
    return json.is_object() && json.contains("job") ? json["job"].value("id", std::string())
                                                    : std::string();
  }

  lomo::v1::Job wait_for(const std::string& job_id,
                         const std::function<bool(const lomo::v1::Job&)>& condition,
                         milliseconds timeout) {
    lomo::v1::Job job;
    EXPECT_TRUE(wait_until(
        [&] {
          job = client_->get_job(job_id);
          return condition(job);
        },
        timeout))
        << "job " << job_id << " did not reach the awaited condition within " << timeout.count()
        << " ms; last seen: " << lomo::v1::JobState_Name(job.state()) << " at step "
        << job.progress().step();
    return job;
  }

  int training_pid() {
    static const std::regex pattern(R"(training in pid (\d+))");
    int pid = 0;
    EXPECT_TRUE(wait_until(
        [&] {
          std::smatch match;
          const std::string text = read_file(dir() / "worker.log");
          if (std::regex_search(text, match, pattern)) pid = std::stoi(match[1].str());
          return pid != 0;
        },
        seconds(60)))
        << "no training child in worker.log";
    return pid;
  }

  // The checkpoint directory the trainer of `job_id`'s attempt wrote at `step` on the worker.
  fs::path worker_checkpoint(const std::string& job_id, int attempt, int step) const {
    char name[32];
    std::snprintf(name, sizeof(name), "step-%08d", step);
    return dir() / "worker/jobs" / job_id / ("attempt-" + std::to_string(attempt)) /
           "out/checkpoints" / name;
  }

  // Every file of the final checkpoint of `resumed_job`'s second attempt equals the uninterrupted
  // `reference` run's, byte for byte, except the job spec the checkpoint keeps (its output.dir
  // names the attempt's directory, and max_restarts differs) and the manifest that holds that
  // file's SHA-256.
  void expect_same_final_checkpoint(const std::string& reference, const std::string& resumed_job,
                                    int steps) {
    const std::set<std::string> differ_by_design{"job.yaml", "lomo_manifest.json"};
    const fs::path uninterrupted = worker_checkpoint(reference, 1, steps);
    const fs::path resumed = worker_checkpoint(resumed_job, 2, steps);
    size_t files = 0;
    for (const auto& entry : fs::recursive_directory_iterator(uninterrupted)) {
      if (!entry.is_regular_file()) continue;
      ++files;
      const fs::path relative = fs::relative(entry.path(), uninterrupted);
      if (differ_by_design.count(relative.string())) continue;
      EXPECT_TRUE(read_file(resumed / relative) == read_file(entry.path()))
          << relative << " differs from the uninterrupted run's";
    }
    EXPECT_GE(files, 4u);
  }

  ScratchDir scratch_{"lomo-control-plane-test"};
  fs::path model_;
  std::string address_;
  std::unique_ptr<ChildProcess> coordinator_;
  std::unique_ptr<ChildProcess> worker_;
  std::unique_ptr<client::Client> client_;
  int jobs_ = 0;
};

TEST_F(ControlPlaneTest, SubmittedJobSucceedsAndItsDownloadedCheckpointIsTheWorkersByteForByte) {
  const std::string id = submit(20, 10);
  ASSERT_FALSE(id.empty());
  std::string output;
  EXPECT_EQ(lomoctl({"watch", id}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr("job " + id + " SUCCEEDED"));
  EXPECT_THAT(output, HasSubstr("step 20/20"));

  ASSERT_EQ(lomoctl({"checkpoints", id, "--output", "json"}, &output), 0) << output;
  const auto checkpoints = nlohmann::json::parse(output)["checkpoints"];
  // Steps 10 and 20, or 20 alone: a checkpoint written while the one before it still waits to be
  // uploaded replaces it (daemon/checkpoint_uploader.h), and on a fast machine the tiny job writes
  // step 20 within milliseconds of step 10 (a fresh-clone CI run listed only step 20).
  ASSERT_GE(checkpoints.size(), 1u);
  ASSERT_LE(checkpoints.size(), 2u);
  if (checkpoints.size() == 2) {
    EXPECT_EQ(checkpoints[0]["checkpointId"], id + "/step-00000010");
  }
  const std::string final_id = checkpoints.back()["checkpointId"];
  EXPECT_EQ(final_id, id + "/step-00000020");

  const fs::path downloaded = dir() / "downloaded";
  ASSERT_EQ(lomoctl({"download", final_id, downloaded.string()}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr("SHA-256 verified"));
  const fs::path worker_copy =
      dir() / "worker/jobs" / id / "attempt-1/out/checkpoints/step-00000020";
  size_t files = 0;
  for (const auto& entry : fs::recursive_directory_iterator(worker_copy)) {
    if (!entry.is_regular_file()) continue;
    ++files;
    const fs::path relative = fs::relative(entry.path(), worker_copy);
    EXPECT_EQ(read_file(downloaded / relative), read_file(entry.path())) << relative;
  }
  EXPECT_GE(files, 4u);
  size_t downloaded_files = 0;
  for (const auto& entry : fs::recursive_directory_iterator(downloaded)) {
    downloaded_files += entry.is_regular_file() ? 1 : 0;
  }
  EXPECT_EQ(downloaded_files, files);
  MemoryAccountant accountant;
  const LlamaWeights weights = load_llama_checkpoint(downloaded, DType::kF32, accountant);
  EXPECT_EQ(weights.config().hidden_size, 128);

  // The job's record: progress, logs, and the same answers in JSON.
  ASSERT_EQ(lomoctl({"get", id, "--output", "json"}, &output), 0) << output;
  const auto job = nlohmann::json::parse(output)["job"];  // GetJobResponse, as REST
  EXPECT_EQ(job["state"], "JOB_STATE_SUCCEEDED");
  EXPECT_EQ(job["progress"]["step"], "20");  // int64 is a string in proto JSON
  ASSERT_EQ(lomoctl({"logs", id}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr("done: 20 steps"));
  ASSERT_EQ(lomoctl({"list"}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr(id));
  EXPECT_THAT(output, HasSubstr("SUCCEEDED"));
}

TEST_F(ControlPlaneTest, CancelMidRunEndsCancelledWithinSeconds) {
  const std::string id = submit(100000, 0);
  ASSERT_FALSE(id.empty());
  const auto running = wait_for(
      id, [](const auto& j) { return j.progress().step() >= 3 || terminal(j.state()); },
      seconds(60));
  ASSERT_EQ(running.state(), lomo::v1::JOB_STATE_RUNNING);
  const auto start = std::chrono::steady_clock::now();
  std::string output;
  ASSERT_EQ(lomoctl({"cancel", id}, &output), 0) << output;
  EXPECT_EQ(lomoctl({"watch", id}, &output), 2) << output;
  EXPECT_THAT(output, HasSubstr("CANCELLED"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(10));
}

// The checkpoint the trainer writes when a cancel stops it is uploaded before the worker confirms
// the cancel: the cancelled job keeps the step it had reached (checkpoint_every 0: no other).
TEST_F(ControlPlaneTest, ACancelledJobKeepsTheCheckpointItsTrainerWroteWhenStopped) {
  const std::string id = submit(100000, 0);
  ASSERT_FALSE(id.empty());
  const auto running = wait_for(
      id, [](const auto& j) { return j.progress().step() >= 3 || terminal(j.state()); },
      seconds(60));
  ASSERT_EQ(running.state(), lomo::v1::JOB_STATE_RUNNING);
  std::string output;
  ASSERT_EQ(lomoctl({"cancel", id}, &output), 0) << output;
  EXPECT_EQ(lomoctl({"watch", id}, &output), 2) << output;
  const auto job = client_->get_job(id);
  EXPECT_EQ(job.state(), lomo::v1::JOB_STATE_CANCELLED);
  ASSERT_EQ(lomoctl({"checkpoints", id, "--output", "json"}, &output), 0) << output;
  const auto checkpoints = nlohmann::json::parse(output)["checkpoints"];
  ASSERT_EQ(checkpoints.size(), 1u) << output;
  EXPECT_GE(std::stoll(checkpoints[0]["step"].get<std::string>()), running.progress().step());
}

TEST_F(ControlPlaneTest, AWorkerKilledWithSigkillFailsItsJobWithinTheHeartbeatTimeout) {
  const std::string id = submit(100000, 0);
  ASSERT_FALSE(id.empty());
  const int child = training_pid();
  ASSERT_GT(child, 0);
  wait_for(
      id, [](const auto& j) { return j.progress().step() >= 2; }, seconds(60));
  worker_->send_signal(SIGKILL);
  worker_->wait();
  const auto start = std::chrono::steady_clock::now();
  const auto job = wait_for(
      id, [](const auto& j) { return terminal(j.state()); }, seconds(20));
  EXPECT_EQ(job.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(job.failure_reason(), HasSubstr("e2e-worker"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(3 + 5));
  // The training child did not outlive its daemon.
  EXPECT_TRUE(wait_until([&] { return ::kill(child, 0) != 0; }, seconds(5)));
}

TEST_F(ControlPlaneTest, AChildThatCrashesFailsTheJobWithTheChildsErrorMessage) {
  const fs::path missing = dir() / "no-such-model";
  const std::string id = submit(20, 0, {"model.path=" + missing.string()});
  ASSERT_FALSE(id.empty());
  std::string output;
  EXPECT_EQ(lomoctl({"watch", id}, &output), 1) << output;
  EXPECT_THAT(output, HasSubstr("FAILED"));
  const auto job = client_->get_job(id);
  EXPECT_EQ(job.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(job.failure_reason(), HasSubstr("lomo-worker train:"));
  EXPECT_THAT(job.failure_reason(), HasSubstr(missing.string()));
}

TEST_F(ControlPlaneTest, ARejectedSpecIsReportedWithTheFieldItNames) {
  // lomoctl validates before sending...
  const fs::path job = dir() / "bad.yaml";
  std::ofstream(job) << tiny_job_yaml(kSourceDir, model_, 20, 0);
  std::string output;
  EXPECT_EQ(lomoctl({"submit", job.string(), "--set", "optimizer.lr=-1"}, &output), 3);
  EXPECT_THAT(output, HasSubstr("optimizer.lr"));
  // ...and the coordinator's own rejection reaches the caller in its words.
  google::protobuf::Struct spec = tiny_job_struct(kSourceDir, model_, 20, 0);
  (*(*spec.mutable_fields())["training"].mutable_struct_value()->mutable_fields())["batch_size"]
      .set_number_value(0);
  try {
    client_->submit_job(spec);
    FAIL() << "accepted";
  } catch (const client::ClientError& e) {
    EXPECT_EQ(e.code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(e.what(), HasSubstr("training.batch_size"));
  }
}

TEST_F(ControlPlaneTest, WatchResumesAcrossACoordinatorRestart) {
  // A fixed port, so that the restarted coordinator is where the worker and lomoctl look.
  worker_->terminate(seconds(20));
  coordinator_->terminate(seconds(20));
  const int port = free_port();
  start_coordinator(port);
  start_worker();
  const std::string id = submit(300, 100);
  ASSERT_FALSE(id.empty());
  ChildOptions watch;
  watch.argv = {kLomoctl.string(), "--coordinator", address_, "watch", id};
  watch.stdout_mode = watch.stderr_mode = ChildOutput::kFile;
  watch.output_file = dir() / "watch.log";
  ChildProcess watcher(watch);
  wait_for(
      id, [](const auto& j) { return j.progress().step() >= 5; }, seconds(60));
  coordinator_->terminate(seconds(20));
  std::this_thread::sleep_for(milliseconds(500));
  start_coordinator(port);
  const auto exit = watcher.wait_for(seconds(150));
  ASSERT_TRUE(exit) << read_file(dir() / "watch.log");
  EXPECT_EQ(exit->code, 0) << read_file(dir() / "watch.log");
  const std::string text = read_file(dir() / "watch.log");
  EXPECT_THAT(text, HasSubstr("reconnecting"));
  EXPECT_THAT(text, HasSubstr("SUCCEEDED"));
}

// Issue 10: a coordinator outage of 60 s (kill -9, then a restart on the same data directory and
// port) loses no step and no checkpoint. The worker keeps training and buffers its events, dials
// with its backoff (up to 15 s between tries), and re-attaches within the default window
// (common/reconnect.h): one attempt, steps reported strictly rising, the final checkpoint
// committed, and every checkpoint the trainer wrote still on the worker's disk. (Of the
// checkpoints written while the coordinator was away the daemon uploads only the newest: it
// supersedes the others; checkpoint_uploader.h.)
TEST_F(ControlPlaneTest, ASixtySecondCoordinatorOutageLosesNoStepAndNoCheckpoint) {
  constexpr int kSteps = 600;
  constexpr int kCheckpointEvery = 50;
  const std::vector<std::string> defaults = {"--reattach-window", "30", "--keep-checkpoints", "0"};
  worker_->terminate(seconds(20));
  coordinator_->terminate(seconds(20));
  const int port = free_port();
  std::vector<std::string> first = defaults;
  first.push_back("--init");  // a harmless repeat if the fixture already asks for a new store
  start_coordinator(port, first);
  start_worker();
  const std::string id = submit(kSteps, kCheckpointEvery);
  ASSERT_FALSE(id.empty());
  const auto before = wait_for(
      id, [](const auto& j) { return j.progress().step() >= 10 || terminal(j.state()); },
      seconds(60));
  ASSERT_EQ(before.state(), lomo::v1::JOB_STATE_RUNNING);
  client_.reset();
  coordinator_->send_signal(SIGKILL);
  ASSERT_TRUE(coordinator_->wait_for(seconds(10)).has_value());
  std::this_thread::sleep_for(seconds(60));  // the outage itself is what is tested
  start_coordinator(port, defaults);

  const auto job = wait_for(
      id, [](const auto& j) { return terminal(j.state()); }, seconds(240));
  ASSERT_EQ(job.state(), lomo::v1::JOB_STATE_SUCCEEDED) << job.failure_reason();
  ASSERT_EQ(job.attempts_size(), 1);
  EXPECT_FALSE(job.attempts(0).restarted());
  EXPECT_EQ(job.attempt(), 1);
  std::set<int64_t> committed;
  for (const auto& checkpoint : client_->list_checkpoints(id)) committed.insert(checkpoint.step());
  EXPECT_EQ(committed.count(kSteps), 1u) << "the final checkpoint was not committed";
  for (int step = kCheckpointEvery; step <= kSteps; step += kCheckpointEvery) {
    EXPECT_TRUE(fs::exists(worker_checkpoint(id, 1, step)))
        << "the checkpoint of step " << step << " is gone from the worker's disk";
  }
  int64_t last_step = 0;
  int metrics = 0;
  client_->watch_job(id, 0, false, [&](const lomo::v1::WatchJobResponse& response) {
    if (!response.event().has_metrics()) return true;
    const int64_t step = response.event().metrics().step();
    EXPECT_GT(step, last_step) << "step " << step << " reported again: steps were recomputed";
    last_step = step;
    ++metrics;
    return true;
  });
  EXPECT_EQ(last_step, kSteps);
  EXPECT_GT(metrics, 0);
}

TEST_F(ControlPlaneTest, AnUnreachableCoordinatorGetsAClearMessageWhereverTheAddressCameFrom) {
  const std::string dead = "127.0.0.1:" + std::to_string(free_port());
  const std::string expected = "lomoctl: cannot reach the coordinator at " + dead +
                               " (connection refused); is lomo-coordinator running? set "
                               "--coordinator or LOMO_COORDINATOR";
  std::string output;
  ExitStatus status = run_program({kLomoctl.string(), "--coordinator", dead, "list"}, &output);
  EXPECT_EQ(status.code, 3);
  EXPECT_THAT(output, HasSubstr(expected));
  status = run_program({kLomoctl.string(), "watch", "some-job"}, &output, seconds(30),
                       {"LOMO_COORDINATOR=" + dead});
  EXPECT_EQ(status.code, 3);
  EXPECT_THAT(output, HasSubstr(expected));
  const fs::path config = dir() / "config";
  fs::create_directories(config / "lomo");
  std::ofstream(config / "lomo" / "lomoctl.yaml") << "coordinator: " << dead << "\n";
  status = run_program({kLomoctl.string(), "get", "some-job"}, &output, seconds(30),
                       {"XDG_CONFIG_HOME=" + config.string(), "LOMO_COORDINATOR="});
  EXPECT_EQ(status.code, 3);
  EXPECT_THAT(output, HasSubstr(expected));
}

TEST_F(ControlPlaneTest, LocalModeRunsTheExampleToSuccessAndLeavesTheCheckpoint) {
  // Its own coordinator and worker: the fixture's are not used.
  const fs::path job = dir() / "local.yaml";
  std::ofstream(job) << tiny_job_yaml(kSourceDir, model_, 20, 0);
  const fs::path state = dir() / "local-state";
  const fs::path out = dir() / "local-out";
  std::string output;
  const ExitStatus status =
      run_program({kLomoctl.string(), "local", job.string(), "--set", "training.steps=12",
                   "--state-dir", state.string(), "--out", out.string()},
                  &output, seconds(150), kEnv);
  EXPECT_EQ(status.code, 0) << output;
  EXPECT_THAT(output, HasSubstr("SUCCEEDED"));
  EXPECT_THAT(output, HasSubstr("step-00000012"));
  // Where the worker trained, from the layout the daemon uses (common/checkpoint_layout.h).
  EXPECT_THAT(output, HasSubstr("training files (metrics.jsonl, checkpoints): " +
                                (state / "worker" / "jobs").string()));
  MemoryAccountant accountant;
  EXPECT_NO_THROW(load_llama_checkpoint(out, DType::kF32, accountant)) << output;
  EXPECT_TRUE(fs::exists(out / "lomo_trainer_state.json"));
  // Both processes are gone.
  EXPECT_THAT(read_file(state / "worker.log"), HasSubstr("stopped"));
}

// The restart policy end to end: the training child of a running job is killed with SIGKILL (as
// the kernel's OOM killer would); the coordinator restarts the job, its second attempt resumes
// from the last committed checkpoint, and the job ends with exactly the weights and optimizer
// state of an uninterrupted run of the same spec.
TEST_F(ControlPlaneTest, AKilledTrainerIsRestartedAndEndsWithTheWeightsOfAnUninterruptedRun) {
  constexpr int kSteps = 200;
  constexpr int kCheckpointEvery = 20;
  const std::string reference = submit(kSteps, kCheckpointEvery);
  ASSERT_FALSE(reference.empty());
  ASSERT_EQ(wait_for(
                reference, [](const auto& j) { return terminal(j.state()); }, seconds(120))
                .state(),
            lomo::v1::JOB_STATE_SUCCEEDED);

  const std::string id = submit(kSteps, kCheckpointEvery, {"resources.max_restarts=2"});
  ASSERT_FALSE(id.empty());
  const std::regex pattern("job " + id + R"( attempt 1: training in pid (\d+))");
  int child = 0;
  ASSERT_TRUE(wait_until(
      [&] {
        std::smatch match;
        const std::string text = read_file(dir() / "worker.log");
        if (std::regex_search(text, match, pattern)) child = std::stoi(match[1].str());
        return child != 0;
      },
      seconds(60)));
  // Past a committed checkpoint and well before the end, so the restart has something to resume.
  const auto before = wait_for(
      id, [](const auto& j) { return j.progress().step() >= 50 || terminal(j.state()); },
      seconds(60));
  ASSERT_EQ(before.state(), lomo::v1::JOB_STATE_RUNNING) << "finished before it could be killed";
  ASSERT_EQ(::kill(child, SIGKILL), 0);

  const auto job = wait_for(
      id, [](const auto& j) { return terminal(j.state()); }, seconds(120));
  ASSERT_EQ(job.state(), lomo::v1::JOB_STATE_SUCCEEDED) << job.failure_reason();
  ASSERT_EQ(job.attempts_size(), 2);
  EXPECT_EQ(job.attempts(0).state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_TRUE(job.attempts(0).restarted());
  EXPECT_THAT(job.attempts(0).reason(), HasSubstr("killed by SIGKILL"));
  EXPECT_EQ(job.attempts(1).state(), lomo::v1::JOB_STATE_SUCCEEDED);
  std::string output;
  ASSERT_EQ(lomoctl({"logs", id}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr("resuming from the job's committed checkpoint at step"));
  ASSERT_EQ(lomoctl({"get", id}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr("FAILED at step"));
  EXPECT_THAT(output, HasSubstr(", restarted: training process killed by SIGKILL"));

  expect_same_final_checkpoint(reference, id, kSteps);
}

// A node drain: the worker daemon gets SIGTERM mid-run. Its trainer checkpoints, the daemon uploads
// that checkpoint, reports the attempt preempted and exits 0; the job goes back to the queue
// without using its restart budget (it has none), and a worker that comes later resumes it from
// that checkpoint to exactly the weights of an uninterrupted run.
TEST_F(ControlPlaneTest, ADrainedWorkersJobIsQueuedAgainAndEndsWithTheWeightsOfAnUninterruptedRun) {
  constexpr int kSteps = 200;
  constexpr int kCheckpointEvery = 20;
  const std::string reference = submit(kSteps, kCheckpointEvery);
  ASSERT_FALSE(reference.empty());
  ASSERT_EQ(wait_for(
                reference, [](const auto& j) { return terminal(j.state()); }, seconds(120))
                .state(),
            lomo::v1::JOB_STATE_SUCCEEDED);

  const std::string id = submit(kSteps, kCheckpointEvery, {"resources.max_restarts=0"});
  ASSERT_FALSE(id.empty());
  const auto before = wait_for(
      id, [](const auto& j) { return j.progress().step() >= 50 || terminal(j.state()); },
      seconds(60));
  ASSERT_EQ(before.state(), lomo::v1::JOB_STATE_RUNNING) << "finished before it could be drained";
  worker_->send_signal(SIGTERM);
  const auto exit = worker_->wait_for(seconds(60));
  ASSERT_TRUE(exit) << "the daemon did not exit after SIGTERM";
  EXPECT_TRUE(exit->success()) << exit->describe();
  const auto queued = wait_for(
      id, [](const auto& j) { return j.state() != lomo::v1::JOB_STATE_RUNNING; }, seconds(30));
  ASSERT_EQ(queued.state(), lomo::v1::JOB_STATE_QUEUED) << queued.failure_reason();
  ASSERT_EQ(queued.attempts_size(), 1);
  EXPECT_TRUE(queued.attempts(0).preempted());
  EXPECT_FALSE(queued.attempts(0).restarted());
  // The step the trainer stopped at is committed: the next attempt starts from there.
  const int64_t stopped_at = queued.attempts(0).step();
  EXPECT_GE(stopped_at, 50);

  start_worker();  // the node is back (or another one joins)
  const auto job = wait_for(
      id, [](const auto& j) { return terminal(j.state()); }, seconds(120));
  ASSERT_EQ(job.state(), lomo::v1::JOB_STATE_SUCCEEDED) << job.failure_reason();
  ASSERT_EQ(job.attempts_size(), 2);
  EXPECT_EQ(job.attempts(1).state(), lomo::v1::JOB_STATE_SUCCEEDED);
  std::string output;
  ASSERT_EQ(lomoctl({"logs", id}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr("resuming from the job's committed checkpoint at step " +
                                std::to_string(stopped_at)));
  ASSERT_EQ(lomoctl({"get", id}, &output), 0) << output;
  EXPECT_THAT(output, HasSubstr("PREEMPTED at step " + std::to_string(stopped_at)));

  expect_same_final_checkpoint(reference, id, kSteps);
}

}  // namespace
}  // namespace lomo::testing
