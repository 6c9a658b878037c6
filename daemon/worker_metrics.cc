#include "daemon/worker_metrics.h"

#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "common/process_metrics.h"

namespace lomo::daemon {
namespace {

prometheus::Gauge* gauge(prometheus::Registry& registry, const std::string& name,
                         const std::string& help) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(registry).Add({});
}

prometheus::Counter* counter(prometheus::Registry& registry, const std::string& name,
                             const std::string& help) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add({});
}

prometheus::Family<prometheus::Gauge>* gauge_family(prometheus::Registry& registry,
                                                    const std::string& name,
                                                    const std::string& help) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(registry);
}

prometheus::Family<prometheus::Counter>* counter_family(prometheus::Registry& registry,
                                                        const std::string& name,
                                                        const std::string& help) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(registry);
}

// "HOST:PORT" or "[V6]:PORT" split in two; std::runtime_error naming the flag when malformed.
std::pair<std::string, int> split_listen(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon != std::string::npos && colon + 1 < listen.size() &&
      listen.find_first_not_of("0123456789", colon + 1) == std::string::npos &&
      listen.size() - colon <= 6) {
    port = std::stoi(listen.substr(colon + 1));
  }
  if (port < 0 || port > 65535) {
    throw std::runtime_error("--metrics-listen " + listen + ": expected HOST:PORT");
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return {host.empty() ? "0.0.0.0" : host, port};
}

}  // namespace

WorkerMetrics::WorkerMetrics(const std::string& listen)
    : registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  // Step times from tens of milliseconds (tiny models) to minutes (large models on few GPUs).
  step_duration_ =
      &prometheus::BuildHistogram()
           .Name("lomo_worker_step_duration_seconds")
           .Help("Wall time of one training step (forward, backward and update)")
           .Register(r)
           .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                            2.5, 5, 10, 30, 60, 120});
  steps_ = counter(r, "lomo_worker_steps_total", "Training steps completed");
  skipped_steps_ =
      counter(r, "lomo_worker_skipped_steps_total", "Steps skipped because of an fp16 overflow");
  tokens_ = counter(r, "lomo_worker_tokens_total", "Tokens processed by training steps");
  loss_ = gauge(r, "lomo_worker_loss", "Training loss of the latest step");
  learning_rate_ = gauge(r, "lomo_worker_learning_rate", "Learning rate of the latest step");
  loss_scale_ =
      gauge(r, "lomo_worker_loss_scale", "Loss scale of the latest step (1 without fp16)");
  grad_norm_ = gauge(r, "lomo_worker_grad_norm", "Global gradient norm of the latest step");
  tokens_per_second_ =
      gauge(r, "lomo_worker_tokens_per_second", "Training throughput of the latest step");
  eval_loss_ = gauge(r, "lomo_worker_eval_loss", "Loss of the latest evaluation");
  memory_peak_family_ = &prometheus::BuildGauge()
                             .Name("lomo_worker_device_memory_peak_bytes")
                             .Help(
                                 "Peak device memory of the current job by kind (parameters, "
                                 "gradients, optimizer_state, activations, workspace, total)")
                             .Register(r);
  busy_ = gauge(r, "lomo_worker_busy", "1 while a job attempt runs on this worker");
  jobs_family_ = &prometheus::BuildCounter()
                      .Name("lomo_worker_jobs_total")
                      .Help("Job attempts finished on this worker, by outcome")
                      .Register(r);
  connected_ = gauge(r, "lomo_worker_connected", "1 while registered with the coordinator");
  connections_ = counter(r, "lomo_worker_connections_total",
                         "Registrations with the coordinator (reconnects included)");
  checkpoint_bytes_ = counter(r, "lomo_worker_checkpoint_upload_bytes_total",
                              "Checkpoint bytes sent to the coordinator");
  step_seconds_family_ =
      gauge_family(r, "lomo_worker_step_seconds", "Wall time of this rank's latest training step");
  communication_seconds_family_ =
      gauge_family(r, "lomo_worker_communication_seconds",
                   "Time this rank spent in collectives during its latest step, waiting included");
  step_seconds_total_family_ = counter_family(r, "lomo_worker_step_seconds_total",
                                              "Wall time of this rank's training steps");
  communication_seconds_total_family_ =
      counter_family(r, "lomo_worker_communication_seconds_total",
                     "Time this rank spent in collectives, waiting included");
  communication_bytes_total_family_ = counter_family(r, "lomo_worker_communication_bytes_total",
                                                     "Payload bytes this rank all-reduced");
  if (!listen.empty()) serve(listen);
}

