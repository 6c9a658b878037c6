// Load on a real lomo-coordinator over loopback: many simulated workers heartbeating on real gRPC
// streams (many streams over a few channels), a burst of job submissions with GetJob calls mixed
// in, and simulated workers running every job to completion. Reports the coordinator's CPU (from
// /proc/<pid>/stat), its peak RSS, and SubmitJob / GetJob latency percentiles.
//
//   build-server/bench/coordinator_load [--workers 1000] [--jobs 10000] [--channels 8]
//       [--clients 8] [--job-seconds 1] [--heartbeat-ms 1000] [--idle-seconds 5] [--rate 0]
//       [--timeout 300] [--coordinator PATH] [--keep]
//
// --rate N paces submissions at N per second in total (open loop); 0 sends them as fast as the
// clients' calls return (a burst).
//
// The bench process shares the machine's cores with the coordinator; its own CPU is reported too.
#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/read_file.h"
#include "lomo/v1/jobs.grpc.pb.h"
#include "lomo/v1/workers.grpc.pb.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = lomo::v1;
using Clock = std::chrono::steady_clock;

struct Options {
  int workers = 1000;
  int jobs = 10000;
  int channels = 8;
  int clients = 8;
  double job_seconds = 1.0;
  int heartbeat_ms = 1000;
  double idle_seconds = 5.0;
  double rate = 0;  // submissions per second over all clients; 0: as fast as they go
  double timeout_seconds = 300;
  std::string coordinator = LOMO_COORDINATOR_BIN;
  bool keep = false;
};

std::chrono::system_clock::time_point deadline_in(double seconds) {
  return std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::milliseconds>(
                                                std::chrono::duration<double>(seconds));
}

// The file's text, or "" when it cannot be read (a process that has exited).
std::string read_text(const fs::path& path) {
  try {
    return lomo::read_file(path);
  } catch (const lomo::FileReadError&) {
    return "";
  }
}

