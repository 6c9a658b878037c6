// The coordinator's SQLite store: jobs, per-job event sequences, checkpoints, paging, and that
// everything is there again when the file is reopened.
#include <gmock/gmock.h>
#include <google/protobuf/util/time_util.h>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "server/store.h"

namespace lomo::server {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::TimeUtil;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/lomo-store-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path db() const { return dir_ / "coordinator.db"; }

  static JobRecord job(const std::string& id, v1::JobState state = v1::JOB_STATE_QUEUED) {
    JobRecord record;
    record.job.set_id(id);
    record.job.set_name("name-" + id);
    record.job.set_state(state);
    record.job.set_priority(7);
    (*record.job.mutable_spec()->mutable_fields())["model"].mutable_struct_value();
    *record.job.mutable_create_time() = TimeUtil::MicrosecondsToTimestamp(1700000000123456);
    return record;
  }
  static v1::JobEvent log(const std::string& text) {
    v1::JobEvent event;
    event.mutable_log()->set_text(text);
    return event;
  }

  fs::path dir_;
};

TEST_F(StoreTest, JobRoundTripsEveryField) {
  Store store(db());
  JobRecord record = job("j1", v1::JOB_STATE_RUNNING);
  record.job.set_worker_id("w1");
  record.job.set_attempt(3);
  record.job.set_failure_reason("none yet");
  *record.job.mutable_start_time() = TimeUtil::MicrosecondsToTimestamp(1700000001000000);
  record.job.mutable_progress()->set_loss(1.5);
  record.job.set_canonical_spec("model:\n  path: m\ntraining:\n  seed: 9223372036854775807\n");
  record.job.set_original_spec("{\"model\": {\"path\": \"m\"}}");
  record.job.add_spec_overrides("training.seed=9223372036854775807");
  record.job.add_spec_overrides("name=a \"quoted\"\nline");
  for (int rank = 0; rank < 2; ++rank) {
    v1::RankAssignment* assignment = record.job.add_assignments();
    assignment->set_rank(rank);
    assignment->set_worker_id(rank == 0 ? "w1" : "w \"2\"");
  }
  record.rank_states = {v1::JOB_STATE_SUCCEEDED, v1::JOB_STATE_UNSPECIFIED};
  record.cancel_requested = true;
  v1::JobAttempt* ended = record.job.add_attempts();
  ended->set_attempt(2);
  ended->set_state(v1::JOB_STATE_FAILED);
  ended->set_reason("rank 1 (worker w \"2\"): killed\nby SIGKILL");
  ended->set_step(12);
  ended->set_restarted(true);
  *ended->mutable_end_time() = TimeUtil::MicrosecondsToTimestamp(1700000002000001);
  *ended->mutable_restart_time() = TimeUtil::MicrosecondsToTimestamp(1700000004000001);
  *ended->mutable_assignments() = record.job.assignments();
  std::vector<v1::JobEvent> events;
  store.insert_job(record, events);
  EXPECT_GT(record.submit_order, 0);

  const std::optional<JobRecord> read = store.get_job("j1");
  ASSERT_TRUE(read.has_value());
  EXPECT_EQ(read->job.SerializeAsString(), record.job.SerializeAsString());
  // An update writes the attempt history too.
  record.job.add_attempts()->set_attempt(3);
  store.update_job(record, events);
  EXPECT_EQ(store.get_job("j1")->job.attempts_size(), 2);
  EXPECT_TRUE(read->cancel_requested);
  EXPECT_EQ(read->rank_states, record.rank_states);
  EXPECT_EQ(read->submit_order, record.submit_order);
  EXPECT_FALSE(read->job.has_end_time());
  EXPECT_FALSE(store.get_job("nope").has_value());
}

