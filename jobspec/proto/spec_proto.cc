#include "jobspec/proto/spec_proto.h"

#include <google/protobuf/util/json_util.h>

#include <stdexcept>

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

}  // namespace

SubmittedSpec read_submitted_spec(const v1::SubmitJobRequest& request, const std::string& source) {
  const bool has_text = !request.spec_text().empty();
  if (has_text && request.has_spec()) {
    throw JobSpecError(source, "", "set only one of spec (a JSON object) and spec_text");
  }
  if (!has_text && !request.has_spec()) {
    throw JobSpecError(source, "", "required (the job spec as a JSON object, or as spec_text)");
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
