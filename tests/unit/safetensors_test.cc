#include "worker/engine/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

namespace lomo {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("lomo_safetensors_" + std::string(info->name()) + "_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes a file by hand: length prefix (the header's size unless `length` overrides it), header
  // text, data bytes.
  fs::path write_raw(const std::string& header, const std::string& data,
                     std::optional<uint64_t> length = std::nullopt) {
    fs::path path = dir_ / "model.safetensors";
    std::string bytes(8, '\0');
    const uint64_t n = length.value_or(header.size());
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    bytes += header;
    bytes += data;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  fs::path dir_;
};

// The message of the CheckpointError that opening `path` throws.
std::string open_error(const fs::path& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const CheckpointError& error) {
    return error.what();
  }
  ADD_FAILURE() << "opening " << path << " did not throw";
  return "";
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  uint64_t begin, uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

TEST_F(SafetensorsTest, WriteThenReadReturnsTheSameBytes) {
  const std::vector<float> weights = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, 1e-30f};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xbf80, 0x7f80, 0x0001};
  const std::vector<uint16_t> fp16 = {0x3c00, 0x7bff, 0x8001, 0xfc00};
  const fs::path path = dir_ / "t.safetensors";
  write_safetensors(path,
                    {{"w", DType::kF32, {2, 3}, weights.data()},
                     {"b", DType::kBF16, {4}, bf16.data()},
                     {"h", DType::kF16, {2, 2, 1}, fp16.data()},
                     {"empty", DType::kF32, {0, 5}, nullptr}},
                    {{"step", "7"}});

  const SafetensorsFile file = SafetensorsFile::open(path);
  ASSERT_EQ(file.tensors().size(), 4u);
  EXPECT_EQ(file.header().metadata.at("format"), "pt");
  EXPECT_EQ(file.header().metadata.at("step"), "7");
  EXPECT_EQ(file.header().data_offset % 8, 0u);

  const SafetensorsTensorInfo& w = file.tensor("w");
  EXPECT_EQ(w.dtype, DType::kF32);
  EXPECT_THAT(w.shape, ElementsAre(2, 3));
  EXPECT_EQ(w.numel(), 6u);
  std::vector<float> w_read(6);
  file.read_tensor("w", w_read.data());
  for (size_t i = 0; i < weights.size(); ++i) {  // bit for bit: the file holds exact fp32 values
    EXPECT_EQ(std::bit_cast<uint32_t>(w_read[i]), std::bit_cast<uint32_t>(weights[i])) << i;
  }

  std::vector<uint16_t> b_read(4), h_read(4);
  file.read_tensor("b", b_read.data());
  file.read_tensor("h", h_read.data());
  EXPECT_EQ(b_read, bf16);
  EXPECT_EQ(h_read, fp16);
  EXPECT_EQ(file.tensor("h").shape_string(), "[2, 2, 1]");
  EXPECT_EQ(file.tensor("empty").size_bytes(), 0u);
}

TEST_F(SafetensorsTest, WriterKeepsTensorOrderAndPadsHeaderWithSpaces) {
  const std::vector<float> a(3, 1.0f), b(2, 2.0f);
  const fs::path path = dir_ / "t.safetensors";
  write_safetensors(
      path, {{"z_first", DType::kF32, {3}, a.data()}, {"a_second", DType::kF32, {2}, b.data()}});
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 20);
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));  // only spaces after the JSON
  const json parsed = json::parse(header);
  EXPECT_EQ(parsed["z_first"]["data_offsets"], json::array({0, 12}));
  EXPECT_EQ(parsed["a_second"]["data_offsets"], json::array({12, 20}));
  EXPECT_EQ(parsed["__metadata__"]["format"], "pt");
}

TEST_F(SafetensorsTest, ReadTensorRangeReadsPartOfATensor) {
  std::vector<float> values(100);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i);
  const fs::path path = dir_ / "t.safetensors";
  write_safetensors(path, {{"v", DType::kF32, {10, 10}, values.data()}});
  const SafetensorsFile file = SafetensorsFile::open(path);
  std::vector<float> part(5);
  file.read_tensor_range(file.tensor("v"), 40 * sizeof(float), 5 * sizeof(float), part.data());
  EXPECT_THAT(part, ElementsAre(40.0f, 41.0f, 42.0f, 43.0f, 44.0f));
  EXPECT_THROW(file.read_tensor_range(file.tensor("v"), 396, 8, part.data()),
               std::invalid_argument);
}

