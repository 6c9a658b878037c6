#include "common/file_transfer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <map>
#include <system_error>

#include "common/fd_io.h"

namespace lomo {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPartialSuffix = ".partial";

std::string errno_text() { return std::strerror(errno); }

std::string lowercase(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

}  // namespace

std::string transfer_path_problem(const std::string& path) {
  if (path.empty()) return "path is empty";
  if (path.size() > 1024) return "path is longer than 1024 bytes";
  if (path.front() == '/') return "path \"" + path + "\" is absolute";
  if (path.find('\0') != std::string::npos) return "path contains a NUL byte";
  if (path.find('\\') != std::string::npos) return "path \"" + path + "\" contains a backslash";
  size_t start = 0;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string part = path.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") {
      return "path \"" + path + "\" must be relative, without empty, '.' or '..' components";
    }
    start = end + 1;
  }
  // The receiver writes each file under "<path>.partial" until it is verified: a sent name of that
  // form could overwrite a file already verified, or be listed while it is still being written.
  if (path.ends_with(kPartialSuffix)) {
    return "path \"" + path + "\" ends in \"" + kPartialSuffix +
           "\", which is reserved for files in transfer";
  }
  return "";
}

std::vector<TransferFile> list_transfer_files(const fs::path& root) {
  std::vector<TransferFile> files;
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    if (!entry.is_regular_file()) continue;
    TransferFile& file = files.emplace_back();
    file.path = fs::relative(entry.path(), root).generic_string();
    file.size_bytes = static_cast<int64_t>(entry.file_size());
  }
  std::sort(files.begin(), files.end(),
            [](const TransferFile& a, const TransferFile& b) { return a.path < b.path; });
  return files;
}

std::string compare_with_record(const std::vector<v1::CheckpointFile>& received,
                                const std::vector<v1::CheckpointFile>& expected) {
  std::map<std::string, const v1::CheckpointFile*> by_path;
  for (const v1::CheckpointFile& file : received) by_path[file.path()] = &file;
  for (const v1::CheckpointFile& want : expected) {
    const auto it = by_path.find(want.path());
    if (it == by_path.end()) return "missing " + want.path();
    if ((!want.sha256().empty() && lowercase(it->second->sha256()) != lowercase(want.sha256())) ||
        (want.size_bytes() > 0 && it->second->size_bytes() != want.size_bytes())) {
      return want.path() + " differs from the checkpoint's record (size or SHA-256)";
    }
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Sending.

FileSender::FileSender(fs::path root, std::vector<TransferFile> files, size_t chunk_bytes)
    : root_(std::move(root)),
      files_(std::move(files)),
      chunk_bytes_(std::max<size_t>(chunk_bytes, 1)) {}

void FileSender::open_file() {
  const TransferFile& file = files_[index_];
  const fs::path full = root_ / file.path;
  const std::string name = "file " + file.path + ": ";
  std::error_code error;
  const uint64_t size = fs::file_size(full, error);
  if (error) throw TransferError(name + "cannot read it: " + error.message());
  if (file.size_bytes >= 0 && static_cast<int64_t>(size) != file.size_bytes) {
    throw TransferError(name + "it has " + std::to_string(size) + " bytes on disk, " +
                        std::to_string(file.size_bytes) + " were expected");
  }
  in_ = std::ifstream(full, std::ios::binary);
  if (!in_) throw TransferError(name + "cannot open it: " + errno_text());
  size_ = static_cast<int64_t>(size);
  offset_ = 0;
  hash_ = Sha256();
  open_ = true;
}

std::optional<v1::FileChunk> FileSender::next() {
  if (index_ >= files_.size()) return std::nullopt;
  if (!open_) open_file();
  const TransferFile& file = files_[index_];
  const int64_t want = std::min(static_cast<int64_t>(chunk_bytes_), size_ - offset_);
  std::string data(static_cast<size_t>(want), '\0');
  in_.read(data.data(), want);
  if (in_.gcount() != want) {
    throw TransferError("file " + file.path + ": it ended early while reading (it changed)");
  }
  hash_.update(data);
  v1::FileChunk chunk;
  chunk.set_path(file.path);
  chunk.set_offset(offset_);
  offset_ += want;
  bytes_sent_ += want;
  *chunk.mutable_data() = std::move(data);
  if (offset_ == size_) {
    const std::string digest = hash_.hex_digest();
    if (!file.sha256.empty() && digest != lowercase(file.sha256)) {
      throw TransferError("file " + file.path + ": its SHA-256 on disk is " + digest + ", " +
                          file.sha256 + " was expected");
    }
    chunk.set_last_chunk_of_file(true);
    chunk.set_sha256(digest);
    in_.close();
    open_ = false;
    ++index_;
  }
  return chunk;
}

// ---------------------------------------------------------------------------------------------
// Receiving.

FileReceiver::FileReceiver(fs::path directory, bool sync_files)
    : directory_(std::move(directory)), sync_files_(sync_files) {}

FileReceiver::~FileReceiver() { abort(); }

fs::path FileReceiver::partial_path() const {
  return directory_ / (current_path_ + kPartialSuffix);
}

void FileReceiver::abort() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!current_path_.empty()) {
    std::error_code ignored;
    fs::remove(partial_path(), ignored);
  }
  current_path_.clear();
  hash_.reset();
}

