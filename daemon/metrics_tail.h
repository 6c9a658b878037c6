// Follows the training child's <output.dir>/metrics.jsonl and turns its lines into job events:
// one TrainingMetrics per step, one EvalResult per evaluation.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "lomo/v1/jobs.pb.h"

namespace lomo::daemon {

// One metrics.jsonl line as an event (time unset): a training line has "loss", an evaluation
// line "eval_loss". nullopt for anything else (a torn or foreign line). `total_steps` fills
// TrainingMetrics.total_steps (the file does not carry it).
std::optional<lomo::v1::JobEvent> metrics_line_to_event(const std::string& line,
                                                        int64_t total_steps);

class MetricsTail {
 public:
  explicit MetricsTail(std::filesystem::path file) : file_(std::move(file)) {}

  // Events for complete lines written since the last call, in file order. The trainer rewrites
  // the file when it resumes (keeping lines up to the checkpoint's step): steps already reported
  // are not reported again.
  std::vector<lomo::v1::JobEvent> poll(int64_t total_steps);

 private:
  std::filesystem::path file_;
  ino_t inode_ = 0;
  off_t offset_ = 0;
  std::string partial_;
  int64_t last_training_step_ = 0;
  int64_t last_eval_step_ = -1;
};

}  // namespace lomo::daemon
