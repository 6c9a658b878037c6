// A gang rank's rendezvous through the real coordinator (lomo-coordinator on loopback): the
// daemon's gRPC client (daemon/coordinator_rendezvous.h), the relay a trainer starts
// (`lomo-workerd rendezvous-relay`) and the Gloo store over it (worker/rendezvous/), up to two
// GlooCommunicators meeting through the coordinator and reducing, and two `lomo-worker train`
// ranks started the way a worker daemon starts them.
#include "daemon/coordinator_rendezvous.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "tests/integration/coordinator_harness.h"

#ifdef LOMO_HAVE_GLOO
#include <signal.h>

#include <fstream>

#include "common/checkpoint_layout.h"
#include "common/trainer_protocol.h"
#include "tests/integration/test_support.h"
#include "worker/comm/gloo_communicator.h"
#include "worker/rendezvous/coordinator_store.h"
#endif

namespace lomo::server::testing {
namespace {

using daemon::CoordinatorRendezvous;
using daemon::CoordinatorRendezvousOptions;
using daemon::RendezvousError;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

// A two-rank gang of workers "rank-a" and "rank-b", scheduled by the coordinator; each test talks
// to that attempt's rendezvous as them.
class CoordinatorRendezvousTest : public ::testing::Test {
 protected:
  void SetUp() override {
    coordinator_ = std::make_unique<CoordinatorProcess>(ProcessOptions(dir_.path() / "data", 5.0));
    auto jobs = coordinator_->jobs();
    v1::SubmitJobRequest request = submit_request("gang");
    auto& fields = *request.mutable_spec()->mutable_fields();
    (*fields["resources"].mutable_struct_value()->mutable_fields())["world_size"].set_number_value(
        2);
    (*fields["training"].mutable_struct_value()->mutable_fields())["batch_size"].set_number_value(
        2);
    v1::Job job;
    const grpc::Status status = submit(*jobs, request, &job);
    ASSERT_TRUE(status.ok()) << status.error_message();
    job_id_ = job.id();
    for (const std::string id : {"rank-a", "rank-b"}) {
      auto worker = std::make_unique<TestWorker>(coordinator_->channel());
      worker->register_as(id);
      worker->start_heartbeats(milliseconds(200));
      workers_.push_back(std::move(worker));
    }
    for (auto& worker : workers_) {
      const std::optional<v1::Assignment> assignment = worker->next_assignment(seconds(10));
      ASSERT_TRUE(assignment.has_value()) << "the gang was not assigned";
      ASSERT_EQ(assignment->job_id(), job_id_);
      ASSERT_EQ(assignment->world_size(), 2);
      attempt_ = assignment->attempt();
      worker->set_current(job_id_, attempt_);
    }
  }
  void TearDown() override {
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  CoordinatorRendezvousOptions as(const std::string& worker_id) const {
    CoordinatorRendezvousOptions options;
    options.coordinator = coordinator_->grpc_address();
    options.worker_id = worker_id;
    options.job_id = job_id_;
    options.attempt = attempt_;
    return options;
  }

  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::vector<std::unique_ptr<TestWorker>> workers_;
  std::string job_id_;
  int64_t attempt_ = 0;
};

TEST_F(CoordinatorRendezvousTest, AValueOneRankSetsIsReadByTheOtherByteForByte) {
  CoordinatorRendezvous a(as("rank-a")), b(as("rank-b"));
  const std::string value("addr\0\xff\n", 7);
  a.set("rank_0", value);
  a.set("empty", "");
  EXPECT_EQ(b.get({"rank_0", "empty"}, seconds(5)), (std::vector<std::string>{value, ""}));
}

// Get answers at once and the client polls: a key set 300 ms later is read soon after, well
// before the timeout (the 5 s bound allows for a loaded machine; the poll interval is at most
// 100 ms).
TEST_F(CoordinatorRendezvousTest, GetWaitsForAKeySetLater) {
  CoordinatorRendezvous a(as("rank-a")), b(as("rank-b"));
  const auto start = Clock::now();
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(300));
    a.set("late", "here");
  });
  const std::vector<std::string> values = b.get({"late"}, seconds(30));
  const auto waited = Clock::now() - start;
  setter.join();
  EXPECT_EQ(values, std::vector<std::string>{"here"});
  EXPECT_GE(waited, milliseconds(300));
  EXPECT_LT(waited, seconds(5));
}

