// The coordinator's Prometheus series (DESIGN.md, "Observability": prefix lomo_, base units,
// counters end in _total, no per-step or unbounded labels; the per-job gauges exist only while the
// job is active, so their label set is bounded by the number of workers).
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "lomo/v1/jobs.pb.h"
#include "lomo/v1/workers.pb.h"

namespace lomo::server {

// "queued", "running", ... (the label value of lomo_jobs{state=...}).
std::string state_label(v1::JobState state);

class Metrics {
 public:
  Metrics();

  // lomo_jobs{state}: jobs in each state now.
  void set_jobs(v1::JobState state, int64_t count);
  void add_jobs(v1::JobState state, int64_t delta);
  // lomo_workers_connected{device}.
  void add_workers_connected(v1::DeviceKind device, int64_t delta);
  // lomo_scheduling_latency_seconds: from queued to assigned.
  void observe_scheduling_latency(double seconds);
  void count_restart() { restarts_->Increment(); }
  void count_submission() { submitted_->Increment(); }
  void count_events(int64_t n) { events_->Increment(static_cast<double>(n)); }
  void count_heartbeat_timeout() { heartbeat_timeouts_->Increment(); }
  void count_checkpoint(bool committed, int64_t bytes);

  // Per-job training gauges (lomo_job_loss, lomo_job_tokens_per_second, lomo_job_step), labelled
  // {job_id}.
  void set_job_progress(const std::string& job_id, const v1::TrainingMetrics& metrics);
  // The job ended: its series disappear from the next scrape.
  void remove_job(const std::string& job_id);

  // The Prometheus text exposition format of every series, lomo_build_info and process_* included.
  std::string serialize() const;

 private:
  struct JobGauges {
    prometheus::Gauge* loss;
    prometheus::Gauge* tokens_per_second;
    prometheus::Gauge* step;
  };

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Gauge>& jobs_;
  prometheus::Family<prometheus::Gauge>& workers_;
  prometheus::Histogram* scheduling_latency_;
  prometheus::Counter* restarts_;
  prometheus::Counter* submitted_;
  prometheus::Counter* events_;
  prometheus::Counter* heartbeat_timeouts_;
  prometheus::Counter* checkpoints_committed_;
  prometheus::Counter* checkpoints_rejected_;
  prometheus::Counter* checkpoint_bytes_;
  prometheus::Family<prometheus::Gauge>& job_loss_;
  prometheus::Family<prometheus::Gauge>& job_tokens_per_second_;
  prometheus::Family<prometheus::Gauge>& job_step_;

  std::mutex jobs_mu_;
  std::unordered_map<std::string, JobGauges> job_gauges_;
};

}  // namespace lomo::server
