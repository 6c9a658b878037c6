// The coordinator's checkpoint store: uploads are verified file by file (contiguous offsets, the
// SHA-256 on each last chunk), land under a temporary name, and appear under step-N only when
// published; anything wrong is reported once, at the commit.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <utility>

#include "common/checkpoint_layout.h"
#include "common/read_file.h"
#include "common/sha256.h"
#include "server/checkpoint_store.h"

namespace lomo::server {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr uint64_t kOwner = 1;

std::string read(const fs::path& path) { return read_file(path); }

class CheckpointStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/lomo-checkpoint-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    root_ = fs::path(pattern) / "checkpoints";
    store_ = std::make_unique<CheckpointStore>(root_);
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(root_.parent_path());
  }

  static v1::CheckpointChunk chunk(const std::string& path, int64_t offset, const std::string& data,
                                   bool last, const std::string& sha = "") {
    v1::CheckpointChunk c;
    c.set_job_id("job-1");
    c.set_attempt(1);
    c.set_step(100);
    v1::FileChunk* file = c.mutable_file();
    file->set_path(path);
    file->set_offset(offset);
    file->set_data(data);
    file->set_last_chunk_of_file(last);
    file->set_sha256(sha);
    return c;
  }
  static v1::CheckpointChunk commit() {
    v1::CheckpointChunk c;
    c.set_job_id("job-1");
    c.set_attempt(1);
    c.set_step(100);
    c.set_commit(true);
    return c;
  }
  ChunkResult send(const v1::CheckpointChunk& c, uint64_t owner = kOwner) {
    return store_->receive(owner, c, "");
  }
  // Where an upload of job-1's step 100 (attempt 1) by `owner` is assembled.
  fs::path temporary(uint64_t owner = kOwner) const {
    return temporary_upload_directory(root_ / "job-1", 100, owner, /*attempt=*/1);
  }

  fs::path root_;
  std::unique_ptr<CheckpointStore> store_;
};

