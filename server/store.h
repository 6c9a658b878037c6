// The coordinator's durable state in SQLite (WAL): jobs, their events numbered per job, committed
// checkpoints, and the schema version. Every write is one transaction.
//
// Durability, in two steps. Every commit runs with synchronous=NORMAL: when COMMIT returns, the
// transaction is in the WAL file (in the OS page cache), so a killed coordinator (kill -9, OOM)
// loses nothing. when_durable() then extends that to a power cut for everything committed so far,
// with one fdatasync of the WAL on the store's sync thread: what synchronous=FULL does inside
// COMMIT, but after the caller has released its locks, and shared by every caller that asked
// meanwhile (group commit). The coordinator waits for it before it acknowledges what must survive
// a power cut: submissions, cancellations and checkpoint commits. A later sync makes every earlier
// commit durable too, since the WAL is replayed in order. (SQLite's automatic checkpoint, every
// 1000 WAL pages, still syncs inside a commit: only there can it finish and let the WAL restart.)
//
// Thread safety: all methods may be called from any thread. Writes are serialised on one writer
// connection; reads use a small pool of reader connections and never wait for a writer.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lomo/v1/jobs.pb.h"

namespace lomo::server {

namespace sqlite {
class Connection;
}

// SQLite failed (I/O error, disk full, corrupt file, a database from a newer coordinator).
class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A job as stored: the public message plus what only the coordinator needs.
struct JobRecord {
  v1::Job job;
  bool cancel_requested = false;  // CancelJob reached an assigned/running job; waiting for it
  int64_t submit_order = 0;       // increases with every submission; set by insert_job
  // What each rank of the current attempt last reported, by rank (UNSPECIFIED: nothing yet;
  // FAILED also for a rank whose worker died); as long as job.assignments, or empty. Stored with
  // the assignments, so that after a restart a rank that had finished is not waited for.
  std::vector<v1::JobState> rank_states;
};

struct JobPage {
  std::vector<v1::Job> jobs;    // newest first
  std::string next_page_token;  // empty on the last page
};

// A job and some of its events, read in one snapshot.
struct EventBatch {
  JobRecord job;
  std::vector<v1::JobEvent> events;  // ascending sequence
  int64_t last_sequence = 0;         // the job's newest event when the snapshot was taken
};

struct StoredCheckpoint {
  std::string job_id;
  v1::CheckpointInfo info;
};

// What Store's constructor does with a file that holds no store yet.
enum class StoreOpen {
  // The file must hold a lomo store: a missing or zero-length file is refused, so a lost volume
  // or data directory never comes up as an empty store (lomo-coordinator without --init).
  kExisting,
  // A missing or zero-length file becomes a new, empty store (lomo-coordinator --init); an
  // existing store opens as with kExisting.
  kCreate,
};

// What Store::backup wrote.
struct BackupSummary {
  int64_t bytes = 0;
  int64_t jobs = 0;
  int64_t events = 0;
  int64_t checkpoints = 0;  // records of committed checkpoints (their files are not in the copy)
  int64_t schema_version = 0;
};

class Store {
 public:
  // 2: jobs gained spec_canonical, spec_original and spec_overrides (a version 1 file is migrated
  // in place when opened; its jobs have only the Struct form until they end).
  // 3: jobs gained assignments, the current attempt's gang (a version 1 or 2 file is migrated in
  // place when opened: a job that was assigned gets rank 0 on its worker_id).
  // 4: jobs gained attempts. 5: jobs gained owner (migrated in place: no owner).
  static constexpr int64_t kSchemaVersion = 5;

  // Opens the database file, creating it only as `open` allows. Throws StoreError naming the file
  // for a schema newer than ours, a missing or zero-length file (unless kCreate), a file with
  // tables but no lomo schema, and a file that fails SQLite's quick_check (corrupt pages): none
  // of them may come up as an empty or broken store.
  explicit Store(const std::filesystem::path& file, int reader_connections = 8,
                 StoreOpen open = StoreOpen::kCreate);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Inserts a new job (sets record.submit_order) with its first events; sequences are assigned
  // from 1 and written back into `events`. Throws StoreError if the id exists.
  void insert_job(JobRecord& record, std::vector<v1::JobEvent>& events);
  // Stores every field of `record` (found by job id) and appends `events`, numbering them after
  // the job's last event. Throws StoreError if the job does not exist.
  void update_job(const JobRecord& record, std::vector<v1::JobEvent>& events);
  // Appends events (numbered in place) and, when `progress` is given, stores it as the job's.
  void append_events(const std::string& job_id, std::vector<v1::JobEvent>& events,
                     const v1::JobProgress* progress);
  // Records a committed checkpoint together with its event (numbered in place).
  // Throws StoreError if the job has a checkpoint at that step already.
  void insert_checkpoint(const std::string& job_id, const v1::CheckpointInfo& info,
                         v1::JobEvent& event);
  // Forgets a committed checkpoint (retention); its commit event stays in the job's history.
  // Nothing happens if there is no such checkpoint.
  void delete_checkpoint(const std::string& checkpoint_id);

