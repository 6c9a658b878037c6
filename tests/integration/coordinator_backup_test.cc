// Issue 12, the metadata store: a coordinator creates a new store only when told (--init), and
// `lomo-coordinator backup` copies the store of a running coordinator that keeps accepting jobs;
// the copy, restored into a new data directory as server/README.md says, serves every job with
// its owner. Real processes on loopback, real tokens made by `lomo-coordinator token create`.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/grpc_channel.h"
#include "tests/integration/coordinator_harness.h"
#include "tests/integration/test_support.h"

namespace lomo::server::testing {
namespace {

namespace fs = std::filesystem;
using lomo::testing::run_program;
using std::chrono::seconds;
using ::testing::HasSubstr;

// `lomo-coordinator token create`: adds NAME to the tokens file and returns the token it printed.
std::string create_token(const fs::path& tokens_file, const std::string& name,
                         const std::string& role) {
  std::string output;
  const ExitStatus status = run_program({LOMO_COORDINATOR_BIN, "token", "create", "--tokens-file",
                                         tokens_file.string(), "--name", name, "--role", role},
                                        &output, seconds(30));
  EXPECT_TRUE(status.success()) << output;
  std::smatch token;
  EXPECT_TRUE(std::regex_search(output, token, std::regex("lomo_[A-Za-z0-9_-]{43}"))) << output;
  return token.empty() ? "" : token.str();
}

std::unique_ptr<v1::JobService::Stub> jobs_as(const CoordinatorProcess& coordinator,
                                              const std::string& token) {
  ChannelSecurity security;
  security.token = token;
  return v1::JobService::NewStub(make_channel(coordinator.grpc_address(), {}, &security));
}

// Every job the caller may see, by id.
std::map<std::string, v1::Job> list_all(v1::JobService::Stub& jobs) {
  std::map<std::string, v1::Job> found;
  v1::ListJobsRequest request;
  request.set_page_size(1000);
  do {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(20));
    v1::ListJobsResponse response;
    const grpc::Status status = jobs.ListJobs(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    if (!status.ok()) break;
    for (const v1::Job& job : response.jobs()) found[job.id()] = job;
    request.set_page_token(response.next_page_token());
  } while (!request.page_token().empty());
  return found;
}

std::string submit_one(v1::JobService::Stub& jobs, const std::string& name) {
  v1::Job job;
  const grpc::Status status = submit(jobs, submit_request(name), &job);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return job.id();
}

// Without --init, a data directory with no store (a lost volume, a typo in --data-dir) is refused
// with a message that names the file and says how to start a new deployment; nothing is created.
TEST(CoordinatorStoreInitTest, WithoutInitAMissingStoreIsRefusedAndNothingIsCreated) {
  TempDir dir;
  const fs::path data = dir.path() / "data";
  std::string output;
  ExitStatus status = run_program({LOMO_COORDINATOR_BIN, "--data-dir", data.string(),
                                   "--grpc-listen", "127.0.0.1:0", "--http-listen", ""},
                                  &output, seconds(30));
  EXPECT_EQ(status.code, 1) << output;
  EXPECT_THAT(output, HasSubstr("data directory " + data.string() + " does not exist"));
  EXPECT_THAT(output, HasSubstr("--init"));
  EXPECT_FALSE(fs::exists(data));

  fs::create_directories(data);  // an empty volume, mounted
  status = run_program({LOMO_COORDINATOR_BIN, "--data-dir", data.string(), "--grpc-listen",
                        "127.0.0.1:0", "--http-listen", ""},
                       &output, seconds(30));
  EXPECT_EQ(status.code, 1) << output;
  EXPECT_THAT(output, HasSubstr((data / "coordinator.db").string() +
                                ": no lomo store here (the file does not exist)"));
  EXPECT_THAT(output, HasSubstr("lomo-coordinator --init"));
  EXPECT_FALSE(fs::exists(data / "coordinator.db"));
}

// --init makes the store once; later starts need no --init, and --init again changes nothing.
TEST(CoordinatorStoreInitTest, InitOnceThenRestartsWithAndWithoutInitKeepTheJobs) {
  TempDir dir;
  ProcessOptions options(dir.path() / "data");
  std::string job_id;
  {
    CoordinatorProcess first(options);  // new: the harness passes --init
    job_id = submit_one(*first.jobs(), "kept");
    ASSERT_EQ(first.terminate(std::chrono::seconds(30)), 0);
  }
  for (const bool init : {false, true}) {
    ProcessOptions again = options;
    again.init_when_new = false;
    if (init) again.extra_args = {"--init"};
    CoordinatorProcess coordinator(again);
    v1::Job job;
    EXPECT_TRUE(get(*coordinator.jobs(), job_id, &job).ok()) << "--init " << init;
    EXPECT_EQ(job.name(), "kept");
    ASSERT_EQ(coordinator.terminate(std::chrono::seconds(30)), 0);
  }
  // The store is lost but the data directory remembers it had one: --init refuses too.
  for (const char* suffix : {"", "-wal", "-shm"}) {
    fs::remove(options.data_dir / (std::string("coordinator.db") + suffix));
  }
  std::string output;
  const ExitStatus status =
      run_program({LOMO_COORDINATOR_BIN, "--data-dir", options.data_dir.string(), "--init",
                   "--grpc-listen", "127.0.0.1:0", "--http-listen", ""},
                  &output, seconds(30));
  EXPECT_EQ(status.code, 1) << output;
  EXPECT_THAT(output, HasSubstr((options.data_dir / "INITIALISED").string() +
                                " says this data directory was initialised"));
  EXPECT_FALSE(fs::exists(options.data_dir / "coordinator.db"));
}

// `lomo-coordinator init`: --init without serving (deploy/k8s's init container).
TEST(CoordinatorStoreInitTest, TheInitCommandMakesAStoreOnceAndThenOnlyChecksIt) {
  TempDir dir;
  const fs::path data = dir.path() / "data";
  std::string output;
  ExitStatus status =
      run_program({LOMO_COORDINATOR_BIN, "init", "--data-dir", data.string()}, &output);
  EXPECT_TRUE(status.success()) << output;
  EXPECT_THAT(output, HasSubstr("new, empty store created"));
  ProcessOptions options(data);
  options.init_when_new = false;
  std::string job_id;
  {
    CoordinatorProcess coordinator(options);
    job_id = submit_one(*coordinator.jobs(), "after-init");
  }
  status = run_program({LOMO_COORDINATOR_BIN, "init", "--data-dir", data.string()}, &output);
  EXPECT_TRUE(status.success()) << output;
  EXPECT_THAT(output, HasSubstr("a store is there already"));
  CoordinatorProcess coordinator(options);
  v1::Job job;
  EXPECT_TRUE(get(*coordinator.jobs(), job_id, &job).ok());
}

TEST(CoordinatorBackupTest, ABackupTakenWhileServingRestoresEveryJobWithItsOwner) {
  TempDir dir;
  const fs::path tokens_file = dir.path() / "tokens.yaml";
  const std::string root = create_token(tokens_file, "root", "admin");
  const std::string alice = create_token(tokens_file, "alice", "user");
  const std::string bob = create_token(tokens_file, "bob", "user");
  ASSERT_FALSE(root.empty() || alice.empty() || bob.empty());

  ProcessOptions options(dir.path() / "data");
  options.extra_args = {"--tokens-file", tokens_file.string()};
  auto coordinator = std::make_unique<CoordinatorProcess>(options);
  std::map<std::string, std::string> owners;  // job id -> owner, submitted before the backup
  {
    auto as_alice = jobs_as(*coordinator, alice);
    auto as_bob = jobs_as(*coordinator, bob);
    for (int i = 0; i < 5; ++i) {
      owners[submit_one(*as_alice, "alice-" + std::to_string(i))] = "alice";
      owners[submit_one(*as_bob, "bob-" + std::to_string(i))] = "bob";
    }
  }

  // Submissions go on while the backup runs; each must be accepted.
  std::atomic<bool> stop{false};
  std::atomic<int> accepted{0}, refused{0};
  std::thread submitter([&] {
    auto as_alice = jobs_as(*coordinator, alice);
    while (!stop) {
      v1::Job job;
      (submit(*as_alice, submit_request("during"), &job).ok() ? accepted : refused)++;
    }
  });
  ASSERT_TRUE(wait_until([&] { return accepted > 0; }, std::chrono::seconds(20)));
  const fs::path backup = dir.path() / "backups" / "lomo.db";
  fs::create_directories(backup.parent_path());
  std::string output;
  const int accepted_before = accepted;
  const ExitStatus status = run_program({LOMO_COORDINATOR_BIN, "backup", "--data-dir",
                                         options.data_dir.string(), "--out", backup.string()},
                                        &output, seconds(60));
  ASSERT_TRUE(wait_until([&] { return accepted > accepted_before + 2; }, std::chrono::seconds(20)));
  stop = true;
  submitter.join();
  ASSERT_TRUE(status.success()) << output;
  EXPECT_EQ(refused, 0);
  EXPECT_THAT(output, HasSubstr("copied to " + backup.string()));
  EXPECT_THAT(output, HasSubstr("are not in the copy"));
  EXPECT_FALSE(fs::exists(backup.string() + "-wal"));
  const size_t on_original = list_all(*jobs_as(*coordinator, root)).size();
  EXPECT_EQ(on_original, owners.size() + static_cast<size_t>(accepted.load()));
  ASSERT_EQ(coordinator->terminate(std::chrono::seconds(30)), 0);
  coordinator.reset();

  // The documented restore: a new data directory holding the copy as coordinator.db; no --init.
  ProcessOptions restored(dir.path() / "restored");
  restored.init_when_new = false;
  restored.extra_args = options.extra_args;
  fs::create_directories(restored.data_dir);
  fs::copy_file(backup, restored.data_dir / "coordinator.db");
  CoordinatorProcess after(restored);
  const std::map<std::string, v1::Job> jobs = list_all(*jobs_as(after, root));
  for (const auto& [id, owner] : owners) {
    ASSERT_EQ(jobs.count(id), 1u) << id;
    EXPECT_EQ(jobs.at(id).owner(), owner) << id;
    EXPECT_EQ(jobs.at(id).state(), v1::JOB_STATE_QUEUED) << id;
  }
  EXPECT_GT(jobs.size(), owners.size()) << "jobs submitted before the copy started are in it";
  EXPECT_LE(jobs.size(), on_original);
  std::smatch count;
  ASSERT_TRUE(std::regex_search(output, count, std::regex(", ([0-9]+) jobs,"))) << output;
  EXPECT_EQ(std::to_string(jobs.size()), count[1].str());
  // Owners still bound access: bob sees his five jobs only.
  const std::map<std::string, v1::Job> bobs = list_all(*jobs_as(after, bob));
  EXPECT_EQ(bobs.size(), 5u);
  for (const auto& [id, job] : bobs) EXPECT_EQ(job.owner(), "bob") << id;
}

TEST(CoordinatorBackupTest, ErrorsNameTheFlagOrTheFile) {
  TempDir dir;
  std::string output;
  ExitStatus status = run_program({LOMO_COORDINATOR_BIN, "backup", "--data-dir", "x"}, &output);
  EXPECT_EQ(status.code, 2) << output;
  EXPECT_THAT(output, HasSubstr("--out: required"));
  status = run_program({LOMO_COORDINATOR_BIN, "backup", "--data-dir", dir.path().string(), "--out",
                        (dir.path() / "copy.db").string()},
                       &output);
  EXPECT_EQ(status.code, 1) << output;
  EXPECT_THAT(output, HasSubstr((dir.path() / "coordinator.db").string() + ": no lomo store"));
  EXPECT_FALSE(fs::exists(dir.path() / "copy.db"));
}

}  // namespace
}  // namespace lomo::server::testing
