#include "tests/integration/coordinator_harness.h"

#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "common/sha256.h"

namespace lomo::server::testing {

namespace fs = std::filesystem;

std::chrono::system_clock::time_point deadline_in(double seconds) {
  return std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::milliseconds>(
                                                std::chrono::duration<double>(seconds));
}

bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds timeout) {
  const auto end = Clock::now() + timeout;
  for (;;) {
    if (condition()) return true;
    if (Clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

TempDir::TempDir() {
  char pattern[] = "/tmp/lomo-coordinator-test-XXXXXX";
  if (mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

// ---------------------------------------------------------------------------------------------

CoordinatorProcess::CoordinatorProcess(const ProcessOptions& options) {
  // A distinct log per start: a test that restarts the coordinator keeps both.
  const fs::path base = options.data_dir.parent_path();
  log_path_ =
      base / ("coordinator-" + std::to_string(Clock::now().time_since_epoch().count()) + ".log");
  const fs::path ready = base / "ready.json";
  fs::remove(ready);

  std::vector<std::string> args = {LOMO_COORDINATOR_BIN,
                                   "--grpc-listen",
                                   "127.0.0.1:0",
                                   "--http-listen",
                                   "127.0.0.1:0",
                                   "--data-dir",
                                   options.data_dir.string(),
                                   "--ready-file",
                                   ready.string(),
                                   "--heartbeat-timeout",
                                   std::to_string(options.heartbeat_timeout_seconds),
                                   "--heartbeat-interval-ms",
                                   std::to_string(options.heartbeat_interval_ms)};
  const double window = options.reattach_window_seconds > 0 ? options.reattach_window_seconds
                                                            : options.heartbeat_timeout_seconds;
  args.insert(args.end(), {"--reattach-window", std::to_string(window)});
  if (options.init_when_new && !fs::exists(options.data_dir / "coordinator.db")) {
    args.push_back("--init");
  }
  args.insert(args.end(), options.extra_args.begin(), options.extra_args.end());
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);

  pid_ = fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    const int fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
    }
    execv(argv[0], argv.data());
    _exit(127);
  }
  const bool ready_seen = wait_until(
      [&] {
        int status = 0;
        if (waitpid(pid_, &status, WNOHANG) == pid_) {
          pid_ = -1;
          return true;
        }
        const auto json = nlohmann::json::parse(read_file(ready), nullptr, false);
        if (!json.is_object() || !json.contains("http")) return false;
        grpc_address_ = json["grpc"];
        const std::string http = json["http"];
        http_host_ = http.substr(0, http.rfind(':'));
        http_port_ = std::stoi(http.substr(http.rfind(':') + 1));
        return true;
      },
      std::chrono::seconds(20));
  if (!ready_seen || pid_ < 0) {
    const std::string text = log();
    if (pid_ > 0) kill9();
    throw std::runtime_error("lomo-coordinator did not become ready; its log:\n" + text);
  }
}

CoordinatorProcess::~CoordinatorProcess() {
  if (pid_ > 0) kill9();
}

void CoordinatorProcess::kill9() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
}

int CoordinatorProcess::terminate(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  int status = 0;
  const bool exited = wait_until([&] { return waitpid(pid_, &status, WNOHANG) == pid_; }, timeout);
  if (!exited) {
    kill9();
    return -1;
  }
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::shared_ptr<grpc::Channel> CoordinatorProcess::channel() const {
  return grpc::CreateChannel(grpc_address_, grpc::InsecureChannelCredentials());
}

std::unique_ptr<v1::JobService::Stub> CoordinatorProcess::jobs() const {
  return v1::JobService::NewStub(channel());
}

// ---------------------------------------------------------------------------------------------

TestWorker::TestWorker(std::shared_ptr<grpc::Channel> channel)
    : stub_(v1::WorkerService::NewStub(std::move(channel))) {
  context_.set_deadline(deadline_in(120));
  stream_ = stub_->Connect(&context_);
  reader_ = std::thread([this] { read_loop(); });
}

TestWorker::~TestWorker() {
  stop_heartbeats();
  context_.TryCancel();
  if (reader_.joinable()) reader_.join();
}

void TestWorker::read_loop() {
  v1::CoordinatorMessage message;
  while (stream_->Read(&message)) {
    std::lock_guard lock(mu_);
    inbox_.push_back(message);
    changed_.notify_all();
  }
  grpc::Status status;
  {
    std::lock_guard write_lock(write_mu_);
    status = stream_->Finish();
  }
  std::lock_guard lock(mu_);
  closed_ = status;
  changed_.notify_all();
}

bool TestWorker::send(const v1::WorkerMessage& message) {
  {
    std::lock_guard lock(mu_);
    if (closed_) return false;
  }
  std::lock_guard lock(write_mu_);
  return stream_->Write(message);
}

v1::Registered TestWorker::register_as(const std::string& worker_id, v1::DeviceKind kind) {
  v1::WorkerMessage message;
  message.mutable_register_()->set_worker_id(worker_id);
  message.mutable_register_()->mutable_device()->set_kind(kind);
  message.mutable_register_()->mutable_device()->set_name(kind == v1::DEVICE_KIND_CUDA ? "test gpu"
                                                                                       : "cpu");
  message.mutable_register_()->set_version("test");
  send(message);
  const auto reply = next_of(v1::CoordinatorMessage::kRegistered, std::chrono::seconds(10));
  if (!reply) throw std::runtime_error("no Registered for worker " + worker_id);
  return reply->registered();
}

bool TestWorker::heartbeat(const std::string& job_id, int64_t attempt) {
  v1::WorkerMessage message;
  message.mutable_heartbeat()->set_job_id(job_id);
  message.mutable_heartbeat()->set_attempt(attempt);
  return send(message);
}

void TestWorker::set_current(const std::string& job_id, int64_t attempt) {
  std::lock_guard lock(mu_);
  current_job_ = job_id;
  current_attempt_ = attempt;
}

void TestWorker::start_heartbeats(std::chrono::milliseconds interval) {
  stop_heartbeats();
  {
    std::lock_guard lock(mu_);
    heartbeating_ = true;
  }
  heartbeater_ = std::thread([this, interval] {
    std::unique_lock lock(mu_);
    while (heartbeating_ && !closed_) {
      lock.unlock();
      {
        // Read and sent in one step with report(): like the daemon's, a heartbeat never names
        // an attempt after the worker reported its end.
        std::lock_guard order(report_order_mu_);
        std::string job;
        int64_t attempt = 0;
        {
          std::lock_guard current(mu_);
          job = current_job_;
          attempt = current_attempt_;
        }
        heartbeat(job, attempt);
      }
      lock.lock();
      changed_.wait_for(lock, interval, [this] { return !heartbeating_; });
    }
  });
}

void TestWorker::stop_heartbeats() {
  {
    std::lock_guard lock(mu_);
    heartbeating_ = false;
    changed_.notify_all();
  }
  if (heartbeater_.joinable()) heartbeater_.join();
}

bool TestWorker::report(const std::string& job_id, int64_t attempt, v1::JobState state,
                        const std::string& reason) {
  v1::JobStatusUpdate status;
  status.set_job_id(job_id);
  status.set_attempt(attempt);
  status.set_state(state);
  status.set_reason(reason);
  return report(status);
}

bool TestWorker::report_permanent_failure(const std::string& job_id, int64_t attempt,
                                          const std::string& reason) {
  v1::JobStatusUpdate status;
  status.set_job_id(job_id);
  status.set_attempt(attempt);
  status.set_state(v1::JOB_STATE_FAILED);
  status.set_reason(reason);
  status.set_permanent(true);
  return report(status);
}

bool TestWorker::report(const v1::JobStatusUpdate& status) {
  const std::string& job_id = status.job_id();
  const int64_t attempt = status.attempt();
  const v1::JobState state = status.state();
  v1::WorkerMessage message;
  *message.mutable_status() = status;
  std::lock_guard order(report_order_mu_);
  const bool sent = send(message);
  const bool terminal = state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
                        state == v1::JOB_STATE_CANCELLED;
  std::lock_guard lock(mu_);
  if (terminal && current_job_ == job_id && current_attempt_ == attempt) {
    current_job_.clear();
    current_attempt_ = 0;
  }
  return sent;
}

bool TestWorker::send_metrics(const std::string& job_id, int64_t attempt, int64_t step, double loss,
                              double tokens_per_second) {
  v1::WorkerMessage message;
  v1::JobEvents* events = message.mutable_events();
  events->set_job_id(job_id);
  events->set_attempt(attempt);
  v1::TrainingMetrics* metrics = events->add_events()->mutable_metrics();
  metrics->set_step(step);
  metrics->set_total_steps(100);
  metrics->set_loss(loss);
  metrics->set_learning_rate(1e-3);
  metrics->set_tokens_per_second(tokens_per_second);
  events->add_events()->mutable_log()->set_text("step " + std::to_string(step));
  return send(message);
}

bool TestWorker::send_eval(const std::string& job_id, int64_t attempt, int64_t step, double loss) {
  v1::WorkerMessage message;
  v1::JobEvents* events = message.mutable_events();
  events->set_job_id(job_id);
  events->set_attempt(attempt);
  v1::EvalResult* eval = events->add_events()->mutable_eval();
  eval->set_step(step);
  eval->set_loss(loss);
  eval->set_perplexity(std::exp(loss));
  return send(message);
}

std::optional<v1::CheckpointAck> TestWorker::upload_checkpoint(
    const std::string& job_id, int64_t attempt, int64_t step,
    const std::map<std::string, std::string>& files, size_t chunk_bytes,
    const std::string& corrupt_path,
    const std::optional<std::map<std::string, std::string>>& manifest_files) {
  for (const auto& [path, data] : files) {
    std::string sent = data;
    if (path == corrupt_path && !sent.empty()) sent[sent.size() / 2] ^= 0x40;
    size_t offset = 0;
    do {
      const size_t n = std::min(chunk_bytes, sent.size() - offset);
      v1::WorkerMessage message;
      v1::CheckpointChunk* chunk = message.mutable_checkpoint_chunk();
      chunk->set_job_id(job_id);
      chunk->set_attempt(attempt);
      chunk->set_step(step);
      v1::FileChunk* file = chunk->mutable_file();
      file->set_path(path);
      file->set_offset(static_cast<int64_t>(offset));
      file->set_data(sent.substr(offset, n));
      offset += n;
      if (offset == sent.size()) {
        file->set_last_chunk_of_file(true);
        file->set_sha256(sha256_hex(data));  // of the real bytes
      }
      send(message);
    } while (offset < sent.size());
  }
  v1::WorkerMessage commit;
  commit.mutable_checkpoint_chunk()->set_job_id(job_id);
  commit.mutable_checkpoint_chunk()->set_attempt(attempt);
  commit.mutable_checkpoint_chunk()->set_step(step);
  commit.mutable_checkpoint_chunk()->set_commit(true);
  for (const auto& [path, data] : manifest_files.value_or(files)) {
    v1::CheckpointFile* entry = commit.mutable_checkpoint_chunk()->add_manifest();
    entry->set_path(path);
    entry->set_size_bytes(static_cast<int64_t>(data.size()));
    entry->set_sha256(sha256_hex(data));
  }
  send(commit);
  const auto ack = next_of(v1::CoordinatorMessage::kCheckpointAck, std::chrono::seconds(10));
  if (!ack) return std::nullopt;
  return ack->checkpoint_ack();
}

std::optional<v1::CoordinatorMessage> TestWorker::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  if (!changed_.wait_for(lock, timeout, [this] { return !inbox_.empty() || closed_; })) {
    return std::nullopt;
  }
  if (inbox_.empty()) return std::nullopt;
  v1::CoordinatorMessage message = std::move(inbox_.front());
  inbox_.pop_front();
  return message;
}

std::optional<v1::CoordinatorMessage> TestWorker::next_of(v1::CoordinatorMessage::KindCase kind,
                                                          std::chrono::milliseconds timeout) {
  const auto end = Clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
    if (left.count() <= 0) return std::nullopt;
    std::optional<v1::CoordinatorMessage> message = next(left);
    if (!message) return std::nullopt;
    if (message->kind_case() == kind) return message;
  }
}

