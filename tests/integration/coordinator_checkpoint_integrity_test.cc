// Checkpoint integrity across processes, against a real lomo-coordinator on loopback: the
// coordinator checks every uploaded file against the manifest the worker sends with the commit,
// keeps only the newest --keep-checkpoints of a job, and a download (the C++ client lomoctl uses)
// lands at its destination whole and verified, or not at all.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "apiclient/lomo_client.h"
#include "tests/integration/coordinator_harness.h"

namespace lomo::server::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr int kKeepCheckpoints = 2;

class CheckpointIntegrityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ProcessOptions options(dir_.path() / "data");
    options.extra_args = {"--keep-checkpoints", std::to_string(kKeepCheckpoints)};
    coordinator_ = std::make_unique<CoordinatorProcess>(options);
    jobs_ = coordinator_->jobs();
  }
  void TearDown() override {
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  // A submitted job whose attempt 1 runs on a test worker that may upload its checkpoints.
  std::string running_job(const std::string& name) {
    v1::Job job;
    const grpc::Status status = submit(*jobs_, submit_request(name), &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    worker_ = std::make_unique<TestWorker>(coordinator_->channel());
    worker_->register_as("w-" + name);
    worker_->start_heartbeats(milliseconds(200));
    EXPECT_TRUE(worker_->next_assignment(seconds(10)).has_value());
    worker_->set_current(job.id(), 1);
    EXPECT_TRUE(worker_->report(job.id(), 1, v1::JOB_STATE_RUNNING));
    wait_for_state(*jobs_, job.id(), v1::JOB_STATE_RUNNING, seconds(30));
    return job.id();
  }

  std::vector<int64_t> listed_steps(const std::string& job_id) {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::ListCheckpointsRequest request;
    request.set_job_id(job_id);
    v1::ListCheckpointsResponse response;
    const grpc::Status status = jobs_->ListCheckpoints(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    std::vector<int64_t> steps;
    for (const v1::CheckpointInfo& info : response.checkpoints()) steps.push_back(info.step());
    return steps;
  }

  // The step directories in the coordinator's store for `job_id`, and whether any temporary one
  // is left.
  std::vector<std::string> stored_entries(const std::string& job_id) const {
    std::vector<std::string> names;
    const fs::path root = dir_.path() / "data" / "checkpoints" / job_id;
    if (!fs::exists(root)) return names;
    for (const auto& entry : fs::directory_iterator(root)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  client::ClientOptions api() const {
    client::ClientOptions options;
    options.address = coordinator_->grpc_address();
    return options;
  }

  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  std::unique_ptr<TestWorker> worker_;
};

const std::map<std::string, std::string> kFiles = {
    {"model.safetensors", std::string(2500, 'w')},
    {"optimizer.safetensors", std::string(1200, 'o')},
    {"trainer_state.json", R"({"step": 10})"}};

TEST_F(CheckpointIntegrityTest, AnUploadWhoseBytesDifferFromTheSentManifestIsRefusedNamingTheFile) {
  const std::string job = running_job("manifest");
  // The worker read model.safetensors after it changed on disk: its chunks hash consistently, but
  // the manifest (the trainer's digests at write time) says otherwise.
  std::map<std::string, std::string> as_written = kFiles;
  as_written["model.safetensors"][100] = 'X';
  auto ack = worker_->upload_checkpoint(job, 1, 10, kFiles, 1000, "", as_written);
  ASSERT_TRUE(ack.has_value());
  EXPECT_FALSE(ack->committed());
  EXPECT_THAT(ack->error(), HasSubstr("file model.safetensors does not match the manifest"));
  // A file the manifest does not list is refused too.
  std::map<std::string, std::string> without_state = kFiles;
  without_state.erase("trainer_state.json");
  ack = worker_->upload_checkpoint(job, 1, 10, kFiles, 1000, "", without_state);
  ASSERT_TRUE(ack.has_value());
  EXPECT_FALSE(ack->committed());
  EXPECT_THAT(ack->error(), HasSubstr("file trainer_state.json was uploaded but is not in the"));
  EXPECT_THAT(listed_steps(job), IsEmpty());
  EXPECT_THAT(stored_entries(job), IsEmpty());  // no step directory, no temporary one

  // The same upload with the manifest it matches commits.
  ack = worker_->upload_checkpoint(job, 1, 10, kFiles);
  ASSERT_TRUE(ack.has_value());
  EXPECT_TRUE(ack->committed()) << ack->error();
  EXPECT_EQ(listed_steps(job), std::vector<int64_t>{10});
}

TEST_F(CheckpointIntegrityTest, RetentionKeepsTheNewestCheckpointsOfAJobAndDeletesTheOlder) {
  const std::string job = running_job("retention");
  for (int64_t step : {10, 20, 30, 40}) {
    const auto ack = worker_->upload_checkpoint(job, 1, step, kFiles);
    ASSERT_TRUE(ack.has_value());
    ASSERT_TRUE(ack->committed()) << ack->error();
  }
  EXPECT_EQ(listed_steps(job), (std::vector<int64_t>{30, 40}));
  // Files go once the record's deletion is durable: shortly after the commit's ack.
  EXPECT_TRUE(wait_until([&] { return stored_entries(job).size() == 2; }, seconds(10)));
  EXPECT_EQ(stored_entries(job), (std::vector<std::string>{"step-00000030", "step-00000040"}));
  // The job's history still tells every commit.
  int commits = 0;
  for (const v1::JobEvent& event : all_events(*jobs_, job)) commits += event.has_checkpoint();
  EXPECT_EQ(commits, 4);
}

// --keep-best-checkpoint: beside the newest K, the checkpoint whose step has the lowest eval loss
// stays, however old; a checkpoint without an eval at its step never counts as the best.
class BestCheckpointRetentionTest : public CheckpointIntegrityTest {
 protected:
  void SetUp() override {
    ProcessOptions options(dir_.path() / "data");
    options.extra_args = {"--keep-checkpoints", std::to_string(kKeepCheckpoints),
                          "--keep-best-checkpoint"};
    coordinator_ = std::make_unique<CoordinatorProcess>(options);
    jobs_ = coordinator_->jobs();
  }
};

TEST_F(BestCheckpointRetentionTest, TheLowestEvalLossIsKeptBesideTheNewest) {
  const std::string job = running_job("best");
  // Evals at 10, 20 (the best: 1.0) and 40; none at 30 or 50.
  const std::map<int64_t, double> evals{{10, 2.0}, {20, 1.0}, {40, 1.7}};
  for (int64_t step : {10, 20, 30, 40, 50}) {
    if (const auto eval = evals.find(step); eval != evals.end()) {
      ASSERT_TRUE(worker_->send_eval(job, 1, step, eval->second));
    }
    const auto ack = worker_->upload_checkpoint(job, 1, step, kFiles);
    ASSERT_TRUE(ack.has_value());
    ASSERT_TRUE(ack->committed()) << ack->error();
  }
  EXPECT_EQ(listed_steps(job), (std::vector<int64_t>{20, 40, 50}));
  EXPECT_TRUE(wait_until([&] { return stored_entries(job).size() == 3; }, seconds(10)));
  EXPECT_THAT(coordinator_->log(),
              HasSubstr("and the best by eval loss, " + job + "/step-00000020"));
}

TEST_F(CheckpointIntegrityTest,
       AFailedDownloadLeavesNothingAtTheDestinationAndASuccessfulOneIsWhole) {
  const std::string job = running_job("download");
  const auto ack = worker_->upload_checkpoint(job, 1, 10, kFiles);
  ASSERT_TRUE(ack.has_value());
  ASSERT_TRUE(ack->committed()) << ack->error();
  const std::string id = job + "/step-00000010";
  const fs::path out = dir_.path() / "downloads";
  fs::create_directories(out);

  // The last file sent (paths in order) rots on the coordinator's disk: the earlier files arrive
  // whole before the stream fails.
  const fs::path stored = dir_.path() / "data" / "checkpoints" / job / "step-00000010";
  std::string bytes = read_file(stored / "trainer_state.json");
  bytes[2] ^= 0x20;
  std::ofstream(stored / "trainer_state.json", std::ios::binary | std::ios::trunc) << bytes;
  client::Client client(api());
  EXPECT_THROW(client.download_checkpoint(id, out / "fresh"), client::ClientError);
  EXPECT_FALSE(fs::exists(out / "fresh"));
  // A destination that held another checkpoint is left exactly as it was.
  fs::create_directories(out / "older");
  std::ofstream(out / "older" / "model.safetensors") << "older weights";
  EXPECT_THROW(client.download_checkpoint(id, out / "older"), client::ClientError);
  EXPECT_EQ(read_file(out / "older" / "model.safetensors"), "older weights");
  EXPECT_EQ(std::distance(fs::directory_iterator(out / "older"), fs::directory_iterator()), 1);
  // No temporary directory is left behind.
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(out)) {
    names.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"older"});

  // Repaired, the same download lands whole, byte for byte.
  std::ofstream(stored / "trainer_state.json", std::ios::binary | std::ios::trunc)
      << kFiles.at("trainer_state.json");
  const client::DownloadResult result = client.download_checkpoint(id, out / "fresh");
  EXPECT_EQ(result.files.size(), kFiles.size());
  for (const auto& [path, data] : kFiles) EXPECT_EQ(read_file(out / "fresh" / path), data) << path;
}

TEST_F(CheckpointIntegrityTest, ADownloadInterruptedByACoordinatorKillLeavesNoPartialCheckpoint) {
  const std::string job = running_job("killed");
  // Big enough that the stream is still running when the coordinator dies (chunks of 1 MiB).
  std::map<std::string, std::string> files = kFiles;
  files["model.safetensors"] = std::string(64u << 20, 'm');
  const auto ack = worker_->upload_checkpoint(job, 1, 10, files, 1u << 20);
  ASSERT_TRUE(ack.has_value());
  ASSERT_TRUE(ack->committed()) << ack->error();
  const fs::path out = dir_.path() / "downloads";
  client::Client client(api());
  bool killed = false;
  EXPECT_THROW(client.download_checkpoint(job + "/step-00000010", out / "ckpt", {},
                                          [&](const client::DownloadProgress& progress) {
                                            if (!killed && progress.bytes > (4 << 20)) {
                                              coordinator_->kill9();
                                              killed = true;
                                            }
                                          }),
               client::ClientError);
  EXPECT_TRUE(killed);
  EXPECT_FALSE(fs::exists(out / "ckpt"));
  EXPECT_TRUE(fs::is_empty(out)) << "a temporary directory was left in " << out;
}

}  // namespace
}  // namespace lomo::server::testing
