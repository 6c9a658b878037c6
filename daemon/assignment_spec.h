// From an Assignment's spec (google.protobuf.Struct holding the job YAML schema as JSON values) to
// the job.yaml a training child runs: the same spec with output.dir moved into the attempt's own
// directory, so attempts never share files.
#pragma once

#include <google/protobuf/struct.pb.h>

#include <filesystem>
#include <string>

#include "jobspec/job_spec.h"

namespace lomo::daemon {

// Parses the Struct as parse_job_spec would parse its JSON; `source` names it in errors.
// Throws JobSpecError (with the field's path) for a spec that cannot run.
JobSpec spec_from_struct(const google::protobuf::Struct& spec, const std::string& source);

// <work dir>/jobs/<job id>/attempt-<n>: characters of the job id other than [A-Za-z0-9._-] become
// '_' so that an id can never climb out of the work directory.
std::filesystem::path attempt_directory(const std::filesystem::path& work_dir,
                                        const std::string& job_id, int64_t attempt);

}  // namespace lomo::daemon
