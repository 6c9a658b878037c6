#include "daemon/trainer_channel.h"

#include <fcntl.h>
#include <unistd.h>

#include <string>

namespace lomo::daemon {

namespace protocol = trainer_protocol;

lomo::v1::JobEvent metrics_event(const protocol::Metrics& r) {
  lomo::v1::JobEvent event;
  auto* m = event.mutable_metrics();
  m->set_step(r.step);
  m->set_total_steps(r.total_steps);
  m->set_loss(r.loss);
  m->set_learning_rate(r.lr);
  m->set_grad_norm(r.grad_norm);
  m->set_loss_scale(r.loss_scale);
  m->set_skipped(r.skipped);
  m->set_tokens_per_second(r.tokens_per_second);
  for (const auto& [kind, bytes] : r.peak_memory_bytes)
    (*m->mutable_peak_memory_bytes())[kind] = bytes;
  return event;
}

lomo::v1::JobEvent eval_event(const protocol::Eval& r) {
  lomo::v1::JobEvent event;
  auto* eval = event.mutable_eval();
  eval->set_step(r.step);
  eval->set_loss(r.loss);
  eval->set_perplexity(r.perplexity);
  if (r.accuracy) {
    eval->set_accuracy(*r.accuracy);
    eval->set_examples(r.examples);
  }
  return event;
}

void TrainerChannel::poll(const std::function<void(protocol::Record)>& on_record) {
  const int fd = ::open(file_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  std::string bytes;
  char buffer[65536];
  while (true) {
    const ssize_t n = ::pread(fd, buffer, sizeof(buffer), offset_);
    if (n <= 0) break;
    offset_ += n;
    bytes.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  reader_.feed(bytes, on_record);
}

}  // namespace lomo::daemon