// CPU seconds (user + system) of a process, from /proc/<pid>/stat fields 14 and 15.
double cpu_seconds(pid_t pid) {
  const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream fields(stat.substr(close + 2));
  std::string field;
  long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {
    if (i == 14) utime = std::stoll(field);
    if (i == 15) stime = std::stoll(field);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// Resident set size in MiB, from /proc/<pid>/status.
double rss_mib(pid_t pid) {
  std::istringstream status(read_text("/proc/" + std::to_string(pid) + "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t index = std::min(values.size() - 1, static_cast<size_t>(p * values.size()));
  return values[index];
}

// One simulated worker: a bidi stream on the callback API. It heartbeats on the timer thread's
// ticks, reports RUNNING on an assignment, and after job_seconds sends one metrics event and
// SUCCEEDED.
class SimWorker : public grpc::ClientBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage> {
 public:
  SimWorker(v1::WorkerService::Stub& stub, std::string id, const Options& options,
            Clock::time_point first_heartbeat, std::atomic<int>& registered,
            std::atomic<int>& completed)
      : id_(std::move(id)),
        options_(options),
        next_heartbeat_(first_heartbeat),
        registered_(registered),
        completed_(completed) {
    context_.set_deadline(deadline_in(options.timeout_seconds + 60));
    stub.async()->Connect(&context_, this);
    v1::WorkerMessage hello;
    hello.mutable_register_()->set_worker_id(id_);
    hello.mutable_register_()->mutable_device()->set_kind(v1::DEVICE_KIND_CPU);
    hello.mutable_register_()->mutable_device()->set_name("simulated");
    send(hello);
    StartRead(&incoming_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    if (incoming_.has_registered()) {
      ++registered_;
    } else if (incoming_.has_assignment()) {
      std::lock_guard lock(mu_);
      job_id_ = incoming_.assignment().job_id();
      attempt_ = incoming_.assignment().attempt();
      job_end_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(options_.job_seconds));
      v1::WorkerMessage running;
      running.mutable_status()->set_job_id(job_id_);
      running.mutable_status()->set_attempt(attempt_);
      running.mutable_status()->set_state(v1::JOB_STATE_RUNNING);
      send_locked(running);
    }
    StartRead(&incoming_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard lock(mu_);
    outgoing_.pop_front();
    writing_ = false;
    if (ok && !outgoing_.empty()) {
      writing_ = true;
      StartWrite(&outgoing_.front());
    }
  }

  void OnDone(const grpc::Status& status) override {
    std::lock_guard lock(mu_);
    done_ = true;
    status_ = status;
    changed_.notify_all();
  }

  // Called by the timer thread.
  void tick(Clock::time_point now) {
    std::lock_guard lock(mu_);
    if (done_) return;
    if (now >= next_heartbeat_) {
      v1::WorkerMessage heartbeat;
      heartbeat.mutable_heartbeat()->set_job_id(job_id_);
      heartbeat.mutable_heartbeat()->set_attempt(attempt_);
      send_locked(heartbeat);
      next_heartbeat_ += std::chrono::milliseconds(options_.heartbeat_ms);
    }
    if (!job_id_.empty() && now >= job_end_) {
      v1::WorkerMessage events;
      events.mutable_events()->set_job_id(job_id_);
      events.mutable_events()->set_attempt(attempt_);
      v1::TrainingMetrics* metrics = events.mutable_events()->add_events()->mutable_metrics();
      metrics->set_step(10);
      metrics->set_total_steps(10);
      metrics->set_loss(1.0);
      metrics->set_tokens_per_second(1000);
      send_locked(events);
      v1::WorkerMessage done;
      done.mutable_status()->set_job_id(job_id_);
      done.mutable_status()->set_attempt(attempt_);
      done.mutable_status()->set_state(v1::JOB_STATE_SUCCEEDED);
      send_locked(done);
      job_id_.clear();
      attempt_ = 0;
      ++completed_;
    }
  }

  void close() {
    context_.TryCancel();
    std::unique_lock lock(mu_);
    changed_.wait_for(lock, std::chrono::seconds(10), [this] { return done_; });
  }

 private:
  void send(const v1::WorkerMessage& message) {
    std::lock_guard lock(mu_);
    send_locked(message);
  }
  void send_locked(const v1::WorkerMessage& message) {
    outgoing_.push_back(message);
    if (!writing_) {
      writing_ = true;
      StartWrite(&outgoing_.front());
    }
  }

  grpc::ClientContext context_;
  const std::string id_;
  const Options& options_;
  v1::CoordinatorMessage incoming_;
  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<v1::WorkerMessage> outgoing_;
  bool writing_ = false;
  bool done_ = false;
  grpc::Status status_;
  Clock::time_point next_heartbeat_;
  std::string job_id_;
  int64_t attempt_ = 0;
  Clock::time_point job_end_;
  std::atomic<int>& registered_;
  std::atomic<int>& completed_;
};

google::protobuf::Struct job_spec(int i) {
  const std::string json = R"({"name": "load-)" + std::to_string(i) + R"(", "priority": )" +
                           std::to_string(i % 7) +
                           R"(, "model": {"path": "/models/tiny"}, "data": {"train": ["a.txt"]},
                            "training": {"steps": 10}, "resources": {"device": "cpu"}})";
  google::protobuf::Struct spec;
  if (!google::protobuf::util::JsonStringToMessage(json, &spec).ok()) std::abort();
  return spec;
}

int64_t count_succeeded(v1::JobService::Stub& stub) {
  int64_t count = 0;
  std::string token;
  do {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(30));
    v1::ListJobsRequest request;
    request.add_states(v1::JOB_STATE_SUCCEEDED);
    request.set_page_size(1000);
    request.set_page_token(token);
    v1::ListJobsResponse response;
    if (!stub.ListJobs(&context, request, &response).ok()) return -1;
    count += response.jobs_size();
    token = response.next_page_token();
  } while (!token.empty());
  return count;
}

int run(const Options& options) {
  char pattern[] = "/tmp/lomo-coordinator-load-XXXXXX";
  if (mkdtemp(pattern) == nullptr) return 1;
  const fs::path dir = pattern;
  const fs::path ready = dir / "ready.json";
  const fs::path log = dir / "coordinator.log";

  std::vector<std::string> args = {options.coordinator,
                                   "--grpc-listen",
                                   "127.0.0.1:0",
                                   "--http-listen",
                                   "127.0.0.1:0",
                                   "--data-dir",
                                   (dir / "data").string(),
                                   "--ready-file",
                                   ready.string(),
                                   "--heartbeat-timeout",
                                   "30",
                                   "--heartbeat-interval-ms",
                                   std::to_string(options.heartbeat_ms),
                                   "--init"};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  std::string address;
  for (int i = 0; i < 400 && address.empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const std::string text = read_text(ready);
    const size_t at = text.find("\"grpc\":\"");
    if (at != std::string::npos) {
      address = text.substr(at + 8, text.find('"', at + 8) - at - 8);
    }
  }
  if (address.empty()) {
    std::fprintf(stderr, "coordinator did not start:\n%s\n", read_text(log).c_str());
    kill(pid, SIGKILL);
    return 1;
  }
  std::printf("coordinator pid %d on %s; data in %s\n", pid, address.c_str(), dir.c_str());

  // Separate TCP connections: without a local subchannel pool, channels to one address share one.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < options.channels; ++i) {
    grpc::ChannelArguments arguments;
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    arguments.SetInt("lomo.bench.channel", i);
    channels.push_back(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), arguments));
  }
  std::vector<std::unique_ptr<v1::WorkerService::Stub>> worker_stubs;
  std::vector<std::unique_ptr<v1::JobService::Stub>> job_stubs;
  for (auto& channel : channels) {
    worker_stubs.push_back(v1::WorkerService::NewStub(channel));
    job_stubs.push_back(v1::JobService::NewStub(channel));
  }

  // Peak RSS, sampled.
  std::atomic<bool> sampling{true};
  std::atomic<double> peak_rss{0};
  std::thread sampler([&] {
    while (sampling) {
      peak_rss = std::max(peak_rss.load(), rss_mib(pid));
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  // Workers, their heartbeats spread evenly over one interval.
  std::atomic<int> registered{0}, completed{0};
  std::vector<std::unique_ptr<SimWorker>> workers;
  const auto start = Clock::now();
  std::mt19937 random(1);
  for (int i = 0; i < options.workers; ++i) {
    const auto offset = std::chrono::milliseconds(random() % options.heartbeat_ms);
    workers.push_back(std::make_unique<SimWorker>(*worker_stubs[i % options.channels],
                                                  "sim-" + std::to_string(i), options,
                                                  start + offset, registered, completed));
  }
  std::atomic<bool> ticking{true};
  std::thread timer([&] {
    while (ticking) {
      const auto now = Clock::now();
      for (auto& worker : workers) worker->tick(now);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  while (registered < options.workers) {
    if (Clock::now() - start > std::chrono::seconds(60)) {
      std::fprintf(stderr, "only %d of %d workers registered\n", registered.load(),
                   options.workers);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double register_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf("%d workers registered in %.2f s over %d channels\n", registered.load(),
              register_seconds, options.channels);

  // Idle: heartbeats only.
  double cpu0 = cpu_seconds(pid);
  auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(options.idle_seconds));
  const double idle_cores =
      (cpu_seconds(pid) - cpu0) / std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf(
      "idle, %d workers heartbeating every %d ms: coordinator CPU %.3f cores, RSS %.1f MiB\n",
      options.workers, options.heartbeat_ms, idle_cores, rss_mib(pid));

  // Submission burst, GetJob of a random earlier job after every submission.
  std::vector<std::vector<double>> submit_ms(options.clients), get_ms(options.clients);
  std::atomic<int> next_job{0}, failures{0};
  cpu0 = cpu_seconds(pid);
  const double self_cpu0 = cpu_seconds(getpid());
  t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int c = 0; c < options.clients; ++c) {
    clients.emplace_back([&, c] {
      std::mt19937 pick(c);
      std::vector<std::string> mine;  // this client's jobs, for GetJob
      v1::JobService::Stub& stub = *job_stubs[c % options.channels];
      for (int i; (i = next_job++) < options.jobs;) {
        if (options.rate > 0) {
          std::this_thread::sleep_until(t0 + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(i / options.rate)));
        }
        v1::SubmitJobRequest submit;
        *submit.mutable_spec() = job_spec(i);
        v1::SubmitJobResponse submitted;
        grpc::ClientContext submit_context;
        submit_context.set_deadline(deadline_in(30));
        auto begin = Clock::now();
        grpc::Status status = stub.SubmitJob(&submit_context, submit, &submitted);
        submit_ms[c].push_back(
            std::chrono::duration<double, std::milli>(Clock::now() - begin).count());
        if (!status.ok()) {
          ++failures;
          continue;
        }
        mine.push_back(submitted.job().id());
        v1::GetJobRequest get;
        get.set_job_id(mine[pick() % mine.size()]);
        v1::GetJobResponse got;
        grpc::ClientContext get_context;
        get_context.set_deadline(deadline_in(30));
        begin = Clock::now();
        status = stub.GetJob(&get_context, get, &got);
        get_ms[c].push_back(
            std::chrono::duration<double, std::milli>(Clock::now() - begin).count());
        if (!status.ok()) ++failures;
      }
    });
  }
  for (auto& client : clients) client.join();
  const double submit_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const double submit_cores = (cpu_seconds(pid) - cpu0) / submit_seconds;
  const double self_cores = (cpu_seconds(getpid()) - self_cpu0) / submit_seconds;
  std::vector<double> all_submit, all_get;
  for (int c = 0; c < options.clients; ++c) {
    all_submit.insert(all_submit.end(), submit_ms[c].begin(), submit_ms[c].end());
    all_get.insert(all_get.end(), get_ms[c].begin(), get_ms[c].end());
  }
  std::printf(
      "submitted %d jobs in %.2f s (%.0f/s%s) from %d clients, %d failed calls: coordinator CPU "
      "%.3f cores (bench process %.3f cores)\n",
      options.jobs, submit_seconds, options.jobs / submit_seconds,
      options.rate > 0 ? ", paced" : ", burst", options.clients, failures.load(), submit_cores,
      self_cores);
  std::printf("  SubmitJob latency ms: p50 %.2f  p90 %.2f  p99 %.2f  max %.2f\n",
              percentile(all_submit, 0.5), percentile(all_submit, 0.9),
              percentile(all_submit, 0.99), percentile(all_submit, 1.0));
  std::printf("  GetJob    latency ms: p50 %.2f  p90 %.2f  p99 %.2f  max %.2f\n",
              percentile(all_get, 0.5), percentile(all_get, 0.9), percentile(all_get, 0.99),
              percentile(all_get, 1.0));

  // Every job runs on the simulated workers until SUCCEEDED.
  const auto drain_start = Clock::now();
  cpu0 = cpu_seconds(pid);
  bool drained = false;
  while (!drained &&
         Clock::now() - start < std::chrono::duration<double>(options.timeout_seconds)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    drained = completed >= options.jobs;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the last reports land
  const double drain_seconds = std::chrono::duration<double>(Clock::now() - drain_start).count();
  const double drain_cores = (cpu_seconds(pid) - cpu0) / drain_seconds;
  const int64_t succeeded = count_succeeded(*job_stubs[0]);
  const double total_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf(
      "run to completion: %lld of %d jobs SUCCEEDED (workers reported %d) %.1f s after the "
      "last submission; coordinator CPU %.3f cores while draining\n",
      static_cast<long long>(succeeded), options.jobs, completed.load(), drain_seconds,
      drain_cores);
  std::printf("whole run %.1f s: coordinator CPU %.3f cores on average, peak RSS %.1f MiB\n",
              total_seconds, cpu_seconds(pid) / total_seconds, peak_rss.load());

  ticking = false;
  timer.join();
  for (auto& worker : workers) worker->close();
  sampling = false;
  sampler.join();
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!options.keep) fs::remove_all(dir);
  return succeeded == options.jobs && failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", flag.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (flag == "--workers") {
      options.workers = std::stoi(value());
    } else if (flag == "--jobs") {
      options.jobs = std::stoi(value());
    } else if (flag == "--channels") {
      options.channels = std::stoi(value());
    } else if (flag == "--clients") {
      options.clients = std::stoi(value());
    } else if (flag == "--job-seconds") {
      options.job_seconds = std::stod(value());
    } else if (flag == "--heartbeat-ms") {
      options.heartbeat_ms = std::stoi(value());
    } else if (flag == "--idle-seconds") {
      options.idle_seconds = std::stod(value());
    } else if (flag == "--rate") {
      options.rate = std::stod(value());
    } else if (flag == "--timeout") {
      options.timeout_seconds = std::stod(value());
    } else if (flag == "--coordinator") {
      options.coordinator = value();
    } else if (flag == "--keep") {
      options.keep = true;
    } else {
      std::fprintf(stderr, "unknown flag %s (see the comment at the top of coordinator_load.cc)\n",
                   flag.c_str());
      return 2;
    }
  }
  return run(options);
}
