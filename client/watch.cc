#include "client/watch.h"

#include <algorithm>
#include <optional>
#include <thread>

#include "client/render.h"

namespace lomo::client {
namespace {

using SteadyClock = std::chrono::steady_clock;

double seconds_of(const google::protobuf::Timestamp& t) {
  return static_cast<double>(t.seconds()) + static_cast<double>(t.nanos()) * 1e-9;
}

class WatchPrinter {
 public:
  WatchPrinter(const WatchOptions& options, std::ostream& out, std::string job_id)
      : options_(options), out_(out), job_id_(std::move(job_id)) {}

  void on_response(const lomo::v1::WatchJobResponse& r) {
    if (options_.json) {
      out_ << message_to_json(r, false) << "\n" << std::flush;
      return;
    }
    if (!r.has_event()) return;
    const lomo::v1::JobEvent& e = r.event();
    if (e.has_metrics()) {
      const double t = e.has_time() ? seconds_of(e.time()) : local_seconds();
      tracker_.observe(e.metrics(), t);
      if (options_.tty) {
        draw_bar(false);
      } else if (plain_line_due(e.metrics())) {
        line(progress_plain_line(tracker_.progress()));
      }
    } else if (e.has_state_change()) {
      if (!is_terminal(e.state_change().state())) {
        std::string text = state_name(e.state_change().state());
        if (!e.state_change().reason().empty()) text += ": " + e.state_change().reason();
        line(text);
      }
    } else if (e.has_eval()) {
      char text[192];
      int n = std::snprintf(text, sizeof(text), "eval at step %lld: loss %.4f  perplexity %.2f",
                            static_cast<long long>(e.eval().step()), e.eval().loss(),
                            e.eval().perplexity());
      if (e.eval().has_accuracy() && n > 0 && static_cast<size_t>(n) < sizeof(text)) {
        std::snprintf(text + n, sizeof(text) - n, "  accuracy %.3f (%lld examples)",
                      e.eval().accuracy(), static_cast<long long>(e.eval().examples()));
      }
      line(text);
    } else if (e.has_checkpoint()) {
      line("checkpoint " + e.checkpoint().checkpoint_id() + " committed (" +
           format_bytes(e.checkpoint().size_bytes()) + ")");
    } else if (e.has_log() && options_.show_logs) {
      line(e.log().text());
    }
    if (r.has_job()) show_wait_reason(r.job());
  }

  void note(const std::string& text) {
    if (!options_.json) line(text);
  }

  void finish(const lomo::v1::Job& job) {
    if (options_.json) return;
    clear_bar();
    std::string text = "job " + job_id_ + " " + state_name(job.state());
    if (job.has_start_time() && job.has_end_time()) {
      text +=
          " after " + format_duration(seconds_of(job.end_time()) - seconds_of(job.start_time()));
    }
    const Progress& p = tracker_.progress();
    if (tracker_.has_progress()) {
      char stats[96];
      std::snprintf(stats, sizeof(stats), " (step %lld/%lld, loss %.4f)",
                    static_cast<long long>(p.step), static_cast<long long>(p.total_steps), p.loss);
      text += stats;
    }
    if (!job.failure_reason().empty()) {
      text += ": " + terminal_paragraph(job.failure_reason(), "  ");
    }
    out_ << text << "\n" << std::flush;
  }

