// /metrics of a real coordinator: the series DESIGN.md names, and per-job gauges that exist only
// while the job is active.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <regex>

#include "tests/integration/coordinator_harness.h"

namespace lomo::server::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;
using ::testing::Not;

// The value of one sample line ("name{labels} value"), or NaN if absent.
double sample(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return std::nan("");
  return std::stod(text.substr(at + series.size() + 2));
}

TEST(CoordinatorMetrics, ExposesTheNamedSeriesAndDropsEndedJobs) {
  TempDir dir;
  CoordinatorProcess coordinator(ProcessOptions(dir.path() / "data"));
  auto jobs = coordinator.jobs();
  v1::Job running, waiting;
  ASSERT_TRUE(submit(*jobs, submit_request("running"), &running).ok());
  ASSERT_TRUE(submit(*jobs, submit_request("waiting"), &waiting).ok());
  TestWorker worker(coordinator.channel());
  worker.register_as("w-metrics");
  worker.start_heartbeats(milliseconds(200));
  ASSERT_TRUE(worker.next_assignment(seconds(5)).has_value());
  worker.set_current(running.id(), 1);
  ASSERT_TRUE(worker.report(running.id(), 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(worker.send_metrics(running.id(), 1, 42, 2.5, 1234.5));

  const std::string job_label = "{job_id=\"" + running.id() + "\"}";
  std::string text;
  ASSERT_TRUE(wait_until(
      [&] {
        text = "\n" + http_request(coordinator, "GET", "/metrics").body;
        return sample(text, "lomo_job_step" + job_label) == 42;
      },
      seconds(5)))
      << text;
  EXPECT_EQ(sample(text, "lomo_job_loss" + job_label), 2.5);
  EXPECT_EQ(sample(text, "lomo_job_tokens_per_second" + job_label), 1234.5);
  EXPECT_EQ(sample(text, "lomo_jobs{state=\"running\"}"), 1);
  EXPECT_EQ(sample(text, "lomo_jobs{state=\"queued\"}"), 1);
  EXPECT_EQ(sample(text, "lomo_jobs{state=\"succeeded\"}"), 0);
  EXPECT_EQ(sample(text, "lomo_workers_connected{device=\"cpu\"}"), 1);
  EXPECT_EQ(sample(text, "lomo_workers_connected{device=\"cuda\"}"), 0);
  EXPECT_EQ(sample(text, "lomo_scheduling_latency_seconds_count"), 1);
  EXPECT_THAT(text, HasSubstr("# TYPE lomo_scheduling_latency_seconds histogram"));
  EXPECT_THAT(text, HasSubstr("lomo_scheduling_latency_seconds_bucket{le=\"+Inf\"} 1"));
  EXPECT_EQ(sample(text, "lomo_job_restarts_total"), 0);
  EXPECT_THAT(text, HasSubstr("# TYPE lomo_job_restarts_total counter"));
  EXPECT_EQ(sample(text, "lomo_jobs_submitted_total"), 2);
  // Every counter ends in _total; every series starts with lomo_, but for the process_* series
  // that every Prometheus client library names alike.
  const std::regex type_line("# TYPE (\\S+) (\\S+)");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), type_line);
       it != std::sregex_iterator(); ++it) {
    const std::string name = (*it)[1];
    EXPECT_TRUE(name.starts_with("lomo_") || name.starts_with("process_")) << name;
    if ((*it)[2] == "counter") {
      EXPECT_TRUE(name.ends_with("_total")) << name;
    }
  }

  ASSERT_TRUE(worker.report(running.id(), 1, v1::JOB_STATE_SUCCEEDED));
  // The job's end and the waiting job's assignment are two transitions: a scrape may fall between
  // them, so wait for both.
  EXPECT_TRUE(wait_until(
      [&] {
        text = "\n" + http_request(coordinator, "GET", "/metrics").body;
        return sample(text, "lomo_jobs{state=\"succeeded\"}") == 1 &&
               sample(text, "lomo_jobs{state=\"assigned\"}") == 1 &&
               sample(text, "lomo_scheduling_latency_seconds_count") == 2 &&
               text.find(running.id()) == std::string::npos;
      },
      seconds(5)))
      << text;
  EXPECT_THAT(text, Not(HasSubstr(running.id()))) << "per-job series go when the job ends";
  // The idle worker took the waiting job at once.
  EXPECT_EQ(sample(text, "lomo_jobs{state=\"running\"}"), 0);
  EXPECT_EQ(sample(text, "lomo_scheduling_latency_seconds_count"), 2);

  worker.disconnect();
  ASSERT_TRUE(wait_until(
      [&] {
        text = "\n" + http_request(coordinator, "GET", "/metrics").body;
        return sample(text, "lomo_workers_connected{device=\"cpu\"}") == 0;
      },
      seconds(5)));
}

}  // namespace
}  // namespace lomo::server::testing
