#include "client/local_mode.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "client/commands.h"
#include "client/render.h"
#include "client/watch.h"
#include "common/child_process.h"
#include "common/stop_signals.h"

namespace lomo::client {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

bool is_executable(const fs::path& path) {
  return fs::is_regular_file(path) && ::access(path.c_str(), X_OK) == 0;
}

std::string last_lines(const fs::path& file, size_t count) {
  std::ifstream in(file);
  std::deque<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    lines.push_back(line);
    if (lines.size() > count) lines.pop_front();
  }
  std::string text;
  for (const auto& l : lines) text += "  " + l + "\n";
  return text;
}

// Stops a child: SIGTERM, then SIGKILL after `grace`. Says what happened if it was not clean.
void stop_child(std::unique_ptr<ChildProcess>& child, const std::string& name,
                std::chrono::milliseconds grace) {
  if (!child) return;
  if (child->running()) {
    const ExitStatus status = child->terminate(grace);
    if (status.signaled && status.signal == SIGKILL) {
      std::cerr << "lomoctl local: " << name << " did not stop within " << grace.count() / 1000
                << "s and was killed\n";
    }
  }
  child.reset();
}

}  // namespace

fs::path find_program(const std::string& name, const std::optional<std::string>& flag,
                      const char* env_var, const std::vector<fs::path>& candidates) {
  if (flag) {
    if (!is_executable(*flag)) throw std::runtime_error(*flag + " is not an executable file");
    return *flag;
  }
  if (const char* env = std::getenv(env_var); env != nullptr && *env != '\0') {
    if (!is_executable(env)) {
      throw std::runtime_error(std::string(env_var) + "=" + env + " is not an executable file");
    }
    return env;
  }
  std::string looked;
  for (const fs::path& candidate : candidates) {
    if (is_executable(candidate)) return fs::weakly_canonical(candidate);
    looked += " " + candidate.string() + ",";
  }
  if (const char* path = std::getenv("PATH")) {
    std::istringstream dirs(path);
    std::string dir;
    while (std::getline(dirs, dir, ':')) {
      if (!dir.empty() && is_executable(fs::path(dir) / name)) return fs::path(dir) / name;
    }
  }
  throw std::runtime_error("cannot find " + name + " (looked at" + looked +
                           " and in PATH); build it, or name it with $" + env_var);
}

std::optional<std::string> read_ready_address(const fs::path& ready_file) {
  std::ifstream in(ready_file);
  if (!in) return std::nullopt;
  std::stringstream text;
  text << in.rdbuf();
  const auto json = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (!json.is_object() || !json.contains("grpc") || !json["grpc"].is_string()) return std::nullopt;
  return json["grpc"].get<std::string>();
}

