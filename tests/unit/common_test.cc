// The small shared pieces in common/: the flag parser of lomo-coordinator and lomo-workerd, the
// one whole-file reader, and the one log (text or JSON lines).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "common/flags.h"
#include "common/log.h"
#include "common/printable.h"
#include "common/read_file.h"

namespace lomo {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

template <typename Error>
std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

TEST(FlagsTest, SplitsBothFormsInOrderAndKeepsPositionalsWhereAllowed) {
  const ParsedFlags parsed =
      parse_flags({"--data-dir", "d", "--threads=4", "job.yaml", "--follow", "--x="},
                  FlagRules{{"--follow"}, /*allow_positional=*/true});
  EXPECT_FALSE(parsed.help);
  using Pair = std::pair<std::string, std::string>;
  EXPECT_EQ(parsed.flags,
            (std::vector<Pair>{
                {"--data-dir", "d"}, {"--threads", "4"}, {"--follow", "true"}, {"--x", ""}}));
  EXPECT_EQ(parsed.positional, std::vector<std::string>{"job.yaml"});
  EXPECT_TRUE(parse_flags({"--a", "1", "-h", "--bogus"}).help);
}

// lomoctl's commands and lomo-worker's subcommands name every flag they take: anything else is an
// error, a short flag included, while "-" stays a positional argument.
TEST(FlagsTest, RefusesFlagsNotNamedWhereAskedTo) {
  const FlagRules rules{.switches = {"--watch", "-f"},
                        .allow_positional = true,
                        .with_value = {"--set"},
                        .unknown = UnknownFlags::kRefuse};
  const ParsedFlags parsed =
      parse_flags({"job.yaml", "--set", "a=1", "-f", "--set=b=2", "-", "--watch"}, rules);
  using Pair = std::pair<std::string, std::string>;
  EXPECT_EQ(
      parsed.flags,
      (std::vector<Pair>{{"--set", "a=1"}, {"-f", "true"}, {"--set", "b=2"}, {"--watch", "true"}}));
  EXPECT_EQ(parsed.positional, (std::vector<std::string>{"job.yaml", "-"}));
  EXPECT_EQ(error_of<FlagError>([&] {
              parse_flags({"--nope", "1"}, rules);
            }),
            "--nope: unknown flag");
  EXPECT_EQ(error_of<FlagError>([&] { parse_flags({"-x"}, rules); }), "-x: unknown flag");
  EXPECT_EQ(error_of<FlagError>([&] { parse_flags({"--watch=no"}, rules); }),
            "--watch: takes no value");
  EXPECT_EQ(error_of<FlagError>([&] {
              parse_flags({"a", "--set"}, rules);
            }),
            "--set: needs a value");
}

// lomoctl's global flags may stand anywhere; every other argument is left, in order, to the
// command's own parse.
TEST(FlagsTest, PassesUnknownFlagsOnAsPositionalsWhereAskedTo) {
  const FlagRules rules{
      .allow_positional = true, .with_value = {"--output", "-o"}, .unknown = UnknownFlags::kPassOn};
  const ParsedFlags parsed = parse_flags(
      {"submit", "--set", "a=1", "-o", "json", "-f", "--x=1", "--output=text", "job.yaml"}, rules);
  using Pair = std::pair<std::string, std::string>;
  EXPECT_EQ(parsed.flags, (std::vector<Pair>{{"-o", "json"}, {"--output", "text"}}));
  EXPECT_EQ(parsed.positional,
            (std::vector<std::string>{"submit", "--set", "a=1", "-f", "--x=1", "job.yaml"}));
}

TEST(FlagsTest, ErrorsNameTheFlag) {
  EXPECT_EQ(error_of<FlagError>([] { parse_flags({"--data-dir"}); }), "--data-dir: needs a value");
  EXPECT_THAT(error_of<FlagError>([] { parse_flags({"stray"}); }),
              HasSubstr("unexpected argument \"stray\""));
  EXPECT_EQ(flag_int("--threads", "12"), 12);
  EXPECT_THAT(error_of<FlagError>([] { flag_int("--threads", "1x"); }),
              HasSubstr("--threads: expected an integer, got \"1x\""));
  EXPECT_DOUBLE_EQ(flag_double("--timeout", "2.5"), 2.5);
  EXPECT_THAT(error_of<FlagError>([] { flag_double("--timeout", "soon"); }),
              HasSubstr("expected a number"));
  EXPECT_EQ(flag_seconds("--grace", "1.5"), std::chrono::milliseconds(1500));
  EXPECT_THAT(error_of<FlagError>([] { flag_seconds("--grace", "-1"); }),
              HasSubstr("--grace: expected seconds"));
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lomo-common-test-XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

TEST(PrintableTest, CutsBetweenCharactersAndEscapesControlBytes) {
  EXPECT_EQ(printable_excerpt("plain", 80), "plain");
  EXPECT_EQ(printable_excerpt("a\x1b[2Jb\x7f", 80), "a\\x1b[2Jb\\x7f");  // no screen clearing
  EXPECT_EQ(printable_excerpt("abcdef", 3), "abc...");
  // "é" is two bytes (c3 a9): a cut after byte 2 of "aé" would split it, so it falls before.
  EXPECT_EQ(printable_excerpt("a\xc3\xa9z", 2), "a...");
  EXPECT_EQ(printable_excerpt("a\xc3\xa9z", 3), "a\xc3\xa9...");
  EXPECT_EQ(printable_excerpt("", 5), "");
}

TEST(ReadFileTest, ReadsEveryByteAndNamesWhatItCannotRead) {
  TempDir dir;
  const std::string bytes("a\0b\r\n\xff", 6);
  std::ofstream(dir.path() / "f.bin", std::ios::binary) << bytes;
  EXPECT_EQ(read_file(dir.path() / "f.bin"), bytes);
  EXPECT_EQ(read_file(dir.path() / "f.bin", 6), bytes);
  EXPECT_THAT(error_of<FileReadError>([&] { read_file(dir.path() / "f.bin", 5); }),
              HasSubstr("6 bytes is too large"));
  const fs::path missing = dir.path() / "missing";
  EXPECT_THAT(error_of<FileReadError>([&] { read_file(missing); }),
              HasSubstr(missing.string() + ": cannot open: No such file or directory"));
  EXPECT_THAT(error_of<FileReadError>([&] { read_file(dir.path()); }),
              HasSubstr("it is a directory"));
}

// Runs `body` with stderr going to a file; returns what was written.
std::string capture_stderr(const std::function<void()>& body) {
  TempDir dir;
  const fs::path file = dir.path() / "stderr";
  std::fflush(stderr);
  const int saved = ::dup(2);
  std::FILE* out = std::fopen(file.c_str(), "w");
  ::dup2(::fileno(out), 2);
  body();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::fclose(out);
  return read_file(file);
}

TEST(LogTest, TextLinesCarryTimeAndProgramAndJsonLinesParse) {
  set_log_program("lomo-test");
  set_log_format(LogFormat::kText);
  const std::string text = capture_stderr([] { log_line("job j: QUEUED -> ASSIGNED"); });
  // 2026-11-26T13:40:02.123Z lomo-test: job j: QUEUED -> ASSIGNED
  EXPECT_EQ(text.size(), 25 + std::string("lomo-test: job j: QUEUED -> ASSIGNED\n").size());
  EXPECT_EQ(text.substr(23), "Z lomo-test: job j: QUEUED -> ASSIGNED\n");

  set_log_format(parse_log_format("json"));
  const std::string line = capture_stderr([] { log_line("a \"quoted\"\nline"); });
  set_log_format(LogFormat::kText);
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "one line per event";
  const auto json = nlohmann::json::parse(line);
  EXPECT_EQ(json.at("program"), "lomo-test");
  EXPECT_EQ(json.at("message"), "a \"quoted\"\nline");
  EXPECT_EQ(json.at("time").get<std::string>().size(), 24u);
  EXPECT_THROW(parse_log_format("xml"), std::invalid_argument);
}

}  // namespace
}  // namespace lomo
