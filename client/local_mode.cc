#include "client/local_mode.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
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
#include "common/bearer_token.h"
#include "common/checkpoint_layout.h"
#include "common/child_process.h"
#include "common/flags.h"
#include "common/read_file.h"
#include "common/sha256.h"
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
  std::string text;
  try {
    text = read_file(ready_file);
  } catch (const FileReadError&) {
    return std::nullopt;
  }
  const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!json.is_object() || !json.contains("grpc") || !json["grpc"].is_string()) return std::nullopt;
  return json["grpc"].get<std::string>();
}

LocalGangPlan plan_local_gang(const std::optional<std::string>& workers_flag,
                              int64_t spec_world_size) {
  LocalGangPlan plan;
  if (!workers_flag) {
    if (spec_world_size > kMaxLocalWorkers) {
      throw UsageError("lomoctl local: the spec's resources.world_size " +
                       std::to_string(spec_world_size) + " is more than the " +
                       std::to_string(kMaxLocalWorkers) + " workers local mode starts");
    }
    plan.workers = static_cast<int>(spec_world_size);
    return plan;
  }
  int64_t workers = 0;
  try {
    workers = flag_int("--workers", *workers_flag);
  } catch (const FlagError& e) {
    throw UsageError(std::string("lomoctl local: ") + e.what());
  }
  if (workers < 1 || workers > kMaxLocalWorkers) {
    throw UsageError("lomoctl local: --workers " + *workers_flag + ": expected 1 to " +
                     std::to_string(kMaxLocalWorkers) +
                     " (each worker holds a full copy of the model)");
  }
  if (spec_world_size != 1 && spec_world_size != workers) {
    throw UsageError("lomoctl local: --workers " + std::to_string(workers) +
                     " differs from the spec's resources.world_size " +
                     std::to_string(spec_world_size) + "; drop --workers, or --set " +
                     "resources.world_size=" + std::to_string(workers) + " to change it");
  }
  plan.workers = static_cast<int>(workers);
  if (spec_world_size != workers) {
    plan.overrides.push_back("resources.world_size=" + std::to_string(workers));
  }
  return plan;
}

std::optional<int> threads_per_local_worker(int workers, unsigned hardware_threads,
                                            const char* omp_num_threads_env) {
  if (omp_num_threads_env != nullptr && *omp_num_threads_env != '\0') return std::nullopt;
  if (workers <= 1) return std::nullopt;
  return std::max(1, static_cast<int>(hardware_threads) / workers);
}

std::vector<LocalWorkerLayout> local_worker_layouts(const fs::path& state_dir, int workers) {
  if (workers == 1) {
    return {{"local-cpu", state_dir / "worker", state_dir / "worker.log"}};
  }
  std::vector<LocalWorkerLayout> layouts;
  for (int i = 0; i < workers; ++i) {
    const std::string n = std::to_string(i);
    layouts.push_back(
        {"local-cpu-" + n, state_dir / ("worker-" + n), state_dir / ("worker-" + n + ".log")});
  }
  return layouts;
}

namespace {

// The files of a local run under its state directory.
struct LocalFiles {
  LocalFiles(const fs::path& state, int workers)
      : state_dir(state),
        coordinator_log(state / "coordinator.log"),
        ready_file(state / "coordinator.ready"),
        coordinator_data(state / "coordinator"),
        tokens_file(state / "tokens.yaml"),
        worker_token_file(state / "worker.token"),
        admin_token_file(state / "admin.token"),
        workers(local_worker_layouts(state, workers)) {}
  fs::path state_dir, coordinator_log, ready_file, coordinator_data;
  // Local mode authenticates like any deployment: fresh tokens every run (write_local_tokens).
  fs::path tokens_file, worker_token_file, admin_token_file;
  std::vector<LocalWorkerLayout> workers;

