// The worker's Prometheus metrics (DESIGN.md, "Observability"): prefix lomo_, base units, counters
// ending in _total, no per-step labels. Served on --metrics-listen at /metrics, beside /healthz
// (the daemon answers: liveness) and /readyz (registered with the coordinator). The per-rank step
// and communication metrics carry {job_id, rank} so that the ranks of a gang, each on its own
// worker, can be compared (a straggler is the rank whose peers spend their steps waiting in
// collectives); only the latest job's series are kept, so the labels stay bounded. The label is
// job_id, not job: Prometheus gives every target a `job` label of its own.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "lomo/v1/jobs.pb.h"

namespace httplib {
class Server;
}

namespace lomo::daemon {

// One rank's own step, from its trainer's metrics record.
struct RankStep {
  double step_seconds = 0.0;           // the step's wall time on this rank
  double communication_seconds = 0.0;  // spent in collectives during it, waiting included
  int64_t communication_bytes = 0;     // payload this rank all-reduced during it
};

class WorkerMetrics {
 public:
  // `listen` ("127.0.0.1:9400", "0.0.0.0:0", "[::]:9400"): serve /metrics, /healthz and /readyz
  // there; empty: keep the metrics without serving them. Throws std::runtime_error when the
  // address cannot be bound.
  explicit WorkerMetrics(const std::string& listen);
  ~WorkerMetrics();
  WorkerMetrics(const WorkerMetrics&) = delete;
  WorkerMetrics& operator=(const WorkerMetrics&) = delete;

  // The bound port (0 when not serving): "…:0" picks a free one.
  int port() const;

  void observe_step(const lomo::v1::TrainingMetrics& metrics, int64_t tokens_per_step);
  void observe_eval(const lomo::v1::EvalResult& eval);
  // Any rank's step (rank 0's too). A new job or rank replaces the previous one's series.
  void observe_rank_step(const std::string& job_id, int rank, const RankStep& step);
  void job_started();
  void job_finished(lomo::v1::JobState state);
  void set_connected(bool connected);
  void connection_established();
  void checkpoint_bytes_uploaded(int64_t bytes);

  // The text exposition format, as /metrics serves it (lomo_build_info and process_* included).
  std::string render() const;

 private:
  void serve(const std::string& listen);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<httplib::Server> server_;
  std::thread server_thread_;
  int port_ = 0;
  std::atomic<bool> listen_returned_{false};
  std::atomic<bool> connected_now_{false};

  prometheus::Histogram* step_duration_;
  prometheus::Counter* steps_;
  prometheus::Counter* skipped_steps_;
  prometheus::Counter* tokens_;
  prometheus::Gauge* loss_;
  prometheus::Gauge* learning_rate_;
  prometheus::Gauge* loss_scale_;
  prometheus::Gauge* grad_norm_;
  prometheus::Gauge* tokens_per_second_;
  prometheus::Gauge* eval_loss_;
  prometheus::Family<prometheus::Gauge>* memory_peak_family_;
  std::map<std::string, prometheus::Gauge*> memory_peak_;
  prometheus::Gauge* busy_;
  prometheus::Family<prometheus::Counter>* jobs_family_;
  prometheus::Gauge* connected_;
  prometheus::Counter* connections_;
  prometheus::Counter* checkpoint_bytes_;

  // The series of the rank that reported last, under {job_id, rank}.
  struct RankSeries {
    prometheus::Gauge* step_seconds;
    prometheus::Gauge* communication_seconds;
    prometheus::Counter* step_seconds_total;
    prometheus::Counter* communication_seconds_total;
    prometheus::Counter* communication_bytes_total;
  };
  void replace_rank_series(const prometheus::Labels& labels);
  prometheus::Family<prometheus::Gauge>* step_seconds_family_;
  prometheus::Family<prometheus::Gauge>* communication_seconds_family_;
  prometheus::Family<prometheus::Counter>* step_seconds_total_family_;
  prometheus::Family<prometheus::Counter>* communication_seconds_total_family_;
  prometheus::Family<prometheus::Counter>* communication_bytes_total_family_;
  prometheus::Labels rank_labels_;
  std::optional<RankSeries> rank_series_;
};

}  // namespace lomo::daemon
