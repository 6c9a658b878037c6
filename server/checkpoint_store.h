// Checkpoints uploaded by workers, on local disk under <data_dir>/checkpoints:
//
//   <job id>/.tmp-step-00000100.upload-<connection>-<attempt>/<path>
//                                 an upload in progress (never listed, removed at startup)
//   <job id>/step-00000100/<path>  a verified upload, renamed into place
//
// Upload protocol (lomo.v1.CheckpointChunk on the worker stream): the checkpoint's files as a
// chunked transfer (FileChunk, received by common/file_transfer.h's FileReceiver into the
// temporary directory, each file fsynced and verified by its SHA-256). A chunk with commit=true
// ends the upload: every file must be complete and verified, and the files must be exactly those
// of the manifest the commit carries (the trainer's digests, common/checkpoint_manifest.h), so a
// file corrupted before it was sent is refused although its chunks hash consistently. (A commit
// without a manifest, from a daemon older than manifests, is verified by the chunks' digests.) The
// commit chunk is answered by exactly one CheckpointAck (and nothing else is): committed=true, or
// committed=false with the first problem found. After a bad chunk the upload's remaining chunks are
// ignored and its temporary directory is removed at once; the reason waits for the commit. An
// upload belongs to one connection and attempt: if the worker reconnects it starts the step again.
// An upload that is discarded or replaced is failed, not only removed: a chunk of it still on its
// way writes nothing, and its temporary directory (named by connection and attempt) is never the
// next upload's.
//
// This class verifies and places files; the coordinator records the commit in the store, and only
// a recorded checkpoint is committed (a renamed directory without a record is removed at startup).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>

#include "lomo/v1/jobs.pb.h"
#include "lomo/v1/workers.pb.h"

namespace lomo::server {

// A complete, verified upload waiting to be published.
struct VerifiedUpload {
  std::string job_id;
  int64_t step = 0;
  std::filesystem::path temporary_dir;
  v1::CheckpointInfo info;  // checkpoint_id, step, size_bytes, files; commit_time unset
};

struct ChunkResult {
  bool commit = false;  // the chunk was a commit: answer it with one CheckpointAck
  std::string error;    // why the upload failed (with commit: the ack's error)
  std::optional<VerifiedUpload> verified;  // with commit and no error
};

class CheckpointStore {
 public:
  // Creates `root` if needed.
  explicit CheckpointStore(std::filesystem::path root);
  ~CheckpointStore();

  // "<job id>/step-00000100".
  static std::string checkpoint_id(const std::string& job_id, int64_t step);
  std::filesystem::path checkpoint_dir(const std::string& job_id, int64_t step) const;

  // Startup: removes every temporary upload directory and every step directory whose checkpoint
  // id is not in `committed`. Returns how many directories were removed.
  int recover(const std::set<std::string>& committed);

  // Handles one chunk from connection `owner`. A non-empty `rejection` (the coordinator's reason
  // to refuse it, e.g. a stale attempt) fails the upload as a bad chunk would. Never throws for
  // bad input or I/O errors: they become the upload's error.
  ChunkResult receive(uint64_t owner, const v1::CheckpointChunk& chunk,
                      const std::string& rejection);

  // Renames the verified upload to its step directory and makes the rename durable. Returns an
  // error text ("" on success); the temporary directory is removed either way.
  std::string publish(const VerifiedUpload& upload);
  // Removes a published directory whose commit could not be recorded.
  void unpublish(const std::string& job_id, int64_t step);
  // Forgets uploads of a connection that closed, or of a job that ended, and removes their files.
  // A chunk of such an upload that is still in receive() finds it failed and writes nothing.
  void discard_owner(uint64_t owner);
  void discard_job(const std::string& job_id);

  // Tests only: `hook` runs in receive() after the chunk's upload is found and before its files are
  // touched, so that a test can discard the upload at exactly that point.
  void set_hook_before_chunk_for_testing(std::function<void()> hook);

  // "" if `path` is a safe relative file path inside a checkpoint, else why not
  // (transfer_path_problem).
  static std::string check_relative_path(const std::string& path);

 private:
  struct Upload;
  void fail(Upload& upload, const std::string& error);
  // Fails an upload that is being forgotten (discarded, or replaced by a new one), under its lock.
  void abandon(Upload& upload, const std::string& why);
  ChunkResult receive_locked(Upload& upload, const v1::CheckpointChunk& chunk,
                             const std::string& rejection);
  // The commit chunk: every file complete and exactly those of its manifest, directories synced;
  // the verified upload or the error.
  ChunkResult commit_locked(Upload& upload, const v1::CheckpointChunk& commit);
  void sync_directories(Upload& upload);

  std::filesystem::path root_;
  std::mutex mu_;
  // By job id and step ("<job>/<step>"); each Upload has its own lock for file I/O.
  std::unordered_map<std::string, std::shared_ptr<Upload>> uploads_;
  std::function<void()> hook_before_chunk_for_testing_;
};

}  // namespace lomo::server
