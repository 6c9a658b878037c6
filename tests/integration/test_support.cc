#include "tests/integration/test_support.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "jobspec/job_spec.h"
#include "jobspec/proto/spec_proto.h"

namespace lomo::testing {

namespace fs = std::filesystem;

ScratchDir::ScratchDir(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern =
      std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/" + prefix + "-XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

ScratchDir::~ScratchDir() {
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    if (condition()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string read_file(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

ExitStatus run_program(const std::vector<std::string>& argv, std::string* output,
                       std::chrono::milliseconds timeout, const std::vector<std::string>& env) {
  ChildOptions options;
  options.argv = argv;
  options.env = env;
  options.stdout_mode = ChildOutput::kPipe;
  options.stderr_mode = ChildOutput::kPipe;
  ChildProcess child(options);
  LineSplitter out, err;
  std::string text;
  auto append = [&](const std::string& line) { text += line + "\n"; };
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (child.stdout_fd() >= 0 || child.stderr_fd() >= 0) {
    if (child.stdout_fd() >= 0 && !drain_lines(child.stdout_fd(), out, append))
      child.close_stdout();
    if (child.stderr_fd() >= 0 && !drain_lines(child.stderr_fd(), err, append))
      child.close_stderr();
    if (std::chrono::steady_clock::now() > deadline) {
      child.send_signal(SIGKILL);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const ExitStatus status = child.wait();
  if (output != nullptr) *output = text;
  return status;
}

std::unique_ptr<ChildProcess> start_program(const std::vector<std::string>& argv,
                                            const fs::path& log,
                                            const std::vector<std::string>& env) {
  ChildOptions options;
  options.argv = argv;
  options.env = env;
  options.stdout_mode = ChildOutput::kFile;
  options.stderr_mode = ChildOutput::kFile;
  options.output_file = log;
  options.parent_death_signal = SIGKILL;
  return std::make_unique<ChildProcess>(options);
}

std::optional<std::string> http_get(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::nullopt;
  timeval timeout{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    ::close(fd);
    return std::nullopt;
  }
  const std::string request =
      "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (::write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return std::nullopt;
  }
  std::string response;
  char buffer[8192];
  ssize_t n;
  while ((n = ::read(fd, buffer, sizeof(buffer))) > 0)
    response.append(buffer, static_cast<size_t>(n));
  ::close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || body == std::string::npos) return std::nullopt;
  if (response.find(" 200 ") == std::string::npos) return std::nullopt;
  return response.substr(body + 4);
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  const bool bound = fd >= 0 &&
                     ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
                     ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  if (fd >= 0) ::close(fd);
  // Port 0 would make a test's server listen somewhere its client does not look.
  if (!bound) throw std::runtime_error("free_port: no loopback port to bind");
  return ntohs(address.sin_port);
}

fs::path tiny_model(const fs::path& lomo_worker) {
  static std::mutex mutex;
  static std::unique_ptr<ScratchDir> dir;
  std::lock_guard lock(mutex);
  if (!dir) {
    dir = std::make_unique<ScratchDir>("lomo-tiny-model");
    std::string output;
    const ExitStatus status = run_program(
        {lomo_worker.string(), "init-model", (dir->path() / "model").string(), "--preset", "tiny"},
        &output);
    if (!status.success()) throw std::runtime_error("init-model failed: " + output);
  }
  return dir->path() / "model";
}

fs::path tiny_job_data(const fs::path& source_dir) {
  static std::mutex mutex;
  static std::map<fs::path, std::unique_ptr<ScratchDir>> snapshots;
  std::lock_guard lock(mutex);
  std::unique_ptr<ScratchDir>& dir = snapshots[source_dir];
  if (!dir) {
    auto copy = std::make_unique<ScratchDir>("lomo-tiny-data");
    for (const char* file : {"README.md", "worker/engine/llama_model.cc", "docs/ARCHITECTURE.md"}) {
      fs::create_directories((copy->path() / file).parent_path());
      fs::copy_file(source_dir / file, copy->path() / file);
    }
    dir = std::move(copy);
  }
  return dir->path();
}

std::string tiny_job_yaml(const fs::path& source_dir, const fs::path& model_dir, int steps,
                          int checkpoint_every, const std::vector<std::string>& overrides) {
  JobSpec spec = load_job_spec((source_dir / "examples" / "tiny-adalomo.yaml").string());
  const fs::path data = tiny_job_data(source_dir);
  std::vector<std::string> all{
      "model.path=" + model_dir.string(),
      "data.train=[" + (data / "README.md").string() + ", " +
          (data / "worker/engine/llama_model.cc").string() + "]",
      "data.eval=[" + (data / "docs/ARCHITECTURE.md").string() + "]",
      "training.steps=" + std::to_string(steps),
      "training.checkpoint_every=" + std::to_string(checkpoint_every),
      "training.eval_every=0",
      "training.log_every=5",
      "optimizer.warmup_steps=2",
      // No restarts unless a test asks for them: a test of a failure sees it end the job.
      "resources.max_restarts=0",
  };
  all.insert(all.end(), overrides.begin(), overrides.end());
  apply_job_spec_overrides(spec, all);
  return job_spec_to_yaml(spec);
}

google::protobuf::Struct tiny_job_struct(const fs::path& source_dir, const fs::path& model_dir,
                                         int steps, int checkpoint_every,
                                         const std::vector<std::string>& overrides) {
  return job_spec_to_struct(parse_job_spec(
      tiny_job_yaml(source_dir, model_dir, steps, checkpoint_every, overrides), "test job"));
}

}  // namespace lomo::testing
