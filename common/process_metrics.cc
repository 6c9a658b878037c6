#include "common/process_metrics.h"

#include <prometheus/text_serializer.h>
#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>

namespace lomo {
namespace {

std::optional<std::string> read_text(const char* path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

prometheus::MetricFamily family(const std::string& name, const std::string& help,
                                prometheus::MetricType type, double value) {
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  return prometheus::MetricFamily{name, help, type, {metric}};
}

double cpu_seconds() {
  rusage usage{};
  if (::getrusage(RUSAGE_SELF, &usage) != 0) return 0.0;
  auto seconds = [](const timeval& t) { return t.tv_sec + t.tv_usec / 1e6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// Field `index` (1-based, as proc(5) numbers them) of /proc/self/stat. The command name (field 2)
// may hold spaces and parentheses, so fields are counted after its last ')'.
std::optional<double> stat_field(int index) {
  const std::optional<std::string> stat = read_text("/proc/self/stat");
  if (!stat) return std::nullopt;
  const size_t close = stat->rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream fields(stat->substr(close + 1));
  std::string field;
  for (int i = 3; i <= index && fields >> field; ++i) {
    if (i == index) return std::stod(field);
  }
  return std::nullopt;
}

// Seconds since the epoch at which the system booted (/proc/stat "btime").
std::optional<double> boot_time() {
  const std::optional<std::string> stat = read_text("/proc/stat");
  if (!stat) return std::nullopt;
  const size_t at = stat->find("\nbtime ");
  if (at == std::string::npos) return std::nullopt;
  return std::stod(stat->substr(at + 7));
}

std::optional<double> start_time_seconds() {
  const std::optional<double> ticks = stat_field(22);  // starttime, clock ticks after boot
  const std::optional<double> boot = boot_time();
  const long hz = ::sysconf(_SC_CLK_TCK);
  if (!ticks || !boot || hz <= 0) return std::nullopt;
  return *boot + *ticks / static_cast<double>(hz);
}

// Virtual and resident size in bytes, from /proc/self/statm (in pages).
std::optional<std::pair<double, double>> memory_bytes() {
  const std::optional<std::string> statm = read_text("/proc/self/statm");
  if (!statm) return std::nullopt;
  std::istringstream fields(*statm);
  double size = 0, resident = 0;
  if (!(fields >> size >> resident)) return std::nullopt;
  const double page = static_cast<double>(::sysconf(_SC_PAGESIZE));
  return std::make_pair(size * page, resident * page);
}

std::optional<double> open_fds() {
  std::error_code error;
  std::filesystem::directory_iterator it("/proc/self/fd", error);
  if (error) return std::nullopt;
  double count = 0;
  for (; it != std::filesystem::directory_iterator(); it.increment(error)) {
    if (error) return std::nullopt;
    ++count;
  }
  return count - 1;  // the directory iterator's own descriptor
}

prometheus::MetricFamily build_info_family() {
  const BuildInfo info = build_info();
  prometheus::ClientMetric metric;
  metric.gauge.value = 1;
  metric.label = {{"build_type", info.build_type},
                  {"isa", info.isa},
                  {"revision", info.revision},
                  {"version", info.version}};
  return {"lomo_build_info",
          "Always 1; the labels say which build of lomo this process runs",
          prometheus::MetricType::Gauge,
          {metric}};
}

}  // namespace

BuildInfo build_info() {
  return BuildInfo{LOMO_BUILD_VERSION, LOMO_BUILD_REVISION, LOMO_BUILD_TYPE, LOMO_BUILD_ISA};
}

std::vector<prometheus::MetricFamily> ProcessCollector::Collect() const {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> families{build_info_family()};
  families.push_back(family("process_cpu_seconds_total",
                            "Total user and system CPU time spent in seconds.", MetricType::Counter,
                            cpu_seconds()));
  if (const auto memory = memory_bytes()) {
    families.push_back(family("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                              MetricType::Gauge, memory->first));
    families.push_back(family("process_resident_memory_bytes", "Resident memory size in bytes.",
                              MetricType::Gauge, memory->second));
  }
  if (const auto start = start_time_seconds()) {
    families.push_back(family("process_start_time_seconds",
                              "Start time of the process since unix epoch in seconds.",
                              MetricType::Gauge, *start));
  }
  if (const auto fds = open_fds()) {
    families.push_back(
        family("process_open_fds", "Number of open file descriptors.", MetricType::Gauge, *fds));
  }
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    families.push_back(family("process_max_fds", "Maximum number of open file descriptors.",
                              MetricType::Gauge, static_cast<double>(limit.rlim_cur)));
  }
  return families;
}

std::string serialize_with_process_metrics(std::vector<prometheus::MetricFamily> families) {
  std::vector<prometheus::MetricFamily> process = ProcessCollector().Collect();
  families.insert(families.end(), std::make_move_iterator(process.begin()),
                  std::make_move_iterator(process.end()));
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace lomo
