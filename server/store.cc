#include "server/store.h"

#include <fcntl.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "server/sqlite.h"
#include "server/timestamps.h"

namespace lomo::server {

namespace {

using google::protobuf::util::TimeUtil;

// Version 4. Scalar job fields are columns so that the sqlite3 shell can answer questions; the
// spec is kept as submitted (spec_original, with spec_overrides as a JSON array of strings), as
// validated (spec_canonical: the YAML the worker runs) and as the Struct's JSON (spec_json); the
// current attempt's gang as a JSON array of {"rank", "worker_id"} objects (assignments); the
// ended attempts as a JSON array of lomo.v1.JobAttempt in protobuf's JSON form (attempts);
// progress and events are serialized lomo.v1 messages (protobuf keeps them readable by every
// later v1 coordinator).
constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
  submit_order INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  name TEXT NOT NULL,
  state INTEGER NOT NULL,
  priority INTEGER NOT NULL,
  spec_json TEXT NOT NULL,
  create_time_us INTEGER NOT NULL,
  start_time_us INTEGER,
  end_time_us INTEGER,
  worker_id TEXT NOT NULL,
  failure_reason TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  cancel_requested INTEGER NOT NULL,
  progress BLOB NOT NULL,
  last_sequence INTEGER NOT NULL,
  spec_canonical TEXT NOT NULL DEFAULT '',
  spec_original TEXT NOT NULL DEFAULT '',
  spec_overrides TEXT NOT NULL DEFAULT '[]',
  assignments TEXT NOT NULL DEFAULT '[]',
  attempts TEXT NOT NULL DEFAULT '[]',
  owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, submit_order);
CREATE TABLE IF NOT EXISTS job_events (
  job_id TEXT NOT NULL REFERENCES jobs (id),
  sequence INTEGER NOT NULL,
  time_us INTEGER NOT NULL,
  kind TEXT NOT NULL,
  event BLOB NOT NULL,
  PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
  job_id TEXT NOT NULL REFERENCES jobs (id),
  step INTEGER NOT NULL,
  checkpoint_id TEXT NOT NULL UNIQUE,
  size_bytes INTEGER NOT NULL,
  commit_time_us INTEGER NOT NULL,
  info BLOB NOT NULL,
  PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
)sql";

constexpr const char* kJobColumns =
    "submit_order, id, name, state, priority, spec_json, create_time_us, start_time_us, "
    "end_time_us, worker_id, failure_reason, attempt, cancel_requested, progress, spec_canonical, "
    "spec_original, spec_overrides, assignments, attempts, owner";
constexpr int kJobColumnCount = 20;

// Version 1 -> 2: the spec's canonical and original texts. ALTER TABLE ... ADD COLUMN with a
// constant default rewrites nothing, so this is instant however many jobs the file holds.
constexpr const char* kMigrateToVersion2 = R"sql(
ALTER TABLE jobs ADD COLUMN spec_canonical TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN spec_original TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN spec_overrides TEXT NOT NULL DEFAULT '[]';
)sql";

// Version 2 -> 3: the gang of each job's current attempt. Every job of a version 2 file ran on
// one worker (world_size 1), so a job that was ever assigned had exactly rank 0 on worker_id.
// The UPDATE rewrites those rows once, inside the opening transaction.
constexpr const char* kMigrateToVersion3 = R"sql(
ALTER TABLE jobs ADD COLUMN assignments TEXT NOT NULL DEFAULT '[]';
UPDATE jobs SET assignments = json_array(json_object('rank', 0, 'worker_id', worker_id))
  WHERE worker_id != '';
)sql";

// Version 3 -> 4: each job's ended attempts (Job.attempts). Jobs of a version 3 file were never
// restarted; their history starts empty.
constexpr const char* kMigrateToVersion4 = R"sql(
ALTER TABLE jobs ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]';
)sql";

// Version 4 -> 5: who submitted each job (Job.owner). Jobs of a version 4 file were submitted
// without authentication: no owner, so only admins reach them once tokens are configured.
constexpr const char* kMigrateToVersion5 = R"sql(
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
)sql";

int64_t to_micros(const google::protobuf::Timestamp& time) {
  return TimeUtil::TimestampToMicroseconds(time);
}

void bind_optional_time(sqlite::Statement& statement, int index, bool has,
                        const google::protobuf::Timestamp& time) {
  if (has) {
    statement.bind(index, to_micros(time));
  } else {
    statement.bind_null(index);
  }
}

std::string spec_json(const v1::Job& job) {
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(job.spec(), &json);
  if (!status.ok())
    throw StoreError("cannot encode the spec of " + job.id() + ": " +
                     std::string(status.message()));
  return json;
}

