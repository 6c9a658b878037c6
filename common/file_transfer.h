// Chunked file transfer over lomo.v1.FileChunk: the one sender and the one receiver behind every
// place lomo moves files between processes: a worker's checkpoint upload to the coordinator, the
// coordinator's DownloadCheckpoint to lomoctl, and a worker's FetchCheckpoint to resume a job.
//
// On the wire (jobs.proto, FileChunk): the files of a transfer one after another, each in chunks
// with contiguous offsets from 0 (an empty file is one chunk); the last chunk of a file carries the
// hex SHA-256 of the whole file. The sender hashes what it reads; the receiver hashes what it
// writes, writes under "<path>.partial", and renames to <path> only once the digests agree, so a
// file under its own name is always complete and verified. What a transfer belongs to (a job
// attempt, a checkpoint id) and how it ends (a commit message, the end of a stream) are the
// caller's.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/sha256.h"
#include "lomo/v1/jobs.pb.h"

namespace lomo {

// A transfer that cannot go on; what() names the file ("file a.bin: chunk at offset 5, expected
// 4").
class TransferError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "" if `path` may name a file in a transfer (relative, '/'-separated, no empty, '.' or '..'
// component, no backslash or NUL, at most 1024 bytes), else why not. Receivers refuse any other
// path, so a sender can never write outside the receiving directory.
std::string transfer_path_problem(const std::string& path);

// A file to send: its path relative to the sender's root and, when known, what it must be.
struct TransferFile {
  std::string path;
  int64_t size_bytes = -1;  // -1: whatever is on disk when the file is opened
  std::string sha256;       // "": not checked; else the digest the bytes read must have
};

// The regular files under `root` (recursively), as relative paths, sorted, with their sizes.
std::vector<TransferFile> list_transfer_files(const std::filesystem::path& root);

// "" when every file of `expected` is among `received` with the same size and SHA-256 (an empty
// digest or a size of 0 in `expected` is not compared); else which file is missing or differs.
std::string compare_with_record(const std::vector<v1::CheckpointFile>& received,
                                const std::vector<v1::CheckpointFile>& expected);

class FileSender {
 public:
  static constexpr size_t kDefaultChunkBytes = 1u << 20;  // well under gRPC's 4 MiB default

  FileSender(std::filesystem::path root, std::vector<TransferFile> files,
             size_t chunk_bytes = kDefaultChunkBytes);

  // The next chunk, or nullopt after the last file's last chunk. Throws TransferError when a file
  // cannot be read, has another size than expected, ends early (it changed while being sent), or
  // hashes to another digest than expected (checked before its last chunk is returned).
  std::optional<v1::FileChunk> next();

  int64_t bytes_sent() const { return bytes_sent_; }

 private:
  void open_file();

  const std::filesystem::path root_;
  const std::vector<TransferFile> files_;
  const size_t chunk_bytes_;
  size_t index_ = 0;  // the file being sent
  bool open_ = false;
  std::ifstream in_;
  int64_t size_ = 0;
  int64_t offset_ = 0;
  Sha256 hash_;
  int64_t bytes_sent_ = 0;
};

class FileReceiver {
 public:
  // Receives into `directory` (created as needed). With `sync_files`, each file is fsynced before
  // its rename (the coordinator's copy must survive a power cut; the caller syncs directories).
  explicit FileReceiver(std::filesystem::path directory, bool sync_files = false);
  ~FileReceiver();  // abort()
  FileReceiver(const FileReceiver&) = delete;
  FileReceiver& operator=(const FileReceiver&) = delete;

  // Writes one chunk; on a file's last chunk, verifies and renames it. Throws TransferError (and
  // removes the file in progress) for a bad path, an offset gap, a file sent twice, a chunk of
  // another file before the last chunk of this one, a missing or wrong SHA-256, or an I/O error.
  void accept(const v1::FileChunk& chunk);
  // The sender says it is done: throws TransferError if a file has no last chunk yet.
  void finish();
  // Closes and removes the file in progress, if any. Verified files stay.
  void abort();

  // The verified files, in the order they completed.
  const std::vector<v1::CheckpointFile>& files() const { return files_; }
  int64_t bytes_received() const { return bytes_received_; }
  // The file being received ("" between files).
  const std::string& current_path() const { return current_path_; }

 private:
  [[noreturn]] void fail(const std::string& what);
  void begin_file(const v1::FileChunk& chunk);
  void end_file(const v1::FileChunk& chunk);
  std::filesystem::path partial_path() const;

  const std::filesystem::path directory_;
  const bool sync_files_;
  std::set<std::string> seen_;  // complete or in progress
  std::string current_path_;
  int fd_ = -1;
  int64_t current_size_ = 0;
  std::optional<Sha256> hash_;
  std::vector<v1::CheckpointFile> files_;
  int64_t bytes_received_ = 0;
};

// The receiving end of one transfer's stream, for receive_transfer. The callbacks are the
// caller's transport (a gRPC reader, in practice); each may throw its own exception type.
struct ChunkStream {
  // The next chunk, or nullptr at the end of the stream. The pointer stays valid until the next
  // call.
  std::function<const v1::FileChunk*()> next;
  // A chunk was refused: stop the stream and wait for its end (cancel, then finish the call).
  std::function<void()> cancel;
  // The stream ended: throws if the sender ended it with an error rather than after its last file.
  std::function<void()> check_end;
  // Optional: called after each chunk is written.
  std::function<void(const v1::FileChunk&)> on_chunk;
};

// Receives a whole transfer into `receiver`: every chunk of `stream`, then the end of the stream,
// then FileReceiver::finish, then compare_with_record against `expected`. A refused chunk cancels
// the stream and rethrows its TransferError; an incomplete file or a difference from `expected`
// throws TransferError; whatever check_end throws passes through. On any throw the file in
// progress is removed (verified files stay: the caller owns the directory).
void receive_transfer(FileReceiver& receiver, const ChunkStream& stream,
                      const std::vector<v1::CheckpointFile>& expected);

}  // namespace lomo
