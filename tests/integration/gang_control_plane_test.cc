// Gangs through the whole control plane: a real lomo-coordinator and three `lomo-worker serve`
// daemons on loopback, two jobs of world size 2. Three workers hold one gang of two, never two:
// the second job waits, says why, and runs when the first has given its workers back. Only rank 0
// uploads checkpoints; the other rank's worker writes none.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>

#include "apiclient/lomo_client.h"
#include "client/local_mode.h"
#include "common/checkpoint_layout.h"
#include "common/sha256.h"
#include "tests/integration/test_support.h"

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
const std::vector<std::string> kEnv{"OMP_NUM_THREADS=1"};
constexpr int kWorkers = 3;

bool terminal(lomo::v1::JobState s) {
  return s == lomo::v1::JOB_STATE_SUCCEEDED || s == lomo::v1::JOB_STATE_FAILED ||
         s == lomo::v1::JOB_STATE_CANCELLED;
}

class GangControlPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = tiny_model(kWorker);
    const fs::path ready = dir() / "ready.json";
    coordinator_ = start_program(
        {kCoordinator.string(), "--data-dir", (dir() / "coordinator").string(), "--grpc-listen",
         "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--ready-file", ready.string(),
         "--heartbeat-timeout", "5", "--heartbeat-interval-ms", "200", "--init"},
        dir() / "coordinator.log");
    std::optional<std::string> address;
    ASSERT_TRUE(wait_until(
        [&] { return (address = client::read_ready_address(ready)).has_value(); }, seconds(20)))
        << read_file(dir() / "coordinator.log");
    address_ = *address;
    client::ClientOptions options;
    options.address = address_;
    client_ = std::make_unique<client::Client>(options);
    for (int i = 0; i < kWorkers; ++i) {
      workers_.push_back(start_program(
          {kWorker.string(), "serve", "--coordinator", address_, "--device", "cpu", "--work-dir",
           work_dir(worker_id(i)).string(), "--worker-id", worker_id(i)},
          dir() / (worker_id(i) + ".log"), kEnv));
    }
    // All three registered before the first job comes: otherwise it could be placed on the first
    // two to connect and end before the third is there to be the second job's one idle worker.
    ASSERT_TRUE(wait_until(
        [&] {
          for (int i = 0; i < kWorkers; ++i) {
            if (read_file(dir() / (worker_id(i) + ".log")).find("registered with") ==
                std::string::npos) {
              return false;
            }
          }
          return true;
        },
        seconds(30)))
        << "the three workers did not all register";
  }

  void TearDown() override {
    client_.reset();  // an idle channel would hold the coordinator's graceful shutdown
    for (auto& worker : workers_) worker->send_signal(SIGTERM);
    for (auto& worker : workers_) worker->wait_for(seconds(20));
    workers_.clear();
    if (coordinator_ && coordinator_->running()) coordinator_->terminate(seconds(20));
    if (HasFailure() || std::getenv("LOMO_TEST_VERBOSE") != nullptr) {
      std::cerr << "coordinator log:\n" << read_file(dir() / "coordinator.log") << "\n";
      for (int i = 0; i < kWorkers; ++i) {
        std::cerr << worker_id(i) << " log:\n" << read_file(dir() / (worker_id(i) + ".log"));
      }
    }
  }

  const fs::path& dir() const { return scratch_.path(); }
  static std::string worker_id(int i) { return "gang-w" + std::to_string(i); }
  fs::path work_dir(const std::string& worker) const { return dir() / worker; }

  // Submits the tiny job with world size 2; returns its id.
  std::string submit(int steps, int checkpoint_every) {
    lomo::v1::SubmitJobRequest request;
    request.set_spec_text(
        tiny_job_yaml(kSourceDir, model_, steps, checkpoint_every, {"resources.world_size=2"}));
    return client_->submit_job(request).id();
  }

  // Where `worker` ran `job`'s attempt.
  fs::path attempt_dir(const std::string& worker, const lomo::v1::Job& job) const {
    return attempt_directory(work_dir(worker), job.id(), job.attempt());
  }

  ScratchDir scratch_{"lomo-gang-control-plane-test"};
  fs::path model_;
  std::string address_;
  std::unique_ptr<ChildProcess> coordinator_;
  std::vector<std::unique_ptr<ChildProcess>> workers_;
  std::unique_ptr<client::Client> client_;
};

