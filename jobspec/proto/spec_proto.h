// The job spec at the API's edges. A spec enters the system once (SubmitJob over gRPC or REST,
// from lomoctl or anyone else), is parsed and validated there, and from then on travels as its
// canonical YAML (job_spec_to_yaml): stored on the coordinator beside the original text, sent in
// the Assignment, written to the job.yaml the training child runs. The Struct form exists for
// JSON clients; its numbers are doubles, so it is never the authoritative copy.
#pragma once

#include <google/protobuf/struct.pb.h>

#include <string>
#include <vector>

#include "jobspec/job_spec.h"
#include "lomo/v1/jobs.pb.h"
#include "lomo/v1/workers.pb.h"

namespace lomo {

// A spec as it was submitted and as it was understood.
struct SubmittedSpec {
  JobSpec spec;                        // parsed and validated
  std::string canonical;               // job_spec_to_yaml(spec)
  std::string original;                // spec_text, or the Struct as JSON
  std::vector<std::string> overrides;  // as given, in order
};

// Parses and validates a SubmitJobRequest's spec: spec_text (YAML or JSON) or, when that is
// empty, the Struct, with the request's overrides applied before the one validation. Problems name
// `source` ("spec") or the override as their source. Throws JobSpecError listing every problem,
// also for a request that sets both forms or neither.
SubmittedSpec read_submitted_spec(const v1::SubmitJobRequest& request,
                                  const std::string& source = "spec");

// The spec of a stored job: its canonical_spec, or (a job stored before canonical_spec existed)
// its Struct. Throws JobSpecError.
JobSpec stored_job_spec(const v1::Job& job, const std::string& source);

// The spec of an Assignment: canonical_spec, or the Struct when a coordinator sent only that.
// Throws JobSpecError.
JobSpec assignment_job_spec(const v1::Assignment& assignment, const std::string& source);

// Records `submitted` in `job`: the canonical and original texts, the overrides, and the Struct
// form of the canonical spec (for JSON clients).
void set_job_spec(const SubmittedSpec& submitted, v1::Job* job);

// Every field of `spec` as Struct values, typed by the schema (job_spec_to_json), not guessed
// from their text. Integers above 2^53 are rounded: a Struct holds doubles.
google::protobuf::Struct job_spec_to_struct(const JobSpec& spec);

// A Struct as compact JSON text.
std::string struct_to_json(const google::protobuf::Struct& value);

// The problems of `error` for an API status message: "optimizer.lr: must be > 0, got -1" for
// one, joined by "; " for several; a problem whose source is not `source` (an override) keeps it
// as a prefix. With `keep_lines` false, the "(line N)" of each problem is left out (JSON on one
// line, or a Struct printed as such, has no lines worth naming).
std::string spec_problems_for_api(const JobSpecError& error, bool keep_lines,
                                  const std::string& source = "spec");

// Whether the line numbers of problems in `request`'s spec help the user: only for a spec_text
// of several lines.
bool spec_lines_are_meaningful(const v1::SubmitJobRequest& request);

}  // namespace lomo
