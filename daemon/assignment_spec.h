// From an Assignment to the spec a training child runs: the coordinator's canonical spec
// (validated once, where the job was submitted). The runner then moves output.dir into the
// attempt's own directory (common/checkpoint_layout.h) and writes it as the child's job.yaml.
#pragma once

#include <google/protobuf/struct.pb.h>

#include <string>

#include "jobspec/job_spec.h"
#include "lomo/v1/workers.pb.h"

namespace lomo::daemon {

// The assignment's canonical_spec (exact YAML), or its Struct when a coordinator sent only that;
// `source` names it in errors. Throws JobSpecError (with the field's path) for a spec that cannot
// run.
JobSpec spec_from_assignment(const v1::Assignment& assignment, const std::string& source);

// Parses the Struct as parse_job_spec would parse its JSON. Throws JobSpecError.
JobSpec spec_from_struct(const google::protobuf::Struct& spec, const std::string& source);

}  // namespace lomo::daemon