TEST(CoordinatorSha256, MatchesPublishedTestVectors) {
  // FIPS 180-2 examples.
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 split;
  split.update("abcdbcdecdefdefgefghfghighijhi");
  split.update("jkijkljklmklmnlmnomnopnopq");
  EXPECT_EQ(split.hex_digest(),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");  // 448 bits
  EXPECT_TRUE(is_sha256_hex(sha256_hex("x")));
  EXPECT_FALSE(is_sha256_hex("abc"));
}

TEST_F(CheckpointStoreTest, VerifiedUploadIsPublishedUnderItsStep) {
  const std::string weights(3000, 'w');
  EXPECT_FALSE(send(chunk("model.safetensors", 0, weights.substr(0, 1000), false)).commit);
  EXPECT_FALSE(
      send(chunk("model.safetensors", 1000, weights.substr(1000), true, sha256_hex(weights)))
          .commit);
  // A subdirectory, an empty file, and an upper-case digest are all fine.
  std::string upper = sha256_hex("");
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  send(chunk("state/empty.json", 0, "", true, upper));
  EXPECT_TRUE(fs::exists(temporary() / "model.safetensors"));

  const ChunkResult result = send(commit());
  ASSERT_TRUE(result.commit);
  ASSERT_EQ(result.error, "");
  ASSERT_TRUE(result.verified.has_value());
  const v1::CheckpointInfo& info = result.verified->info;
  EXPECT_EQ(info.checkpoint_id(), "job-1/step-00000100");
  EXPECT_EQ(info.step(), 100);
  EXPECT_EQ(info.size_bytes(), 3000);
  ASSERT_EQ(info.files_size(), 2);
  EXPECT_EQ(info.files(0).sha256(), sha256_hex(weights));
  EXPECT_EQ(info.files(1).path(), "state/empty.json");

  EXPECT_FALSE(fs::exists(root_ / "job-1" / "step-00000100")) << "not before publish";
  EXPECT_EQ(store_->publish(*result.verified), "");
  EXPECT_EQ(read(store_->checkpoint_dir("job-1", 100) / "model.safetensors"), weights);
  EXPECT_TRUE(fs::exists(store_->checkpoint_dir("job-1", 100) / "state" / "empty.json"));
  EXPECT_FALSE(fs::exists(result.verified->temporary_dir));
}

// The chunks of a file that changed on the worker's disk before it was sent hash consistently;
// only the manifest (the trainer's digests) tells. The manifest file itself may come unlisted.
TEST_F(CheckpointStoreTest, FilesThatDifferFromTheCommitsManifestAreRefusedNamingTheFile) {
  auto manifest_entry = [](v1::CheckpointChunk& c, const std::string& path,
                           const std::string& bytes) {
    v1::CheckpointFile* file = c.add_manifest();
    file->set_path(path);
    file->set_size_bytes(static_cast<int64_t>(bytes.size()));
    file->set_sha256(sha256_hex(bytes));
  };
  send(chunk("model.safetensors", 0, "rotted", true, sha256_hex("rotted")));
  v1::CheckpointChunk refused = commit();
  manifest_entry(refused, "model.safetensors", "as written");
  ChunkResult result = send(refused);
  EXPECT_THAT(result.error, HasSubstr("file model.safetensors does not match the manifest"));
  EXPECT_FALSE(result.verified.has_value());
  EXPECT_FALSE(fs::exists(temporary()));

  send(chunk("model.safetensors", 0, "as written", true, sha256_hex("as written")));
  v1::CheckpointChunk missing = commit();
  manifest_entry(missing, "model.safetensors", "as written");
  manifest_entry(missing, "optimizer.safetensors", "state");
  EXPECT_THAT(send(missing).error,
              HasSubstr("file optimizer.safetensors is in the manifest but not uploaded"));

  send(chunk("model.safetensors", 0, "as written", true, sha256_hex("as written")));
  send(chunk("lomo_manifest.json", 0, "{}", true, sha256_hex("{}")));
  v1::CheckpointChunk matching = commit();
  manifest_entry(matching, "model.safetensors", "as written");
  result = send(matching);
  EXPECT_EQ(result.error, "");
  ASSERT_TRUE(result.verified.has_value());
  EXPECT_EQ(result.verified->info.files_size(), 2);  // the manifest file is kept
}

TEST_F(CheckpointStoreTest, CorruptedChunkIsReportedAtTheCommitAndLeavesNothing) {
  const std::string data = "the real bytes";
  std::string corrupted = data;
  corrupted[3] ^= 1;
  send(chunk("model.safetensors", 0, corrupted, true, sha256_hex(data)));
  EXPECT_FALSE(fs::exists(temporary())) << "a failed upload's files are removed at once";
  // Later chunks of the failed upload are ignored.
  send(chunk("other.bin", 0, "x", true, sha256_hex("x")));
  const ChunkResult result = send(commit());
  ASSERT_TRUE(result.commit);
  EXPECT_FALSE(result.verified.has_value());
  EXPECT_THAT(result.error, HasSubstr("model.safetensors: SHA-256 mismatch"));
  EXPECT_FALSE(fs::exists(root_ / "job-1" / "step-00000100"));

  // The commit ended that upload: the same step can be sent again, correctly.
  send(chunk("model.safetensors", 0, data, true, sha256_hex(data)));
  const ChunkResult retry = send(commit());
  EXPECT_EQ(retry.error, "");
  ASSERT_TRUE(retry.verified.has_value());
}

TEST_F(CheckpointStoreTest, OffsetsMustBeContiguous) {
  send(chunk("a.bin", 0, "1234", false));
  send(chunk("a.bin", 5, "6789", true, sha256_hex("12346789")));
  EXPECT_THAT(send(commit()).error, HasSubstr("a.bin: chunk at offset 5, expected 4"));

  send(chunk("b.bin", 3, "late", true, sha256_hex("late")));
  EXPECT_THAT(send(commit()).error, HasSubstr("b.bin: first chunk at offset 3, expected 0"));
}

TEST_F(CheckpointStoreTest, PathsMustStayInsideTheCheckpoint) {
  for (const std::string path :
       {"../escape.bin", "/etc/passwd", "a/../../b", "./a", "a//b", "a/", "a\\b"}) {
    send(chunk(path, 0, "x", true, sha256_hex("x")));
    const ChunkResult result = send(commit());
    EXPECT_THAT(result.error, HasSubstr("path")) << path;
    EXPECT_FALSE(result.verified.has_value()) << path;
  }
  EXPECT_FALSE(fs::exists(root_.parent_path() / "escape.bin"));
  EXPECT_EQ(CheckpointStore::check_relative_path("shard/model-00001-of-00002.safetensors"), "");
}

TEST_F(CheckpointStoreTest, IncompleteOrMissingFilesFailTheCommit) {
  send(chunk("a.bin", 0, "12", false));
  EXPECT_THAT(send(commit()).error, HasSubstr("a.bin is incomplete"));
  EXPECT_THAT(send(commit()).error, HasSubstr("no files were uploaded for step 100"));
  send(chunk("c.bin", 0, "x", true, "not-a-digest"));
  EXPECT_THAT(send(commit()).error, HasSubstr("64 hex digits"));
  send(chunk("d.bin", 0, "x", true, sha256_hex("x")));
  send(chunk("d.bin", 0, "x", true, sha256_hex("x")));
  EXPECT_THAT(send(commit()).error, HasSubstr("d.bin: sent again"));
  send(chunk("e.bin", 0, "x", false));
  send(chunk("f.bin", 0, "y", true, sha256_hex("y")));
  EXPECT_THAT(send(commit()).error, HasSubstr("before the last chunk of e.bin"));
}

TEST_F(CheckpointStoreTest, ARejectionFromTheCoordinatorFailsTheUpload) {
  store_->receive(kOwner, chunk("a.bin", 0, "x", true, sha256_hex("x")), "attempt 1 is stale");
  EXPECT_EQ(send(commit()).error, "attempt 1 is stale");
  EXPECT_FALSE(fs::exists(root_ / "job-1"));
}

TEST_F(CheckpointStoreTest, ANewConnectionStartsTheStepOver) {
  send(chunk("a.bin", 0, "half", false), /*owner=*/1);
  send(chunk("a.bin", 0, "whole", true, sha256_hex("whole")), /*owner=*/2);
  const ChunkResult result = send(commit(), /*owner=*/2);
  EXPECT_EQ(result.error, "");
  ASSERT_TRUE(result.verified.has_value());
  EXPECT_EQ(result.verified->info.size_bytes(), 5);
}

TEST_F(CheckpointStoreTest, DiscardRemovesUploadsInProgress) {
  send(chunk("a.bin", 0, "half", false));
  EXPECT_TRUE(fs::exists(temporary()));
  store_->discard_owner(kOwner);
  EXPECT_FALSE(fs::exists(temporary()));
  send(chunk("a.bin", 0, "half", false));
  store_->discard_job("job-1");
  EXPECT_FALSE(fs::exists(temporary()));
}

// The race: a chunk of an upload is already inside receive() when the upload is discarded (its
// connection closed), and a new connection uploads the same step before that chunk is written. The
// late chunk, and the old connection's refused commit after it, must neither write into nor remove
// the new upload's files. The hook makes the interleaving exact instead of a matter of timing.
TEST_F(CheckpointStoreTest, ALateChunkOfADiscardedUploadCannotTouchTheNextUploadOfTheStep) {
  constexpr uint64_t kNewOwner = 2;
  send(chunk("a.bin", 0, "old", true, sha256_hex("old")));
  bool discarded = false;
  store_->set_hook_before_chunk_for_testing([&] {
    if (std::exchange(discarded, true)) return;  // only for the late chunk, not the new upload's
    store_->discard_owner(kOwner);
    send(chunk("a.bin", 0, "new", true, sha256_hex("new")), kNewOwner);
  });
  // The late chunk found the old upload before the discard and is written after it.
  send(chunk("late.bin", 0, "late", true, sha256_hex("late")));
  ASSERT_TRUE(discarded);
  EXPECT_FALSE(fs::exists(temporary(kOwner))) << "the discarded upload wrote nothing";
  // The old connection's commit, refused by the coordinator (its worker is gone), removes nothing.
  const ChunkResult old_commit = store_->receive(kOwner, commit(), "connection 1 closed");
  EXPECT_FALSE(old_commit.verified.has_value());
  EXPECT_EQ(old_commit.error, "connection 1 closed");

  const ChunkResult result = send(commit(), kNewOwner);
  ASSERT_EQ(result.error, "");
  ASSERT_TRUE(result.verified.has_value());
  ASSERT_EQ(store_->publish(*result.verified), "");
  const fs::path published = store_->checkpoint_dir("job-1", 100);
  EXPECT_EQ(read(published / "a.bin"), "new");
  EXPECT_EQ(std::distance(fs::directory_iterator(published), fs::directory_iterator()), 1)
      << "only the new upload's file";
}

TEST_F(CheckpointStoreTest, ARefusedChunkDoesNotEndAnotherConnectionsUpload) {
  send(chunk("a.bin", 0, "who", false), /*owner=*/2);
  // A stale attempt's commit from connection 1 is refused by the coordinator.
  const ChunkResult refused = store_->receive(kOwner, commit(), "attempt 1 is stale");
  EXPECT_TRUE(refused.commit);
  EXPECT_EQ(refused.error, "attempt 1 is stale");
  send(chunk("a.bin", 3, "le", true, sha256_hex("whole")), /*owner=*/2);
  const ChunkResult result = send(commit(), /*owner=*/2);
  EXPECT_EQ(result.error, "");
  EXPECT_TRUE(result.verified.has_value());
}

TEST_F(CheckpointStoreTest, PublishingAStepTwiceFails) {
  for (int round = 0; round < 2; ++round) {
    send(chunk("a.bin", 0, "x", true, sha256_hex("x")));
    const ChunkResult result = send(commit());
    ASSERT_TRUE(result.verified.has_value());
    const std::string error = store_->publish(*result.verified);
    if (round == 0) {
      EXPECT_EQ(error, "");
    } else {
      EXPECT_THAT(error, HasSubstr("already committed"));
      EXPECT_FALSE(fs::exists(result.verified->temporary_dir));
    }
  }
}

TEST_F(CheckpointStoreTest, RecoverKeepsOnlyRecordedCheckpoints) {
  fs::create_directories(root_ / "job-1" / ".tmp-step-00000300");
  fs::create_directories(root_ / "job-1" / "step-00000100");
  fs::create_directories(root_ / "job-1" / "step-00000200");
  std::ofstream(root_ / "job-1" / "step-00000200" / "a.bin") << "x";
  EXPECT_EQ(store_->recover({"job-1/step-00000100"}), 2);
  EXPECT_TRUE(fs::exists(root_ / "job-1" / "step-00000100"));
  EXPECT_FALSE(fs::exists(root_ / "job-1" / "step-00000200"));
  EXPECT_FALSE(fs::exists(root_ / "job-1" / ".tmp-step-00000300"));
}

}  // namespace
}  // namespace lomo::server
