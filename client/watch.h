// `lomoctl watch`: follows a job to its end, showing a one-line progress bar on a terminal (plain
// lines otherwise, or JSON lines), and resumes after the last event seen when the stream breaks.
#pragma once

#include <chrono>
#include <optional>
#include <ostream>
#include <string>

#include "apiclient/lomo_client.h"

namespace lomo::client {

struct WatchOptions {
  bool tty = false;        // redraw one progress line in place
  bool json = false;       // one WatchJobResponse per line, as proto JSON
  bool show_logs = false;  // the worker's log lines too
  int width = 80;          // terminal columns
  // How long the coordinator may stay unreachable once the watch has started before giving up.
  std::chrono::seconds reconnect_window{60};
};

// Prints the job's events to `out` until it has ended and returns it as it ended. Throws
// ClientError when the coordinator cannot be reached at the start, stays unreachable past the
// window, or refuses the watch (unknown job).
lomo::v1::Job watch_job_to_end(Client& client, const std::string& job_id,
                               const WatchOptions& options, std::ostream& out);

// The time left of a RUNNING job as `watch` would show it now: its TrainingMetrics events so far
// (a non-follow WatchJob) through the tqdm-smoothed estimator. nullopt for a job that is not
// running, has no total step count, or fewer than two steps reported. Throws ClientError.
std::optional<double> smoothed_eta_seconds(Client& client, const lomo::v1::Job& job);

}  // namespace lomo::client