  // "worker.log", or "worker-0.log .. worker-3.log": for messages.
  std::string worker_log_names() const {
    std::string first = workers.front().log.filename().string();
    if (workers.size() == 1) return first;
    return first + " .. " + workers.back().log.filename().string();
  }
  // Every log, for a message after a failure.
  std::string all_logs() const {
    std::string text;
    for (const auto& w : workers) text += w.log.string() + ", ";
    return text + coordinator_log.string();
  }
};

// The two programs a local run starts.
struct LocalPrograms {
  fs::path coordinator;
  fs::path worker;
};

// Found before anything starts: a missing program fails at once.
LocalPrograms find_local_programs(const ParsedArgs& args) {
  std::error_code error;
  const fs::path self_dir = fs::read_symlink("/proc/self/exe", error).parent_path();
  LocalPrograms programs;
  programs.coordinator = find_program(
      "lomo-coordinator", args.value("--coordinator-bin"), "LOMO_COORDINATOR_BIN",
      {self_dir / "lomo-coordinator", self_dir / ".." / "server" / "lomo-coordinator"});
  programs.worker =
      find_program("lomo-worker", args.value("--worker-bin"), "LOMO_WORKER_BIN",
                   {self_dir / "lomo-worker", self_dir / ".." / "worker" / "lomo-worker"});
  return programs;
}

// The settings of a local run beyond its files: how many workers, and their OpenMP threads.
struct LocalSettings {
  int workers = 1;
  std::optional<int> threads_per_worker;  // nullopt: OMP_NUM_THREADS left as it is
};

// The coordinator and the workers as child processes, one job submitted and watched to its end.
// Ctrl-C: the first cancels the job (the workers stop it and report), the second stops everything
// at once.
class LocalRun {
 public:
  LocalRun(CommandContext& context, const ParsedArgs& args, LocalPrograms programs,
           LocalFiles files, LocalSettings settings)
      : context_(context),
        args_(args),
        programs_(std::move(programs)),
        files_(std::move(files)),
        settings_(settings),
        // Set up before any gRPC thread exists, so that every thread inherits the signal mask.
        signals_([this](int, int count) { on_stop_signal(count); }) {}

  int run(const lomo::v1::SubmitJobRequest& spec, const std::string& name) {
    try {
      start_coordinator();
      const std::string address = wait_until_ready();
      start_workers(address);
      connect(address);
      const lomo::v1::Job job = submit_and_watch(spec, name);
      return finish(job);
    } catch (...) {
      stop_after_error();
      throw;
    }
  }

 private:
  void on_stop_signal(int count) {
    interrupts_ = count;
    std::lock_guard lock(mutex_);
    if (count == 1 && client_ && !job_id_.empty()) {
      std::cerr << "\nlomoctl local: cancelling job " << job_id_
                << " (Ctrl-C again to stop at once)\n";
      try {
        client_->cancel_job(job_id_);
      } catch (const std::exception& e) {
        std::cerr << "lomoctl local: " << e.what() << "\n";
        client_->cancel_streams();
      }
    } else if (client_) {
      client_->cancel_streams();
    }
  }

  // An admin token for this lomoctl and a worker token for the local workers, each written 0600
  // (admin.token lets `lomoctl --token-file` reach the local coordinator while it runs).
  void write_local_tokens() {
    admin_token_ = new_token();
    const std::string worker_token = new_token();
    write_private_file(files_.admin_token_file, admin_token_ + "\n");
    write_private_file(files_.worker_token_file, worker_token + "\n");
    write_private_file(files_.tokens_file,
                       "tokens:\n"
                       "  - name: local-admin\n"
                       "    role: admin\n"
                       "    sha256: " +
                           sha256_hex(admin_token_) +
                           "\n"
                           "  - name: local-workers\n"
                           "    role: worker\n"
                           "    sha256: " +
                           sha256_hex(worker_token) +
                           "\n"
                           "    worker_ids: [\"local-*\"]\n");
  }

  void start_coordinator() {
    write_local_tokens();
    ChildOptions c;
    // --init: local mode owns its state dir, and a new one starts with an empty store.
    c.argv = {programs_.coordinator.string(),
              "--data-dir",
              files_.coordinator_data.string(),
              "--grpc-listen",
              "127.0.0.1:0",
              "--http-listen",
              "127.0.0.1:0",
              "--ready-file",
              files_.ready_file.string(),
              "--tokens-file",
              files_.tokens_file.string(),
              "--init"};
    c.stdout_mode = c.stderr_mode = ChildOutput::kFile;
    c.output_file = files_.coordinator_log;
    coordinator_ = std::make_unique<ChildProcess>(c);
  }

