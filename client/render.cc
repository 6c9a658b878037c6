#include "client/render.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>

#include "common/api_json.h"
#include "common/printable.h"

namespace lomo::client {

std::string state_name(lomo::v1::JobState state) {
  std::string name = lomo::v1::JobState_Name(state);
  const std::string prefix = "JOB_STATE_";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  return name.empty() ? "STATE_" + std::to_string(static_cast<int>(state)) : name;
}

std::optional<lomo::v1::JobState> parse_state(const std::string& text) {
  std::string upper = text;
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  if (upper.rfind("JOB_STATE_", 0) != 0) upper = "JOB_STATE_" + upper;
  lomo::v1::JobState state;
  if (!lomo::v1::JobState_Parse(upper, &state) || state == lomo::v1::JOB_STATE_UNSPECIFIED) {
    return std::nullopt;
  }
  return state;
}

bool is_terminal(lomo::v1::JobState state) {
  return state == lomo::v1::JOB_STATE_SUCCEEDED || state == lomo::v1::JOB_STATE_FAILED ||
         state == lomo::v1::JOB_STATE_CANCELLED;
}

int exit_code_for(lomo::v1::JobState state) {
  switch (state) {
    case lomo::v1::JOB_STATE_SUCCEEDED:
      return 0;
    case lomo::v1::JOB_STATE_FAILED:
      return 1;
    case lomo::v1::JOB_STATE_CANCELLED:
      return 2;
    default:
      return kExitError;
  }
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char text[32];
  if (s < 60) {
    std::snprintf(text, sizeof(text), "%lds", s);
  } else if (s < 3600) {
    std::snprintf(text, sizeof(text), "%ld:%02ld", s / 60, s % 60);
  } else {
    std::snprintf(text, sizeof(text), "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  }
  return text;
}

std::string format_bytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  if (unit == 0) {
    std::snprintf(text, sizeof(text), "%lld B", static_cast<long long>(bytes));
  } else {
    std::snprintf(text, sizeof(text), "%.1f %s", value, units[unit]);
  }
  return text;
}

std::string format_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

std::string message_to_json(const google::protobuf::Message& message, bool pretty) {
  return api_json(message, pretty);  // the REST gateway's JSON, byte for byte when not pretty
}

std::string terminal_text(std::string_view text) { return printable_excerpt(text, text.size()); }

std::string terminal_paragraph(std::string_view text, const std::string& indent) {
  std::string out;
  size_t start = 0;
  for (size_t end = text.find('\n'); end != std::string_view::npos; end = text.find('\n', start)) {
    out += terminal_text(text.substr(start, end - start)) + "\n" + indent;
    start = end + 1;
  }
  return out + terminal_text(text.substr(start));
}

std::vector<std::string> gang_lines(const lomo::v1::Job& job) {
  std::vector<std::string> lines;
  if (job.assignments_size() <= 1) return lines;
  for (const auto& a : job.assignments()) {
    lines.push_back("rank " + std::to_string(a.rank()) + "  " + terminal_text(a.worker_id()));
  }
  return lines;
}

std::vector<std::string> attempt_lines(const lomo::v1::Job& job) {
  std::vector<std::string> lines;
  for (const lomo::v1::JobAttempt& attempt : job.attempts()) {
    std::string workers;
    for (const auto& a : attempt.assignments()) {
      workers += (workers.empty() ? "" : ",") + terminal_text(a.worker_id());
    }
    // A preempted attempt (its worker was drained) is stored FAILED but was no failure.
    std::string line = std::to_string(attempt.attempt()) + "  " +
                       (attempt.preempted() ? "PREEMPTED" : state_name(attempt.state())) +
                       " at step " + std::to_string(attempt.step());
    if (!workers.empty()) line += " on " + workers;
    if (attempt.restarted()) line += ", restarted";
    if (attempt.preempted()) line += ", queued again";
    if (!attempt.reason().empty()) line += ": " + terminal_text(attempt.reason());
    lines.push_back(std::move(line));
  }
  return lines;
}

// A table column wide enough for "waiting for 2 idle cpu workers, 1 idle"; the longer reasons
// (waiting behind another job, too few workers connected) are cut, and `lomoctl get` has them
// whole.
constexpr size_t kMaxWaitReasonCell = 60;

std::string workers_cell(const lomo::v1::Job& job, size_t max_named) {
  if (job.assignments_size() > 1) {
    std::string cell;
    const size_t count = static_cast<size_t>(job.assignments_size());
    for (size_t i = 0; i < std::min(count, max_named); ++i) {
      if (!cell.empty()) cell += ",";
      cell += terminal_text(job.assignments(static_cast<int>(i)).worker_id());
    }
    if (count > max_named) cell += " +" + std::to_string(count - max_named);
    return cell;
  }
  if (!job.worker_id().empty()) return terminal_text(job.worker_id());
  if (job.state() == lomo::v1::JOB_STATE_QUEUED && !job.wait_reason().empty()) {
    return "(" + printable_excerpt(job.wait_reason(), kMaxWaitReasonCell) + ")";
  }
  return "-";
}

void ProgressTracker::observe(const lomo::v1::TrainingMetrics& m, double time_seconds) {
  eta_.observe(m.step(), time_seconds);  // a step below the last one starts it again
  seen_ = true;
  progress_.step = m.step();
  if (m.total_steps() > 0) progress_.total_steps = m.total_steps();
  progress_.loss = m.loss();
  progress_.tokens_per_second = m.tokens_per_second();
  progress_.eta_seconds = eta_.eta_seconds(progress_.total_steps);
}

namespace {

std::string stats_text(const Progress& p) {
  char text[160];
  std::snprintf(text, sizeof(text), "loss %.4f  %.0f tok/s  ETA %s", p.loss, p.tokens_per_second,
                p.eta_seconds ? format_duration(*p.eta_seconds).c_str() : "?");
  return text;
}

std::string steps_text(const Progress& p) {
  return std::to_string(p.step) + "/" + (p.total_steps > 0 ? std::to_string(p.total_steps) : "?");
}

}  // namespace

std::string progress_bar_line(const Progress& p, int width) {
  const std::string tail = "  " + steps_text(p) + "  " + stats_text(p);
  const int bar = std::min(30, width - static_cast<int>(tail.size()) - 3);
  if (bar < 5) return steps_text(p) + "  " + stats_text(p);
  const double fraction =
      p.total_steps > 0
          ? std::clamp(static_cast<double>(p.step) / static_cast<double>(p.total_steps), 0.0, 1.0)
          : 0.0;
  const int filled = static_cast<int>(std::floor(fraction * bar));
  return "[" + std::string(filled, '#') + std::string(bar - filled, '-') + "]" + tail;
}

std::string progress_plain_line(const Progress& p) {
  return "step " + steps_text(p) + "  " + stats_text(p);
}

}  // namespace lomo::client