std::optional<v1::Assignment> TestWorker::next_assignment(std::chrono::milliseconds timeout) {
  const auto message = next_of(v1::CoordinatorMessage::kAssignment, timeout);
  if (!message) return std::nullopt;
  return message->assignment();
}

void TestWorker::disconnect() {
  stop_heartbeats();
  context_.TryCancel();
  if (reader_.joinable()) reader_.join();
}

std::optional<grpc::Status> TestWorker::wait_closed(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  changed_.wait_for(lock, timeout, [this] { return closed_.has_value(); });
  return closed_;
}

// ---------------------------------------------------------------------------------------------

HttpResult http_request(const CoordinatorProcess& coordinator, const std::string& method,
                        const std::string& path, const std::string& body) {
  httplib::Client client(coordinator.http_host(), coordinator.http_port());
  client.set_connection_timeout(5);
  client.set_read_timeout(10);
  client.set_write_timeout(10);
  httplib::Result result = method == "POST" ? client.Post(path.c_str(), body, "application/json")
                                            : client.Get(path.c_str());
  if (!result) return {};
  return {result->status, result->body};
}

google::protobuf::Struct valid_spec(const std::string& name, int64_t priority,
                                    const std::string& device) {
  nlohmann::json spec = {{"model", {{"path", "/models/tiny"}}},
                         {"data", {{"train", {"train.txt"}}}},
                         {"training", {{"steps", 10}}},
                         // No restarts unless a test asks: a failure ends the job.
                         {"resources", {{"device", device}, {"max_restarts", 0}}},
                         {"priority", priority}};
  if (!name.empty()) spec["name"] = name;
  google::protobuf::Struct result;
  const auto status = google::protobuf::util::JsonStringToMessage(spec.dump(), &result);
  if (!status.ok()) throw std::runtime_error(std::string(status.message()));
  return result;
}