  std::optional<JobRecord> get_job(const std::string& job_id) const;
  // Newest first; `states` empty means all. page_token is "" or a next_page_token from an
  // earlier call; anything else throws std::invalid_argument. page_size must be >= 1. With
  // `owner`, only the jobs that owner submitted.
  JobPage list_jobs(const std::vector<v1::JobState>& states, int page_size,
                    const std::string& page_token, const std::string* owner = nullptr) const;
  // Every job in one of `states`, oldest submission first (startup recovery).
  std::vector<JobRecord> jobs_in_states(const std::vector<v1::JobState>& states) const;
  // The job and up to `limit` events with sequence > after_sequence; nullopt if no such job.
  std::optional<EventBatch> events_after(const std::string& job_id, int64_t after_sequence,
                                         int limit) const;
  // Committed checkpoints of one job, oldest step first.
  std::vector<v1::CheckpointInfo> list_checkpoints(const std::string& job_id) const;
  // The job's eval losses by step (EvalResult events; a later one for the same step wins).
  std::map<int64_t, double> eval_losses(const std::string& job_id) const;
  std::optional<StoredCheckpoint> get_checkpoint(const std::string& checkpoint_id) const;
  std::vector<std::string> all_checkpoint_ids() const;
  std::map<v1::JobState, int64_t> count_jobs_by_state() const;

  // Calls `done` once every transaction committed before this call survives a power cut, with ""
  // or what went wrong. It runs on the store's sync thread and must not block; callers that ask
  // while a sync is running share the next one.
  void when_durable(std::function<void(const std::string& error)> done);
  // The blocking form of when_durable(). Throws StoreError.
  void make_durable();
  // How many times the WAL was synced to disk: lets tests prove that a durable answer cost a
  // sync, and an answer with nothing new to sync none.
  uint64_t wal_syncs() const { return wal_syncs_.load(); }

  // A consistent copy of the store at `file` in `out`, taken with SQLite's online backup API from
  // a connection of its own: a coordinator may be running on the file (WAL: its writes go on
  // while the copy reads one snapshot). The copy is written to a temporary file beside `out`,
  // made a single self-contained file (no WAL), checked with PRAGMA integrity_check and for
  // lomo's schema, fsynced, and renamed over `out`. Throws StoreError naming the file at fault;
  // `out` is then untouched.
  static BackupSummary backup(const std::filesystem::path& file, const std::filesystem::path& out);

  // "" while no operation found the file corrupt (SQLITE_CORRUPT, SQLITE_NOTADB); after that, the
  // first such error, naming the file. Health checks report NOT_SERVING from then on.
  std::string corruption() const;
  // Records `error` if it says the file is corrupt (called by every store operation).
  void note_failure(int sqlite_code, const std::string& error) const;
  // Called once, with corruption(), when corruption is first found (at once if it was already);
  // nullptr stops the calls. Runs on the thread of the failed operation and must not block.
  void set_on_corruption(const std::function<void(const std::string&)>& on_corruption);

 private:
  class ReaderLease;
  ReaderLease lease_reader() const;
  int64_t append_events_locked(const std::string& job_id, std::vector<v1::JobEvent>& events);

  std::filesystem::path file_;
  std::mutex writer_mu_;
  std::unique_ptr<sqlite::Connection> writer_;
  // Transactions committed; incremented after COMMIT returned, so a sync that starts after
  // reading it covers that many.
  std::atomic<uint64_t> commits_{0};

  void sync_loop();

  int wal_fd_ = -1;
  std::mutex sync_mu_;
  std::condition_variable sync_wanted_;
  std::vector<std::function<void(const std::string&)>> waiters_;  // for the next sync
  bool sync_stop_ = false;
  uint64_t synced_ = 0;  // commits_ as of the last sync (sync thread only)
  std::atomic<uint64_t> wal_syncs_{0};
  std::thread sync_thread_;

  mutable std::mutex corruption_mu_;
  mutable std::string corruption_;
  std::function<void(const std::string&)> on_corruption_;  // under corruption_mu_

  mutable std::mutex readers_mu_;
  mutable std::condition_variable reader_free_;
  mutable std::vector<std::unique_ptr<sqlite::Connection>> free_readers_;
};

}  // namespace lomo::server
