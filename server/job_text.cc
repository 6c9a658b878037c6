#include "server/job_text.h"

#include <algorithm>
#include <cctype>
#include <cstdio>

#include "common/log.h"
#include "server/timestamps.h"

namespace lomo::server {

bool is_terminal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

std::string state_name(v1::JobState state) {
  std::string name = v1::JobState_Name(state);
  const std::string prefix = "JOB_STATE_";
  return name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name;
}

std::string device_kind_name(v1::DeviceKind kind) {
  std::string name = v1::DeviceKind_IsValid(kind) ? v1::DeviceKind_Name(kind) : "";
  const std::string prefix = "DEVICE_KIND_";
  if (name.rfind(prefix, 0) != 0) return "unspecified";
  name = name.substr(prefix.size());
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return name;
}

std::string device_text(const v1::DeviceInfo& device) {
  const std::string kind = device_kind_name(device.kind());
  return device.name().empty() ? kind : kind + " " + device.name();
}

std::string seconds_text(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f", seconds);
  return text;
}

grpc::Status internal_error(const std::string& what, const std::exception& error) {
  log_line("error: " + what + ": " + error.what());
  return grpc::Status(grpc::StatusCode::INTERNAL, what + ": " + error.what());
}

grpc::Status require_job_id(const std::string& job_id) {
  if (job_id.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "job_id: required");
  }
  return grpc::Status::OK;
}

grpc::Status job_not_found(const std::string& job_id) {
  return grpc::Status(grpc::StatusCode::NOT_FOUND, "job " + job_id + " not found");
}

v1::JobEvent state_change_event(v1::JobState state, const std::string& reason) {
  v1::JobEvent event;
  *event.mutable_time() = now_timestamp();
  event.mutable_state_change()->set_state(state);
  event.mutable_state_change()->set_reason(reason);
  return event;
}

v1::JobEvent log_event(const std::string& text) {
  v1::JobEvent event;
  *event.mutable_time() = now_timestamp();
  event.mutable_log()->set_text(text);
  return event;
}

}  // namespace lomo::server