TEST_F(StoreTest, EventsAreNumberedFromOneWithoutGapsPerJob) {
  Store store(db());
  JobRecord a = job("a");
  JobRecord b = job("b");
  std::vector<v1::JobEvent> first{log("a1"), log("a2")};
  store.insert_job(a, first);
  EXPECT_EQ(first[0].sequence(), 1);
  EXPECT_EQ(first[1].sequence(), 2);
  std::vector<v1::JobEvent> other{log("b1")};
  store.insert_job(b, other);
  EXPECT_EQ(other[0].sequence(), 1);

  a.job.set_state(v1::JOB_STATE_ASSIGNED);
  std::vector<v1::JobEvent> second{log("a3")};
  store.update_job(a, second);
  v1::JobProgress progress;
  progress.set_step(10);
  std::vector<v1::JobEvent> third{log("a4"), log("a5")};
  store.append_events("a", third, &progress);
  EXPECT_EQ(third[1].sequence(), 5);

  const std::optional<EventBatch> all = store.events_after("a", 0, 100);
  ASSERT_TRUE(all.has_value());
  std::vector<int64_t> sequences;
  std::vector<std::string> texts;
  for (const v1::JobEvent& event : all->events) {
    sequences.push_back(event.sequence());
    texts.push_back(event.log().text());
    EXPECT_TRUE(event.has_time());
  }
  EXPECT_THAT(sequences, ElementsAre(1, 2, 3, 4, 5));
  EXPECT_THAT(texts, ElementsAre("a1", "a2", "a3", "a4", "a5"));
  EXPECT_EQ(all->last_sequence, 5);
  EXPECT_EQ(all->job.job.state(), v1::JOB_STATE_ASSIGNED);
  EXPECT_EQ(all->job.job.progress().step(), 10);

  const std::optional<EventBatch> tail = store.events_after("a", 3, 1);
  ASSERT_TRUE(tail.has_value());
  ASSERT_EQ(tail->events.size(), 1u);
  EXPECT_EQ(tail->events[0].sequence(), 4);
  EXPECT_FALSE(store.events_after("nope", 0, 10).has_value());
}

TEST_F(StoreTest, UpdatingAMissingJobThrows) {
  Store store(db());
  std::vector<v1::JobEvent> none;
  EXPECT_THROW(store.update_job(job("ghost"), none), StoreError);
  std::vector<v1::JobEvent> one{log("x")};
  EXPECT_THROW(store.append_events("ghost", one, nullptr), StoreError);
}

TEST_F(StoreTest, DuplicateJobIdIsRejectedAndChangesNothing) {
  Store store(db());
  JobRecord record = job("same");
  std::vector<v1::JobEvent> events{log("first")};
  store.insert_job(record, events);
  JobRecord again = job("same");
  std::vector<v1::JobEvent> more{log("second")};
  EXPECT_THROW(store.insert_job(again, more), StoreError);
  EXPECT_EQ(store.events_after("same", 0, 10)->events.size(), 1u);
}

TEST_F(StoreTest, ListJobsPagesNewestFirstAndFiltersByState) {
  Store store(db());
  for (int i = 0; i < 5; ++i) {
    JobRecord record =
        job("j" + std::to_string(i), i % 2 == 0 ? v1::JOB_STATE_QUEUED : v1::JOB_STATE_FAILED);
    std::vector<v1::JobEvent> none;
    store.insert_job(record, none);
  }
  auto ids = [](const JobPage& page) {
    std::vector<std::string> out;
    for (const v1::Job& job : page.jobs) out.push_back(job.id());
    return out;
  };
  const JobPage first = store.list_jobs({}, 2, "");
  EXPECT_THAT(ids(first), ElementsAre("j4", "j3"));
  ASSERT_FALSE(first.next_page_token.empty());
  const JobPage second = store.list_jobs({}, 2, first.next_page_token);
  EXPECT_THAT(ids(second), ElementsAre("j2", "j1"));
  const JobPage last = store.list_jobs({}, 2, second.next_page_token);
  EXPECT_THAT(ids(last), ElementsAre("j0"));
  EXPECT_TRUE(last.next_page_token.empty());

  const JobPage queued = store.list_jobs({v1::JOB_STATE_QUEUED}, 10, "");
  EXPECT_THAT(ids(queued), ElementsAre("j4", "j2", "j0"));
  EXPECT_TRUE(queued.next_page_token.empty());
  const JobPage exact = store.list_jobs({v1::JOB_STATE_FAILED}, 2, "");
  EXPECT_THAT(ids(exact), ElementsAre("j3", "j1"));
  EXPECT_TRUE(exact.next_page_token.empty()) << "a full last page has no next page";

  EXPECT_THROW(store.list_jobs({}, 2, "not-a-token"), std::invalid_argument);
  EXPECT_THROW(store.list_jobs({}, 2, "-5"), std::invalid_argument);

  const auto counts = store.count_jobs_by_state();
  EXPECT_EQ(counts.at(v1::JOB_STATE_QUEUED), 3);
  EXPECT_EQ(counts.at(v1::JOB_STATE_FAILED), 2);
  const auto active = store.jobs_in_states({v1::JOB_STATE_QUEUED});
  ASSERT_EQ(active.size(), 3u);
  EXPECT_EQ(active.front().job.id(), "j0") << "oldest submission first";
}

