// Fuzzes the job spec parser, which reads text from users and from the REST API. It may reject
// input only with JobSpecError (yaml-cpp's own exceptions must have been converted); a spec it
// accepts must come back unchanged through job_spec_to_yaml, which is how the coordinator stores
// and forwards specs, and that canonical text must be a fixed point: parsed and written again it is
// the same text, so a spec stored, sent to a worker and re-stored never drifts. The one-line JSON
// form (the REST/Struct view) must read back to the same spec too. Anything else (a crash, a
// sanitizer report, another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "jobspec/job_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  lomo::JobSpec spec;
  try {
    spec = lomo::parse_job_spec(text, "fuzz.yaml");
  } catch (const lomo::JobSpecError&) {
    return -1;  // the documented rejection
  }
  // Must not throw: every spec parse returns is valid and writable.
  const std::string yaml = lomo::job_spec_to_yaml(spec);
  const lomo::JobSpec reparsed = lomo::parse_job_spec(yaml, "round-trip.yaml");
  if (!(reparsed == spec)) __builtin_trap();
  if (lomo::job_spec_to_yaml(reparsed) != yaml) __builtin_trap();
  if (!(lomo::parse_job_spec(lomo::job_spec_to_json(spec), "round-trip.json") == spec)) {
    __builtin_trap();
  }
  return 0;
}