// Job.spec_overrides as a JSON array of strings.
std::string overrides_json(const v1::Job& job) {
  google::protobuf::ListValue list;
  for (const std::string& o : job.spec_overrides()) list.add_values()->set_string_value(o);
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(list, &json);
  if (!status.ok()) {
    throw StoreError("cannot encode the spec overrides of " + job.id() + ": " +
                     std::string(status.message()));
  }
  return json;
}

void read_overrides(const std::string& json, v1::Job& job) {
  google::protobuf::ListValue list;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &list);
  if (!status.ok()) {
    throw StoreError("job " + job.id() + ": stored spec overrides are not valid JSON: " +
                     std::string(status.message()));
  }
  for (const auto& value : list.values()) job.add_spec_overrides(value.string_value());
}

// Job.assignments and the record's rank_states as a JSON array of {"rank": R, "worker_id": "W",
// "state": "RUNNING"} ("state" only once the rank reported).
std::string assignments_json(const JobRecord& record) {
  nlohmann::json list = nlohmann::json::array();
  for (int i = 0; i < record.job.assignments_size(); ++i) {
    const v1::RankAssignment& a = record.job.assignments(i);
    nlohmann::json entry = {{"rank", a.rank()}, {"worker_id", a.worker_id()}};
    const size_t index = static_cast<size_t>(i);
    if (index < record.rank_states.size() &&
        record.rank_states[index] != v1::JOB_STATE_UNSPECIFIED) {
      entry["state"] = v1::JobState_Name(record.rank_states[index]);
    }
    list.push_back(std::move(entry));
  }
  return list.dump();
}

void read_assignments(const std::string& text, JobRecord& record) {
  try {
    for (const nlohmann::json& entry : nlohmann::json::parse(text)) {
      v1::RankAssignment* assignment = record.job.add_assignments();
      assignment->set_rank(entry.at("rank").get<int32_t>());
      assignment->set_worker_id(entry.at("worker_id").get<std::string>());
      v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
      if (entry.contains("state")) {
        v1::JobState_Parse(entry.at("state").get<std::string>(), &state);
      }
      record.rank_states.push_back(state);
    }
  } catch (const nlohmann::json::exception& error) {
    throw StoreError("job " + record.job.id() +
                     ": stored assignments are not valid: " + error.what());
  }
}

// Job.attempts as a JSON array of JobAttempt objects (protobuf's JSON form).
std::string attempts_json(const v1::Job& job) {
  nlohmann::json list = nlohmann::json::array();
  for (const v1::JobAttempt& attempt : job.attempts()) {
    std::string json;
    const auto status = google::protobuf::util::MessageToJsonString(attempt, &json);
    if (!status.ok()) {
      throw StoreError("cannot encode the attempts of " + job.id() + ": " +
                       std::string(status.message()));
    }
    list.push_back(nlohmann::json::parse(json));
  }
  return list.dump();
}

void read_attempts(const std::string& text, v1::Job& job) {
  try {
    for (const nlohmann::json& entry : nlohmann::json::parse(text)) {
      const auto status =
          google::protobuf::util::JsonStringToMessage(entry.dump(), job.add_attempts());
      if (!status.ok()) throw StoreError(std::string(status.message()));
    }
  } catch (const std::exception& error) {
    throw StoreError("job " + job.id() + ": stored attempts are not valid: " + error.what());
  }
}

// Reads the kJobColumns of the current row.
JobRecord read_job(const sqlite::Statement& row) {
  JobRecord record;
  v1::Job& job = record.job;
  record.submit_order = row.column_int(0);
  job.set_id(row.column_text(1));
  job.set_name(row.column_text(2));
  job.set_state(static_cast<v1::JobState>(row.column_int(3)));
  job.set_priority(row.column_int(4));
  const auto status =
      google::protobuf::util::JsonStringToMessage(row.column_text(5), job.mutable_spec());
  if (!status.ok()) {
    throw StoreError("job " + job.id() +
                     ": stored spec is not valid JSON: " + std::string(status.message()));
  }
  *job.mutable_create_time() = TimeUtil::MicrosecondsToTimestamp(row.column_int(6));
  if (!row.column_is_null(7)) {
    *job.mutable_start_time() = TimeUtil::MicrosecondsToTimestamp(row.column_int(7));
  }
  if (!row.column_is_null(8)) {
    *job.mutable_end_time() = TimeUtil::MicrosecondsToTimestamp(row.column_int(8));
  }
  job.set_worker_id(row.column_text(9));
  job.set_failure_reason(row.column_text(10));
  job.set_attempt(row.column_int(11));
  record.cancel_requested = row.column_int(12) != 0;
  if (!job.mutable_progress()->ParseFromString(row.column_blob(13))) {
    throw StoreError("job " + job.id() + ": stored progress does not parse");
  }
  job.set_canonical_spec(row.column_text(14));
  job.set_original_spec(row.column_text(15));
  read_overrides(row.column_text(16), job);
  read_assignments(row.column_text(17), record);
  read_attempts(row.column_text(18), job);
  job.set_owner(row.column_text(19));
  return record;
}