int local_command(CommandContext& context) {
  const ParsedArgs args =
      parse_args(context.args, "local",
                 {"--set", "--state-dir", "--out", "--coordinator-bin", "--worker-bin"}, {});
  if (args.positional.size() != 1) throw UsageError("lomoctl local needs a job file (JOB.yaml)");
  std::string name;
  // Validated here, before anything starts: a bad spec fails in a second with the field's path.
  const google::protobuf::Struct spec =
      load_spec_struct(args.positional[0], args.all("--set"), &name);

  const fs::path state_dir = fs::absolute(args.value("--state-dir").value_or("out/local"));
  std::error_code error;
  const fs::path self_dir = fs::read_symlink("/proc/self/exe", error).parent_path();
  const fs::path coordinator_bin = find_program(
      "lomo-coordinator", args.value("--coordinator-bin"), "LOMO_COORDINATOR_BIN",
      {self_dir / "lomo-coordinator", self_dir / ".." / "server" / "lomo-coordinator"});
  const fs::path worker_bin =
      find_program("lomo-worker", args.value("--worker-bin"), "LOMO_WORKER_BIN",
                   {self_dir / "lomo-worker", self_dir / ".." / "worker" / "lomo-worker"});
  fs::create_directories(state_dir);
  const fs::path coordinator_log = state_dir / "coordinator.log";
  const fs::path worker_log = state_dir / "worker.log";
  const fs::path ready_file = state_dir / "coordinator.ready";
  fs::remove(ready_file);
  fs::remove(coordinator_log);
  fs::remove(worker_log);

  // Ctrl-C: the first cancels the job (the worker stops it and reports), the second stops
  // everything at once. Set up before any gRPC thread exists.
  std::mutex mutex;
  std::string job_id;
  std::atomic<int> interrupts{0};
  std::unique_ptr<Client> client;
  StopSignalWatcher signals([&](int, int count) {
    interrupts = count;
    std::lock_guard lock(mutex);
    if (count == 1 && client && !job_id.empty()) {
      std::cerr << "\nlomoctl local: cancelling job " << job_id
                << " (Ctrl-C again to stop at once)\n";
      try {
        client->cancel_job(job_id);
      } catch (const std::exception& e) {
        std::cerr << "lomoctl local: " << e.what() << "\n";
        client->cancel_streams();
      }
    } else if (client) {
      client->cancel_streams();
    }
  });

  std::unique_ptr<ChildProcess> coordinator;
  std::unique_ptr<ChildProcess> worker;
  auto stop_all = [&] {
    stop_child(worker, "lomo-worker", std::chrono::seconds(30));
    stop_child(coordinator, "lomo-coordinator", std::chrono::seconds(15));
  };
  try {
    ChildOptions c;
    c.argv = {coordinator_bin.string(),
              "--data-dir",
              (state_dir / "coordinator").string(),
              "--grpc-listen",
              "127.0.0.1:0",
              "--http-listen",
              "127.0.0.1:0",
              "--ready-file",
              ready_file.string()};
    c.stdout_mode = c.stderr_mode = ChildOutput::kFile;
    c.output_file = coordinator_log;
    coordinator = std::make_unique<ChildProcess>(c);

    std::optional<std::string> address;
    const auto ready_deadline = Clock::now() + std::chrono::seconds(30);
    while (!(address = read_ready_address(ready_file))) {
      if (auto status = coordinator->try_wait()) {
        throw std::runtime_error("lomo-coordinator " + status->describe() +
                                 " while starting; the end of " + coordinator_log.string() + ":\n" +
                                 last_lines(coordinator_log, 15));
      }
      if (Clock::now() > ready_deadline || interrupts > 0) {
        if (interrupts > 0) throw Interrupted("interrupted while starting");
        throw std::runtime_error("lomo-coordinator did not become ready within 30s; see " +
                                 coordinator_log.string());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }

    ChildOptions w;
    w.argv = {worker_bin.string(), "serve",    "--coordinator", *address,
              "--device",          "cpu",      "--work-dir",    (state_dir / "worker").string(),
              "--worker-id",       "local-cpu"};
    w.stdout_mode = w.stderr_mode = ChildOutput::kFile;
    w.output_file = worker_log;
    worker = std::make_unique<ChildProcess>(w);
    if (!context.json) {
      std::cout << "local mode: coordinator at " << *address << ", one CPU worker; state in "
                << state_dir.string() << " (logs: coordinator.log, worker.log)\n";
    }

    ClientOptions options;
    options.address = *address;
    options.timeout =
        std::chrono::milliseconds(static_cast<int64_t>(context.config.timeout_seconds * 1000));
    {
      std::lock_guard lock(mutex);
      client = std::make_unique<Client>(options);
    }
    if (interrupts > 0) throw Interrupted("interrupted while starting");
    const lomo::v1::Job submitted = client->submit_job(spec);
    {
      std::lock_guard lock(mutex);
      job_id = submitted.id();
    }
    if (!context.json) {
      std::cout << "submitted job " << submitted.id() << (name.empty() ? "" : " (" + name + ")")
                << "\n"
                << std::flush;
    }
    lomo::v1::Job job;
    try {
      job = watch_job_to_end(*client, submitted.id(), watch_options_for(context), std::cout);
    } catch (const ClientError& e) {
      if (e.code() == grpc::StatusCode::CANCELLED && interrupts > 0) {
        throw Interrupted("stopped at once (second Ctrl-C); the coordinator and worker are gone");
      }
      throw;
    }
    if (worker->try_wait()) {
      std::cerr << "lomoctl local: lomo-worker ended during the job; the end of "
                << worker_log.string() << ":\n"
                << last_lines(worker_log, 15);
    }

    if (job.state() == lomo::v1::JOB_STATE_SUCCEEDED) {
      const auto checkpoints = client->list_checkpoints(job.id());
      if (checkpoints.empty()) {
        std::cerr << "lomoctl local: the job succeeded but has no committed checkpoint\n";
        stop_all();
        return kExitError;
      }
      const auto& newest =
          *std::max_element(checkpoints.begin(), checkpoints.end(),
                            [](const auto& a, const auto& b) { return a.step() < b.step(); });
      const fs::path out =
          args.value("--out").value_or((state_dir / "checkpoints" / job.id()).string());
      const DownloadResult result = client->download_checkpoint(
          newest.checkpoint_id(), out, {newest.files().begin(), newest.files().end()});
      if (context.json) {
        lomo::v1::CheckpointInfo info = newest;
        std::cout << message_to_json(info, false) << "\n";
      } else {
        std::cout << "checkpoint " << newest.checkpoint_id() << " (" << result.files.size()
                  << " files, " << format_bytes(result.bytes) << ", SHA-256 verified) in "
                  << out.string() << "\n";
      }
    } else if (!context.json) {
      std::cout << "logs: " << worker_log.string() << ", " << coordinator_log.string() << "\n";
    }
    // Where the worker trained: metrics.jsonl and every checkpoint of the attempt.
    const fs::path attempt_out = state_dir / "worker" / "jobs" / job.id() /
                                 ("attempt-" + std::to_string(job.attempt())) / "out";
    if (!context.json && fs::exists(attempt_out / "metrics.jsonl")) {
      std::cout << "training files (metrics.jsonl, checkpoints): " << attempt_out.string() << "\n";
    }
    {
      std::lock_guard lock(mutex);
      client.reset();  // before the coordinator goes: no call of ours may wait on it
    }
    stop_all();
    return exit_code_for(job.state());
  } catch (...) {
    {
      std::lock_guard lock(mutex);
      if (client) client->cancel_streams();
    }
    // A second Ctrl-C means now; otherwise the worker gets its graceful stop.
    if (interrupts >= 2) {
      if (worker) worker->send_signal(SIGKILL);
      if (coordinator) coordinator->send_signal(SIGKILL);
    }
    const bool started = coordinator != nullptr;
    stop_all();
    {
      std::lock_guard lock(mutex);
      client.reset();
    }
    if (started) {
      std::cerr << "lomoctl local: logs: " << worker_log.string() << ", "
                << coordinator_log.string() << "\n";
    }
    throw;
  }
}

}  // namespace lomo::client
