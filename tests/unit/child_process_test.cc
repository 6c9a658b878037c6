// ChildProcess and LineSplitter (common/child_process.h): how children end is described, their
// output is split into lines, and they never outlive a failed start.
#include "common/child_process.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

namespace lomo {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<std::string> read_all_lines(ChildProcess& child) {
  std::vector<std::string> lines;
  LineSplitter splitter;
  auto add = [&](const std::string& line) { lines.push_back(line); };
  while (child.stdout_fd() >= 0) {
    if (!drain_lines(child.stdout_fd(), splitter, add)) child.close_stdout();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return lines;
}

// The child's first line of output (blocks until it comes or stdout closes).
std::string read_first_line(ChildProcess& child) {
  std::vector<std::string> lines;
  LineSplitter splitter;
  auto add = [&](const std::string& line) { lines.push_back(line); };
  while (lines.empty() && child.stdout_fd() >= 0) {
    if (!drain_lines(child.stdout_fd(), splitter, add)) child.close_stdout();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return lines.empty() ? "" : lines.front();
}

TEST(ChildProcessTest, CapturesOutputLinesAndTheExitCode) {
  ChildOptions options;
  options.argv = {"/bin/sh", "-c", "printf 'one\\ntwo\\r\\nthree'; exit 3"};
  options.stdout_mode = ChildOutput::kPipe;
  ChildProcess child(options);
  EXPECT_THAT(read_all_lines(child), ElementsAre("one", "two", "three"));
  const ExitStatus status = child.wait();
  EXPECT_FALSE(status.signaled);
  EXPECT_EQ(status.code, 3);
  EXPECT_EQ(status.describe(), "exited with code 3");
}

TEST(ChildProcessTest, DescribesASignalByName) {
  ChildOptions options;
  options.argv = {"/bin/sh", "-c", "kill -KILL $$"};
  ChildProcess child(options);
  const ExitStatus status = child.wait();
  EXPECT_TRUE(status.signaled);
  EXPECT_EQ(status.describe(), "killed by SIGKILL");
  EXPECT_EQ(signal_name(SIGSEGV), "SIGSEGV");
  EXPECT_EQ(signal_name(64), "signal 64");
}

TEST(ChildProcessTest, AProgramThatCannotStartThrowsNamingIt) {
  ChildOptions options;
  options.argv = {"/nonexistent/lomo-program"};
  try {
    ChildProcess child(options);
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("/nonexistent/lomo-program"));
    EXPECT_THAT(e.what(), HasSubstr("No such file"));
  }
}

TEST(ChildProcessTest, TerminateEscalatesToSigkillAfterTheGracePeriod) {
  ChildOptions options;
  // The child says when SIGTERM is ignored, so the test never races the trap (a fixed sleep
  // did, on a loaded machine).
  options.argv = {"/bin/sh", "-c", "trap '' TERM; echo trapped; while true; do sleep 0.05; done"};
  options.stdout_mode = ChildOutput::kPipe;
  ChildProcess child(options);
  ASSERT_EQ(read_first_line(child), "trapped");
  const auto start = std::chrono::steady_clock::now();
  const ExitStatus status = child.terminate(std::chrono::milliseconds(300));
  EXPECT_TRUE(status.signaled);
  EXPECT_EQ(status.signal, SIGKILL);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(ChildProcessTest, AddsEnvironmentEntries) {
  ChildOptions options;
  options.argv = {"/bin/sh", "-c", "echo $LOMO_TEST_VALUE"};
  options.env = {"LOMO_TEST_VALUE=forty-two"};
  options.stdout_mode = ChildOutput::kPipe;
  ChildProcess child(options);
  EXPECT_THAT(read_all_lines(child), ElementsAre("forty-two"));
  EXPECT_TRUE(child.wait().success());
}

TEST(LineSplitterTest, SplitsLongLinesIntoBoundedPieces) {
  LineSplitter splitter(4);
  std::vector<std::string> lines;
  const std::string text = "abcdefghij\nxy";
  splitter.feed(text.data(), text.size(), [&](const std::string& l) { lines.push_back(l); });
  splitter.finish([&](const std::string& l) { lines.push_back(l); });
  EXPECT_THAT(lines, ElementsAre("abcd", "efgh", "ij", "xy"));
}

}  // namespace
}  // namespace lomo