const char* event_kind(const v1::JobEvent& event) {
  switch (event.kind_case()) {
    case v1::JobEvent::kStateChange:
      return "state_change";
    case v1::JobEvent::kMetrics:
      return "metrics";
    case v1::JobEvent::kEval:
      return "eval";
    case v1::JobEvent::kLog:
      return "log";
    case v1::JobEvent::kCheckpoint:
      return "checkpoint";
    case v1::JobEvent::KIND_NOT_SET:
      break;
  }
  return "unset";
}

std::string state_list(const std::vector<v1::JobState>& states) {
  std::string list;
  for (v1::JobState state : states) {
    if (!list.empty()) list += ",";
    list += std::to_string(static_cast<int>(state));
  }
  return list;
}

template <typename F>
auto guarded(const Store* store, const std::string& what, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const sqlite::Error& error) {
    store->note_failure(error.code(), what + ": " + error.what());
    throw StoreError(what + ": " + error.what());
  }
}

// A file that holds no store yet: missing, or zero bytes (SQLite would take either for a new,
// empty database, and the jobs it should hold would silently be gone). Only kCreate starts a new
// store there, and not over a zero-length file whose WAL holds data.
void check_new_file(const std::filesystem::path& file, StoreOpen open) {
  std::error_code error;
  if (!std::filesystem::exists(file, error)) {
    if (open == StoreOpen::kCreate) return;
    throw StoreError(file.string() +
                     ": no lomo store here (the file does not exist). A new store is created only "
                     "when asked: lomo-coordinator --init, for a new deployment. If this "
                     "deployment had one, its data directory or volume is missing: restore "
                     "coordinator.db from a backup (server/README.md)");
  }
  const auto size = std::filesystem::file_size(file, error);
  if (error || size != 0) return;
  if (open == StoreOpen::kExisting) {
    throw StoreError(file.string() +
                     ": zero-length file; it is not a lomo store (restore it from a backup, or "
                     "pass --init to start a new, empty store)");
  }
  const std::filesystem::path wal = file.string() + "-wal";
  const auto wal_size = std::filesystem::file_size(wal, error);
  if (!error && wal_size > 0) {
    throw StoreError(file.string() + ": zero-length file beside a non-empty " + wal.string() +
                     "; not starting a new store over it (restore from a backup)");
  }
}

// Tables but no meta table: another program's database, not ours to add tables to.
void refuse_foreign_schema(sqlite::Connection& db, const std::filesystem::path& file) {
  auto tables =
      db.prepare("SELECT COUNT(*), SUM(name = 'meta') FROM sqlite_master WHERE type = 'table'");
  if (tables->step() && tables->column_int(0) > 0 && tables->column_int(1) == 0) {
    throw StoreError(file.string() + ": an SQLite database without lomo's schema (no meta table)");
  }
}

// SQLite's quick_check: every page readable and well-formed (indexes not compared to tables).
void refuse_corrupt_file(sqlite::Connection& db, const std::filesystem::path& file) {
  auto check = db.prepare("PRAGMA quick_check(5)");
  std::string problems;
  while (check->step()) {
    const std::string line = check->column_text(0);
    if (line == "ok") return;
    problems += (problems.empty() ? "" : "; ") + line;
  }
  throw StoreError(file.string() + ": failed SQLite's integrity check (" + problems +
                   "); restore it from a backup");
}

// One value from a query that returns a single integer.
int64_t single_int(sqlite::Connection& db, const std::string& sql) {
  auto select = db.prepare(sql);
  return select->step() ? select->column_int(0) : 0;
}