  // The coordinator's gRPC address once it has written its ready file.
  std::string wait_until_ready() {
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (true) {
      if (auto address = read_ready_address(files_.ready_file)) return *address;
      if (auto status = coordinator_->try_wait()) {
        throw std::runtime_error("lomo-coordinator " + status->describe() +
                                 " while starting; the end of " + files_.coordinator_log.string() +
                                 ":\n" + last_lines(files_.coordinator_log, 15));
      }
      if (interrupts_ > 0) throw Interrupted("interrupted while starting");
      if (Clock::now() > deadline) {
        throw std::runtime_error("lomo-coordinator did not become ready within 30s; see " +
                                 files_.coordinator_log.string());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  void start_workers(const std::string& address) {
    for (const LocalWorkerLayout& layout : files_.workers) {
      ChildOptions w;
      w.argv = {programs_.worker.string(),
                "serve",
                "--coordinator",
                address,
                "--device",
                "cpu",
                "--work-dir",
                layout.work_dir.string(),
                "--worker-id",
                layout.id,
                "--token-file",
                files_.worker_token_file.string()};
      if (settings_.threads_per_worker) {
        // The daemon's training child inherits it.
        w.env = {"OMP_NUM_THREADS=" + std::to_string(*settings_.threads_per_worker)};
      }
      w.stdout_mode = w.stderr_mode = ChildOutput::kFile;
      w.output_file = layout.log;
      workers_.push_back(std::make_unique<ChildProcess>(w));
      ended_reported_.push_back(false);
    }
    if (context_.json) return;
    std::cout << "local mode: coordinator at " << address << ", " << workers_text() << "; state in "
              << files_.state_dir.string() << " (logs: coordinator.log, "
              << files_.worker_log_names() << ")\n";
  }

  // "one CPU worker", "2 CPU workers (local-cpu-0 .. local-cpu-1, 8 OpenMP threads each)".
  std::string workers_text() const {
    if (settings_.workers == 1) return "one CPU worker";
    std::string text = std::to_string(settings_.workers) + " CPU workers (" +
                       files_.workers.front().id + " .. " + files_.workers.back().id;
    if (settings_.threads_per_worker) {
      text += ", " + std::to_string(*settings_.threads_per_worker) + " OpenMP thread" +
              (*settings_.threads_per_worker == 1 ? "" : "s") + " each";
    }
    return text + ")";
  }

  void connect(const std::string& address) {
    ClientOptions options;
    options.address = address;
    options.security.token = admin_token_;
    options.timeout =
        std::chrono::milliseconds(static_cast<int64_t>(context_.config.timeout_seconds * 1000));
    std::lock_guard lock(mutex_);
    client_ = std::make_unique<Client>(options);
  }

  lomo::v1::Job submit_and_watch(const lomo::v1::SubmitJobRequest& spec, const std::string& name) {
    if (interrupts_ > 0) throw Interrupted("interrupted while starting");
    const lomo::v1::Job submitted = client_->submit_job(spec);
    {
      std::lock_guard lock(mutex_);
      job_id_ = submitted.id();
    }
    if (!context_.json) {
      std::cout << "submitted job " << submitted.id() << (name.empty() ? "" : " (" + name + ")")
                << "\n"
                << std::flush;
    }
    // Stopped and joined on every way out of this function, before anything else touches the
    // worker processes.
    const std::jthread monitor([this](const std::stop_token& stop) { watch_workers(stop); });
    try {
      return watch_job_to_end(*client_, submitted.id(), watch_options_for(context_), std::cout);
    } catch (const ClientError& e) {
      if (e.code() == grpc::StatusCode::CANCELLED && interrupts_ > 0) {
        throw Interrupted("stopped at once (second Ctrl-C); the coordinator and workers are gone");
      }
      throw;
    }
  }

  // While the job is watched: a worker that ends (a crash, a refused flag) is said at once, with
  // the end of its log. Local mode has no other worker to take its place, so a job still QUEUED
  // could never get its gang: it is cancelled rather than left waiting forever. A running job is
  // failed by the coordinator when the worker's heartbeats stop.
  void watch_workers(const std::stop_token& stop) {
    while (!stop.stop_requested()) {
      for (size_t i = 0; i < workers_.size(); ++i) {
        if (ended_reported_[i]) continue;
        const std::optional<ExitStatus> ended = workers_[i]->try_wait();
        if (!ended) continue;
        ended_reported_[i] = true;
        const LocalWorkerLayout& layout = files_.workers[i];
        std::cerr << "\nlomoctl local: lomo-worker " << layout.id << " " << ended->describe()
                  << " during the job; the end of " << layout.log.string() << ":\n"
                  << last_lines(layout.log, 15);
        cancel_if_queued();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }

  void cancel_if_queued() {
    std::lock_guard lock(mutex_);
    if (!client_ || job_id_.empty()) return;
    try {
      if (client_->get_job(job_id_).state() != lomo::v1::JOB_STATE_QUEUED) return;
      std::cerr << "lomoctl local: cancelling job " << job_id_
                << ", which can no longer get its workers\n";
      client_->cancel_job(job_id_);
    } catch (const std::exception& e) {
      std::cerr << "lomoctl local: " << e.what() << "\n";
    }
  }

  // After the job's end: its checkpoint downloaded (if it succeeded), the processes stopped.
  int finish(const lomo::v1::Job& job) {
    for (size_t i = 0; i < workers_.size(); ++i) {
      if (!ended_reported_[i] && workers_[i]->try_wait()) {
        const fs::path& log = files_.workers[i].log;
        std::cerr << "lomoctl local: lomo-worker " << files_.workers[i].id
                  << " ended during the job; the end of " << log.string() << ":\n"
                  << last_lines(log, 15);
      }
    }
    if (job.state() == lomo::v1::JOB_STATE_SUCCEEDED) {
      if (!download_newest_checkpoint(job)) {
        std::cerr << "lomoctl local: the job succeeded but has no committed checkpoint\n";
        stop_all();
        return kExitError;
      }
    } else if (!context_.json) {
      std::cout << "logs: " << files_.all_logs() << "\n";
    }
    print_training_files(job);
    {
      std::lock_guard lock(mutex_);
      client_.reset();  // before the coordinator goes: no call of ours may wait on it
    }
    stop_all();
    return exit_code_for(job.state());
  }

  // False when the job has no committed checkpoint.
  bool download_newest_checkpoint(const lomo::v1::Job& job) {
    const auto checkpoints = client_->list_checkpoints(job.id());
    if (checkpoints.empty()) return false;
    const auto& newest =
        *std::max_element(checkpoints.begin(), checkpoints.end(),
                          [](const auto& a, const auto& b) { return a.step() < b.step(); });
    const fs::path out =
        args_.value("--out").value_or((files_.state_dir / "checkpoints" / job.id()).string());
    const DownloadResult result = client_->download_checkpoint(
        newest.checkpoint_id(), out, {newest.files().begin(), newest.files().end()});
    if (context_.json) {
      lomo::v1::CheckpointInfo info = newest;
      std::cout << message_to_json(info, false) << "\n";
    } else {
      std::cout << "checkpoint " << newest.checkpoint_id() << " (" << result.files.size()
                << " files, " << format_bytes(result.bytes) << ", SHA-256 verified) in "
                << out.string() << "\n";
    }
    return true;
  }

  // Where rank 0's worker (Job.worker_id) trained: metrics.jsonl and every checkpoint of the
  // attempt. The other ranks write neither.
  void print_training_files(const lomo::v1::Job& job) const {
    const LocalWorkerLayout* rank0 = &files_.workers.front();
    for (const LocalWorkerLayout& layout : files_.workers) {
      if (layout.id == job.worker_id()) rank0 = &layout;
    }
    const fs::path out =
        attempt_output_directory(attempt_directory(rank0->work_dir, job.id(), job.attempt()));
    if (!context_.json && fs::exists(out / "metrics.jsonl")) {
      std::cout << "training files (metrics.jsonl, checkpoints): " << out.string() << "\n";
    }
  }

  void stop_after_error() {
    {
      std::lock_guard lock(mutex_);
      if (client_) client_->cancel_streams();
    }
    // A second Ctrl-C means now; otherwise the workers get their graceful stop.
    if (interrupts_ >= 2) {
      for (auto& worker : workers_) worker->send_signal(SIGKILL);
      if (coordinator_) coordinator_->send_signal(SIGKILL);
    }
    const bool started = coordinator_ != nullptr;
    stop_all();
    {
      std::lock_guard lock(mutex_);
      client_.reset();
    }
    if (started) std::cerr << "lomoctl local: logs: " << files_.all_logs() << "\n";
  }

  // The workers first (all at once: each may be finishing a checkpoint), then the coordinator.
  void stop_all() {
    stop_workers(std::chrono::seconds(30));
    stop_child(coordinator_, "lomo-coordinator", std::chrono::seconds(15));
  }

  // SIGTERM to every worker, then SIGKILL to those still running after `grace`.
  void stop_workers(std::chrono::milliseconds grace) {
    for (auto& worker : workers_) worker->send_signal(SIGTERM);
    const auto deadline = Clock::now() + grace;
    for (size_t i = 0; i < workers_.size(); ++i) {
      const auto left =
          std::max(std::chrono::milliseconds(0),
                   std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
      if (!workers_[i]->wait_for(left)) {
        std::cerr << "lomoctl local: lomo-worker " << files_.workers[i].id
                  << " did not stop within " << grace.count() / 1000 << "s and was killed\n";
      }
    }
    workers_.clear();  // a worker still running is killed and reaped here
  }

  CommandContext& context_;
  const ParsedArgs& args_;
  const LocalPrograms programs_;
  const LocalFiles files_;
  const LocalSettings settings_;
  // Shared with the signal watcher's thread (declared before it: they outlive it).
  std::mutex mutex_;
  std::string job_id_;
  std::atomic<int> interrupts_{0};
  std::unique_ptr<Client> client_;
  StopSignalWatcher signals_;
  std::string admin_token_;
  std::unique_ptr<ChildProcess> coordinator_;
  std::vector<std::unique_ptr<ChildProcess>> workers_;  // in the order of files_.workers
  // A worker's end was already told (by watch_workers, while the job was watched).
  std::vector<bool> ended_reported_;
};

// A fresh state directory: logs and the ready file of an earlier run would mislead.
LocalFiles prepare_state_directory(const fs::path& state_dir, int workers) {
  LocalFiles files(state_dir, workers);
  fs::create_directories(state_dir);
  fs::remove(files.ready_file);
  fs::remove(files.coordinator_log);
  for (const LocalWorkerLayout& worker : files.workers) fs::remove(worker.log);
  return files;
}

}  // namespace

int local_command(CommandContext& context) {
  const ParsedArgs args = parse_args(
      context.args, "local",
      {"--set", "--state-dir", "--out", "--coordinator-bin", "--worker-bin", "--workers"}, {});
  if (args.positional.size() != 1) throw UsageError("lomoctl local needs a job file (JOB.yaml)");
  std::string name;
  int64_t world_size = 1;
  // Validated here, before anything starts: a bad spec fails in a second with the field's path.
  lomo::v1::SubmitJobRequest spec =
      load_submit_request(args.positional[0], args.all("--set"), &name, &world_size);
  const LocalGangPlan plan = plan_local_gang(args.value("--workers"), world_size);
  if (!plan.overrides.empty()) {
    // Validated again with the world size: training.batch_size must divide by it.
    std::vector<std::string> overrides = args.all("--set");
    overrides.insert(overrides.end(), plan.overrides.begin(), plan.overrides.end());
    spec = load_submit_request(args.positional[0], overrides, &name);
  }
  const LocalSettings settings{
      .workers = plan.workers,
      .threads_per_worker = threads_per_local_worker(
          plan.workers, std::thread::hardware_concurrency(), std::getenv("OMP_NUM_THREADS"))};
  const fs::path state_dir = fs::absolute(args.value("--state-dir").value_or("out/local"));
  LocalPrograms programs = find_local_programs(args);
  LocalRun run(context, args, std::move(programs), prepare_state_directory(state_dir, plan.workers),
               settings);
  return run.run(spec, name);
}

}  // namespace lomo::client
