#include "daemon/metrics_tail.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

namespace lomo::daemon {

std::optional<lomo::v1::JobEvent> metrics_line_to_event(const std::string& line,
                                                        int64_t total_steps) {
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) return std::nullopt;
  lomo::v1::JobEvent event;
  auto number = [&](const char* key) {
    const auto it = j.find(key);
    return it != j.end() && it->is_number() ? it->get<double>() : 0.0;
  };
  if (j.contains("eval_loss")) {
    auto* eval = event.mutable_eval();
    eval->set_step(j["step"].get<int64_t>());
    eval->set_loss(number("eval_loss"));
    eval->set_perplexity(number("eval_perplexity"));
    return event;
  }
  if (!j.contains("loss")) return std::nullopt;
  auto* m = event.mutable_metrics();
  m->set_step(j["step"].get<int64_t>());
  m->set_total_steps(total_steps);
  m->set_loss(number("loss"));
  m->set_learning_rate(number("lr"));
  m->set_grad_norm(number("grad_norm"));
  m->set_loss_scale(number("loss_scale"));
  m->set_skipped(j.value("skipped", false));
  m->set_tokens_per_second(number("tokens_per_second"));
  const auto memory = j.find("memory");
  if (memory != j.end() && memory->is_object()) {
    for (const auto& [kind, value] : memory->items()) {
      if (value.is_object() && value.contains("peak") && value["peak"].is_number()) {
        (*m->mutable_peak_memory_bytes())[kind] = value["peak"].get<int64_t>();
      }
    }
  }
  return event;
}

std::vector<lomo::v1::JobEvent> MetricsTail::poll(int64_t total_steps) {
  std::vector<lomo::v1::JobEvent> events;
  const int fd = ::open(file_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return events;
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    ::close(fd);
    return events;
  }
  if (info.st_ino != inode_ || info.st_size < offset_) {
    // A new file (the trainer replaces it atomically when it resumes) or a truncated one.
    inode_ = info.st_ino;
    offset_ = 0;
    partial_.clear();
  }
  char buffer[65536];
  while (true) {
    const ssize_t n = ::pread(fd, buffer, sizeof(buffer), offset_);
    if (n <= 0) break;
    offset_ += n;
    partial_.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);

  size_t start = 0;
  for (size_t newline; (newline = partial_.find('\n', start)) != std::string::npos;
       start = newline + 1) {
    const std::string line = partial_.substr(start, newline - start);
    std::optional<lomo::v1::JobEvent> event = metrics_line_to_event(line, total_steps);
    if (!event) continue;
    if (event->has_metrics()) {
      if (event->metrics().step() <= last_training_step_) continue;
      last_training_step_ = event->metrics().step();
    } else {
      if (event->eval().step() <= last_eval_step_) continue;
      last_eval_step_ = event->eval().step();
    }
    events.push_back(std::move(*event));
  }
  partial_.erase(0, start);
  return events;
}

}  // namespace lomo::daemon
