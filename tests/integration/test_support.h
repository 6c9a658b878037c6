// Helpers for tests that run lomo's programs as real processes on loopback: scratch directories,
// bounded waits, log files, a minimal HTTP GET, the tiny model, and job specs for it.
#pragma once

#include <google/protobuf/struct.pb.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/child_process.h"

namespace lomo::testing {

// A fresh directory under $TMPDIR (or /tmp), removed by the destructor.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& prefix);
  ~ScratchDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Polls `condition` every 20 ms until it holds (true) or `timeout` passes (false). nodiscard: a
// wait whose outcome nobody checks lets a test pass on a timeout.
[[nodiscard]] bool wait_until(const std::function<bool()>& condition,
                              std::chrono::milliseconds timeout);

std::string read_file(const std::filesystem::path& file);

// Runs a program to its end (at most `timeout`, then SIGKILL) and returns its status, with its
// stdout and stderr together in `*output`.
ExitStatus run_program(const std::vector<std::string>& argv, std::string* output,
                       std::chrono::milliseconds timeout = std::chrono::seconds(60),
                       const std::vector<std::string>& env = {});

// Starts a long-running program with stdout and stderr appended to `log`.
std::unique_ptr<ChildProcess> start_program(const std::vector<std::string>& argv,
                                            const std::filesystem::path& log,
                                            const std::vector<std::string>& env = {});

// The body of GET http://127.0.0.1:<port><path>, or nullopt if the request fails.
std::optional<std::string> http_get(int port, const std::string& path);

// A TCP port that was free a moment ago on 127.0.0.1.
int free_port();

// The tiny model (lomo-worker init-model --preset tiny) in a directory shared by the tests of
// one process; created on first use.
std::filesystem::path tiny_model(const std::filesystem::path& lomo_worker);

// A copy of the tiny jobs' data files of `source_dir` (README.md, worker/engine/llama_model.cc,
// docs/ARCHITECTURE.md under the same relative paths), taken on first use and shared by the tests
// of one process. Every attempt of a job must read the same bytes: a resume refuses data that
// changed since its checkpoint, and the source tree may be edited while the tests run.
std::filesystem::path tiny_job_data(const std::filesystem::path& source_dir);

// The tiny AdaLomo example (examples/tiny-adalomo.yaml) on `model_dir`, with absolute paths to
// tiny_job_data (the worker's working directory is not the source tree), `steps` steps, a
// checkpoint every `checkpoint_every`, plus `overrides`.
std::string tiny_job_yaml(const std::filesystem::path& source_dir,
                          const std::filesystem::path& model_dir, int steps, int checkpoint_every,
                          const std::vector<std::string>& overrides = {});
google::protobuf::Struct tiny_job_struct(const std::filesystem::path& source_dir,
                                         const std::filesystem::path& model_dir, int steps,
                                         int checkpoint_every,
                                         const std::vector<std::string>& overrides = {});

}  // namespace lomo::testing