TEST_F(SafetensorsTest, MissingTensorIsNamed) {
  const std::vector<float> a(2, 1.0f);
  const fs::path path = dir_ / "t.safetensors";
  write_safetensors(path, {{"a", DType::kF32, {2}, a.data()}});
  const SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ(file.find("nope"), nullptr);
  EXPECT_THAT([&] { file.tensor("nope"); }, ::testing::ThrowsMessage<CheckpointError>(AllOf(
                                                HasSubstr(path.string()), HasSubstr("'nope'"))));
}

TEST_F(SafetensorsTest, WriterReplacesAtomicallyAndLeavesNoTemporaryFiles) {
  const std::vector<float> a(4, 1.0f);
  const fs::path path = dir_ / "t.safetensors";
  write_safetensors(path, {{"a", DType::kF32, {4}, a.data()}});
  write_safetensors(path, {{"b", DType::kF32, {2}, a.data()}});
  EXPECT_NE(SafetensorsFile::open(path).find("b"), nullptr);
  EXPECT_EQ(SafetensorsFile::open(path).find("a"), nullptr);

  // A rejected write leaves the old file untouched and no temporary beside it.
  EXPECT_THROW(write_safetensors(
                   path, {{"x", DType::kF32, {4}, a.data()}, {"x", DType::kF32, {4}, a.data()}}),
               std::invalid_argument);
  EXPECT_NE(SafetensorsFile::open(path).find("b"), nullptr);
  size_t files = 0;
  for (const auto& item : fs::directory_iterator(dir_)) {
    EXPECT_EQ(item.path().filename(), "t.safetensors");
    ++files;
  }
  EXPECT_EQ(files, 1u);
}

TEST_F(SafetensorsTest, WriterRejectsInvalidTensors) {
  const std::vector<float> a(4, 1.0f);
  const fs::path path = dir_ / "t.safetensors";
  EXPECT_THROW(write_safetensors(path, {{"__metadata__", DType::kF32, {4}, a.data()}}),
               std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"a", DType::kF32, {-4}, a.data()}}),
               std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"a", DType::kF32, {4}, nullptr}}), std::invalid_argument);
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(SafetensorsTest, WriteIntoMissingDirectoryNamesThePath) {
  const std::vector<float> a(4, 1.0f);
  const fs::path path = dir_ / "missing" / "t.safetensors";
  EXPECT_THAT(
      [&] {
        write_safetensors(path, {{"a", DType::kF32, {4}, a.data()}});
      },
      ::testing::ThrowsMessage<std::system_error>(HasSubstr(path.string())));
}

TEST_F(SafetensorsTest, EmptyHeaderIsAValidFileWithoutTensors) {
  const SafetensorsFile file = SafetensorsFile::open(write_raw("{}", ""));
  EXPECT_TRUE(file.tensors().empty());
}

TEST_F(SafetensorsTest, RejectsFileTooShortForTheLengthPrefix) {
  const fs::path path = dir_ / "short.safetensors";
  std::ofstream(path, std::ios::binary) << "abc";
  EXPECT_THAT(open_error(path), AllOf(HasSubstr(path.string()), HasSubstr("too short")));
}

TEST_F(SafetensorsTest, RejectsHeaderLengthBeyondTheFile) {
  const fs::path path = write_raw("{}", "", 1000);
  EXPECT_THAT(open_error(path),
              AllOf(HasSubstr(path.string()), HasSubstr("header length 1000 exceeds the file")));
}

TEST_F(SafetensorsTest, RejectsAbsurdHeaderLength) {
  const fs::path path = write_raw("{}", "", 200'000'000);
  EXPECT_THAT(open_error(path), AllOf(HasSubstr(path.string()), HasSubstr("exceeds the limit")));
  // Not a safetensors file at all: the first 8 bytes of text read as a huge length.
  const fs::path text = dir_ / "notes.txt";
  std::ofstream(text) << "this is not a checkpoint";
  EXPECT_THAT(open_error(text), HasSubstr("not a safetensors file?"));
}

