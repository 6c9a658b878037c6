// The store refuses files it must not serve from (issue 12): zero-length, another program's
// database, corrupt pages; and corruption found while serving is reported (health goes
// NOT_SERVING from it, tests/integration/coordinator_hardening_test.cc covers the start).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "server/store.h"

namespace lomo::server {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class StoreIntegrityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/lomo-store-integrity-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path db() const { return dir_ / "coordinator.db"; }

  // Runs SQL on the file with a connection of its own, as another program would.
  void exec(const std::string& sql) const {
    sqlite3* handle = nullptr;
    ASSERT_EQ(sqlite3_open(db().c_str(), &handle), SQLITE_OK);
    EXPECT_EQ(sqlite3_exec(handle, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK)
        << sqlite3_errmsg(handle);
    sqlite3_close(handle);
  }

  std::string open_failure(StoreOpen open = StoreOpen::kCreate) const {
    try {
      Store store(db(), /*reader_connections=*/1, open);
    } catch (const StoreError& error) {
      return error.what();
    }
    return "";
  }

  fs::path dir_;
};

JobRecord job(int i) {
  JobRecord record;
  record.job.set_id("job-" + std::to_string(i));
  record.job.set_name(std::string(200, 'n'));
  record.job.set_state(v1::JOB_STATE_QUEUED);
  (*record.job.mutable_spec()->mutable_fields())["model"].mutable_struct_value();
  return record;
}

TEST_F(StoreIntegrityTest, AZeroLengthFileIsRefusedAndLeftAsItIs) {
  std::ofstream(db()).close();
  EXPECT_THAT(open_failure(StoreOpen::kExisting), HasSubstr(db().string() + ": zero-length file"));
  EXPECT_THAT(open_failure(StoreOpen::kExisting), HasSubstr("pass --init"));
  EXPECT_EQ(fs::file_size(db()), 0u);
}

// Without --init a lost volume (no file) never comes up as an empty store; nothing is created.
TEST_F(StoreIntegrityTest, AMissingFileIsRefusedUnlessCreatingAndNothingIsCreated) {
  const std::string error = open_failure(StoreOpen::kExisting);
  EXPECT_THAT(error, HasSubstr(db().string() + ": no lomo store here (the file does not exist)"));
  EXPECT_THAT(error, HasSubstr("--init"));
  EXPECT_FALSE(fs::exists(db()));
  EXPECT_EQ(open_failure(StoreOpen::kCreate), "");
  EXPECT_EQ(open_failure(StoreOpen::kExisting), "") << "the store made by kCreate opens";
}

TEST_F(StoreIntegrityTest, CreatingOverAZeroLengthFileStartsANewStore) {
  std::ofstream(db()).close();
  EXPECT_EQ(open_failure(StoreOpen::kCreate), "");
  EXPECT_GT(fs::file_size(db()), 0u);
  EXPECT_EQ(open_failure(StoreOpen::kExisting), "");
}

// A zero-length file whose WAL holds pages may be a store that was never checkpointed.
TEST_F(StoreIntegrityTest, CreatingOverAZeroLengthFileBesideAWalWithDataIsRefused) {
  std::ofstream(db()).close();
  std::ofstream(db().string() + "-wal") << std::string(4096, 'w');
  EXPECT_THAT(open_failure(StoreOpen::kCreate),
              HasSubstr(db().string() + ": zero-length file beside a non-empty"));
  EXPECT_EQ(fs::file_size(db()), 0u);
}

// An existing store with --init is opened as it is, jobs and all.
TEST_F(StoreIntegrityTest, CreatingOnAnExistingStoreKeepsItsJobs) {
  {
    Store store(db(), 1, StoreOpen::kCreate);
    JobRecord record = job(1);
    std::vector<v1::JobEvent> events;
    store.insert_job(record, events);
  }
  Store store(db(), 1, StoreOpen::kCreate);
  EXPECT_TRUE(store.get_job("job-1").has_value());
}

// The online backup: taken while another connection keeps writing, a complete, self-contained
// store (no -wal beside it) that opens without --init and holds every job committed before it.
TEST_F(StoreIntegrityTest, ABackupTakenWhileWritingOpensAsAStoreWithTheJobs) {
  Store store(db(), 2);
  for (int i = 0; i < 200; ++i) {
    JobRecord record = job(i);
    std::vector<v1::JobEvent> events(3);
    store.insert_job(record, events);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> written{0};
  std::thread writer([&] {
    for (int i = 1000; !stop; ++i) {
      JobRecord record = job(i);
      std::vector<v1::JobEvent> events(1);
      store.insert_job(record, events);
      ++written;
    }
  });
  while (written < 20) std::this_thread::yield();
  const fs::path out = dir_ / "backups" / "coordinator.db";
  fs::create_directories(out.parent_path());
  BackupSummary summary;
  std::string error;
  try {
    summary = Store::backup(db(), out);
  } catch (const StoreError& e) {
    error = e.what();
  }
  stop = true;
  writer.join();
  ASSERT_EQ(error, "");
  EXPECT_GE(summary.jobs, 220);
  EXPECT_LE(summary.jobs, 200 + written.load());
  EXPECT_GE(summary.events, 600);
  EXPECT_EQ(summary.schema_version, Store::kSchemaVersion);
  EXPECT_EQ(summary.bytes, static_cast<int64_t>(fs::file_size(out)));
  EXPECT_FALSE(fs::exists(out.string() + "-wal"));
  std::vector<std::string> left;
  for (const auto& entry : fs::directory_iterator(out.parent_path())) {
    left.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(left, std::vector<std::string>{"coordinator.db"}) << "no temporary file left";

  Store copy(out, 1, StoreOpen::kExisting);
  EXPECT_EQ(copy.list_jobs({}, 10000, "").jobs.size(), static_cast<size_t>(summary.jobs));
  EXPECT_TRUE(copy.get_job("job-199").has_value());
  EXPECT_TRUE(copy.get_job("job-1000").has_value());
}

TEST_F(StoreIntegrityTest, ABackupOfNoStoreOrIntoNoDirectoryFailsNamingTheFile) {
  const fs::path out = dir_ / "copy.db";
  auto failure = [](const fs::path& from, const fs::path& to) -> std::string {
    try {
      Store::backup(from, to);
    } catch (const StoreError& error) {
      return error.what();
    }
    return "";
  };
  EXPECT_THAT(failure(db(), out), HasSubstr(db().string() + ": no lomo store here"));
  exec("CREATE TABLE photos (id INTEGER PRIMARY KEY)");
  EXPECT_THAT(failure(db(), out), HasSubstr(db().string() + ": an SQLite database without lomo's"));
  fs::remove(db());
  { Store store(db(), 1); }
  EXPECT_THAT(failure(db(), dir_ / "missing" / "copy.db"), HasSubstr("missing/copy.db.tmp-"));
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(failure(db(), out), "");
  EXPECT_TRUE(fs::exists(out));
}

TEST_F(StoreIntegrityTest, AnotherProgramsDatabaseIsRefused) {
  exec("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)");
  EXPECT_THAT(open_failure(), HasSubstr(db().string() + ": an SQLite database without lomo's"));
}

TEST_F(StoreIntegrityTest, AnEmptyNewFileAndAReopenedStoreOpen) {
  { Store store(db()); }
  EXPECT_EQ(open_failure(), "");
}

TEST_F(StoreIntegrityTest, CorruptionFoundWhileServingIsReportedOnceNamingTheFile) {
  Store store(db(), /*reader_connections=*/1);  // the reader has read nothing yet: no cache
  for (int i = 0; i < 300; ++i) {
    JobRecord record = job(i);
    std::vector<v1::JobEvent> events;
    store.insert_job(record, events);
  }
  exec("PRAGMA wal_checkpoint(TRUNCATE)");  // every page in the main file
  const auto size = fs::file_size(db());
  ASSERT_GE(size, 16384u);
  {
    std::fstream bytes(db(), std::ios::in | std::ios::out | std::ios::binary);
    bytes.seekp(4096);
    const std::string garbage(size - 4096, '\x5a');
    bytes.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
  }
  std::vector<std::string> reported;
  store.set_on_corruption([&](const std::string& what) { reported.push_back(what); });
  EXPECT_EQ(store.corruption(), "");
  EXPECT_THROW(store.list_jobs({}, 1000, ""), StoreError);
  EXPECT_THROW(store.list_jobs({}, 1000, ""), StoreError);
  EXPECT_THAT(store.corruption(), HasSubstr(db().string() + " is corrupt: listing jobs"));
  ASSERT_EQ(reported.size(), 1u);
  EXPECT_EQ(reported[0], store.corruption());
  store.set_on_corruption(nullptr);
}

}  // namespace
}  // namespace lomo::server
