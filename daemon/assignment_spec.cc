#include "daemon/assignment_spec.h"

#include <google/protobuf/util/json_util.h>

namespace lomo::daemon {

JobSpec spec_from_struct(const google::protobuf::Struct& spec, const std::string& source) {
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(spec, &json);
  if (!status.ok()) {
    throw JobSpecError(source, "", "cannot turn the spec into JSON: " + status.ToString());
  }
  return parse_job_spec(json, source);
}

std::filesystem::path attempt_directory(const std::filesystem::path& work_dir,
                                        const std::string& job_id, int64_t attempt) {
  std::string safe = job_id.empty() ? "unnamed" : job_id;
  for (char& c : safe) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) c = '_';
  }
  if (safe == "." || safe == "..") safe = "_" + safe;
  return work_dir / "jobs" / safe / ("attempt-" + std::to_string(attempt));
}

}  // namespace lomo::daemon
