// The trainer→daemon protocol (common/trainer_protocol.h) and the checkpoint layout
// (common/checkpoint_layout.h): every record survives a write and a read, a reader fed in
// arbitrary pieces sees each record once and whole, and what is not a record of this version is
// refused with an error naming the line.
#include "common/trainer_protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "common/checkpoint_layout.h"

namespace lomo::trainer_protocol {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct TempDir {
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lomo-protocol-test-XXXXXX").string();
    path = ::mkdtemp(pattern.data());
  }
  ~TempDir() { fs::remove_all(path); }
  fs::path path;
};

// One record of every type, with values that a lossy encoding would change (large integers,
// doubles with all their digits, an optional field present).
std::vector<Record> every_kind_of_record() {
  Metrics metrics{/*step=*/7,
                  /*total_steps=*/(int64_t{1} << 62) + 1,
                  /*loss=*/2.345678901234567,
                  /*lr=*/1e-5 / 3.0,
                  /*grad_norm=*/0.1,
                  /*loss_scale=*/65536.0,
                  /*skipped=*/true,
                  /*skipped_records=*/3,
                  /*tokens=*/512,
                  /*tokens_per_second=*/12345.678,
                  /*elapsed_seconds=*/1.5,
                  {{"total", 1 << 20}, {"parameters", 1000}},
                  /*step_seconds=*/0.123456789012345,
                  /*communication_seconds=*/0.01 / 3.0,
                  /*communication_bytes=*/(int64_t{1} << 40) + 7};
  return {Started{20, 5, "/out/checkpoints/step-00000005"},
          metrics,
          Eval{20, 3.25, std::exp(3.25), 256, 0.75, 4},
          Eval{10, 3.5, std::exp(3.5), 128, std::nullopt, 0},
          Checkpoint{20, "/out/checkpoints/step-00000020"},
          Outcome{Status::kNonFinite, "gradient of 'lm_head.weight' is not finite", 12, 20},
          Outcome{Status::kFailed, "collective all_reduce failed (peer rank 3)", 7, 20, 3}};
}

std::vector<Record> read_all(ProtocolReader& reader, std::string_view bytes) {
  std::vector<Record> records;
  reader.feed(bytes, [&](Record r) { records.push_back(std::move(r)); });
  return records;
}

TEST(TrainerProtocolTest, EveryRecordSurvivesAWriteAndARead) {
  for (const Record& record : every_kind_of_record()) {
    const std::string line = to_line(record);
    ASSERT_EQ(line.back(), '\n');
    EXPECT_EQ(line.find('\n'), line.size() - 1) << "one record, one line: " << line;
    // Exact equality: doubles are written with enough digits to read back the same value.
    EXPECT_EQ(parse_line(std::string_view(line).substr(0, line.size() - 1)), record) << line;
  }
}

TEST(TrainerProtocolTest, EveryLineCarriesTheVersionAndItsType) {
  const std::string line = to_line(Checkpoint{3, "/d"});
  EXPECT_THAT(line, HasSubstr("\"v\":1"));
  EXPECT_THAT(line, HasSubstr("\"type\":\"checkpoint\""));
}

TEST(TrainerProtocolTest, NonFiniteNumbersSurviveAsWords) {
  Metrics overflow;
  overflow.grad_norm = std::numeric_limits<double>::infinity();
  overflow.loss = std::numeric_limits<double>::quiet_NaN();
  overflow.lr = -std::numeric_limits<double>::infinity();
  const std::string line = to_line(overflow);
  EXPECT_THAT(line, HasSubstr("\"grad_norm\":\"inf\""));
  const auto back = std::get<Metrics>(parse_line(line.substr(0, line.size() - 1)));
  EXPECT_TRUE(std::isinf(back.grad_norm) && back.grad_norm > 0);
  EXPECT_TRUE(std::isnan(back.loss));
  EXPECT_TRUE(std::isinf(back.lr) && back.lr < 0);
}