TEST_F(CoordinatorRendezvousTest, AKeyNeverSetTimesOutNamingTheKeyAndTheCoordinator) {
  CoordinatorRendezvous b(as("rank-b"));
  const auto start = Clock::now();
  try {
    b.get({"never-set"}, milliseconds(400));
    FAIL() << "no timeout";
  } catch (const RendezvousError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'never-set'"));
    EXPECT_THAT(e.what(), HasSubstr(coordinator_->grpc_address()));
    EXPECT_THAT(e.what(), HasSubstr("not set within 400 ms"));
  }
  // Ends near its timeout: not before, and not a whole RPC deadline (10 s) after.
  EXPECT_GE(Clock::now() - start, milliseconds(300));
  EXPECT_LT(Clock::now() - start, seconds(5));
}

// The namespace lives in the coordinator's memory: a coordinator that restarts (killed, then
// started again on the same port and data directory, restoring the assigned gang) has lost it. A
// rank that set its key before the restart and waits through it — its polls failing UNAVAILABLE
// while nobody listens, then while its worker reconnects — sets its key again, so the ranks still
// meet. (Without the retry the wait fails at the first poll; without setting again it times out.)
TEST_F(CoordinatorRendezvousTest, RanksStillMeetWhenTheCoordinatorRestartsWhileOneWaits) {
  CoordinatorRendezvous a(as("rank-a"));
  a.set("rank_0", "A");
  const std::string address = coordinator_->grpc_address();
  workers_.clear();
  coordinator_->kill9();

  std::vector<std::string> seen_by_a;
  std::string a_error;
  std::thread waiter([&] {
    try {
      seen_by_a = a.get({"rank_0", "rank_1"}, seconds(30));
    } catch (const std::exception& e) {
      a_error = e.what();
    }
  });
  std::this_thread::sleep_for(milliseconds(500));  // rank a polls a coordinator that is down

  ProcessOptions again(dir_.path() / "data", 5.0);
  again.extra_args = {"--grpc-listen", address};
  coordinator_ = std::make_unique<CoordinatorProcess>(again);
  std::this_thread::sleep_for(milliseconds(300));  // rank a polls while its worker is away
  for (const std::string id : {"rank-a", "rank-b"}) {
    auto worker = std::make_unique<TestWorker>(coordinator_->channel());
    worker->register_as(id);
    worker->set_current(job_id_, attempt_);
    worker->heartbeat(job_id_, attempt_);
    worker->start_heartbeats(milliseconds(200));
    workers_.push_back(std::move(worker));
  }
  std::vector<std::string> seen_by_b;
  std::string b_error;
  try {
    CoordinatorRendezvous b(as("rank-b"));
    b.set("rank_1", "B");
    seen_by_b = b.get({"rank_0", "rank_1"}, seconds(10));
  } catch (const std::exception& e) {
    b_error = e.what();
  }
  waiter.join();
  EXPECT_EQ(a_error, "");
  EXPECT_EQ(b_error, "");
  EXPECT_EQ(seen_by_a, (std::vector<std::string>{"A", "B"}));
  EXPECT_EQ(seen_by_b, (std::vector<std::string>{"A", "B"}));
}

// A rank of another attempt (here one that does not exist yet) is refused: it can never meet the
// ranks of this one. The error names the key, the coordinator and the gRPC status.
TEST_F(CoordinatorRendezvousTest, AnotherAttemptIsRefusedWithTheGrpcStatus) {
  CoordinatorRendezvousOptions stale = as("rank-a");
  stale.attempt = attempt_ + 1;
  CoordinatorRendezvous other(stale);
  try {
    other.set("rank_0", "x");
    FAIL() << "the coordinator accepted a set for an attempt the worker does not own";
  } catch (const RendezvousError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'rank_0'"));
    EXPECT_THAT(e.what(), HasSubstr(coordinator_->grpc_address()));
    EXPECT_THAT(e.what(), HasSubstr("gRPC status"));
  }
  CoordinatorRendezvousOptions stranger = as("not-in-the-gang");
  EXPECT_THROW(CoordinatorRendezvous(stranger).get({"rank_0"}, seconds(1)), RendezvousError);
}

#ifdef LOMO_HAVE_GLOO
CoordinatorStoreOptions store_options(const CoordinatorRendezvousOptions& as) {
  CoordinatorStoreOptions options;
  options.relay_program = LOMO_WORKERD_BIN;
  options.coordinator = as.coordinator;
  options.worker_id = as.worker_id;
  options.job_id = as.job_id;
  options.attempt = as.attempt;
  options.timeout = seconds(30);
  return options;
}