void FileReceiver::fail(const std::string& what) {
  abort();
  throw TransferError(what);
}

void FileReceiver::accept(const v1::FileChunk& chunk) {
  const std::string& path = chunk.path();
  if (const std::string problem = transfer_path_problem(path); !problem.empty()) fail(problem);
  if (current_path_.empty()) {
    begin_file(chunk);
  } else if (path != current_path_) {
    fail("file " + path + ": chunk arrived before the last chunk of " + current_path_ +
         " (files are sent one after another)");
  } else if (chunk.offset() != current_size_) {
    fail("file " + path + ": chunk at offset " + std::to_string(chunk.offset()) + ", expected " +
         std::to_string(current_size_));
  }
  if (!write_all(fd_, chunk.data())) fail("file " + path + ": cannot write: " + errno_text());
  hash_->update(chunk.data());
  current_size_ += static_cast<int64_t>(chunk.data().size());
  bytes_received_ += static_cast<int64_t>(chunk.data().size());
  if (chunk.last_chunk_of_file()) end_file(chunk);
}

void FileReceiver::begin_file(const v1::FileChunk& chunk) {
  const std::string& path = chunk.path();
  if (seen_.count(path)) fail("file " + path + ": sent again after its last chunk");
  if (chunk.offset() != 0) {
    fail("file " + path + ": first chunk at offset " + std::to_string(chunk.offset()) +
         ", expected 0");
  }
  current_path_ = path;
  const fs::path partial = partial_path();
  std::error_code error;
  fs::create_directories(partial.parent_path(), error);
  fd_ = error ? -1 : ::open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    fail("file " + path + ": cannot create " + partial.string() + ": " +
         (error ? error.message() : errno_text()));
  }
  current_size_ = 0;
  hash_.emplace();
  seen_.insert(path);
}

void FileReceiver::end_file(const v1::FileChunk& chunk) {
  const std::string& path = current_path_;
  const std::string computed = hash_->hex_digest();
  if (!is_sha256_hex(chunk.sha256())) {
    fail("file " + path +
         ": the last chunk must carry the file's SHA-256 as 64 hex digits, got \"" +
         chunk.sha256().substr(0, 80) + "\"");
  }
  if (lowercase(chunk.sha256()) != computed) {
    fail("file " + path + ": SHA-256 mismatch: the sender says " + lowercase(chunk.sha256()) +
         ", the bytes received hash to " + computed + " (" + std::to_string(current_size_) +
         " bytes)");
  }
  if (sync_files_ && ::fsync(fd_) != 0) fail("file " + path + ": cannot sync: " + errno_text());
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail("file " + path + ": cannot write: " + errno_text());
  }
  fd_ = -1;
  std::error_code error;
  fs::rename(partial_path(), directory_ / path, error);
  if (error) fail("file " + path + ": cannot rename it into place: " + error.message());
  v1::CheckpointFile& file = files_.emplace_back();
  file.set_path(path);
  file.set_size_bytes(current_size_);
  file.set_sha256(computed);
  current_path_.clear();
  hash_.reset();
}

void FileReceiver::finish() {
  if (current_path_.empty()) return;
  fail("file " + current_path_ + " is incomplete: " + std::to_string(current_size_) +
       " bytes received and no last chunk");
}

void receive_transfer(FileReceiver& receiver, const ChunkStream& stream,
                      const std::vector<v1::CheckpointFile>& expected) {
  try {
    while (const v1::FileChunk* chunk = stream.next()) {
      receiver.accept(*chunk);
      if (stream.on_chunk) stream.on_chunk(*chunk);
    }
  } catch (const TransferError&) {
    stream.cancel();
    throw;
  }
  try {
    stream.check_end();
  } catch (...) {
    receiver.abort();
    throw;
  }
  receiver.finish();
  if (const std::string mismatch = compare_with_record(receiver.files(), expected);
      !mismatch.empty()) {
    throw TransferError(mismatch);
  }
}

}  // namespace lomo
