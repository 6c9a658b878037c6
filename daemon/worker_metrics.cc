#include "daemon/worker_metrics.h"

#include <prometheus/text_serializer.h>

#include <algorithm>
#include <stdexcept>

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
  if (!listen.empty()) {
    try {
      exposer_ = std::make_unique<prometheus::Exposer>(listen);
    } catch (const std::exception& e) {
      throw std::runtime_error("--metrics-listen " + listen +
                               ": cannot serve /metrics: " + e.what());
    }
    exposer_->RegisterCollectable(registry_);
  }
}

int WorkerMetrics::port() const {
  if (!exposer_) return 0;
  const std::vector<int> ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

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
  const prometheus::Labels labels{{"job", job_id}, {"rank", std::to_string(rank)}};
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

void WorkerMetrics::set_connected(bool connected) { connected_->Set(connected ? 1 : 0); }

void WorkerMetrics::connection_established() { connections_->Increment(); }

void WorkerMetrics::checkpoint_bytes_uploaded(int64_t bytes) {
  checkpoint_bytes_->Increment(static_cast<double>(bytes));
}

std::string WorkerMetrics::render() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace lomo::daemon
