#include "common/child_process.h"

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace lomo {
namespace {

std::string errno_text(int error) { return std::strerror(error); }

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

ExitStatus from_wait_status(int status) {
  ExitStatus result;
  if (WIFSIGNALED(status)) {
    result.signaled = true;
    result.signal = WTERMSIG(status);
  } else if (WIFEXITED(status)) {
    result.code = WEXITSTATUS(status);
  }
  return result;
}

// The environment for the child: the parent's, with `overrides` ("KEY=VALUE") replacing or
// adding entries. Built before fork(): between fork and exec only async-signal-safe calls.
std::vector<std::string> child_environment(const std::vector<std::string>& overrides) {
  std::vector<std::string> result;
  auto key_of = [](const std::string& entry) { return entry.substr(0, entry.find('=')); };
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    bool replaced = false;
    for (const std::string& o : overrides) replaced = replaced || key_of(o) == key_of(entry);
    if (!replaced) result.push_back(entry);
  }
  result.insert(result.end(), overrides.begin(), overrides.end());
  return result;
}

// Runs in the child between fork() and exec(): async-signal-safe calls only. Reports a failure
// through `error_fd` as an errno value and a step code, then _exit(127).
[[noreturn]] void child_fail(int error_fd, int step) {
  const int values[2] = {errno, step};
  ssize_t ignored = ::write(error_fd, values, sizeof(values));
  (void)ignored;
  ::_exit(127);
}

constexpr const char* kStepNames[] = {"set up the process group", "set the parent-death signal",
                                      "redirect output", "change directory", "start"};

}  // namespace

std::string signal_name(int signal) {
  switch (signal) {
    case SIGHUP:
      return "SIGHUP";
    case SIGINT:
      return "SIGINT";
    case SIGQUIT:
      return "SIGQUIT";
    case SIGILL:
      return "SIGILL";
    case SIGTRAP:
      return "SIGTRAP";
    case SIGABRT:
      return "SIGABRT";
    case SIGBUS:
      return "SIGBUS";
    case SIGFPE:
      return "SIGFPE";
    case SIGKILL:
      return "SIGKILL";
    case SIGUSR1:
      return "SIGUSR1";
    case SIGSEGV:
      return "SIGSEGV";
    case SIGUSR2:
      return "SIGUSR2";
    case SIGPIPE:
      return "SIGPIPE";
    case SIGALRM:
      return "SIGALRM";
    case SIGTERM:
      return "SIGTERM";
    case SIGXCPU:
      return "SIGXCPU";
    case SIGXFSZ:
      return "SIGXFSZ";
    default:
      return "signal " + std::to_string(signal);
  }
}

std::string ExitStatus::describe() const {
  if (signaled) return "killed by " + signal_name(signal);
  return "exited with code " + std::to_string(code);
}