// Copies every page of `file` into `temporary` (a new file) from one read snapshot: a single
// backup step holds one read transaction, which in WAL mode never blocks the coordinator's writer
// and is never restarted by its commits. Busy only while another connection recovers the WAL.
void copy_pages(const std::filesystem::path& file, const std::filesystem::path& temporary) {
  sqlite::Connection source(file, /*create=*/false);
  source.exec("PRAGMA query_only=ON");
  if (single_int(source,
                 "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND "
                 "name = 'meta'") == 0) {
    throw StoreError(file.string() + ": an SQLite database without lomo's schema (no meta table)");
  }
  sqlite::Connection copy(temporary, /*create=*/true);
  sqlite3_backup* backup = sqlite3_backup_init(copy.handle(), "main", source.handle(), "main");
  if (backup == nullptr) {
    throw StoreError("cannot back up " + file.string() + " into " + temporary.string() + ": " +
                     sqlite3_errmsg(copy.handle()));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  int code = SQLITE_OK;
  for (;;) {
    code = sqlite3_backup_step(backup, -1);
    if ((code != SQLITE_BUSY && code != SQLITE_LOCKED) ||
        std::chrono::steady_clock::now() > deadline) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  sqlite3_backup_finish(backup);
  if (code != SQLITE_DONE) {
    throw StoreError("backing up " + file.string() + " into " + temporary.string() + ": " +
                     sqlite3_errstr(code));
  }
  // The pages say WAL mode, as the source's do; a backup is one self-contained file instead.
  auto mode = copy.prepare("PRAGMA journal_mode=DELETE");
  if (!mode->step() || mode->column_text(0) != "delete") {
    throw StoreError(temporary.string() + ": cannot leave WAL mode");
  }
}

// The copy must be whole (PRAGMA integrity_check, every index against its table too) and a lomo
// store; returns what it holds.
BackupSummary check_copy(const std::filesystem::path& temporary) {
  sqlite::Connection copy(temporary, /*create=*/false);
  auto check = copy.prepare("PRAGMA integrity_check(5)");
  std::string problems;
  while (check->step()) {
    const std::string line = check->column_text(0);
    if (line != "ok") problems += (problems.empty() ? "" : "; ") + line;
  }
  if (!problems.empty()) {
    throw StoreError(temporary.string() + ": the copy failed SQLite's integrity check (" +
                     problems + ")");
  }
  BackupSummary summary;
  summary.schema_version =
      single_int(copy, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'schema_version'");
  summary.jobs = single_int(copy, "SELECT COUNT(*) FROM jobs");
  summary.events = single_int(copy, "SELECT COUNT(*) FROM job_events");
  summary.checkpoints = single_int(copy, "SELECT COUNT(*) FROM checkpoints");
  return summary;
}

// fsync of a file or a directory, naming it when it fails.
void sync_path(const std::filesystem::path& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    const std::string reason = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    throw StoreError("cannot sync " + path.string() + ": " + reason);
  }
  ::close(fd);
}

}  // namespace

// A reader connection borrowed from the pool for one read; returned on destruction.
class Store::ReaderLease {
 public:
  ReaderLease(const Store& store, std::unique_ptr<sqlite::Connection> connection)
      : store_(store), connection_(std::move(connection)) {}
  ~ReaderLease() {
    if (connection_ == nullptr) return;
    std::lock_guard lock(store_.readers_mu_);
    store_.free_readers_.push_back(std::move(connection_));
    store_.reader_free_.notify_one();
  }
  ReaderLease(ReaderLease&&) = default;
  sqlite::Connection& operator*() const { return *connection_; }
  sqlite::Connection* operator->() const { return connection_.get(); }

 private:
  const Store& store_;
  std::unique_ptr<sqlite::Connection> connection_;
};

Store::Store(const std::filesystem::path& file, int reader_connections, StoreOpen open)
    : file_(file) {
  check_new_file(file, open);
  guarded(this, "opening " + file.string(), [&] {
    writer_ = std::make_unique<sqlite::Connection>(file, /*create=*/open == StoreOpen::kCreate);
    refuse_foreign_schema(*writer_, file);
    refuse_corrupt_file(*writer_, file);
    {
      auto mode = writer_->prepare("PRAGMA journal_mode=WAL");
      if (!mode->step() || mode->column_text(0) != "wal") {
        throw StoreError(file.string() + ": SQLite cannot use WAL mode on this file system");
      }
    }
    writer_->exec("PRAGMA foreign_keys=ON");
    // See the header: commits reach the WAL; the sync thread syncs it. SQLite's automatic
    // checkpoint (every 1000 WAL pages) stays: it runs inside a commit and syncs, but only there,
    // with no other writer appending, does a checkpoint finish and let the WAL start over, which
    // keeps it at a few MiB under a steady stream of writes.
    writer_->exec("PRAGMA synchronous=NORMAL");
    sqlite::Transaction transaction(*writer_, sqlite::Transaction::Kind::kWrite);
    writer_->exec(kSchema);
    int64_t version = 0;
    {
      auto select = writer_->prepare("SELECT value FROM meta WHERE key = 'schema_version'");
      if (select->step()) version = std::stoll(select->column_text(0));
    }
    if (version > kSchemaVersion) {
      throw StoreError(file.string() + ": schema version " + std::to_string(version) +
                       " was written by a newer lomo-coordinator (this one reads up to " +
                       std::to_string(kSchemaVersion) + ")");
    }
    if (version < kSchemaVersion) {
      // Version 0 is a new file (kSchema made it current); older ones migrate here, inside this
      // transaction.
      if (version == 1) writer_->exec(kMigrateToVersion2);
      if (version >= 1 && version <= 2) writer_->exec(kMigrateToVersion3);
      if (version >= 1 && version <= 3) writer_->exec(kMigrateToVersion4);
      if (version >= 1 && version <= 4) writer_->exec(kMigrateToVersion5);
      auto upsert =
          writer_->prepare("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)");
      upsert->bind(1, std::to_string(kSchemaVersion));
      upsert->run();
    }
    transaction.commit();
    // The WAL file exists from the first write on and stays while a connection is open.
    const std::filesystem::path wal = file.string() + "-wal";
    wal_fd_ = ::open(wal.c_str(), O_RDWR | O_CLOEXEC);
    if (wal_fd_ < 0) {
      throw StoreError("cannot open " + wal.string() + ": " + std::strerror(errno));
    }
    // The directory entries of the database and its WAL must survive a power cut as well.
    const std::filesystem::path dir = std::filesystem::absolute(file).parent_path();
    const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
      ::fsync(dir_fd);
      ::close(dir_fd);
    }
    for (int i = 0; i < reader_connections; ++i) {
      auto reader = std::make_unique<sqlite::Connection>(file, /*create=*/false);
      reader->exec("PRAGMA query_only=ON");
      free_readers_.push_back(std::move(reader));
    }
  });
  sync_thread_ = std::thread([this] { sync_loop(); });
}

