// Words and errors that more than one of the coordinator's roles uses: state and device names for
// log lines and reasons, the INTERNAL and NOT_FOUND answers, and the events every transition
// records.
#pragma once

#include <grpcpp/support/status.h>

#include <exception>
#include <string>

#include "lomo/v1/jobs.pb.h"
#include "lomo/v1/workers.pb.h"

namespace lomo::server {

bool is_terminal(v1::JobState state);

// "RUNNING" for JOB_STATE_RUNNING.
std::string state_name(v1::JobState state);
// "cpu", "cuda", "unspecified": a device kind in messages and metric labels.
std::string device_kind_name(v1::DeviceKind kind);
// "cuda NVIDIA H100 80GB HBM3", or just the kind when the device has no name.
std::string device_text(const v1::DeviceInfo& device);
// "1.5": seconds in log lines and reasons.
std::string seconds_text(double seconds);

// Logs the error and returns INTERNAL "<what>: <error>".
grpc::Status internal_error(const std::string& what, const std::exception& error);
// INVALID_ARGUMENT when job_id is empty.
grpc::Status require_job_id(const std::string& job_id);
grpc::Status job_not_found(const std::string& job_id);

v1::JobEvent state_change_event(v1::JobState state, const std::string& reason);
v1::JobEvent log_event(const std::string& text);

}  // namespace lomo::server