TEST(TrainerProtocolTest, AReasonWithBytesThatAreNotUtf8IsWrittenWithReplacementCharacters) {
  const std::string line =
      to_line(Outcome{Status::kBadData, "bad line in data/\xff\xfe.jsonl", 3, 20});
  const auto back = std::get<Outcome>(parse_line(line.substr(0, line.size() - 1)));
  EXPECT_EQ(back.reason, "bad line in data/\xEF\xBF\xBD\xEF\xBF\xBD.jsonl");
  EXPECT_EQ(back.status, Status::kBadData);
}

TEST(TrainerProtocolTest, EachStatusHasItsOwnExitCodeAndWord) {
  const Status all[] = {Status::kSucceeded, Status::kFailed,    Status::kBadSpec,
                        Status::kBadData,   Status::kNonFinite, Status::kInterrupted};
  std::set<int> codes{kExitUsage};  // 2 belongs to a bad command line
  for (Status status : all) {
    EXPECT_TRUE(codes.insert(exit_code_for(status)).second) << status_name(status);
    EXPECT_EQ(status_from_name(status_name(status)), status);
  }
  EXPECT_EQ(exit_code_for(Status::kSucceeded), 0);
  EXPECT_EQ(exit_code_for(Status::kFailed), 1);
  EXPECT_FALSE(status_from_name("finished"));
}

TEST(TrainerProtocolTest, AReaderFedByteByByteSeesEachRecordOnceAndWhole) {
  std::string stream;
  for (const Record& record : every_kind_of_record()) stream += to_line(record);
  ProtocolReader reader;
  std::vector<Record> records;
  for (char byte : stream) {
    reader.feed(std::string_view(&byte, 1), [&](Record r) { records.push_back(std::move(r)); });
  }
  EXPECT_EQ(records, every_kind_of_record());
  EXPECT_EQ(reader.pending_bytes(), 0u);
  EXPECT_EQ(reader.lines_read(), static_cast<int64_t>(every_kind_of_record().size()));
}

TEST(TrainerProtocolTest, APartialLineWaitsForItsNewline) {
  const std::string line = to_line(Checkpoint{4, "/d"});
  ProtocolReader reader;
  EXPECT_TRUE(read_all(reader, line.substr(0, 10)).empty());
  EXPECT_EQ(reader.pending_bytes(), 10u);
  const auto records = read_all(reader, line.substr(10));
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(std::get<Checkpoint>(records[0]).step, 4);
  EXPECT_EQ(reader.pending_bytes(), 0u);
}

