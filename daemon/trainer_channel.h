// The daemon's end of the trainer→daemon protocol (common/trainer_protocol.h): follows the training
// child's protocol file as it grows and turns its metrics and eval records into job events.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <functional>

#include "common/trainer_protocol.h"
#include "lomo/v1/jobs.pb.h"

namespace lomo::daemon {

// A metrics record as a TrainingMetrics event, an eval record as an EvalResult event (time unset).
lomo::v1::JobEvent metrics_event(const trainer_protocol::Metrics& metrics);
lomo::v1::JobEvent eval_event(const trainer_protocol::Eval& eval);

class TrainerChannel {
 public:
  explicit TrainerChannel(std::filesystem::path file) : file_(std::move(file)) {}

  // Hands every record completed since the last call to `on_record`, in file order; a line still
  // being written waits for the next call. No file yet: nothing. Throws
  // trainer_protocol::ProtocolError for a line that is not a record of a known version (after the
  // records before it); a later call goes on after that line.
  void poll(const std::function<void(trainer_protocol::Record)>& on_record);

  // Bytes of an unfinished last line: at the end of a run, the child died while writing it.
  size_t pending_bytes() const { return reader_.pending_bytes(); }

 private:
  std::filesystem::path file_;
  off_t offset_ = 0;
  trainer_protocol::ProtocolReader reader_;
};

}  // namespace lomo::daemon
