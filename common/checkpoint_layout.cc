#include "common/checkpoint_layout.h"

#include <cstdio>
#include <fstream>
#include <stdexcept>

#include "common/atomic_file.h"

namespace lomo {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kStepPrefix = "step-";
constexpr std::string_view kTemporaryPrefix = ".tmp-";
constexpr const char* kLatestPointer = "latest";
// int64_t holds every 18-digit number; 19 digits may overflow.
constexpr size_t kMaxStepDigits = 18;

}  // namespace

std::string checkpoint_directory_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

std::optional<int64_t> checkpoint_step_from_name(std::string_view name) {
  if (!name.starts_with(kStepPrefix)) return std::nullopt;
  const std::string_view digits = name.substr(kStepPrefix.size());
  if (digits.empty() || digits.size() > kMaxStepDigits ||
      digits.find_first_not_of("0123456789") != std::string_view::npos) {
    return std::nullopt;
  }
  return std::stoll(std::string(digits));
}

fs::path checkpoints_directory(const fs::path& output_dir) { return output_dir / "checkpoints"; }

fs::path checkpoint_directory(const fs::path& checkpoints_dir, int64_t step) {
  return checkpoints_dir / checkpoint_directory_name(step);
}

fs::path temporary_checkpoint_directory(const fs::path& checkpoints_dir, int64_t step) {
  return checkpoints_dir / (std::string(kTemporaryPrefix) + checkpoint_directory_name(step));
}

fs::path temporary_upload_directory(const fs::path& checkpoints_dir, int64_t step,
                                    uint64_t connection, int64_t attempt) {
  fs::path directory = temporary_checkpoint_directory(checkpoints_dir, step);
  directory += ".upload-" + std::to_string(connection) + "-" + std::to_string(attempt);
  return directory;
}

bool is_temporary_checkpoint_name(std::string_view name) {
  return name.starts_with(kTemporaryPrefix);
}

fs::path latest_checkpoint_pointer(const fs::path& checkpoints_dir) {
  return checkpoints_dir / kLatestPointer;
}

void write_latest_checkpoint(const fs::path& checkpoints_dir, int64_t step) {
  write_file_atomically(latest_checkpoint_pointer(checkpoints_dir),
                        checkpoint_directory_name(step) + "\n");
}

std::optional<fs::path> read_latest_checkpoint(const fs::path& checkpoints_dir) {
  const fs::path pointer = latest_checkpoint_pointer(checkpoints_dir);
  std::ifstream in(pointer);
  if (!in) return std::nullopt;
  std::string name;
  std::getline(in, name);
  const fs::path dir = checkpoints_dir / name;
  // Only a step directory ("step-NNNNNNNN") is a checkpoint: "..", "." or another folder would
  // resume from somewhere else.
  if (!checkpoint_step_from_name(name) || !fs::is_directory(dir)) {
    throw std::runtime_error(pointer.string() + ": names '" + name +
                             "', which is not a checkpoint directory beside it");
  }
  return dir;
}

fs::path attempt_directory(const fs::path& work_dir, const std::string& job_id, int64_t attempt) {
  std::string safe = job_id.empty() ? "unnamed" : job_id;
  for (char& c : safe) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) c = '_';
  }
  if (safe == "." || safe == "..") safe = "_" + safe;
  return work_dir / "jobs" / safe / ("attempt-" + std::to_string(attempt));
}

fs::path attempt_output_directory(const fs::path& attempt_dir) { return attempt_dir / "out"; }
fs::path attempt_job_file(const fs::path& attempt_dir) { return attempt_dir / "job.yaml"; }
fs::path attempt_protocol_file(const fs::path& attempt_dir) {
  return attempt_dir / "protocol.jsonl";
}

}  // namespace lomo