// The message for a bad line; the test fails if the line was accepted.
std::string error_for(const std::string& stream) {
  ProtocolReader reader;
  try {
    read_all(reader, stream);
  } catch (const ProtocolError& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted: " << stream;
  return "";
}

TEST(TrainerProtocolTest, AnUnknownVersionIsRefusedNamingTheVersionAndTheLine) {
  std::string second = to_line(Checkpoint{1, "/d"});
  second.replace(second.find("\"v\":1"), 5, "\"v\":2");
  const std::string error = error_for(to_line(Started{}) + second);
  EXPECT_THAT(error, HasSubstr("trainer protocol line 2"));
  EXPECT_THAT(error, HasSubstr("version 2 is not supported"));
  EXPECT_THAT(error, HasSubstr("knows version 1"));
}

TEST(TrainerProtocolTest, GarbageIsRefusedNamingTheLineAndQuotingIt) {
  const std::string error =
      error_for(to_line(Started{}) + to_line(Started{}) + "step 3/20 loss 2.5\n");
  EXPECT_THAT(error, HasSubstr("trainer protocol line 3: not a JSON object"));
  EXPECT_THAT(error, HasSubstr("'step 3/20 loss 2.5'"));
}

TEST(TrainerProtocolTest, AMissingOrMistypedFieldAndAnUnknownTypeAreNamed) {
  EXPECT_THAT(error_for("{\"v\":1,\"type\":\"checkpoint\",\"step\":3}\n"),
              HasSubstr("field 'dir' is missing"));
  EXPECT_THAT(error_for("{\"v\":1,\"type\":\"checkpoint\",\"step\":\"3\",\"dir\":\"/d\"}\n"),
              HasSubstr("field 'step' is not an integer"));
  EXPECT_THAT(error_for("{\"v\":1,\"type\":\"finished\"}\n"),
              HasSubstr("unknown record type 'finished'"));
  EXPECT_THAT(error_for("{\"type\":\"started\"}\n"), HasSubstr("field 'v' is missing"));
  EXPECT_THAT(error_for("{\"v\":1,\"type\":\"outcome\",\"status\":\"done\",\"reason\":\"\","
                        "\"steps_done\":1,\"total_steps\":1}\n"),
              HasSubstr("unknown outcome status 'done'"));
}

TEST(TrainerProtocolTest, FieldsAddedWithinAVersionAreIgnored) {
  const auto record =
      parse_line(R"({"v":1,"type":"checkpoint","step":3,"dir":"/d","sha256":"abc"})");
  EXPECT_EQ(std::get<Checkpoint>(record), (Checkpoint{3, "/d"}));
}

TEST(TrainerProtocolTest, TheReaderGoesOnAfterABadLineWithTheRecordsAroundIt) {
  ProtocolReader reader;
  std::vector<Record> records;
  const std::string stream =
      to_line(Started{5, 0, ""}) + "garbage\n" + to_line(Checkpoint{2, "/d"});
  auto keep = [&](Record r) { records.push_back(std::move(r)); };
  EXPECT_THROW(reader.feed(stream, keep), ProtocolError);
  ASSERT_EQ(records.size(), 1u);  // the record before the bad line was delivered
  reader.feed("", keep);
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(std::get<Checkpoint>(records[1]).step, 2);
  EXPECT_EQ(reader.lines_read(), 3);
}

TEST(TrainerProtocolTest, TheWriterStartsAnEmptyFileAndAppendsWholeLines) {
  TempDir dir;
  const fs::path file = dir.path / "protocol.jsonl";
  std::ofstream(file) << "left over from an earlier run\n";
  {
    ProtocolWriter writer(file);
    for (const Record& record : every_kind_of_record()) writer.write(record);
  }
  std::ifstream in(file);
  std::stringstream bytes;
  bytes << in.rdbuf();
  ProtocolReader reader;
  EXPECT_EQ(read_all(reader, bytes.str()), every_kind_of_record());
  EXPECT_THROW(ProtocolWriter(dir.path / "no-such-dir" / "p.jsonl"), std::runtime_error);
}

}  // namespace
}  // namespace lomo::trainer_protocol