TEST_F(StoreTest, CheckpointsAreRecordedWithTheirEventOncePerStep) {
  Store store(db());
  JobRecord record = job("j");
  std::vector<v1::JobEvent> events{log("submitted")};
  store.insert_job(record, events);
  v1::CheckpointInfo info;
  info.set_checkpoint_id("j/step-00000100");
  info.set_step(100);
  info.set_size_bytes(3);
  v1::CheckpointFile* file = info.add_files();
  file->set_path("model.safetensors");
  file->set_size_bytes(3);
  file->set_sha256(std::string(64, 'a'));
  *info.mutable_commit_time() = TimeUtil::MicrosecondsToTimestamp(1700000002000000);
  v1::JobEvent event;
  *event.mutable_checkpoint() = info;
  store.insert_checkpoint("j", info, event);
  EXPECT_EQ(event.sequence(), 2);

  const auto listed = store.list_checkpoints("j");
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].SerializeAsString(), info.SerializeAsString());
  const auto found = store.get_checkpoint("j/step-00000100");
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->job_id, "j");
  EXPECT_FALSE(store.get_checkpoint("j/step-00000200").has_value());
  EXPECT_THAT(store.all_checkpoint_ids(), ElementsAre("j/step-00000100"));

  v1::JobEvent again;
  EXPECT_THROW(store.insert_checkpoint("j", info, again), StoreError);
  EXPECT_EQ(store.events_after("j", 0, 10)->events.size(), 2u) << "nothing of the failed insert";
}

TEST_F(StoreTest, EverythingIsThereAfterReopening) {
  {
    Store store(db());
    JobRecord record = job("kept", v1::JOB_STATE_RUNNING);
    std::vector<v1::JobEvent> events{log("one"), log("two")};
    store.insert_job(record, events);
    std::vector<v1::JobEvent> more{log("three")};
    store.append_events("kept", more, nullptr);
  }
  Store reopened(db());
  const auto batch = reopened.events_after("kept", 0, 10);
  ASSERT_TRUE(batch.has_value());
  EXPECT_EQ(batch->job.job.state(), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(batch->events.size(), 3u);
  EXPECT_EQ(batch->events[2].log().text(), "three");
  std::vector<v1::JobEvent> next{log("four")};
  reopened.append_events("kept", next, nullptr);
  EXPECT_EQ(next[0].sequence(), 4);
}

TEST_F(StoreTest, ADatabaseFromANewerCoordinatorIsRefused) {
  { Store store(db()); }
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(db().c_str(), &raw), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(raw, "UPDATE meta SET value = '99' WHERE key = 'schema_version'", nullptr,
                         nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(raw);
  try {
    Store store(db());
    FAIL() << "opened a version 99 database";
  } catch (const StoreError& error) {
    EXPECT_THAT(error.what(), HasSubstr("schema version 99"));
  }
}

// A database written by a version 1 coordinator (jobs without the spec's canonical and original
// texts) opens: it is migrated in place, its jobs read with those texts empty, and new jobs keep
// them.
TEST_F(StoreTest, AVersion1DatabaseIsMigratedAndKeepsItsJobs) {
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(db().c_str(), &raw), SQLITE_OK);
  // The version 1 schema of the jobs table, and its meta row, as that coordinator wrote them.
  const char* v1_schema = R"sql(
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('schema_version', '1');
    CREATE TABLE jobs (
      submit_order INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
      name TEXT NOT NULL, state INTEGER NOT NULL, priority INTEGER NOT NULL,
      spec_json TEXT NOT NULL, create_time_us INTEGER NOT NULL, start_time_us INTEGER,
      end_time_us INTEGER, worker_id TEXT NOT NULL, failure_reason TEXT NOT NULL,
      attempt INTEGER NOT NULL, cancel_requested INTEGER NOT NULL, progress BLOB NOT NULL,
      last_sequence INTEGER NOT NULL);
    INSERT INTO jobs (id, name, state, priority, spec_json, create_time_us, worker_id,
                      failure_reason, attempt, cancel_requested, progress, last_sequence)
      VALUES ('old', 'old-job', 1, 3, '{"model":{"path":"m"}}', 1700000000000000, '', '', 0, 0,
              x'', 0);
  )sql";
  ASSERT_EQ(sqlite3_exec(raw, v1_schema, nullptr, nullptr, nullptr), SQLITE_OK)
      << sqlite3_errmsg(raw);
  sqlite3_close(raw);

  {
    Store store(db());
    const std::optional<JobRecord> old = store.get_job("old");
    ASSERT_TRUE(old.has_value());
    EXPECT_EQ(old->job.name(), "old-job");
    EXPECT_EQ(
        old->job.spec().fields().at("model").struct_value().fields().at("path").string_value(),
        "m");
    EXPECT_EQ(old->job.canonical_spec(), "");
    EXPECT_EQ(old->job.original_spec(), "");
    EXPECT_EQ(old->job.spec_overrides_size(), 0);

    JobRecord record = job("new");
    record.job.set_canonical_spec("model:\n  path: m\n");
    record.job.set_original_spec("model: {path: m}\n");
    std::vector<v1::JobEvent> events{log("submitted")};
    store.insert_job(record, events);
  }
  Store reopened(db());  // now version 2: opening again migrates nothing
  const std::optional<JobRecord> fresh = reopened.get_job("new");
  ASSERT_TRUE(fresh.has_value());
  EXPECT_EQ(fresh->job.canonical_spec(), "model:\n  path: m\n");
  EXPECT_EQ(fresh->job.original_spec(), "model: {path: m}\n");
  ASSERT_EQ(sqlite3_open(db().c_str(), &raw), SQLITE_OK);
  sqlite3_stmt* select = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(raw, "SELECT value FROM meta WHERE key = 'schema_version'", -1,
                               &select, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(select), SQLITE_ROW);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(sqlite3_column_text(select, 0))),
            std::to_string(Store::kSchemaVersion));
  sqlite3_finalize(select);
  sqlite3_close(raw);
}

