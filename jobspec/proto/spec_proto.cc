#include "jobspec/proto/spec_proto.h"

#include <google/protobuf/util/json_util.h>

#include <cmath>
#include <stdexcept>
#include <string>

namespace lomo {
namespace {

// A Struct's JSON: protobuf prints each number as the shortest text of its double.
std::string struct_json_or_throw(const google::protobuf::Struct& value, const std::string& source) {
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(value, &json);
  if (!status.ok()) {
    throw JobSpecError(source, "", "cannot read as JSON: " + std::string(status.message()));
  }
  return json;
}

// " (line 12)" at the end of a problem's message.
std::string without_line(const std::string& message) {
  const size_t open = message.rfind(" (line ");
  if (open == std::string::npos || message.back() != ')') return message;
  for (size_t i = open + 7; i + 1 < message.size(); ++i) {
    if (message[i] < '0' || message[i] > '9') return message;
  }
  return message.substr(0, open);
}

// A Struct holds every number as a double, which is exact only below 2^53: a larger integer (a
// seed, say) has already been rounded by the time it arrives, and its shortest printed form may
// look like a plain integer. Refuse it, naming the field, rather than train with another value.
void refuse_inexact_numbers(const google::protobuf::Value& value, const std::string& path,
                            const std::string& source) {
  constexpr double kExactLimit = 9007199254740992.0;  // 2^53
  switch (value.kind_case()) {
    case google::protobuf::Value::kNumberValue:
      if (std::fabs(value.number_value()) >= kExactLimit) {
        throw JobSpecError(source, path,
                           "a number this large (" + std::to_string(value.number_value()) +
                               ") cannot travel exactly in a JSON object spec (a double, exact "
                               "below 2^53); send the spec as spec_text to keep 64-bit integers");
      }
      return;
    case google::protobuf::Value::kStructValue:
      for (const auto& [key, field] : value.struct_value().fields()) {
        refuse_inexact_numbers(field, path.empty() ? key : path + "." + key, source);
      }
      return;
    case google::protobuf::Value::kListValue:
      for (int i = 0; i < value.list_value().values_size(); ++i) {
        refuse_inexact_numbers(value.list_value().values(i), path + "[" + std::to_string(i) + "]",
                               source);
      }
      return;
    default:
      return;
  }
}

}  // namespace

SubmittedSpec read_submitted_spec(const v1::SubmitJobRequest& request, const std::string& source) {
  const bool has_text = !request.spec_text().empty();
  if (has_text && request.has_spec()) {
    throw JobSpecError(source, "", "set only one of spec (a JSON object) and spec_text");
  }
  if (!has_text && !request.has_spec()) {
    throw JobSpecError(source, "", "required (the job spec as a JSON object, or as spec_text)");
  }
  if (!has_text) {
    google::protobuf::Value root;
    *root.mutable_struct_value() = request.spec();
    refuse_inexact_numbers(root, "", source);
  }
  SubmittedSpec submitted;
  submitted.original =
      has_text ? request.spec_text() : struct_json_or_throw(request.spec(), source);
  submitted.overrides.assign(request.overrides().begin(), request.overrides().end());
  submitted.spec = parse_job_spec(submitted.original, source, submitted.overrides);
  submitted.canonical = job_spec_to_yaml(submitted.spec);
  return submitted;
}

JobSpec stored_job_spec(const v1::Job& job, const std::string& source) {
  if (!job.canonical_spec().empty()) return parse_job_spec(job.canonical_spec(), source);
  return parse_job_spec(struct_json_or_throw(job.spec(), source), source);
}

JobSpec assignment_job_spec(const v1::Assignment& assignment, const std::string& source) {
  if (!assignment.canonical_spec().empty()) {
    return parse_job_spec(assignment.canonical_spec(), source);
  }
  return parse_job_spec(struct_json_or_throw(assignment.spec(), source), source);
}

void set_job_spec(const SubmittedSpec& submitted, v1::Job* job) {
  *job->mutable_spec() = job_spec_to_struct(submitted.spec);
  job->set_canonical_spec(submitted.canonical);
  job->set_original_spec(submitted.original);
  job->clear_spec_overrides();
  for (const std::string& o : submitted.overrides) job->add_spec_overrides(o);
}

google::protobuf::Struct job_spec_to_struct(const JobSpec& spec) {
  google::protobuf::Struct value;
  const auto status = google::protobuf::util::JsonStringToMessage(job_spec_to_json(spec), &value);
  if (!status.ok()) {
    // job_spec_to_json writes valid JSON for every spec; a failure here is a defect.
    throw std::logic_error("job_spec_to_json gave JSON protobuf cannot read: " +
                           std::string(status.message()));
  }
  return value;
}

std::string struct_to_json(const google::protobuf::Struct& value) {
  std::string json;
  google::protobuf::util::MessageToJsonString(value, &json);
  return json;
}

std::string spec_problems_for_api(const JobSpecError& error, bool keep_lines,
                                  const std::string& source) {
  std::string text;
  for (const JobSpecProblem& problem : error.problems()) {
    if (!text.empty()) text += "; ";
    if (problem.source != source) text += problem.source + ": ";
    if (!problem.field.empty()) text += problem.field + ": ";
    text += keep_lines ? problem.message : without_line(problem.message);
  }
  return text;
}

bool spec_lines_are_meaningful(const v1::SubmitJobRequest& request) {
  return request.spec_text().find('\n') != std::string::npos;
}

}  // namespace lomo