WorkerMetrics::~WorkerMetrics() {
  if (!server_thread_.joinable()) return;
  // httplib's stop() does nothing before the listening loop runs, which would then never end:
  // wait for the loop (or its early return) first.
  while (!server_->is_running() && !listen_returned_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  server_->stop();
  server_thread_.join();
}

void WorkerMetrics::serve(const std::string& listen) {
  const auto [host, port] = split_listen(listen);
  server_ = std::make_unique<httplib::Server>();
  // httplib's default SO_REUSEPORT would let a second worker bind the same port and share its
  // scrapes; SO_REUSEADDR alone makes an address in use an error.
  server_->set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  server_->new_task_queue = [] { return new httplib::ThreadPool(2); };
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& response) {
    response.set_content(render(), kPrometheusContentType);
  });
  // Liveness: the daemon's process answers. Losing the coordinator is not a reason to restart a
  // worker (it reconnects by itself), so that is /readyz's business only.
  server_->Get("/healthz", [](const httplib::Request&, httplib::Response& response) {
    response.set_content("ok\n", "text/plain; charset=utf-8");
  });
  server_->Get("/readyz", [this](const httplib::Request&, httplib::Response& response) {
    const bool ready = connected_now_.load();
    response.status = ready ? 200 : 503;
    response.set_content(ready ? "ok\n" : "not registered with the coordinator\n",
                         "text/plain; charset=utf-8");
  });
  port_ = port == 0 ? server_->bind_to_any_port(host) : port;
  if (port_ <= 0 || (port != 0 && !server_->bind_to_port(host, port))) {
    throw std::runtime_error("--metrics-listen " + listen +
                             ": cannot serve /metrics (port in use, or not an address of this "
                             "host)");
  }
  server_thread_ = std::thread([this] {
    server_->listen_after_bind();
    listen_returned_ = true;
  });
}

int WorkerMetrics::port() const { return port_; }

void WorkerMetrics::observe_step(const lomo::v1::TrainingMetrics& m, int64_t tokens_per_step) {
  steps_->Increment();
  if (m.skipped()) skipped_steps_->Increment();
  tokens_->Increment(static_cast<double>(tokens_per_step));
  // The trainer reports tokens_per_second = tokens_per_step / step time; invert it.
  if (m.tokens_per_second() > 0 && tokens_per_step > 0) {
    step_duration_->Observe(static_cast<double>(tokens_per_step) / m.tokens_per_second());
  }
  loss_->Set(m.loss());
  learning_rate_->Set(m.learning_rate());
  loss_scale_->Set(m.loss_scale());
  grad_norm_->Set(m.grad_norm());
  tokens_per_second_->Set(m.tokens_per_second());
  for (const auto& [kind, bytes] : m.peak_memory_bytes()) {
    auto it = memory_peak_.find(kind);
    if (it == memory_peak_.end()) {
      if (memory_peak_.size() >= 16) continue;  // bounded label values, whatever the trainer says
      it = memory_peak_.emplace(kind, &memory_peak_family_->Add({{"kind", kind}})).first;
    }
    it->second->Set(static_cast<double>(bytes));
  }
}

void WorkerMetrics::replace_rank_series(const prometheus::Labels& labels) {
  if (rank_series_) {
    step_seconds_family_->Remove(rank_series_->step_seconds);
    communication_seconds_family_->Remove(rank_series_->communication_seconds);
    step_seconds_total_family_->Remove(rank_series_->step_seconds_total);
    communication_seconds_total_family_->Remove(rank_series_->communication_seconds_total);
    communication_bytes_total_family_->Remove(rank_series_->communication_bytes_total);
  }
  rank_labels_ = labels;
  rank_series_ = RankSeries{
      &step_seconds_family_->Add(labels), &communication_seconds_family_->Add(labels),
      &step_seconds_total_family_->Add(labels), &communication_seconds_total_family_->Add(labels),
      &communication_bytes_total_family_->Add(labels)};
}

void WorkerMetrics::observe_rank_step(const std::string& job_id, int rank, const RankStep& step) {
  const prometheus::Labels labels{{"job_id", job_id}, {"rank", std::to_string(rank)}};
  if (!rank_series_ || labels != rank_labels_) replace_rank_series(labels);
  rank_series_->step_seconds->Set(step.step_seconds);
  rank_series_->communication_seconds->Set(step.communication_seconds);
  rank_series_->step_seconds_total->Increment(std::max(0.0, step.step_seconds));
  rank_series_->communication_seconds_total->Increment(std::max(0.0, step.communication_seconds));
  rank_series_->communication_bytes_total->Increment(
      static_cast<double>(std::max<int64_t>(0, step.communication_bytes)));
}

void WorkerMetrics::observe_eval(const lomo::v1::EvalResult& eval) { eval_loss_->Set(eval.loss()); }

void WorkerMetrics::job_started() { busy_->Set(1); }

void WorkerMetrics::job_finished(lomo::v1::JobState state) {
  busy_->Set(0);
  std::string outcome = "failed";
  if (state == lomo::v1::JOB_STATE_SUCCEEDED) outcome = "succeeded";
  if (state == lomo::v1::JOB_STATE_CANCELLED) outcome = "cancelled";
  jobs_family_->Add({{"outcome", outcome}}).Increment();
}

void WorkerMetrics::set_connected(bool connected) {
  connected_->Set(connected ? 1 : 0);
  connected_now_ = connected;
}

void WorkerMetrics::connection_established() { connections_->Increment(); }

void WorkerMetrics::checkpoint_bytes_uploaded(int64_t bytes) {
  checkpoint_bytes_->Increment(static_cast<double>(bytes));
}

std::string WorkerMetrics::render() const {
  return serialize_with_process_metrics(registry_->Collect());
}

}  // namespace lomo::daemon
