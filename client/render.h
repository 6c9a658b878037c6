// How lomoctl shows things: state names, durations, sizes, tables, JSON, the progress bar.
#pragma once

#include <google/protobuf/message.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "client/eta.h"
#include "lomo/v1/jobs.pb.h"

namespace lomo::client {

// "RUNNING" for JOB_STATE_RUNNING.
std::string state_name(lomo::v1::JobState state);
// "running", "RUNNING" or "JOB_STATE_RUNNING"; nullopt for anything else.
std::optional<lomo::v1::JobState> parse_state(const std::string& text);
bool is_terminal(lomo::v1::JobState state);
// lomoctl's exit status for a job that ended in `state`: 0 SUCCEEDED, 1 FAILED, 2 CANCELLED.
int exit_code_for(lomo::v1::JobState state);
inline constexpr int kExitError = 3;  // lomoctl itself failed: usage, unreachable, rejected

// "42s", "3:07", "1:02:03".
std::string format_duration(double seconds);
// "812 B", "1.5 KiB", "3.2 MiB", "1.1 GiB".
std::string format_bytes(int64_t bytes);
// Columns padded to their widest cell, two spaces apart; the first row is the header.
std::string format_table(const std::vector<std::vector<std::string>>& rows);
// The REST API's JSON (common/api_json.h: protobuf's JSON mapping, lowerCamelCase names, enums
// by name, defaults included).
std::string message_to_json(const google::protobuf::Message& message, bool pretty);

// A string from the coordinator (an id, a name, a reason) made safe for a terminal: control
// characters and DEL become \xNN, so a hostile or broken server cannot move the cursor or clear
// the screen. Nothing is cut.
std::string terminal_text(std::string_view text);
// Text of several lines (a failure reason with the trainer's last stderr lines) for a terminal:
// each line escaped as terminal_text() does, the lines after the first indented by `indent`, so
// that no line of it can pass for a row of its own.
std::string terminal_paragraph(std::string_view text, const std::string& indent);
// The job's gang, rank -> worker, in rank order: {"rank 0  w-a", "rank 1  w-b"}; empty when the
// job has at most one assignment (its worker is Job.worker_id). Terminal-safe.
std::vector<std::string> gang_lines(const lomo::v1::Job& job);
// `lomoctl get`'s history of ended attempts, one line each (Job.attempts, oldest first):
// "1  FAILED at step 12 on w1, restarted: training process killed by SIGKILL".
std::vector<std::string> attempt_lines(const lomo::v1::Job& job);
// The WORKER cell of `lomoctl list`: the worker, or the gang's workers in rank order ("a,b,c",
// then "+N" beyond `max_named`), or "(wait reason)" for a queued job that says why it waits (cut
// at 60 bytes with "..."), or "-". Terminal-safe.
std::string workers_cell(const lomo::v1::Job& job, size_t max_named = 3);

struct Progress {
  int64_t step = 0;
  int64_t total_steps = 0;
  double loss = 0.0;
  double tokens_per_second = 0.0;
  std::optional<double> eta_seconds;
};

// Follows TrainingMetrics events to estimate the time left from the step rate of the current
// attempt, smoothed as tqdm smooths it (client/eta.h); a restart from a checkpoint starts the
// estimate again.
class ProgressTracker {
 public:
  // `time_seconds`: when the step was logged (the event's time).
  void observe(const lomo::v1::TrainingMetrics& metrics, double time_seconds);
  const Progress& progress() const { return progress_; }
  bool has_progress() const { return seen_; }

 private:
  Progress progress_;
  bool seen_ = false;
  EtaEstimator eta_;
};

// "[##########----------]  12/20  loss 2.3456  1,234 tok/s  ETA 0:07", fitted to `width`
// columns (the bar shrinks first).
std::string progress_bar_line(const Progress& progress, int width);
// "step 12/20  loss 2.3456  1234 tok/s  ETA 0:07" for logs and pipes.
std::string progress_plain_line(const Progress& progress);

}  // namespace lomo::client
