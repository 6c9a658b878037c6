// What Prometheus operators expect of both daemons' /metrics (issue 13): the standard content
// type, lomo_build_info, the process_* series with values that follow the process, and the
// worker's /healthz and /readyz beside /metrics on its listener.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <regex>
#include <string>

#include "common/process_metrics.h"
#include "daemon/worker_metrics.h"

namespace lomo {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// The value of the unlabelled sample `name` in exposition text; NaN when absent.
double sample(const std::string& text, const std::string& name) {
  const std::regex line("(^|\n)" + name + " ([^\n]+)");
  std::smatch match;
  if (!std::regex_search(text, match, line)) return std::nan("");
  return std::stod(match[2]);
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

TEST(ProcessMetrics, FollowTheProcess) {
  const std::string before = serialize_with_process_metrics({});
  // An open file is one more descriptor at the next scrape.
  const int fd = ::open("/proc/self/stat", O_RDONLY);
  ASSERT_GE(fd, 0);
  const std::string opened = serialize_with_process_metrics({});
  ::close(fd);
  EXPECT_EQ(sample(opened, "process_open_fds"), sample(before, "process_open_fds") + 1);
  // Burn some CPU: the counter grows.
  volatile double sink = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (std::chrono::steady_clock::now() < until) sink = sink + std::sqrt(sink + 1);
  const std::string after = serialize_with_process_metrics({});
  EXPECT_GT(sample(after, "process_cpu_seconds_total"),
            sample(before, "process_cpu_seconds_total"));
  EXPECT_GT(sample(after, "process_resident_memory_bytes"), 1 << 20);
  EXPECT_GE(sample(after, "process_virtual_memory_bytes"),
            sample(after, "process_resident_memory_bytes"));
  // This test started within the last hour, and not in the future.
  const double start = sample(after, "process_start_time_seconds");
  EXPECT_LE(start, now_seconds() + 1);
  EXPECT_GT(start, now_seconds() - 3600);
  EXPECT_GT(sample(after, "process_max_fds"), sample(after, "process_open_fds"));
  EXPECT_THAT(after, HasSubstr("# TYPE process_cpu_seconds_total counter"));
}

TEST(ProcessMetrics, BuildInfoNamesTheBuild) {
  const BuildInfo info = build_info();
  EXPECT_FALSE(info.version.empty());
  EXPECT_FALSE(info.revision.empty());
  EXPECT_FALSE(info.isa.empty());
  const std::string text = serialize_with_process_metrics({});
  EXPECT_THAT(
      text, HasSubstr("lomo_build_info{build_type=\"" + info.build_type + "\",isa=\"" + info.isa +
                      "\",revision=\"" + info.revision + "\",version=\"" + info.version + "\"} 1"));
}

TEST(WorkerListener, ServesMetricsHealthAndReadiness) {
  daemon::WorkerMetrics metrics("127.0.0.1:0");
  ASSERT_GT(metrics.port(), 0);
  httplib::Client client("127.0.0.1", metrics.port());
  metrics.observe_rank_step("job-7", 0, {0.5, 0.25, 64});

  const auto scraped = client.Get("/metrics");
  ASSERT_TRUE(scraped);
  EXPECT_EQ(scraped->status, 200);
  EXPECT_EQ(scraped->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_THAT(scraped->body, HasSubstr("lomo_worker_step_seconds{job_id=\"job-7\",rank=\"0\"}"));
  EXPECT_THAT(scraped->body, HasSubstr("lomo_build_info{"));
  EXPECT_THAT(scraped->body, HasSubstr("process_resident_memory_bytes "));
  // Prometheus attaches `job` and `instance` to every target; a series of ours must not.
  EXPECT_THAT(scraped->body, Not(HasSubstr("{job=")));
  EXPECT_THAT(scraped->body, Not(HasSubstr(",job=")));

  // Alive whether or not the coordinator is there; ready only while registered with it.
  const auto live = client.Get("/healthz");
  ASSERT_TRUE(live);
  EXPECT_EQ(live->status, 200);
  auto ready = client.Get("/readyz");
  ASSERT_TRUE(ready);
  EXPECT_EQ(ready->status, 503);
  EXPECT_THAT(ready->body, HasSubstr("not registered"));
  metrics.set_connected(true);
  ready = client.Get("/readyz");
  ASSERT_TRUE(ready);
  EXPECT_EQ(ready->status, 200);
  metrics.set_connected(false);
  ready = client.Get("/readyz");
  ASSERT_TRUE(ready);
  EXPECT_EQ(ready->status, 503);
}

TEST(WorkerListener, AnAddressInUseIsRefusedNamingTheFlag) {
  daemon::WorkerMetrics first("127.0.0.1:0");
  const std::string taken = "127.0.0.1:" + std::to_string(first.port());
  try {
    daemon::WorkerMetrics second(taken);
    FAIL() << "a second listener bound " << taken;
  } catch (const std::runtime_error& error) {
    EXPECT_THAT(error.what(), HasSubstr("--metrics-listen " + taken));
  }
  EXPECT_THROW(daemon::WorkerMetrics("localhost"), std::runtime_error);
  EXPECT_THROW(daemon::WorkerMetrics("127.0.0.1:99999"), std::runtime_error);
}

}  // namespace
}  // namespace lomo