std::string Store::corruption() const {
  std::lock_guard lock(corruption_mu_);
  return corruption_;
}

void Store::note_failure(int sqlite_code, const std::string& error) const {
  const int primary = sqlite_code & 0xff;
  if (primary != SQLITE_CORRUPT && primary != SQLITE_NOTADB) return;
  std::function<void(const std::string&)> notify;
  {
    std::lock_guard lock(corruption_mu_);
    if (!corruption_.empty()) return;
    corruption_ = file_.string() + " is corrupt: " + error;
    notify = on_corruption_;
  }
  if (notify) notify(corruption());
}

void Store::set_on_corruption(const std::function<void(const std::string&)>& on_corruption) {
  std::string found;
  {
    std::lock_guard lock(corruption_mu_);
    on_corruption_ = on_corruption;
    found = corruption_;
  }
  if (on_corruption && !found.empty()) on_corruption(found);
}

Store::~Store() {
  if (sync_thread_.joinable()) {
    {
      std::lock_guard lock(sync_mu_);
      sync_stop_ = true;
      sync_wanted_.notify_all();
    }
    sync_thread_.join();  // after a last sync for anyone still waiting
  }
  if (wal_fd_ >= 0) ::close(wal_fd_);
}

void Store::when_durable(std::function<void(const std::string& error)> done) {
  std::lock_guard lock(sync_mu_);
  waiters_.push_back(std::move(done));
  sync_wanted_.notify_one();
}

void Store::sync_loop() {
  std::unique_lock lock(sync_mu_);
  for (;;) {
    sync_wanted_.wait(lock, [this] { return sync_stop_ || !waiters_.empty(); });
    if (waiters_.empty()) return;  // stopping, nobody waiting
    // Every waiter taken here asked after its commit returned, so one sync that starts now
    // covers them all.
    std::vector<std::function<void(const std::string&)>> batch;
    batch.swap(waiters_);
    lock.unlock();
    const uint64_t covered = commits_.load();
    std::string error;
    if (covered != synced_) {
      if (::fdatasync(wal_fd_) == 0) {
        synced_ = covered;
        wal_syncs_.fetch_add(1);
      } else {
        error = "cannot sync " + file_.string() + "-wal: " + std::strerror(errno);
      }
    }
    for (const auto& done : batch) done(error);
    lock.lock();
  }
}

void Store::make_durable() {
  std::promise<std::string> synced;
  std::future<std::string> result = synced.get_future();
  when_durable([&synced](const std::string& error) { synced.set_value(error); });
  const std::string error = result.get();
  if (!error.empty()) throw StoreError(error);
}

Store::ReaderLease Store::lease_reader() const {
  std::unique_lock lock(readers_mu_);
  reader_free_.wait(lock, [this] { return !free_readers_.empty(); });
  auto connection = std::move(free_readers_.back());
  free_readers_.pop_back();
  return ReaderLease(*this, std::move(connection));
}