// A database written by a version 2 coordinator (one worker per job, no assignments column)
// opens: it is migrated in place, a job that was assigned gets its worker as rank 0, a queued job
// none, and the gang of a new job is kept.
TEST_F(StoreTest, AVersion2DatabaseIsMigratedAndItsAssignedJobsGetRankZero) {
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(db().c_str(), &raw), SQLITE_OK);
  const char* v2_schema = R"sql(
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('schema_version', '2');
    CREATE TABLE jobs (
      submit_order INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
      name TEXT NOT NULL, state INTEGER NOT NULL, priority INTEGER NOT NULL,
      spec_json TEXT NOT NULL, create_time_us INTEGER NOT NULL, start_time_us INTEGER,
      end_time_us INTEGER, worker_id TEXT NOT NULL, failure_reason TEXT NOT NULL,
      attempt INTEGER NOT NULL, cancel_requested INTEGER NOT NULL, progress BLOB NOT NULL,
      last_sequence INTEGER NOT NULL, spec_canonical TEXT NOT NULL DEFAULT '',
      spec_original TEXT NOT NULL DEFAULT '', spec_overrides TEXT NOT NULL DEFAULT '[]');
    INSERT INTO jobs (id, name, state, priority, spec_json, create_time_us, worker_id,
                      failure_reason, attempt, cancel_requested, progress, last_sequence,
                      spec_canonical)
      VALUES ('running', 'r', 3, 0, '{}', 1700000000000000, 'w-old', '', 2, 0, x'', 0, 'c: 1'),
             ('queued', 'q', 1, 0, '{}', 1700000000000001, '', '', 0, 0, x'', 0, 'c: 2');
  )sql";
  ASSERT_EQ(sqlite3_exec(raw, v2_schema, nullptr, nullptr, nullptr), SQLITE_OK)
      << sqlite3_errmsg(raw);
  sqlite3_close(raw);

  {
    Store store(db());
    const std::optional<JobRecord> running = store.get_job("running");
    ASSERT_TRUE(running.has_value());
    EXPECT_EQ(running->job.state(), v1::JOB_STATE_RUNNING);
    EXPECT_EQ(running->job.worker_id(), "w-old");
    EXPECT_EQ(running->job.attempt(), 2);
    EXPECT_EQ(running->job.canonical_spec(), "c: 1");
    ASSERT_EQ(running->job.assignments_size(), 1);
    EXPECT_EQ(running->job.assignments(0).rank(), 0);
    EXPECT_EQ(running->job.assignments(0).worker_id(), "w-old");
    const std::optional<JobRecord> queued = store.get_job("queued");
    ASSERT_TRUE(queued.has_value());
    EXPECT_EQ(queued->job.assignments_size(), 0);
    EXPECT_EQ(store.jobs_in_states({v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING}).size(), 2u);

    JobRecord gang = job("gang", v1::JOB_STATE_ASSIGNED);
    gang.job.set_worker_id("w0");
    for (const char* worker : {"w0", "w1"}) {
      v1::RankAssignment* assignment = gang.job.add_assignments();
      assignment->set_rank(gang.job.assignments_size() - 1);
      assignment->set_worker_id(worker);
    }
    std::vector<v1::JobEvent> events;
    store.insert_job(gang, events);
  }
  Store reopened(db());  // now version 3: opening again migrates nothing
  const std::optional<JobRecord> gang = reopened.get_job("gang");
  ASSERT_TRUE(gang.has_value());
  ASSERT_EQ(gang->job.assignments_size(), 2);
  EXPECT_EQ(gang->job.assignments(1).rank(), 1);
  EXPECT_EQ(gang->job.assignments(1).worker_id(), "w1");
  EXPECT_EQ(reopened.get_job("running")->job.assignments_size(), 1);
}

