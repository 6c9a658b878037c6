#include "server/metrics.h"

#include <algorithm>
#include <cctype>

#include "common/process_metrics.h"
#include "server/job_text.h"

namespace lomo::server {

namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

constexpr v1::JobState kStates[] = {v1::JOB_STATE_QUEUED,  v1::JOB_STATE_ASSIGNED,
                                    v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED,
                                    v1::JOB_STATE_FAILED,  v1::JOB_STATE_CANCELLED};

}  // namespace

std::string state_label(v1::JobState state) {
  std::string name = v1::JobState_Name(state);
  const std::string prefix = "JOB_STATE_";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return name;
}

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      jobs_(BuildGauge().Name("lomo_jobs").Help("Jobs in each state.").Register(*registry_)),
      workers_(BuildGauge()
                   .Name("lomo_workers_connected")
                   .Help("Workers with an open stream, by device kind.")
                   .Register(*registry_)),
      job_loss_(BuildGauge()
                    .Name("lomo_job_loss")
                    .Help("Latest training loss of each active job.")
                    .Register(*registry_)),
      job_tokens_per_second_(BuildGauge()
                                 .Name("lomo_job_tokens_per_second")
                                 .Help("Latest training throughput of each active job.")
                                 .Register(*registry_)),
      job_step_(BuildGauge()
                    .Name("lomo_job_step")
                    .Help("Latest training step of each active job.")
                    .Register(*registry_)) {
  for (v1::JobState state : kStates) jobs_.Add({{"state", state_label(state)}}).Set(0);
  for (v1::DeviceKind device : {v1::DEVICE_KIND_CPU, v1::DEVICE_KIND_CUDA}) {
    workers_.Add({{"device", device_kind_name(device)}}).Set(0);
  }
  // 1 ms .. ~9 h in steps of x4: an idle cluster assigns in milliseconds, a busy one in hours.
  prometheus::Histogram::BucketBoundaries buckets;
  for (double bound = 0.001; bound < 40000; bound *= 4) buckets.push_back(bound);
  scheduling_latency_ = &BuildHistogram()
                             .Name("lomo_scheduling_latency_seconds")
                             .Help("Time from a job being queued to its assignment to a worker.")
                             .Register(*registry_)
                             .Add({}, buckets);
  restarts_ = &BuildCounter()
                   .Name("lomo_job_restarts_total")
                   .Help("Job attempts started again after a failure.")
                   .Register(*registry_)
                   .Add({});
  submitted_ = &BuildCounter()
                    .Name("lomo_jobs_submitted_total")
                    .Help("Jobs accepted by SubmitJob.")
                    .Register(*registry_)
                    .Add({});
  events_ = &BuildCounter()
                 .Name("lomo_job_events_total")
                 .Help("Job events recorded.")
                 .Register(*registry_)
                 .Add({});
  heartbeat_timeouts_ = &BuildCounter()
                             .Name("lomo_worker_heartbeat_timeouts_total")
                             .Help("Workers declared dead after missing heartbeats.")
                             .Register(*registry_)
                             .Add({});
  auto& checkpoints = BuildCounter()
                          .Name("lomo_checkpoints_total")
                          .Help("Checkpoint uploads that ended, by result.")
                          .Register(*registry_);
  checkpoints_committed_ = &checkpoints.Add({{"result", "committed"}});
  checkpoints_rejected_ = &checkpoints.Add({{"result", "rejected"}});
  checkpoint_bytes_ = &BuildCounter()
                           .Name("lomo_checkpoint_committed_bytes_total")
                           .Help("Bytes of committed checkpoints.")
                           .Register(*registry_)
                           .Add({});
}

void Metrics::set_jobs(v1::JobState state, int64_t count) {
  jobs_.Add({{"state", state_label(state)}}).Set(static_cast<double>(count));
}

void Metrics::add_jobs(v1::JobState state, int64_t delta) {
  jobs_.Add({{"state", state_label(state)}}).Increment(static_cast<double>(delta));
}

void Metrics::add_workers_connected(v1::DeviceKind device, int64_t delta) {
  workers_.Add({{"device", device_kind_name(device)}}).Increment(static_cast<double>(delta));
}

void Metrics::observe_scheduling_latency(double seconds) {
  scheduling_latency_->Observe(std::max(0.0, seconds));
}

void Metrics::count_checkpoint(bool committed, int64_t bytes) {
  if (committed) {
    checkpoints_committed_->Increment();
    checkpoint_bytes_->Increment(static_cast<double>(bytes));
  } else {
    checkpoints_rejected_->Increment();
  }
}

void Metrics::set_job_progress(const std::string& job_id, const v1::TrainingMetrics& metrics) {
  std::lock_guard lock(jobs_mu_);
  auto it = job_gauges_.find(job_id);
  if (it == job_gauges_.end()) {
    // job_id, not job: Prometheus gives each target a `job` label of its own, and a scraped `job`
    // would be renamed exported_job.
    const prometheus::Labels labels{{"job_id", job_id}};
    it = job_gauges_
             .emplace(job_id, JobGauges{&job_loss_.Add(labels), &job_tokens_per_second_.Add(labels),
                                        &job_step_.Add(labels)})
             .first;
  }
  it->second.loss->Set(metrics.loss());
  it->second.tokens_per_second->Set(metrics.tokens_per_second());
  it->second.step->Set(static_cast<double>(metrics.step()));
}

void Metrics::remove_job(const std::string& job_id) {
  std::lock_guard lock(jobs_mu_);
  const auto it = job_gauges_.find(job_id);
  if (it == job_gauges_.end()) return;
  job_loss_.Remove(it->second.loss);
  job_tokens_per_second_.Remove(it->second.tokens_per_second);
  job_step_.Remove(it->second.step);
  job_gauges_.erase(it);
}

std::string Metrics::serialize() const {
  return serialize_with_process_metrics(registry_->Collect());
}

}  // namespace lomo::server