v1::SubmitJobRequest submit_request(const std::string& name, int64_t priority,
                                    const std::string& device) {
  v1::SubmitJobRequest request;
  *request.mutable_spec() = valid_spec(name, priority, device);
  return request;
}

v1::SubmitJobRequest gang_request(const std::string& name, int64_t world_size, int64_t priority) {
  v1::SubmitJobRequest request = submit_request(name, priority);
  auto& fields = *request.mutable_spec()->mutable_fields();
  (*fields["training"].mutable_struct_value()->mutable_fields())["batch_size"].set_number_value(
      static_cast<double>(world_size));
  (*fields["resources"].mutable_struct_value()->mutable_fields())["world_size"].set_number_value(
      static_cast<double>(world_size));
  return request;
}

grpc::Status rendezvous_set(const std::shared_ptr<grpc::Channel>& channel,
                            const std::string& worker_id, const std::string& job_id,
                            int64_t attempt, const std::string& key, const std::string& value) {
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::RendezvousSetRequest request;
  request.set_worker_id(worker_id);
  request.set_job_id(job_id);
  request.set_attempt(attempt);
  request.set_key(key);
  request.set_value(value);
  v1::RendezvousSetResponse response;
  return v1::WorkerService::NewStub(channel)->RendezvousSet(&context, request, &response);
}

