// The chunked transfer every file move uses (common/file_transfer.h): what a FileSender sends a
// FileReceiver writes back byte for byte; every way a transfer can go wrong is refused with the
// file named, and a file appears under its own name only once verified.
#include "common/file_transfer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/read_file.h"

namespace lomo {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lomo-transfer-test-XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void write_file(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
}

std::vector<v1::FileChunk> send_all(const fs::path& root, std::vector<TransferFile> files,
                                    size_t chunk_bytes) {
  FileSender sender(root, std::move(files), chunk_bytes);
  std::vector<v1::FileChunk> chunks;
  while (auto chunk = sender.next()) chunks.push_back(std::move(*chunk));
  return chunks;
}

std::string transfer_error(const std::function<void()>& body) {
  try {
    body();
  } catch (const TransferError& error) {
    return error.what();
  }
  return "(no error)";
}

v1::FileChunk chunk(const std::string& path, int64_t offset, const std::string& data,
                    const std::string& sha256 = "") {
  v1::FileChunk c;
  c.set_path(path);
  c.set_offset(offset);
  c.set_data(data);
  c.set_last_chunk_of_file(!sha256.empty());
  c.set_sha256(sha256);
  return c;
}

TEST(FileTransferTest, ADirectorySentInChunksIsReceivedByteForByte) {
  TempDir from, to;
  std::string weights(2500, '\0');
  for (size_t i = 0; i < weights.size(); ++i) weights[i] = static_cast<char>(i * 131 + 3);
  const std::map<std::string, std::string> files = {
      {"model.safetensors", weights}, {"config.json", "{}"}, {"state/empty", ""}};
  for (const auto& [path, bytes] : files) write_file(from.path() / path, bytes);

  const std::vector<TransferFile> listed = list_transfer_files(from.path());
  ASSERT_EQ(listed.size(), 3u);
  EXPECT_EQ(listed[0].path, "config.json");  // sorted, '/'-separated
  EXPECT_EQ(listed[2].path, "state/empty");
  EXPECT_EQ(listed[1].size_bytes, 2500);

  const std::vector<v1::FileChunk> chunks = send_all(from.path(), listed, 1000);
  // config.json: 1 chunk; model.safetensors: 1000 + 1000 + 500; the empty file: 1 chunk.
  ASSERT_EQ(chunks.size(), 5u);
  FileReceiver receiver(to.path());
  for (const v1::FileChunk& c : chunks) {
    EXPECT_LE(c.data().size(), 1000u);
    EXPECT_EQ(c.last_chunk_of_file(), !c.sha256().empty());
    receiver.accept(c);
  }
  receiver.finish();
  ASSERT_EQ(receiver.files().size(), 3u);
  EXPECT_EQ(receiver.bytes_received(), 2502);
  for (const auto& [path, bytes] : files) {
    EXPECT_EQ(read_file(to.path() / path), bytes) << path;
    EXPECT_FALSE(fs::exists(to.path() / (path + ".partial"))) << path;
  }
  EXPECT_EQ(receiver.files()[1].sha256(), sha256_hex(weights));
}

TEST(FileTransferTest, AFileKeepsItsPartialNameUntilItsLastChunkIsVerified) {
  TempDir to;
  FileReceiver receiver(to.path());
  receiver.accept(chunk("a.bin", 0, "12"));
  EXPECT_TRUE(fs::exists(to.path() / "a.bin.partial"));
  EXPECT_FALSE(fs::exists(to.path() / "a.bin"));
  receiver.accept(chunk("a.bin", 2, "34", sha256_hex("1234")));
  EXPECT_FALSE(fs::exists(to.path() / "a.bin.partial"));
  EXPECT_EQ(read_file(to.path() / "a.bin"), "1234");
}

TEST(FileTransferTest, ACorruptedFileIsRefusedAndLeavesNothingUnderItsName) {
  TempDir to;
  FileReceiver receiver(to.path());
  EXPECT_THAT(
      transfer_error([&] { receiver.accept(chunk("m.bin", 0, "bytez", sha256_hex("bytes"))); }),
      HasSubstr("file m.bin: SHA-256 mismatch"));
  EXPECT_FALSE(fs::exists(to.path() / "m.bin"));
  EXPECT_FALSE(fs::exists(to.path() / "m.bin.partial"));
}

TEST(FileTransferTest, TheReceiverRefusesGapsRepeatsInterleavingAndBadDigests) {
  TempDir to;
  {
    FileReceiver receiver(to.path());
    receiver.accept(chunk("a.bin", 0, "1234"));
    EXPECT_THAT(transfer_error([&] { receiver.accept(chunk("a.bin", 5, "6")); }),
                HasSubstr("file a.bin: chunk at offset 5, expected 4"));
  }
  {
    FileReceiver receiver(to.path());
    EXPECT_THAT(transfer_error([&] { receiver.accept(chunk("b.bin", 3, "x")); }),
                HasSubstr("file b.bin: first chunk at offset 3, expected 0"));
  }
  {
    FileReceiver receiver(to.path());
    receiver.accept(chunk("d.bin", 0, "x", sha256_hex("x")));
    EXPECT_THAT(transfer_error([&] { receiver.accept(chunk("d.bin", 0, "x", sha256_hex("x"))); }),
                HasSubstr("file d.bin: sent again"));
  }
  {
    FileReceiver receiver(to.path());
    receiver.accept(chunk("e.bin", 0, "x"));
    EXPECT_THAT(transfer_error([&] { receiver.accept(chunk("f.bin", 0, "y")); }),
                HasSubstr("before the last chunk of e.bin"));
  }
  {
    FileReceiver receiver(to.path());
    EXPECT_THAT(transfer_error([&] { receiver.accept(chunk("c.bin", 0, "x", "not-a-digest")); }),
                HasSubstr("64 hex digits"));
  }
  {
    FileReceiver receiver(to.path());
    receiver.accept(chunk("g.bin", 0, "12"));
    EXPECT_THAT(transfer_error([&] { receiver.finish(); }), HasSubstr("file g.bin is incomplete"));
    EXPECT_FALSE(fs::exists(to.path() / "g.bin.partial"));
  }
}

TEST(FileTransferTest, PathsThatWouldLeaveTheDirectoryAreRefused) {
  TempDir root;
  const fs::path to = root.path() / "inside";
  for (const std::string path : {"../escape.bin", "/etc/passwd", "a/../../b", "./a", "a//b", "a/",
                                 "a\\b", "", "model.safetensors.partial"}) {
    EXPECT_NE(transfer_path_problem(path), "") << path;
    FileReceiver receiver(to);
    EXPECT_THAT(transfer_error([&] { receiver.accept(chunk(path, 0, "x", sha256_hex("x"))); }),
                HasSubstr("path"))
        << path;
  }
  EXPECT_FALSE(fs::exists(root.path() / "escape.bin"));
  EXPECT_EQ(transfer_path_problem("shard/model-00001-of-00002.safetensors"), "");
}

TEST(FileTransferTest, TheSenderRefusesAFileThatDiffersFromItsRecord) {
  TempDir from;
  write_file(from.path() / "w.bin", "weights");
  EXPECT_THAT(transfer_error([&] {
                send_all(from.path(), {{"w.bin", 8, ""}}, 4);
              }),
              HasSubstr("file w.bin: it has 7 bytes on disk, 8 were expected"));
  EXPECT_THAT(transfer_error([&] {
                send_all(from.path(), {{"w.bin", 7, sha256_hex("weighty")}}, 4);
              }),
              HasSubstr("file w.bin: its SHA-256 on disk is " + sha256_hex("weights")));
  EXPECT_THAT(transfer_error([&] {
                send_all(from.path(), {{"missing.bin", -1, ""}}, 4);
              }),
              HasSubstr("file missing.bin: cannot read it"));
  EXPECT_EQ(send_all(from.path(), {{"w.bin", 7, sha256_hex("weights")}}, 4).size(), 2u);
}

TEST(FileTransferTest, ReceivedFilesAreComparedWithTheRecord) {
  v1::CheckpointFile a;
  a.set_path("a");
  a.set_size_bytes(1);
  a.set_sha256(sha256_hex("x"));
  v1::CheckpointFile b = a;
  b.set_path("b");
  EXPECT_EQ(compare_with_record({a, b}, {a, b}), "");
  EXPECT_EQ(compare_with_record({a, b}, {}), "");
  EXPECT_THAT(compare_with_record({a}, {a, b}), HasSubstr("missing b"));
  v1::CheckpointFile other = b;
  other.set_sha256(sha256_hex("y"));
  EXPECT_THAT(compare_with_record({a, b}, {other}), HasSubstr("b differs"));
}

// A stream over `chunks` that records what receive_transfer did with it; `end_error` makes the
// sender end the stream with an error.
struct RecordedStream {
  explicit RecordedStream(std::vector<v1::FileChunk> chunks, std::string end_error = "")
      : chunks(std::move(chunks)), end_error(std::move(end_error)) {}

