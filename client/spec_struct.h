// A job spec as the API carries it: google.protobuf.Struct holding the job YAML schema as JSON
// values (SubmitJobRequest.spec).
#pragma once

#include <google/protobuf/struct.pb.h>

#include <string>

#include "jobspec/job_spec.h"

namespace lomo::client {

// Every field of `spec` (its canonical YAML, job_spec_to_yaml) as Struct values: plain scalars
// that read as numbers or booleans become JSON numbers and booleans, null stays null, the rest
// strings. parse_job_spec of the Struct's JSON gives `spec` back. Integers beyond 2^53 (a seed)
// lose precision: JSON numbers are doubles.
google::protobuf::Struct job_spec_to_struct(const JobSpec& spec);

// The Struct as compact JSON text.
std::string struct_to_json(const google::protobuf::Struct& value);

}  // namespace lomo::client