// What a gang rank's trainer does: a Gloo store over the relay, and a communicator under the
// attempt's prefix. Both ranks end with the sum of their values (exact in fp32).
TEST_F(CoordinatorRendezvousTest, TwoGlooRanksMeetThroughTheRelayAndReduce) {
  std::vector<float> results(2);
  std::vector<std::string> errors(2);
  auto rank = [&](int r, const std::string& worker) {
    try {
      CoordinatorStore store(store_options(as(worker)));
      GlooCommunicatorOptions options;
      options.rank = r;
      options.world_size = 2;
      options.prefix = "job/" + job_id_ + "/attempt/" + std::to_string(attempt_);
      options.timeout = seconds(30);
      GlooCommunicator communicator(options, store);
      float value = 1.5f + static_cast<float>(r);
      communicator.all_reduce(&value, 1, ReduceOp::kSum);
      results[r] = value;
    } catch (const std::exception& e) {
      errors[r] = e.what();
    }
  };
  std::thread a(rank, 0, "rank-a"), b(rank, 1, "rank-b");
  a.join();
  b.join();
  EXPECT_EQ(errors, (std::vector<std::string>{"", ""}));
  EXPECT_EQ(results, (std::vector<float>{4.0f, 4.0f}));
}

TEST_F(CoordinatorRendezvousTest, TheStoreReportsAKeyNeverSetNamingItAndTheCoordinator) {
  CoordinatorStore store(store_options(as("rank-b")));
  try {
    store.wait({"no-peer-yet"}, milliseconds(300));
    FAIL() << "no timeout";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("'no-peer-yet'"));
    EXPECT_THAT(e.what(), HasSubstr(coordinator_->grpc_address()));
  }
  // The relay survives a failed request: the next one is answered.
  store.set("after", {'o', 'k'});
  EXPECT_EQ(store.get("after"), (std::vector<char>{'o', 'k'}));
}

TEST_F(CoordinatorRendezvousTest, AStopRequestEndsAWaitForPeersAtOnce) {
  std::atomic<bool> stop{false};
  CoordinatorStoreOptions options = store_options(as("rank-a"));
  options.stop_requested = &stop;
  const auto start = Clock::now();
  {
    CoordinatorStore store(options);
    std::thread stopper([&] {
      std::this_thread::sleep_for(milliseconds(300));
      stop = true;
    });
    EXPECT_THROW(store.wait({"rank-b-never-comes"}, seconds(60)), RendezvousStopped);
    stopper.join();
  }  // the relay, still polling for the key, is ended here
  // Well before the 60 s wait would end; 5 s allows for a loaded machine.
  EXPECT_LT(Clock::now() - start, seconds(5));
}

// --- Two `lomo-worker train` ranks, as the worker daemons of rank-a and rank-b start them. ---

const std::filesystem::path kWorker = LOMO_WORKER_BIN;
const std::filesystem::path kSourceDir = LOMO_SOURCE_DIR;
constexpr int kSteps = 4;

class TrainerRankTest : public CoordinatorRendezvousTest {
 protected:
  // Rank `rank`'s command line: its own job file (output in its own directory, as on its own
  // worker) and protocol file, and the rank flags of a coordinator rendezvous.
  std::vector<std::string> rank_argv(int rank, const std::string& worker) {
    const std::filesystem::path job_file = dir_.path() / ("rank" + std::to_string(rank) + ".yaml");
    std::ofstream(job_file) << lomo::testing::tiny_job_yaml(
        kSourceDir, lomo::testing::tiny_model(kWorker), kSteps, kSteps,
        {"output.dir=" + output(rank).string(), "resources.world_size=2"});
    return {kWorker.string(),
            "train",
            job_file.string(),
            "--protocol-file",
            protocol_file(rank).string(),
            "--rank",
            std::to_string(rank),
            "--world-size",
            "2",
            "--rendezvous",
            "coordinator://" + coordinator_->grpc_address(),
            "--worker-id",
            worker,
            "--job-id",
            job_id_,
            "--attempt",
            std::to_string(attempt_)};
  }
  std::filesystem::path output(int rank) const {
    return dir_.path() / ("out" + std::to_string(rank));
  }
  std::filesystem::path protocol_file(int rank) const {
    return dir_.path() / ("protocol" + std::to_string(rank) + ".jsonl");
  }
  std::filesystem::path log(int rank) const {
    return dir_.path() / ("rank" + std::to_string(rank) + ".log");
  }
  // Every record of a rank's protocol file.
  std::vector<trainer_protocol::Record> records(int rank) const {
    std::vector<trainer_protocol::Record> result;
    std::ifstream in(protocol_file(rank));
    for (std::string line; std::getline(in, line);) {
      result.push_back(trainer_protocol::parse_line(line));
    }
    return result;
  }
};

