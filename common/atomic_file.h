// Whole-file replacement by temporary file and rename: a reader of the final name sees either the
// old file or the complete new one, never a prefix, even if the writer crashes or throws midway.
// Header-only and free of other libraries: checkpoint files of the training library and the
// `latest` pointer of common/checkpoint_layout.h are written with it.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "common/fd_io.h"

namespace lomo {

// Errors are std::system_error whose message names the file and the failed operation.
class AtomicFileWriter {
 public:
  // Creates a hidden temporary file beside `path` (same directory, so rename cannot cross file
  // systems). The directory must exist.
  explicit AtomicFileWriter(std::filesystem::path path) : path_(std::move(path)) {
    const std::filesystem::path directory = path_.has_parent_path() ? path_.parent_path() : ".";
    std::string pattern = (directory / ("." + path_.filename().string() + ".tmp.XXXXXX")).string();
    fd_ = ::mkostemp(pattern.data(), O_CLOEXEC);
    if (fd_ < 0) fail("create temporary file in " + directory.string());
    temp_path_ = pattern;
    // mkostemp creates 0600; checkpoints are shared artefacts, readable like any written file.
    if (::fchmod(fd_, 0644) != 0) fail("chmod");
  }
  ~AtomicFileWriter() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
  }
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  const std::filesystem::path& path() const { return path_; }

  // Linux transfers at most ~2 GiB per write call; write_all continues a large tensor's short
  // writes.
  void write(const void* data, size_t bytes) {
    if (!write_all(fd_, std::string_view(static_cast<const char*>(data), bytes))) fail("write");
  }
  void write(std::string_view text) { write(text.data(), text.size()); }

  // Flushes the data to disk, then renames over the final name and syncs the directory entry:
  // without the first sync a crash after the rename could leave an empty file under that name.
  void commit() {
    if (::fsync(fd_) != 0) fail("fsync");
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail("close");
    if (::rename(temp_path_.c_str(), path_.c_str()) != 0) fail("rename temporary file onto");
    committed_ = true;
    sync_directory();
  }

 private:
  [[noreturn]] void fail(const std::string& operation) const {
    throw std::system_error(errno, std::generic_category(), path_.string() + ": " + operation);
  }

  void sync_directory() const {
    const std::filesystem::path directory = path_.has_parent_path() ? path_.parent_path() : ".";
    const int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;  // the rename happened; durability of the entry is best effort here
    const int result = ::fsync(fd);
    const int saved_errno = errno;
    ::close(fd);
    // Some file systems cannot sync directories (EINVAL); the data itself is already synced.
    if (result != 0 && saved_errno != EINVAL) {
      errno = saved_errno;
      fail("fsync directory of");
    }
  }

  std::filesystem::path path_;
  std::filesystem::path temp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

inline void write_file_atomically(const std::filesystem::path& path, std::string_view contents) {
  AtomicFileWriter writer(path);
  writer.write(contents);
  writer.commit();
}

}  // namespace lomo