int64_t Store::append_events_locked(const std::string& job_id, std::vector<v1::JobEvent>& events) {
  int64_t last = 0;
  {
    auto bump = writer_->prepare(
        "UPDATE jobs SET last_sequence = last_sequence + ? WHERE id = ? RETURNING last_sequence");
    bump->bind(1, static_cast<int64_t>(events.size())).bind(2, job_id);
    if (!bump->step()) throw StoreError("job " + job_id + " does not exist");
    last = bump->column_int(0);
  }
  int64_t sequence = last - static_cast<int64_t>(events.size());
  for (v1::JobEvent& event : events) {
    event.set_sequence(++sequence);
    if (!event.has_time()) *event.mutable_time() = now_timestamp();
    auto insert = writer_->prepare(
        "INSERT INTO job_events (job_id, sequence, time_us, kind, event) VALUES (?, ?, ?, ?, ?)");
    insert->bind(1, job_id)
        .bind(2, event.sequence())
        .bind(3, to_micros(event.time()))
        .bind(4, std::string_view(event_kind(event)))
        .bind_blob(5, event.SerializeAsString());
    insert->run();
  }
  return last;
}

void Store::insert_job(JobRecord& record, std::vector<v1::JobEvent>& events) {
  const v1::Job& job = record.job;
  guarded(this, "inserting job " + job.id(), [&] {
    std::lock_guard lock(writer_mu_);
    sqlite::Transaction transaction(*writer_, sqlite::Transaction::Kind::kWrite);
    {
      auto insert = writer_->prepare(
          "INSERT INTO jobs (id, name, state, priority, spec_json, create_time_us, start_time_us, "
          "end_time_us, worker_id, failure_reason, attempt, cancel_requested, progress, "
          "spec_canonical, spec_original, spec_overrides, assignments, attempts, owner, "
          "last_sequence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) "
          "RETURNING "
          "submit_order");
      insert->bind(1, job.id())
          .bind(2, job.name())
          .bind(3, static_cast<int64_t>(job.state()))
          .bind(4, job.priority())
          .bind(5, spec_json(job))
          .bind(6, to_micros(job.create_time()));
      bind_optional_time(*insert, 7, job.has_start_time(), job.start_time());
      bind_optional_time(*insert, 8, job.has_end_time(), job.end_time());
      insert->bind(9, job.worker_id())
          .bind(10, job.failure_reason())
          .bind(11, job.attempt())
          .bind(12, static_cast<int64_t>(record.cancel_requested))
          .bind_blob(13, job.progress().SerializeAsString())
          .bind(14, job.canonical_spec())
          .bind(15, job.original_spec())
          .bind(16, overrides_json(job))
          .bind(17, assignments_json(record))
          .bind(18, attempts_json(job))
          .bind(19, job.owner());
      if (!insert->step()) throw StoreError("INSERT returned no submit order");
      record.submit_order = insert->column_int(0);
    }
    if (!events.empty()) append_events_locked(job.id(), events);
    transaction.commit();
    ++commits_;
  });
}

void Store::update_job(const JobRecord& record, std::vector<v1::JobEvent>& events) {
  const v1::Job& job = record.job;
  guarded(this, "updating job " + job.id(), [&] {
    std::lock_guard lock(writer_mu_);
    sqlite::Transaction transaction(*writer_, sqlite::Transaction::Kind::kWrite);
    {
      auto update = writer_->prepare(
          "UPDATE jobs SET name = ?, state = ?, priority = ?, start_time_us = ?, end_time_us = ?, "
          "worker_id = ?, failure_reason = ?, attempt = ?, cancel_requested = ?, progress = ?, "
          "assignments = ?, attempts = ? WHERE id = ?");
      update->bind(1, job.name())
          .bind(2, static_cast<int64_t>(job.state()))
          .bind(3, job.priority());
      bind_optional_time(*update, 4, job.has_start_time(), job.start_time());
      bind_optional_time(*update, 5, job.has_end_time(), job.end_time());
      update->bind(6, job.worker_id())
          .bind(7, job.failure_reason())
          .bind(8, job.attempt())
          .bind(9, static_cast<int64_t>(record.cancel_requested))
          .bind_blob(10, job.progress().SerializeAsString())
          .bind(11, assignments_json(record))
          .bind(12, attempts_json(job))
          .bind(13, job.id());
      update->run();
    }
    if (writer_->changes() != 1) throw StoreError("job " + job.id() + " does not exist");
    if (!events.empty()) append_events_locked(job.id(), events);
    transaction.commit();
    ++commits_;
  });
}

void Store::append_events(const std::string& job_id, std::vector<v1::JobEvent>& events,
                          const v1::JobProgress* progress) {
  guarded(this, "appending events to job " + job_id, [&] {
    std::lock_guard lock(writer_mu_);
    sqlite::Transaction transaction(*writer_, sqlite::Transaction::Kind::kWrite);
    if (progress != nullptr) {
      auto update = writer_->prepare("UPDATE jobs SET progress = ? WHERE id = ?");
      update->bind_blob(1, progress->SerializeAsString()).bind(2, job_id);
      update->run();
    }
    if (!events.empty()) append_events_locked(job_id, events);
    transaction.commit();
    ++commits_;
  });
}