// Both ranks train to the end; each reports to its own supervisor, with its own step and
// communication figures; rank 0 alone writes a checkpoint (and names it).
TEST_F(TrainerRankTest, TwoRanksMeetThroughTheCoordinatorTrainAndReportEachToItsOwnSupervisor) {
  const std::vector<std::string> env{"OMP_NUM_THREADS=1"};
  auto rank0 = lomo::testing::start_program(rank_argv(0, "rank-a"), log(0), env);
  auto rank1 = lomo::testing::start_program(rank_argv(1, "rank-b"), log(1), env);
  const std::optional<ExitStatus> end0 = rank0->wait_for(seconds(90));
  const std::optional<ExitStatus> end1 = rank1->wait_for(seconds(90));
  ASSERT_TRUE(end0 && end1) << lomo::testing::read_file(log(0)) << lomo::testing::read_file(log(1));
  EXPECT_TRUE(end0->success()) << lomo::testing::read_file(log(0));
  EXPECT_TRUE(end1->success()) << lomo::testing::read_file(log(1));

  for (const int rank : {0, 1}) {
    int steps = 0, checkpoints = 0;
    std::optional<trainer_protocol::Outcome> outcome;
    for (const auto& record : records(rank)) {
      if (const auto* m = std::get_if<trainer_protocol::Metrics>(&record)) {
        ++steps;
        EXPECT_GT(m->step_seconds, 0.0);
        EXPECT_GT(m->communication_bytes, 0) << "every step all-reduces the gradients";
      }
      if (std::holds_alternative<trainer_protocol::Checkpoint>(record)) ++checkpoints;
      if (const auto* o = std::get_if<trainer_protocol::Outcome>(&record)) outcome = *o;
    }
    EXPECT_EQ(steps, kSteps) << "rank " << rank;
    EXPECT_EQ(checkpoints, rank == 0 ? 1 : 0) << "rank " << rank;
    ASSERT_TRUE(outcome.has_value()) << "rank " << rank;
    EXPECT_EQ(outcome->status, trainer_protocol::Status::kSucceeded);
  }
  EXPECT_TRUE(
      std::filesystem::exists(checkpoint_directory(checkpoints_directory(output(0)), kSteps)));
  EXPECT_FALSE(std::filesystem::exists(checkpoints_directory(output(1))));
}

// A rank stopped (SIGTERM, as a cancel or a worker shutdown sends) while it waits for a peer that
// never comes ends at once, interrupted, instead of waiting out the rendezvous timeout (10 min).
TEST_F(TrainerRankTest, ARankStoppedWhileWaitingForItsPeersEndsInterruptedAtOnce) {
  auto rank0 = lomo::testing::start_program(rank_argv(0, "rank-a"), log(0), {"OMP_NUM_THREADS=1"});
  // It is waiting once its relay runs (a child of the trainer, polling for rank 1's keys).
  const std::filesystem::path children = "/proc/" + std::to_string(rank0->pid()) + "/task/" +
                                         std::to_string(rank0->pid()) + "/children";
  const bool waiting = lomo::testing::wait_until(
      [&] { return !lomo::testing::read_file(children).empty(); }, seconds(20));
  ASSERT_TRUE(waiting) << lomo::testing::read_file(log(0));
  std::this_thread::sleep_for(milliseconds(200));
  const auto stopped_at = Clock::now();
  ASSERT_EQ(::kill(rank0->pid(), SIGTERM), 0);
  const std::optional<ExitStatus> end = rank0->wait_for(seconds(30));
  ASSERT_TRUE(end.has_value());
  EXPECT_LT(Clock::now() - stopped_at, seconds(5));
  EXPECT_FALSE(end->signaled) << end->describe();
  EXPECT_EQ(end->code, trainer_protocol::kExitInterrupted) << lomo::testing::read_file(log(0));
  const auto all = records(0);
  ASSERT_FALSE(all.empty());
  const auto* outcome = std::get_if<trainer_protocol::Outcome>(&all.back());
  ASSERT_NE(outcome, nullptr);
  EXPECT_EQ(outcome->status, trainer_protocol::Status::kInterrupted);
  EXPECT_THAT(outcome->reason, HasSubstr("stopped before training began"));
}
#endif

}  // namespace
}  // namespace lomo::server::testing
