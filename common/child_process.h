// A child process that cannot outlive or silently escape its parent: started in its own process
// group (so a terminal's Ctrl-C reaches only the parent, which decides what to forward), with a
// parent-death signal, optional pipes for its stdout and stderr, and an exit status that can say
// in words how it ended ("killed by SIGKILL").
#pragma once

#include <sys/types.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace lomo {

struct ExitStatus {
  bool signaled = false;  // ended by a signal (then `signal` is set), else exited with `code`
  int code = 0;
  int signal = 0;

  bool success() const { return !signaled && code == 0; }
  // "exited with code 1", "killed by SIGKILL".
  std::string describe() const;
};

// "SIGKILL", "SIGSEGV", ... or "signal 42".
std::string signal_name(int signal);

enum class ChildOutput {
  kInherit,  // the parent's stdout/stderr
  kPipe,     // readable through stdout_fd()/stderr_fd()
  kFile,     // appended to ChildOptions::output_file (stdout and stderr together)
  kDiscard,  // /dev/null
};

struct ChildOptions {
  std::vector<std::string> argv;  // argv[0]: the program (a path, or a name looked up in PATH)
  std::vector<std::string> env;   // "KEY=VALUE" entries added to (or replacing) the parent's
  std::filesystem::path working_directory;  // empty: the parent's
  ChildOutput stdout_mode = ChildOutput::kInherit;
  ChildOutput stderr_mode = ChildOutput::kInherit;
  std::filesystem::path output_file;  // for kFile
  // A pipe to the child's stdin, written through stdin_fd() (a request/reply helper such as the
  // rendezvous relay); otherwise stdin is the parent's.
  bool stdin_pipe = false;
  // Delivered to the child when the thread that started it ends (Linux PR_SET_PDEATHSIG): a
  // parent killed with SIGKILL leaves no orphan running. 0: none.
  int parent_death_signal = SIGTERM;
};

class ChildProcess {
 public:
  // Starts the program. Throws std::runtime_error naming the program when it cannot be started
  // (not found, not executable, no pipes): exec failures are reported here, not as an exit code.
  explicit ChildProcess(const ChildOptions& options);
  // A child still running is killed (SIGKILL to its process group) and reaped.
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  // Read ends of the pipes (ChildOutput::kPipe), non-blocking; -1 otherwise. Owned here.
  int stdout_fd() const { return stdout_fd_; }
  int stderr_fd() const { return stderr_fd_; }
  void close_stdout();
  void close_stderr();
  // Write end of the stdin pipe (ChildOptions::stdin_pipe), blocking; -1 otherwise. Owned here;
  // closing it is the child's end of file.
  int stdin_fd() const { return stdin_fd_; }
  void close_stdin();

  // Sends `signal` to the child's process group; does nothing once it has been reaped.
  void send_signal(int signal);
  // Reaps the child if it has ended.
  std::optional<ExitStatus> try_wait();
  std::optional<ExitStatus> wait_for(std::chrono::milliseconds timeout);
  ExitStatus wait();
  // SIGTERM, then SIGKILL if it has not ended within `grace`.
  ExitStatus terminate(std::chrono::milliseconds grace);
  bool running() const { return !status_.has_value(); }

 private:
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  int stderr_fd_ = -1;
  int stdin_fd_ = -1;
  std::optional<ExitStatus> status_;
};

// Splits a byte stream into lines ('\n', a trailing '\r' dropped). A line longer than
// `max_line_bytes` is delivered in pieces so that a child writing without newlines cannot grow
// the buffer without bound.
class LineSplitter {
 public:
  explicit LineSplitter(size_t max_line_bytes = 64 * 1024) : max_line_bytes_(max_line_bytes) {}
  void feed(const char* data, size_t size, const std::function<void(const std::string&)>& on_line);
  // Delivers a last line that had no newline.
  void finish(const std::function<void(const std::string&)>& on_line);

 private:
  size_t max_line_bytes_;
  std::string pending_;
};

// Reads what is available on a non-blocking fd into `splitter`. Returns false at end of file (or
// on an error other than EAGAIN), after delivering any last partial line.
bool drain_lines(int fd, LineSplitter& splitter,
                 const std::function<void(const std::string&)>& on_line);

}  // namespace lomo