void Store::insert_checkpoint(const std::string& job_id, const v1::CheckpointInfo& info,
                              v1::JobEvent& event) {
  guarded(this, "recording checkpoint " + info.checkpoint_id(), [&] {
    std::lock_guard lock(writer_mu_);
    sqlite::Transaction transaction(*writer_, sqlite::Transaction::Kind::kWrite);
    {
      auto insert = writer_->prepare(
          "INSERT INTO checkpoints (job_id, step, checkpoint_id, size_bytes, commit_time_us, info) "
          "VALUES (?, ?, ?, ?, ?, ?)");
      insert->bind(1, job_id)
          .bind(2, info.step())
          .bind(3, info.checkpoint_id())
          .bind(4, info.size_bytes())
          .bind(5, to_micros(info.commit_time()))
          .bind_blob(6, info.SerializeAsString());
      insert->run();
    }
    std::vector<v1::JobEvent> events{event};
    append_events_locked(job_id, events);
    event = events.front();
    transaction.commit();
    ++commits_;
  });
}

void Store::delete_checkpoint(const std::string& checkpoint_id) {
  guarded(this, "deleting checkpoint " + checkpoint_id, [&] {
    std::lock_guard lock(writer_mu_);
    sqlite::Transaction transaction(*writer_, sqlite::Transaction::Kind::kWrite);
    {
      auto remove = writer_->prepare("DELETE FROM checkpoints WHERE checkpoint_id = ?");
      remove->bind(1, checkpoint_id);
      remove->run();
    }
    transaction.commit();
    ++commits_;
  });
}

std::optional<JobRecord> Store::get_job(const std::string& job_id) const {
  return guarded(this, "reading job " + job_id, [&]() -> std::optional<JobRecord> {
    ReaderLease reader = lease_reader();
    auto select = reader->prepare(std::string("SELECT ") + kJobColumns + " FROM jobs WHERE id = ?");
    select->bind(1, job_id);
    if (!select->step()) return std::nullopt;
    return read_job(*select);
  });
}

JobPage Store::list_jobs(const std::vector<v1::JobState>& states, int page_size,
                         const std::string& page_token, const std::string* owner) const {
  int64_t before = INT64_MAX;
  if (!page_token.empty()) {
    const auto parsed =
        std::from_chars(page_token.data(), page_token.data() + page_token.size(), before);
    if (parsed.ec != std::errc() || parsed.ptr != page_token.data() + page_token.size() ||
        before <= 0) {
      throw std::invalid_argument("page_token: \"" + page_token.substr(0, 40) +
                                  "\" is not a next_page_token from ListJobs");
    }
  }
  return guarded(this, "listing jobs", [&] {
    ReaderLease reader = lease_reader();
    // The state list is made of enum numbers, never user text; at most 2^6 distinct statements.
    std::string sql = std::string("SELECT ") + kJobColumns + " FROM jobs WHERE submit_order < ?";
    if (!states.empty()) sql += " AND state IN (" + state_list(states) + ")";
    if (owner != nullptr) sql += " AND owner = ?";
    sql += " ORDER BY submit_order DESC LIMIT ?";
    auto select = reader->prepare(sql);
    select->bind(1, before);
    if (owner != nullptr) select->bind(2, *owner);
    select->bind(owner != nullptr ? 3 : 2, static_cast<int64_t>(page_size) + 1);
    JobPage page;
    int64_t last_order = 0;
    while (select->step()) {
      if (static_cast<int>(page.jobs.size()) == page_size) {
        page.next_page_token = std::to_string(last_order);
        break;
      }
      JobRecord record = read_job(*select);
      last_order = record.submit_order;
      page.jobs.push_back(std::move(record.job));
    }
    return page;
  });
}

std::vector<JobRecord> Store::jobs_in_states(const std::vector<v1::JobState>& states) const {
  return guarded(this, "reading jobs by state", [&] {
    ReaderLease reader = lease_reader();
    auto select =
        reader->prepare(std::string("SELECT ") + kJobColumns + " FROM jobs WHERE state IN (" +
                        state_list(states) + ") ORDER BY submit_order");
    std::vector<JobRecord> jobs;
    while (select->step()) jobs.push_back(read_job(*select));
    return jobs;
  });
}