grpc::Status rendezvous_get(const std::shared_ptr<grpc::Channel>& channel,
                            const std::string& worker_id, const std::string& job_id,
                            int64_t attempt, const std::vector<std::string>& keys,
                            v1::RendezvousGetResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::RendezvousGetRequest request;
  request.set_worker_id(worker_id);
  request.set_job_id(job_id);
  request.set_attempt(attempt);
  for (const std::string& key : keys) request.add_keys(key);
  return v1::WorkerService::NewStub(channel)->RendezvousGet(&context, request, response);
}

grpc::Status submit(v1::JobService::Stub& jobs, const v1::SubmitJobRequest& request, v1::Job* job) {
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::SubmitJobResponse response;
  grpc::Status status = jobs.SubmitJob(&context, request, &response);
  if (job != nullptr) *job = response.job();
  return status;
}

grpc::Status get(v1::JobService::Stub& jobs, const std::string& job_id, v1::Job* job) {
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::GetJobResponse response;
  grpc::Status status = jobs.GetJob(&context, request, &response);
  if (job != nullptr) *job = response.job();
  return status;
}

grpc::Status cancel(v1::JobService::Stub& jobs, const std::string& job_id, v1::Job* job) {
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::CancelJobRequest request;
  request.set_job_id(job_id);
  v1::CancelJobResponse response;
  grpc::Status status = jobs.CancelJob(&context, request, &response);
  if (job != nullptr) *job = response.job();
  return status;
}

std::vector<v1::JobEvent> all_events(v1::JobService::Stub& jobs, const std::string& job_id) {
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  auto reader = jobs.WatchJob(&context, request);
  std::vector<v1::JobEvent> events;
  v1::WatchJobResponse response;
  while (reader->Read(&response)) events.push_back(response.event());
  const grpc::Status status = reader->Finish();
  if (!status.ok()) throw std::runtime_error("WatchJob " + job_id + ": " + status.error_message());
  return events;
}

v1::Job wait_for_state(v1::JobService::Stub& jobs, const std::string& job_id, v1::JobState state,
                       std::chrono::milliseconds timeout) {
  v1::Job job;
  grpc::Status status;
  const bool reached = wait_until(
      [&] {
        status = get(jobs, job_id, &job);
        return status.ok() && job.state() == state;
      },
      timeout);
  if (!reached) {
    ADD_FAILURE() << "job " << job_id << " did not reach " << v1::JobState_Name(state) << " within "
                  << timeout.count() << " ms; last seen: "
                  << (status.ok() ? v1::JobState_Name(job.state())
                                  : "GetJob failed: " + status.error_message());
  }
  return job;
}

}  // namespace lomo::server::testing