 private:
  double local_seconds() const {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  // Why a queued job waits (a gang short of idle workers), each new reason once.
  void show_wait_reason(const lomo::v1::Job& job) {
    if (job.state() != lomo::v1::JOB_STATE_QUEUED || job.wait_reason().empty()) return;
    if (job.wait_reason() == last_wait_reason_) return;
    last_wait_reason_ = job.wait_reason();
    line("waiting: " + terminal_text(job.wait_reason()));
  }

  // A tenth of the way at a time, and at least every 10 s of a long job.
  bool plain_line_due(const lomo::v1::TrainingMetrics& m) {
    const int64_t total = tracker_.progress().total_steps;
    const int64_t every = total > 0 ? std::max<int64_t>(1, total / 10) : 10;
    const auto now = SteadyClock::now();
    if (m.step() == 1 || m.step() == total || m.step() % every == 0 ||
        now - last_plain_line_ >= std::chrono::seconds(10)) {
      last_plain_line_ = now;
      return true;
    }
    return false;
  }

  void line(const std::string& text) {
    clear_bar();
    out_ << text << "\n";
    if (options_.tty && tracker_.has_progress()) draw_bar(true);
    out_ << std::flush;
  }

  void clear_bar() {
    if (bar_shown_) out_ << "\r\033[K";
    bar_shown_ = false;
  }

  void draw_bar(bool force) {
    const auto now = SteadyClock::now();
    if (!force && bar_shown_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    out_ << "\r\033[K" << progress_bar_line(tracker_.progress(), options_.width) << std::flush;
    bar_shown_ = true;
  }

  const WatchOptions& options_;
  std::ostream& out_;
  std::string job_id_;
  ProgressTracker tracker_;
  bool bar_shown_ = false;
  std::string last_wait_reason_;
  SteadyClock::time_point last_draw_{};
  SteadyClock::time_point last_plain_line_ = SteadyClock::now();
};

// Failures that a coordinator going away or restarting produces. CANCELLED counts when the
// coordinator cancelled the call (a server shutting down cancels the calls it still has), not when
// we did.
bool retryable(const ClientError& e, Client& client) {
  switch (e.code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::ABORTED:
      return true;
    case grpc::StatusCode::CANCELLED:
      return !client.streams_cancelled();
    default:
      return false;
  }
}

}  // namespace

std::optional<double> smoothed_eta_seconds(Client& client, const lomo::v1::Job& job) {
  if (job.state() != lomo::v1::JOB_STATE_RUNNING || job.progress().total_steps() <= 0) {
    return std::nullopt;
  }
  ProgressTracker tracker;
  client.watch_job(job.id(), 0, /*follow=*/false, [&](const lomo::v1::WatchJobResponse& r) {
    if (r.has_event() && r.event().has_metrics() && r.event().has_time()) {
      tracker.observe(r.event().metrics(), seconds_of(r.event().time()));
    }
    return true;
  });
  return tracker.progress().eta_seconds;
}

lomo::v1::Job watch_job_to_end(Client& client, const std::string& job_id,
                               const WatchOptions& options, std::ostream& out) {
  WatchPrinter printer(options, out, job_id);
  int64_t after = 0;
  std::optional<lomo::v1::Job> job;
  bool connected_once = false;
  std::optional<SteadyClock::time_point> failing_since;
  auto delay = std::chrono::milliseconds(250);
  auto on_response = [&](const lomo::v1::WatchJobResponse& r) {
    connected_once = true;
    failing_since.reset();
    delay = std::chrono::milliseconds(250);
    if (r.has_event()) after = std::max(after, r.event().sequence());
    if (r.has_job()) job = r.job();
    printer.on_response(r);
    return true;
  };
  while (true) {
    try {
      client.watch_job(job_id, after, /*follow=*/true, on_response);
      connected_once = true;
      // The stream ended: normally because the job did. Otherwise (the coordinator restarted or
      // closed it) look, and resume after the last event seen.
      if (job && is_terminal(job->state())) break;
      lomo::v1::Job now = client.get_job(job_id);
      if (is_terminal(now.state())) {
        client.watch_job(job_id, after, /*follow=*/false, on_response);  // events not yet seen
        job = now;
        break;
      }
    } catch (const ClientError& e) {
      if (!connected_once || !retryable(e, client)) throw;
      if (!failing_since) {
        failing_since = SteadyClock::now();
        printer.note("lost the coordinator (" + std::string(e.what()) + "); reconnecting");
      }
      if (SteadyClock::now() - *failing_since > options.reconnect_window) throw;
    }
    std::this_thread::sleep_for(delay);
    delay = std::min(delay * 2, std::chrono::milliseconds(5000));
  }
  printer.finish(*job);
  return *job;
}

}  // namespace lomo::client
