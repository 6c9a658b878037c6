#include "daemon/assignment_spec.h"

#include "jobspec/proto/spec_proto.h"

namespace lomo::daemon {

JobSpec spec_from_assignment(const v1::Assignment& assignment, const std::string& source) {
  return assignment_job_spec(assignment, source);
}

JobSpec spec_from_struct(const google::protobuf::Struct& spec, const std::string& source) {
  v1::Assignment assignment;
  *assignment.mutable_spec() = spec;
  return assignment_job_spec(assignment, source);
}

}  // namespace lomo::daemon