// A database written by a version 3 coordinator (no attempts column) opens: its jobs keep every
// field and start with no attempt history, which new updates then record.
TEST_F(StoreTest, AVersion3DatabaseIsMigratedAndItsJobsHaveNoAttemptHistory) {
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(db().c_str(), &raw), SQLITE_OK);
  const char* v3_schema = R"sql(
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('schema_version', '3');
    CREATE TABLE jobs (
      submit_order INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
      name TEXT NOT NULL, state INTEGER NOT NULL, priority INTEGER NOT NULL,
      spec_json TEXT NOT NULL, create_time_us INTEGER NOT NULL, start_time_us INTEGER,
      end_time_us INTEGER, worker_id TEXT NOT NULL, failure_reason TEXT NOT NULL,
      attempt INTEGER NOT NULL, cancel_requested INTEGER NOT NULL, progress BLOB NOT NULL,
      last_sequence INTEGER NOT NULL, spec_canonical TEXT NOT NULL DEFAULT '',
      spec_original TEXT NOT NULL DEFAULT '', spec_overrides TEXT NOT NULL DEFAULT '[]',
      assignments TEXT NOT NULL DEFAULT '[]');
    INSERT INTO jobs (id, name, state, priority, spec_json, create_time_us, worker_id,
                      failure_reason, attempt, cancel_requested, progress, last_sequence,
                      spec_canonical, assignments)
      VALUES ('running', 'r', 3, 0, '{}', 1700000000000000, 'w-old', '', 1, 0, x'', 0,
              'resources: {retries: 0}', '[{"rank": 0, "worker_id": "w-old"}]');
  )sql";
  ASSERT_EQ(sqlite3_exec(raw, v3_schema, nullptr, nullptr, nullptr), SQLITE_OK)
      << sqlite3_errmsg(raw);
  sqlite3_close(raw);

  Store store(db());
  std::optional<JobRecord> running = store.get_job("running");
  ASSERT_TRUE(running.has_value());
  EXPECT_EQ(running->job.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(running->job.canonical_spec(), "resources: {retries: 0}");
  ASSERT_EQ(running->job.assignments_size(), 1);
  EXPECT_EQ(running->job.attempts_size(), 0);
  running->job.add_attempts()->set_reason("crashed");
  std::vector<v1::JobEvent> events;
  store.update_job(*running, events);
  ASSERT_EQ(store.get_job("running")->job.attempts_size(), 1);
  EXPECT_EQ(store.get_job("running")->job.attempts(0).reason(), "crashed");
}

TEST_F(StoreTest, UsesWriteAheadLoggingAndSyncsIt) {
  Store store(db());
  JobRecord record = job("w");
  std::vector<v1::JobEvent> events{log("x")};
  store.insert_job(record, events);
  EXPECT_TRUE(fs::exists(dir_ / "coordinator.db-wal"));
  const uint64_t before = store.wal_syncs();
  store.make_durable();
  EXPECT_EQ(store.wal_syncs(), before + 1) << "a commit made durable costs one WAL sync";
  store.make_durable();
  EXPECT_EQ(store.wal_syncs(), before + 1) << "nothing new: returns without a sync";
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&store, i] {
      std::vector<v1::JobEvent> more{log("t" + std::to_string(i))};
      store.append_events("w", more, nullptr);
      store.make_durable();
    });
  }
  for (std::thread& thread : threads) thread.join();
  // Each thread's commit was synced before its make_durable returned; threads that asked while a
  // sync ran share the next one, so 1 to 4 more syncs.
  EXPECT_GE(store.wal_syncs(), before + 2);
  EXPECT_LE(store.wal_syncs(), before + 5);
  EXPECT_EQ(store.events_after("w", 0, 10)->events.size(), 5u);
}

}  // namespace
}  // namespace lomo::server
