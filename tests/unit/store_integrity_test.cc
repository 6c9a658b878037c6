// The store refuses files it must not serve from (issue 12): zero-length, another program's
// database, corrupt pages; and corruption found while serving is reported (health goes
// NOT_SERVING from it, tests/integration/coordinator_hardening_test.cc covers the start).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
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

  std::string open_failure() const {
    try {
      Store store(db());
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
  EXPECT_THAT(open_failure(), HasSubstr(db().string() + ": zero-length file"));
  EXPECT_EQ(fs::file_size(db()), 0u);
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