// What the poll loop saw of the two jobs.
struct Observed {
  std::set<std::string> second_wait_reasons;  // while the second job was QUEUED
  bool second_queued_while_first_ran = false;
  std::map<std::string, std::vector<std::string>> gangs;  // job id -> worker per rank
};

std::vector<std::string> gang_of(const lomo::v1::Job& job) {
  std::vector<std::string> gang;
  for (const auto& a : job.assignments()) {
    EXPECT_EQ(a.rank(), static_cast<int>(gang.size())) << "assignments not in rank order";
    gang.push_back(a.worker_id());
  }
  return gang;
}

// Rank 0 alone uploads: every file of every listed checkpoint is byte for byte (SHA-256) the
// file rank 0's worker has in its attempt's output, and rank 1's worker has no checkpoint at all.
void expect_checkpoints_from_rank_zero(client::Client& client, const lomo::v1::Job& job,
                                       const fs::path& rank0_attempt, const fs::path& rank1_attempt,
                                       const std::vector<int64_t>& steps) {
  const auto checkpoints = client.list_checkpoints(job.id());
  std::vector<int64_t> listed;
  for (const auto& c : checkpoints) listed.push_back(c.step());
  EXPECT_EQ(listed, steps) << job.id();
  const fs::path rank0_checkpoints = checkpoints_directory(attempt_output_directory(rank0_attempt));
  for (const auto& c : checkpoints) {
    EXPECT_GE(c.files_size(), 4) << c.checkpoint_id();
    for (const auto& file : c.files()) {
      const fs::path local = checkpoint_directory(rank0_checkpoints, c.step()) / file.path();
      ASSERT_TRUE(fs::exists(local)) << local;
      EXPECT_EQ(sha256_file_hex(local), file.sha256()) << local;
    }
  }
  // Rank 1 ran here (its attempt directory exists) and wrote no checkpoint, finished or not.
  ASSERT_TRUE(fs::is_directory(rank1_attempt)) << rank1_attempt;
  for (const auto& entry : fs::recursive_directory_iterator(rank1_attempt)) {
    const std::string name = entry.path().filename().string();
    EXPECT_FALSE(checkpoint_step_from_name(name).has_value() || is_temporary_checkpoint_name(name))
        << "rank 1 wrote " << entry.path();
  }
}

TEST_F(GangControlPlaneTest, TwoGangsOnThreeWorkersRunOneAfterTheOtherAndOnlyRankZeroUploads) {
  // The first long enough (3 checkpoints) that the second is seen waiting behind it.
  const std::string first = submit(30, 10);
  const std::string second = submit(10, 5);
  Observed seen;
  lomo::v1::Job a, b;
  const bool ended = wait_until(
      [&] {
        a = client_->get_job(first);
        b = client_->get_job(second);
        if (b.state() == lomo::v1::JOB_STATE_QUEUED) {
          if (!b.wait_reason().empty()) seen.second_wait_reasons.insert(b.wait_reason());
          if (a.state() == lomo::v1::JOB_STATE_RUNNING) seen.second_queued_while_first_ran = true;
        }
        for (const lomo::v1::Job* job : {&a, &b}) {
          if (job->assignments_size() > 0) seen.gangs[job->id()] = gang_of(*job);
        }
        return terminal(a.state()) && terminal(b.state());
      },
      seconds(150));
  ASSERT_TRUE(ended) << "first " << lomo::v1::JobState_Name(a.state()) << ", second "
                     << lomo::v1::JobState_Name(b.state());
  ASSERT_EQ(a.state(), lomo::v1::JOB_STATE_SUCCEEDED) << a.failure_reason();
  ASSERT_EQ(b.state(), lomo::v1::JOB_STATE_SUCCEEDED) << b.failure_reason();

  // The second waited, with the reason the API promises, while the first held its gang.
  EXPECT_TRUE(seen.second_queued_while_first_ran);
  EXPECT_THAT(seen.second_wait_reasons,
              ::testing::Contains("waiting for 2 idle cpu workers, 1 idle"));
  EXPECT_TRUE(b.wait_reason().empty()) << "a job that is not queued has no wait reason";
  // Each ran on two distinct workers. (The second may start before the first is SUCCEEDED: a
  // rank's worker is idle again once it has reported its own end, so rank 1's worker can join the
  // third while rank 0 still uploads its last checkpoint.)
  for (const std::string& id : {first, second}) {
    ASSERT_EQ(seen.gangs[id].size(), 2u) << id;
    EXPECT_NE(seen.gangs[id][0], seen.gangs[id][1]) << id;
  }
  EXPECT_LE(a.start_time().seconds(), b.start_time().seconds());

  for (const lomo::v1::Job* job : {&a, &b}) {
    const std::vector<std::string>& gang = seen.gangs[job->id()];
    EXPECT_EQ(job->worker_id(), gang[0]) << "Job.worker_id is rank 0's worker";
    expect_checkpoints_from_rank_zero(
        *client_, *job, attempt_dir(gang[0], *job), attempt_dir(gang[1], *job),
        job->id() == first ? std::vector<int64_t>{10, 20, 30} : std::vector<int64_t>{5, 10});
  }

  // lomoctl shows the gang, rank by rank.
  std::string output;
  const ExitStatus get =
      run_program({kLomoctl.string(), "--coordinator", address_, "get", first}, &output);
  ASSERT_TRUE(get.success()) << output;
  EXPECT_THAT(output, HasSubstr("gang:"));
  EXPECT_THAT(output, HasSubstr("rank 0  " + seen.gangs[first][0]));
  EXPECT_THAT(output, HasSubstr("rank 1  " + seen.gangs[first][1]));
}