TEST_F(SafetensorsTest, RejectsInvalidJson) {
  const fs::path path = write_raw("{\"w\": {", "");
  EXPECT_THAT(open_error(path), AllOf(HasSubstr(path.string()), HasSubstr("not valid JSON")));
  // Found by the fuzzer: a number beyond double range is a different nlohmann exception.
  EXPECT_THAT(open_error(write_raw("{\"w\": {\"shape\": [1e400]}}", "")),
              HasSubstr("not valid JSON"));
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotAnObject) {
  EXPECT_THAT(open_error(write_raw("[1, 2]", "")), HasSubstr("header must be a JSON object"));
}

TEST_F(SafetensorsTest, RejectsEntryThatIsNotAnObject) {
  EXPECT_THAT(open_error(write_raw("{\"w\": 5}", "")),
              AllOf(HasSubstr("model.safetensors"), HasSubstr("tensor 'w'"),
                    HasSubstr("expected an object")));
}

TEST_F(SafetensorsTest, RejectsDtypesLomoDoesNotStoreByName) {
  const fs::path path =
      write_raw("{" + entry("ids", "I64", "[2]", 0, 16) + "}", std::string(16, 0));
  EXPECT_THAT(open_error(path), AllOf(HasSubstr(path.string()), HasSubstr("tensor 'ids'"),
                                      HasSubstr("'I64' is not supported")));
  EXPECT_THAT(open_error(write_raw("{\"w\":{\"dtype\":7,\"shape\":[],\"data_offsets\":[0,4]}}",
                                   std::string(4, 0))),
              AllOf(HasSubstr("tensor 'w'"), HasSubstr("'dtype' must be a string")));
}

TEST_F(SafetensorsTest, RejectsNegativeOrNonIntegerShape) {
  EXPECT_THAT(
      open_error(write_raw("{" + entry("w", "F32", "[-1, 2]", 0, 8) + "}", std::string(8, 0))),
      AllOf(HasSubstr("tensor 'w'"), HasSubstr("non-negative integers, got -1")));
  EXPECT_THAT(
      open_error(write_raw("{" + entry("w", "F32", "[1.5]", 0, 8) + "}", std::string(8, 0))),
      AllOf(HasSubstr("tensor 'w'"), HasSubstr("got 1.5")));
  EXPECT_THAT(
      open_error(write_raw("{" + entry("w", "F32", "\"2x2\"", 0, 16) + "}", std::string(16, 0))),
      AllOf(HasSubstr("tensor 'w'"), HasSubstr("'shape' must be a list")));
}

TEST_F(SafetensorsTest, RejectsMalformedDataOffsets) {
  EXPECT_THAT(
      open_error(write_raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", "")),
      AllOf(HasSubstr("tensor 'w'"), HasSubstr("'data_offsets' must be [begin, end]")));
  EXPECT_THAT(open_error(write_raw(
                  "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", "")),
              AllOf(HasSubstr("tensor 'w'"), HasSubstr("'data_offsets' must be [begin, end]")));
  EXPECT_THAT(open_error(write_raw("{" + entry("w", "F32", "[1]", 8, 4) + "}", std::string(8, 0))),
              AllOf(HasSubstr("tensor 'w'"), HasSubstr("[8, 4] end before they begin")));
}

TEST_F(SafetensorsTest, RejectsOffsetsPastTheEndOfATruncatedFile) {
  const fs::path path =
      write_raw("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[4]", 8, 24) + "}",
                std::string(20, 0));
  EXPECT_THAT(open_error(path),
              AllOf(HasSubstr(path.string()), HasSubstr("tensor 'b'"),
                    HasSubstr("extend past the data buffer of 20 bytes (file truncated?)")));
}

TEST_F(SafetensorsTest, RejectsSizeThatDisagreesWithShape) {
  EXPECT_THAT(
      open_error(write_raw("{" + entry("w", "BF16", "[3, 2]", 0, 8) + "}", std::string(8, 0))),
      AllOf(HasSubstr("tensor 'w'"), HasSubstr("needs 12 bytes"), HasSubstr("hold 8")));
}

TEST_F(SafetensorsTest, RejectsShapeWhoseSizeOverflows) {
  const std::string big = std::to_string(uint64_t{1} << 62);
  EXPECT_THAT(open_error(write_raw("{" + entry("w", "F32", "[" + big + ", 8]", 0, 0) + "}", "")),
              AllOf(HasSubstr("tensor 'w'"), HasSubstr("overflows")));
  EXPECT_THAT(
      open_error(write_raw("{" + entry("w", "F32", "[18446744073709551615]", 0, 0) + "}", "")),
      AllOf(HasSubstr("tensor 'w'"), HasSubstr("non-negative integers")));
}

