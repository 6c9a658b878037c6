// The series every lomo program serves beside its own, as Prometheus operators expect them:
// lomo_build_info (which build runs where) and the process_* series of the client-library
// conventions (CPU, resident memory, start time, file descriptors). prometheus-cpp provides
// neither, so they are read from /proc/self and getrusage on each scrape.
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <string>
#include <vector>

namespace lomo {

// What the build system recorded about this binary (common/CMakeLists.txt sets them).
struct BuildInfo {
  std::string version;     // LOMO_VERSION
  std::string revision;    // git revision at configure time, "unknown" without a git checkout
  std::string build_type;  // CMAKE_BUILD_TYPE
  std::string isa;         // "native" (local builds) or the portable baseline, e.g. "x86-64-v3"
};
BuildInfo build_info();

// Collect() reads the values now, so every scrape carries current ones.
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override;
};

// The exposition text of `families` plus this process's series: what /metrics serves.
std::string serialize_with_process_metrics(std::vector<prometheus::MetricFamily> families);

// The Content-Type of the Prometheus text exposition format, version 0.0.4.
inline constexpr const char* kPrometheusContentType = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace lomo