// A drain of one rank's node preempts the whole gang: SIGTERM to rank 1's daemon stops both
// trainers after the same step, rank 0 checkpoints and uploads that step before the attempt ends,
// the job goes back to the queue without using its restart budget (it has none), and the next
// attempt, on the two workers left, resumes from that checkpoint and succeeds.
TEST_F(GangControlPlaneTest,
       ASigtermOnOneRanksWorkerPreemptsTheGangWhichResumesFromRankZerosCheckpoint) {
  lomo::v1::SubmitJobRequest request;
  request.set_spec_text(tiny_job_yaml(kSourceDir, model_, 120, 10,
                                      {"resources.world_size=2", "resources.max_restarts=0"}));
  const std::string id = client_->submit_job(request).id();
  lomo::v1::Job job;
  ASSERT_TRUE(wait_until(
      [&] {
        job = client_->get_job(id);
        return job.progress().step() >= 13 || terminal(job.state());
      },
      seconds(90)));
  ASSERT_EQ(job.state(), lomo::v1::JOB_STATE_RUNNING) << "finished before it could be drained";
  const std::vector<std::string> gang = gang_of(job);
  ASSERT_EQ(gang.size(), 2u);
  const int64_t step_before = job.progress().step();
  int drained = -1;
  for (int i = 0; i < kWorkers; ++i) drained = worker_id(i) == gang[1] ? i : drained;
  ASSERT_GE(drained, 0);
  workers_[static_cast<size_t>(drained)]->send_signal(SIGTERM);
  const auto exit = workers_[static_cast<size_t>(drained)]->wait_for(seconds(60));
  ASSERT_TRUE(exit) << "rank 1's daemon did not exit after SIGTERM";
  EXPECT_TRUE(exit->success()) << exit->describe();

  ASSERT_TRUE(wait_until(
      [&] {
        job = client_->get_job(id);
        return job.attempts_size() > 0;
      },
      seconds(60)));
  EXPECT_TRUE(job.attempts(0).preempted()) << job.attempts(0).reason();
  EXPECT_FALSE(job.attempts(0).restarted());
  // Rank 0's checkpoint of the step the gang stopped at was committed before the attempt ended.
  const auto checkpoints = client_->list_checkpoints(id);
  ASSERT_FALSE(checkpoints.empty());
  const int64_t stopped_at = checkpoints.back().step();
  EXPECT_GT(stopped_at, step_before - step_before % 10) << "only a scheduled checkpoint is there";

  ASSERT_TRUE(wait_until(
      [&] {
        job = client_->get_job(id);
        return terminal(job.state());
      },
      seconds(150)));
  ASSERT_EQ(job.state(), lomo::v1::JOB_STATE_SUCCEEDED) << job.failure_reason();
  ASSERT_EQ(job.attempts_size(), 2);
  for (const auto& a : job.attempts(1).assignments()) EXPECT_NE(a.worker_id(), gang[1]);
  std::string output;
  const ExitStatus logs =
      run_program({kLomoctl.string(), "--coordinator", address_, "logs", id}, &output);
  ASSERT_TRUE(logs.success()) << output;
  EXPECT_THAT(output, HasSubstr("resuming from the job's committed checkpoint at step " +
                                std::to_string(stopped_at)));
}

}  // namespace
}  // namespace lomo::testing