namespace lomo {
namespace {

namespace fs = std::filesystem;

TEST(CheckpointLayoutTest, StepNamesAreZeroPaddedAndParseBack) {
  EXPECT_EQ(checkpoint_directory_name(20), "step-00000020");
  EXPECT_EQ(checkpoint_directory_name(123456789), "step-123456789");
  for (int64_t step : {int64_t{0}, int64_t{20}, int64_t{123456789}, int64_t{1} << 40}) {
    EXPECT_EQ(checkpoint_step_from_name(checkpoint_directory_name(step)), step);
  }
  for (const char* other : {"latest", "step-", "step-12a", ".tmp-step-00000020",
                            "step-1234567890123456789", "xstep-1"}) {
    EXPECT_FALSE(checkpoint_step_from_name(other)) << other;
  }
}

TEST(CheckpointLayoutTest, CheckpointsTheirTemporaryNameAndTheLatestPointer) {
  const fs::path root = checkpoints_directory("/out");
  EXPECT_EQ(root, fs::path("/out/checkpoints"));
  EXPECT_EQ(checkpoint_directory(root, 20), fs::path("/out/checkpoints/step-00000020"));
  EXPECT_EQ(temporary_checkpoint_directory(root, 20),
            fs::path("/out/checkpoints/.tmp-step-00000020"));
  EXPECT_EQ(latest_checkpoint_pointer(root), fs::path("/out/checkpoints/latest"));
  EXPECT_TRUE(
      is_temporary_checkpoint_name(temporary_checkpoint_directory(root, 20).filename().string()));
  EXPECT_FALSE(is_temporary_checkpoint_name(checkpoint_directory_name(20)));
}

TEST(CheckpointLayoutTest, LatestNamesADirectoryBesideItOrIsRefused) {
  std::string pattern = (fs::temp_directory_path() / "lomo-layout-test-XXXXXX").string();
  const fs::path root = ::mkdtemp(pattern.data());
  EXPECT_FALSE(read_latest_checkpoint(root));  // no pointer yet
  fs::create_directories(checkpoint_directory(root, 5));
  std::ofstream(latest_checkpoint_pointer(root)) << "step-00000005\n";
  EXPECT_EQ(read_latest_checkpoint(root), checkpoint_directory(root, 5));
  // Anything but a step directory would resume from somewhere else: "..", ".", another folder.
  fs::create_directories(root / "other");
  for (const char* name : {"../elsewhere", "..", ".", "other", "step-00000006"}) {
    std::ofstream(latest_checkpoint_pointer(root)) << name << "\n";
    EXPECT_THROW(read_latest_checkpoint(root), std::runtime_error) << name;
  }
  fs::remove_all(root);
}

TEST(CheckpointLayoutTest, WrittenLatestPointerReadsBackAndLeavesNoTemporaryFile) {
  std::string pattern = (fs::temp_directory_path() / "lomo-layout-test-XXXXXX").string();
  const fs::path root = ::mkdtemp(pattern.data());
  for (const int64_t step : {5, 10}) {
    fs::create_directories(checkpoint_directory(root, step));
    write_latest_checkpoint(root, step);
    EXPECT_EQ(read_latest_checkpoint(root), checkpoint_directory(root, step));
  }
  // Only the two step directories and the pointer: the temporary file was renamed away.
  EXPECT_EQ(std::distance(fs::directory_iterator(root), fs::directory_iterator()), 3);
  fs::remove_all(root);
}

TEST(CheckpointLayoutTest, UploadDirectoriesAreTemporaryAndDistinctPerConnectionAndAttempt) {
  const fs::path root = "/data/checkpoints/job-1";
  EXPECT_EQ(temporary_upload_directory(root, 100, 3, 2),
            fs::path("/data/checkpoints/job-1/.tmp-step-00000100.upload-3-2"));
  EXPECT_NE(temporary_upload_directory(root, 100, 3, 2),
            temporary_upload_directory(root, 100, 4, 2));
  EXPECT_NE(temporary_upload_directory(root, 100, 3, 2),
            temporary_upload_directory(root, 100, 3, 3));
  EXPECT_TRUE(is_temporary_checkpoint_name(
      temporary_upload_directory(root, 100, 3, 2).filename().string()));
  EXPECT_FALSE(checkpoint_step_from_name(".tmp-step-00000100.upload-3-2"));
}

TEST(CheckpointLayoutTest, AttemptDirectoriesCannotEscapeTheWorkDirectory) {
  EXPECT_EQ(attempt_directory("/w", "job-1", 2), fs::path("/w/jobs/job-1/attempt-2"));
  EXPECT_EQ(attempt_directory("/w", "../../etc", 1), fs::path("/w/jobs/.._.._etc/attempt-1"));
  EXPECT_EQ(attempt_directory("/w", "..", 1), fs::path("/w/jobs/_../attempt-1"));
  const fs::path attempt = attempt_directory("/w", "job-1", 2);
  EXPECT_EQ(attempt_output_directory(attempt), fs::path("/w/jobs/job-1/attempt-2/out"));
  EXPECT_EQ(attempt_job_file(attempt), fs::path("/w/jobs/job-1/attempt-2/job.yaml"));
  EXPECT_EQ(attempt_protocol_file(attempt), fs::path("/w/jobs/job-1/attempt-2/protocol.jsonl"));
}

}  // namespace
}  // namespace lomo