  std::vector<v1::FileChunk> chunks;
  std::string end_error;
  size_t read = 0;
  bool cancelled = false;
  bool end_checked = false;
  std::vector<std::string> progress;

  ChunkStream stream() {
    ChunkStream s;
    s.next = [this]() { return read < chunks.size() ? &chunks[read++] : nullptr; };
    s.cancel = [this] { cancelled = true; };
    s.check_end = [this] {
      end_checked = true;
      if (!end_error.empty()) throw std::runtime_error(end_error);
    };
    s.on_chunk = [this](const v1::FileChunk& chunk) { progress.push_back(chunk.path()); };
    return s;
  }
};

TEST(ReceiveTransferTest, AWholeStreamIsReceivedCheckedAtItsEndAndComparedWithTheRecord) {
  TempDir to;
  RecordedStream recorded{{chunk("a.bin", 0, "ab"), chunk("a.bin", 2, "c", sha256_hex("abc"))}};
  FileReceiver receiver(to.path());
  v1::CheckpointFile record;
  record.set_path("a.bin");
  record.set_size_bytes(3);
  record.set_sha256(sha256_hex("abc"));
  receive_transfer(receiver, recorded.stream(), {record});
  EXPECT_TRUE(recorded.end_checked);
  EXPECT_FALSE(recorded.cancelled);
  EXPECT_EQ(recorded.progress, (std::vector<std::string>{"a.bin", "a.bin"}));
  EXPECT_EQ(read_file(to.path() / "a.bin"), "abc");

  // The same bytes against a record that wants another file: refused after the end.
  TempDir again;
  RecordedStream second(recorded.chunks);
  FileReceiver other(again.path());
  record.set_path("b.bin");
  EXPECT_THAT(transfer_error([&] { receive_transfer(other, second.stream(), {record}); }),
              HasSubstr("missing b.bin"));
}

TEST(ReceiveTransferTest, ARefusedChunkCancelsTheStreamWithoutWaitingForItsEnd) {
  TempDir to;
  RecordedStream recorded{{chunk("a.bin", 0, "ab"), chunk("a.bin", 5, "c", sha256_hex("abc"))}};
  FileReceiver receiver(to.path());
  EXPECT_THAT(transfer_error([&] { receive_transfer(receiver, recorded.stream(), {}); }),
              HasSubstr("a.bin: chunk at offset 5, expected 2"));
  EXPECT_TRUE(recorded.cancelled);
  EXPECT_FALSE(recorded.end_checked);
  EXPECT_TRUE(fs::is_empty(to.path()));
}

TEST(ReceiveTransferTest, TheSendersErrorPassesThroughAndRemovesTheFileInProgress) {
  TempDir to;
  RecordedStream recorded{{chunk("a.bin", 0, "ab")}, "the coordinator stopped"};
  FileReceiver receiver(to.path());
  try {
    receive_transfer(receiver, recorded.stream(), {});
    FAIL() << "no exception";
  } catch (const TransferError& error) {
    FAIL() << "the sender's error became a TransferError: " << error.what();
  } catch (const std::runtime_error& error) {
    EXPECT_STREQ(error.what(), "the coordinator stopped");
  }
  EXPECT_TRUE(fs::is_empty(to.path())) << "a.bin.partial was removed";
}

}  // namespace
}  // namespace lomo