std::optional<EventBatch> Store::events_after(const std::string& job_id, int64_t after_sequence,
                                              int limit) const {
  return guarded(this, "reading events of job " + job_id, [&]() -> std::optional<EventBatch> {
    ReaderLease reader = lease_reader();
    sqlite::Transaction snapshot(*reader, sqlite::Transaction::Kind::kRead);
    EventBatch batch;
    {
      auto select = reader->prepare(std::string("SELECT ") + kJobColumns +
                                    ", last_sequence FROM jobs WHERE id = ?");
      select->bind(1, job_id);
      if (!select->step()) return std::nullopt;
      batch.job = read_job(*select);
      batch.last_sequence = select->column_int(kJobColumnCount);
    }
    {
      auto select = reader->prepare(
          "SELECT event FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence "
          "LIMIT ?");
      select->bind(1, job_id).bind(2, after_sequence).bind(3, static_cast<int64_t>(limit));
      while (select->step()) {
        v1::JobEvent event;
        if (!event.ParseFromString(select->column_blob(0))) {
          throw StoreError("job " + job_id + ": a stored event does not parse");
        }
        batch.events.push_back(std::move(event));
      }
    }
    snapshot.commit();
    return batch;
  });
}

std::vector<v1::CheckpointInfo> Store::list_checkpoints(const std::string& job_id) const {
  return guarded(this, "listing checkpoints of job " + job_id, [&] {
    ReaderLease reader = lease_reader();
    auto select = reader->prepare("SELECT info FROM checkpoints WHERE job_id = ? ORDER BY step");
    select->bind(1, job_id);
    std::vector<v1::CheckpointInfo> checkpoints;
    while (select->step()) {
      v1::CheckpointInfo info;
      if (!info.ParseFromString(select->column_blob(0))) {
        throw StoreError("job " + job_id + ": a stored checkpoint record does not parse");
      }
      checkpoints.push_back(std::move(info));
    }
    return checkpoints;
  });
}

std::map<int64_t, double> Store::eval_losses(const std::string& job_id) const {
  return guarded(this, "reading eval results of job " + job_id, [&] {
    ReaderLease reader = lease_reader();
    auto select = reader->prepare(
        "SELECT event FROM job_events WHERE job_id = ? AND kind = 'eval' ORDER BY sequence");
    select->bind(1, job_id);
    std::map<int64_t, double> losses;
    while (select->step()) {
      v1::JobEvent event;
      if (!event.ParseFromString(select->column_blob(0)) || !event.has_eval()) {
        throw StoreError("job " + job_id + ": a stored eval event does not parse");
      }
      losses[event.eval().step()] = event.eval().loss();
    }
    return losses;
  });
}

std::optional<StoredCheckpoint> Store::get_checkpoint(const std::string& checkpoint_id) const {
  return guarded(
      this, "reading checkpoint " + checkpoint_id, [&]() -> std::optional<StoredCheckpoint> {
        ReaderLease reader = lease_reader();
        auto select =
            reader->prepare("SELECT job_id, info FROM checkpoints WHERE checkpoint_id = ?");
        select->bind(1, checkpoint_id);
        if (!select->step()) return std::nullopt;
        StoredCheckpoint checkpoint;
        checkpoint.job_id = select->column_text(0);
        if (!checkpoint.info.ParseFromString(select->column_blob(1))) {
          throw StoreError("checkpoint " + checkpoint_id + ": stored record does not parse");
        }
        return checkpoint;
      });
}

std::vector<std::string> Store::all_checkpoint_ids() const {
  return guarded(this, "listing checkpoints", [&] {
    ReaderLease reader = lease_reader();
    auto select = reader->prepare("SELECT checkpoint_id FROM checkpoints");
    std::vector<std::string> ids;
    while (select->step()) ids.push_back(select->column_text(0));
    return ids;
  });
}

std::map<v1::JobState, int64_t> Store::count_jobs_by_state() const {
  return guarded(this, "counting jobs", [&] {
    ReaderLease reader = lease_reader();
    auto select = reader->prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state");
    std::map<v1::JobState, int64_t> counts;
    while (select->step()) {
      counts[static_cast<v1::JobState>(select->column_int(0))] = select->column_int(1);
    }
    return counts;
  });
}

BackupSummary Store::backup(const std::filesystem::path& file, const std::filesystem::path& out) {
  check_new_file(file, StoreOpen::kExisting);
  const std::filesystem::path temporary = out.string() + ".tmp-" + std::to_string(::getpid());
  std::error_code ignored;
  std::filesystem::remove(temporary, ignored);
  try {
    copy_pages(file, temporary);
    BackupSummary summary = check_copy(temporary);
    summary.bytes = static_cast<int64_t>(std::filesystem::file_size(temporary));
    sync_path(temporary, O_RDONLY);
    std::filesystem::rename(temporary, out);
    sync_path(std::filesystem::absolute(out).parent_path(), O_RDONLY | O_DIRECTORY);
    return summary;
  } catch (const sqlite::Error& error) {
    std::filesystem::remove(temporary, ignored);
    throw StoreError(std::string("backup of ") + file.string() + ": " + error.what());
  } catch (...) {
    std::filesystem::remove(temporary, ignored);
    throw;
  }
}

}  // namespace lomo::server