TEST_F(SafetensorsTest, RejectsOverlappingTensors) {
  const fs::path path =
      write_raw("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12) + "}",
                std::string(12, 0));
  EXPECT_THAT(open_error(path), AllOf(HasSubstr(path.string()), HasSubstr("tensor 'b'"),
                                      HasSubstr("overlap tensor 'a'")));
}

TEST_F(SafetensorsTest, RejectsGapsAndTrailingBytes) {
  EXPECT_THAT(open_error(write_raw("{" + entry("a", "F32", "[1]", 4, 8) + "}", std::string(8, 0))),
              AllOf(HasSubstr("tensor 'a'"), HasSubstr("leave bytes [0, 4)")));
  EXPECT_THAT(open_error(write_raw("{" + entry("a", "F32", "[1]", 0, 4) + "}", std::string(12, 0))),
              HasSubstr("8 bytes after the last tensor belong to no tensor"));
}

TEST_F(SafetensorsTest, RejectsDuplicateTensorNames) {
  EXPECT_THAT(open_error(write_raw(
                  "{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("a", "F32", "[1]", 4, 8) + "}",
                  std::string(8, 0))),
              HasSubstr("tensor 'a' appears twice"));
}

TEST_F(SafetensorsTest, RejectsMetadataThatIsNotStrings) {
  EXPECT_THAT(open_error(write_raw("{\"__metadata__\":{\"format\":1}}", "")),
              AllOf(HasSubstr("__metadata__"), HasSubstr("'format' is not a string")));
  EXPECT_THAT(open_error(write_raw("{\"__metadata__\":[]}", "")),
              HasSubstr("__metadata__: expected an object"));
}

TEST_F(SafetensorsTest, RejectsDeepNesting) {
  EXPECT_THAT(
      open_error(write_raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[[1]],\"data_offsets\":[0,4]}}",
                           std::string(4, 0))),
      HasSubstr("nests deeper"));
  EXPECT_THAT(open_error(write_raw(std::string(10000, '[') + std::string(10000, ']'), "")),
              HasSubstr("nests deeper"));
}

TEST_F(SafetensorsTest, LongHostileNamesAreShortenedInMessages) {
  const std::string name(5000, 'x');
  const std::string message = open_error(write_raw("{\"" + name + "\": 5}", ""));
  EXPECT_THAT(message, HasSubstr("..."));
  EXPECT_LT(message.size(), 1000u);
}

TEST_F(SafetensorsTest, RejectsMissingFileAndDirectory) {
  EXPECT_THAT(open_error(dir_ / "absent.safetensors"),
              AllOf(HasSubstr("absent.safetensors"), HasSubstr("cannot open")));
  EXPECT_THAT(open_error(dir_), HasSubstr("not a regular file"));
}

TEST_F(SafetensorsTest, FileTruncatedAfterOpenFailsTheRead) {
  const std::vector<float> a(1024, 1.0f);
  const fs::path path = dir_ / "t.safetensors";
  write_safetensors(path, {{"a", DType::kF32, {1024}, a.data()}});
  const SafetensorsFile file = SafetensorsFile::open(path);
  fs::resize_file(path, fs::file_size(path) - 100);
  std::vector<float> out(1024);
  EXPECT_THAT([&] { file.read_tensor("a", out.data()); },
              ::testing::ThrowsMessage<CheckpointError>(
                  AllOf(HasSubstr(path.string()), HasSubstr("unexpected end of file"))));
}

TEST(SafetensorsHeaderTest, ParserNeedsTheWholeHeader) {
  std::string bytes = std::string("\x10\0\0\0\0\0\0\0", 8) + "{}              ";
  EXPECT_EQ(parse_safetensors_header(bytes, bytes.size(), "mem").tensors.size(), 0u);
  EXPECT_THAT([&] { parse_safetensors_header(bytes.substr(0, 12), bytes.size(), "mem"); },
              ::testing::ThrowsMessage<CheckpointError>(HasSubstr("mem: only 4 of the 16")));
}

}  // namespace
}  // namespace lomo
