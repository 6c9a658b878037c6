// SHA-256 (common/sha256.h) against the FIPS 180-2 test vectors.
#include "common/sha256.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>

namespace lomo {
namespace {

TEST(Sha256Test, MatchesTheFipsVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, IncrementalUpdatesEqualOneUpdate) {
  const std::string text = "The quick brown fox jumps over the lazy dog";
  Sha256 hash;
  for (char c : text) hash.update(&c, 1);
  EXPECT_EQ(hash.hex_digest(), sha256_hex(text));
  EXPECT_EQ(sha256_hex(text), "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592");
}

TEST(Sha256Test, HashesAFileAndNamesAFileItCannotRead) {
  const std::filesystem::path file =
      std::filesystem::temp_directory_path() / ("lomo-sha256-test-" + std::to_string(::getpid()));
  std::ofstream(file, std::ios::binary) << std::string(3u << 20, 'x');  // spans read buffers
  EXPECT_EQ(sha256_file_hex(file), sha256_hex(std::string(3u << 20, 'x')));
  std::filesystem::remove(file);
  try {
    sha256_file_hex(file);
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(file.string()), std::string::npos);
  }
}

}  // namespace
}  // namespace lomo