ChildProcess::ChildProcess(const ChildOptions& options) {
  if (options.argv.empty()) throw std::invalid_argument("ChildProcess: empty argv");
  const std::string program = options.argv[0];

  std::vector<std::string> env_strings = child_environment(options.env);
  std::vector<char*> argv;
  for (const std::string& a : options.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  const std::string cwd = options.working_directory.string();

  int out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1}, in_pipe[2] = {-1, -1};
  int status_pipe[2] = {-1, -1};
  int file_fd = -1, null_fd = -1;
  auto cleanup = [&]() {
    for (int* fd : {&out_pipe[0], &out_pipe[1], &err_pipe[0], &err_pipe[1], &in_pipe[0],
                    &in_pipe[1], &status_pipe[0], &status_pipe[1], &file_fd, &null_fd}) {
      close_fd(*fd);
    }
  };
  auto fail = [&](const std::string& what) {
    const int error = errno;
    cleanup();
    throw std::runtime_error("cannot start " + program + ": " + what + ": " + errno_text(error));
  };
  if (options.stdout_mode == ChildOutput::kPipe && ::pipe2(out_pipe, O_CLOEXEC) != 0) fail("pipe");
  if (options.stderr_mode == ChildOutput::kPipe && ::pipe2(err_pipe, O_CLOEXEC) != 0) fail("pipe");
  if (options.stdin_pipe && ::pipe2(in_pipe, O_CLOEXEC) != 0) fail("pipe");
  if (::pipe2(status_pipe, O_CLOEXEC) != 0) fail("pipe");
  if (options.stdout_mode == ChildOutput::kFile || options.stderr_mode == ChildOutput::kFile) {
    file_fd = ::open(options.output_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (file_fd < 0) fail(options.output_file.string());
  }
  if (options.stdout_mode == ChildOutput::kDiscard ||
      options.stderr_mode == ChildOutput::kDiscard) {
    null_fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null_fd < 0) fail("/dev/null");
  }
  auto target_fd = [&](ChildOutput mode, int pipe_write) {
    switch (mode) {
      case ChildOutput::kPipe:
        return pipe_write;
      case ChildOutput::kFile:
        return file_fd;
      case ChildOutput::kDiscard:
        return null_fd;
      case ChildOutput::kInherit:
        break;
    }
    return -1;
  };
  const int stdout_target = target_fd(options.stdout_mode, out_pipe[1]);
  const int stderr_target = target_fd(options.stderr_mode, err_pipe[1]);
  const pid_t parent = ::getpid();
  const int death_signal = options.parent_death_signal;

  const pid_t pid = ::fork();
  if (pid < 0) fail("fork");
  if (pid == 0) {
    const int error_fd = status_pipe[1];
    if (::setpgid(0, 0) != 0) child_fail(error_fd, 0);
    if (death_signal != 0) {
      if (::prctl(PR_SET_PDEATHSIG, death_signal) != 0) child_fail(error_fd, 1);
      if (::getppid() != parent) ::_exit(127);  // the parent died before prctl took effect
    }
    // The parent may block signals for a signal-handling thread; the mask survives exec.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    if (stdout_target >= 0 && ::dup2(stdout_target, STDOUT_FILENO) < 0) child_fail(error_fd, 2);
    if (stderr_target >= 0 && ::dup2(stderr_target, STDERR_FILENO) < 0) child_fail(error_fd, 2);
    if (in_pipe[0] >= 0 && ::dup2(in_pipe[0], STDIN_FILENO) < 0) child_fail(error_fd, 2);
    if (!cwd.empty() && ::chdir(cwd.c_str()) != 0) child_fail(error_fd, 3);
    ::execvpe(argv[0], argv.data(), envp.data());
    child_fail(error_fd, 4);
  }

  pid_ = pid;
  // The parent also sets the group, so that a signal sent right after this constructor reaches
  // the child's group even if the child has not run yet.
  ::setpgid(pid, pid);
  close_fd(status_pipe[1]);
  close_fd(out_pipe[1]);
  close_fd(err_pipe[1]);
  close_fd(in_pipe[0]);
  close_fd(file_fd);
  close_fd(null_fd);

  int report[2] = {0, 0};
  ssize_t got;
  do {
    got = ::read(status_pipe[0], report, sizeof(report));
  } while (got < 0 && errno == EINTR);
  close_fd(status_pipe[0]);
  if (got == static_cast<ssize_t>(sizeof(report))) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid_ = -1;
    close_fd(out_pipe[0]);
    close_fd(err_pipe[0]);
    close_fd(in_pipe[1]);
    const int step = report[1] >= 0 && report[1] < 5 ? report[1] : 4;
    throw std::runtime_error("cannot start " + program + ": " + kStepNames[step] + ": " +
                             errno_text(report[0]));
  }
  stdout_fd_ = out_pipe[0];
  stderr_fd_ = err_pipe[0];
  stdin_fd_ = in_pipe[1];
  for (int fd : {stdout_fd_, stderr_fd_}) {
    if (fd >= 0) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  }
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !status_) {
    send_signal(SIGKILL);
    wait();
  }
  close_fd(stdout_fd_);
  close_fd(stderr_fd_);
  close_fd(stdin_fd_);
}

void ChildProcess::close_stdout() { close_fd(stdout_fd_); }
void ChildProcess::close_stderr() { close_fd(stderr_fd_); }
void ChildProcess::close_stdin() { close_fd(stdin_fd_); }

void ChildProcess::send_signal(int signal) {
  if (pid_ <= 0 || status_) return;
  if (::kill(-pid_, signal) != 0) ::kill(pid_, signal);
}

std::optional<ExitStatus> ChildProcess::try_wait() {
  if (status_ || pid_ <= 0) return status_;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    status_ = from_wait_status(status);
  } else if (r < 0 && errno == ECHILD) {
    status_ = ExitStatus{};  // reaped elsewhere: nothing more can be known
  }
  return status_;
}

std::optional<ExitStatus> ChildProcess::wait_for(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    if (auto s = try_wait()) return s;
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

ExitStatus ChildProcess::wait() {
  while (!status_ && pid_ > 0) {
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, 0);
    if (r == pid_) {
      status_ = from_wait_status(status);
    } else if (r < 0 && errno != EINTR) {
      status_ = ExitStatus{};
    }
  }
  return status_.value_or(ExitStatus{});
}

ExitStatus ChildProcess::terminate(std::chrono::milliseconds grace) {
  send_signal(SIGTERM);
  if (auto s = wait_for(grace)) return *s;
  send_signal(SIGKILL);
  return wait();
}

void LineSplitter::feed(const char* data, size_t size,
                        const std::function<void(const std::string&)>& on_line) {
  for (size_t i = 0; i < size; ++i) {
    const char c = data[i];
    if (c == '\n') {
      if (!pending_.empty() && pending_.back() == '\r') pending_.pop_back();
      on_line(pending_);
      pending_.clear();
      continue;
    }
    pending_.push_back(c);
    if (pending_.size() >= max_line_bytes_) {
      on_line(pending_);
      pending_.clear();
    }
  }
}

void LineSplitter::finish(const std::function<void(const std::string&)>& on_line) {
  if (!pending_.empty()) on_line(pending_);
  pending_.clear();
}

bool drain_lines(int fd, LineSplitter& splitter,
                 const std::function<void(const std::string&)>& on_line) {
  char buffer[16384];
  while (true) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n > 0) {
      splitter.feed(buffer, static_cast<size_t>(n), on_line);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    splitter.finish(on_line);
    return false;
  }
}

}  // namespace lomo
