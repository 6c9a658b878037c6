// The abuse cases of issue 12 against a real lomo-coordinator on loopback: each now gets a clear
// error, or leaves /healthz answering (server/rest.h lists the bounds).
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "tests/integration/coordinator_test_fixture.h"

namespace lomo::server::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

class HardeningTest : public CoordinatorTest {
 protected:
  HardeningTest() : CoordinatorTest(10.0) {}

  httplib::Client http() const {
    httplib::Client client(coordinator_->http_host(), coordinator_->http_port());
    client.set_connection_timeout(5);
    client.set_read_timeout(10);
    return client;
  }

  // A TCP connection to the REST port that sends `bytes` and then nothing more.
  int raw_connection(const std::string& bytes) const {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(coordinator_->http_port()));
    ::inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      ::close(fd);
      return -1;
    }
    if (!bytes.empty() && ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) < 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  int64_t job_count() {
    const HttpResult list = http_request(*coordinator_, "GET", "/v1/jobs");
    EXPECT_EQ(list.status, 200) << list.body;
    return static_cast<int64_t>(nlohmann::json::parse(list.body)["jobs"].size());
  }
};

// A valid POST /v1/jobs body.
std::string submit_body() {
  std::string spec;
  EXPECT_TRUE(google::protobuf::util::MessageToJsonString(valid_spec(), &spec).ok());
  return R"({"spec": )" + spec + "}";
}

TEST_F(HardeningTest, APostThatIsNotJsonIsRefusedWith415AndChangesNothing) {
  auto client = http();
  for (const char* type : {"text/plain", "application/x-www-form-urlencoded",
                           "multipart/form-data; boundary=x", "application/jsonp"}) {
    const auto result = client.Post("/v1/jobs", submit_body(), type);
    ASSERT_TRUE(result) << type;
    EXPECT_EQ(result->status, 415) << type;
    EXPECT_THAT(result->body, HasSubstr("Content-Type must be application/json")) << type;
  }
  EXPECT_EQ(job_count(), 0);
  const auto accepted = client.Post("/v1/jobs", submit_body(), "application/json; charset=utf-8");
  ASSERT_TRUE(accepted);
  EXPECT_EQ(accepted->status, 200) << accepted->body;
  EXPECT_EQ(job_count(), 1);
}

TEST_F(HardeningTest, AHostHeaderThatIsNotOursIsRefusedExceptByProbes) {
  auto client = http();
  const std::string port = std::to_string(coordinator_->http_port());
  for (const std::string& host : {"attacker.example:" + port, std::string("attacker.example")}) {
    const auto list = client.Get("/v1/jobs", {{"Host", host}});
    ASSERT_TRUE(list);
    EXPECT_EQ(list->status, 421) << host;
    EXPECT_THAT(list->body, HasSubstr("is not a name of this coordinator"));
    const auto submit =
        client.Post("/v1/jobs", {{"Host", host}}, submit_body(), "application/json");
    ASSERT_TRUE(submit);
    EXPECT_EQ(submit->status, 421) << host;
    // Probes and scrapers name whatever address they were given.
    const auto health = client.Get("/healthz", {{"Host", host}});
    ASSERT_TRUE(health);
    EXPECT_EQ(health->status, 200);
  }
  EXPECT_EQ(job_count(), 0);
  for (const std::string& host : {"localhost:" + port, "127.0.0.1:" + port, "[::1]:" + port}) {
    const auto list = client.Get("/v1/jobs", {{"Host", host}});
    ASSERT_TRUE(list);
    EXPECT_EQ(list->status, 200) << host;
  }
}

TEST_F(HardeningTest, ADeeplyNestedBodyIsRefusedFast) {
  // 200 KB of nesting: what used a core for minutes.
  const std::string body =
      R"({"spec": )" + std::string(100000, '[') + std::string(100000, ']') + "}";
  auto client = http();
  const auto start = Clock::now();
  const auto result = client.Post("/v1/jobs", body, "application/json");
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  ASSERT_TRUE(result);
  EXPECT_EQ(result->status, 400);
  EXPECT_THAT(result->body, HasSubstr("nested deeper than 64 levels"));
  EXPECT_LT(elapsed, 2.0);
  std::printf("refused a %zu-byte nested body in %.1f ms\n", body.size(), elapsed * 1000);
  // Nesting inside strings is text, not depth.
  const std::string in_string =
      R"({"spec": {"model": {"path": ")" + std::string(1000, '[') + R"("}}})";
  const auto text = client.Post("/v1/jobs", in_string, "application/json");
  ASSERT_TRUE(text);
  EXPECT_THAT(text->body, ::testing::Not(HasSubstr("nested deeper")));
}

TEST_F(HardeningTest, OversizedSpecsAndBodiesAreRefusedNamingTheLimit) {
  // gRPC: a spec over 256 KiB.
  v1::SubmitJobRequest request = submit_request("big");
  request.clear_spec();
  request.set_spec_text("model: {path: /m}\ndata: {train: [t.txt]}\n# " +
                        std::string(300 * 1024, 'x') + "\n");
  v1::Job job;
  const grpc::Status status = submit(*jobs_, request, &job);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("over the limit of 262144 bytes"));
  // REST: the same spec, then a body over 1 MiB (never read).
  nlohmann::json body{{"spec_text", request.spec_text()}};
  const HttpResult rest = http_request(*coordinator_, "POST", "/v1/jobs", body.dump());
  EXPECT_EQ(rest.status, 400);
  EXPECT_THAT(rest.body, HasSubstr("over the limit of 262144 bytes"));
  const HttpResult huge =
      http_request(*coordinator_, "POST", "/v1/jobs", std::string(2 << 20, ' '));
  EXPECT_EQ(huge.status, 413);
  EXPECT_EQ(job_count(), 0);
}

TEST_F(HardeningTest, ListJobsLeavesSpecsOutAndGetJobHasThem) {
  v1::Job submitted;
  ASSERT_TRUE(submit(*jobs_, submit_request("listed"), &submitted).ok());
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::ListJobsRequest list_request;
  v1::ListJobsResponse list;
  ASSERT_TRUE(jobs_->ListJobs(&context, list_request, &list).ok());
  ASSERT_EQ(list.jobs_size(), 1);
  EXPECT_EQ(list.jobs(0).name(), "listed");
  EXPECT_TRUE(list.jobs(0).canonical_spec().empty());
  EXPECT_TRUE(list.jobs(0).original_spec().empty());
  EXPECT_FALSE(list.jobs(0).has_spec());
  v1::Job got;
  ASSERT_TRUE(get(*jobs_, submitted.id(), &got).ok());
  EXPECT_FALSE(got.canonical_spec().empty());
}

TEST_F(HardeningTest, HealthzAnswersWhileFollowersAndSlowClientsHoldConnections) {
  v1::Job queued;  // no worker: it stays QUEUED, and its followers wait
  ASSERT_TRUE(submit(*jobs_, submit_request("followed"), &queued).ok());
  const std::string follow =
      "GET /v1/jobs/" + queued.id() + "/events?follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  // http_threads 16 (the default): 32 followers at most, then 429.
  std::vector<int> held;
  for (int i = 0; i < 32; ++i) held.push_back(raw_connection(follow));
  for (int i = 0; i < 17; ++i) held.push_back(raw_connection("GET /healthz HTTP/1.1\r\nHo"));
  for (int fd : held) ASSERT_GE(fd, 0);
  // Every follower is being served before the next one asks.
  ASSERT_TRUE(wait_until(
      [&] {
        const auto metrics = http_request(*coordinator_, "GET", "/healthz");
        return metrics.status == 200;
      },
      milliseconds(10000)));
  auto client = http();
  bool refused = false;
  ASSERT_TRUE(wait_until(
      [&] {
        httplib::Client one(coordinator_->http_host(), coordinator_->http_port());
        one.set_read_timeout(2);
        const auto extra = one.Get(("/v1/jobs/" + queued.id() + "/events?follow=true").c_str());
        refused = extra && extra->status == 429;
        if (refused) {
          EXPECT_THAT(extra->body, HasSubstr("32 event streams are followed already"));
        }
        return refused;
      },
      milliseconds(20000)));
  double worst = 0;
  for (int i = 0; i < 20; ++i) {
    const auto start = Clock::now();
    const HttpResult health = http_request(*coordinator_, "GET", "/healthz");
    const HttpResult metrics = http_request(*coordinator_, "GET", "/metrics");
    worst = std::max(worst, std::chrono::duration<double>(Clock::now() - start).count());
    EXPECT_EQ(health.status, 200);
    EXPECT_EQ(metrics.status, 200);
  }
  EXPECT_LT(worst, 2.0);
  std::printf("/healthz + /metrics under 32 followers and 17 slow clients: worst %.1f ms\n",
              worst * 1000);
  for (int fd : held) ::close(fd);
}

TEST_F(HardeningTest, TheHttpListenBacklogIsLargerThanFive) {
  // ss prints a listening socket's backlog as its Send-Q.
  const std::string command =
      "ss -ltnH 'sport = :" + std::to_string(coordinator_->http_port()) + "' 2>/dev/null";
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  char line[512] = {};
  const bool read = std::fgets(line, sizeof(line), pipe) != nullptr;
  ::pclose(pipe);
  if (!read) GTEST_SKIP() << "ss (iproute2) is not available";
  char state[32];
  long queued = 0, backlog = 0;
  ASSERT_EQ(std::sscanf(line, "%31s %ld %ld", state, &queued, &backlog), 3) << line;
  EXPECT_GE(backlog, 128) << line;
}

TEST_F(HardeningTest, ASecondCoordinatorCannotShareTheHttpPortOfARunningOne) {
  // With SO_REUSEPORT (httplib's default) the second one bound too and took half the requests.
  TempDir other;
  ProcessOptions options(other.path() / "data");
  options.extra_args = {"--http-listen", "127.0.0.1:" + std::to_string(coordinator_->http_port())};
  try {
    CoordinatorProcess second(options);
    ADD_FAILURE() << "a second coordinator started on HTTP port " << coordinator_->http_port();
  } catch (const std::runtime_error& error) {
    EXPECT_THAT(error.what(), HasSubstr("cannot listen for HTTP on 127.0.0.1:" +
                                        std::to_string(coordinator_->http_port())));
  }
  EXPECT_EQ(http_request(*coordinator_, "GET", "/healthz").status, 200);
}

// Register on a new stream; the Registered reply, or nothing if the stream was refused.
std::optional<v1::CoordinatorMessage> try_register(TestWorker& worker, const std::string& id) {
  v1::WorkerMessage message;
  message.mutable_register_()->set_worker_id(id);
  message.mutable_register_()->mutable_device()->set_kind(v1::DEVICE_KIND_CPU);
  if (!worker.send(message)) return std::nullopt;
  return worker.next_of(v1::CoordinatorMessage::kRegistered, seconds(5));
}

TEST_F(HardeningTest, ASecondWorkerWithTheIdOfALiveOneIsRefusedAndTheFirstKeepsItsStream) {
  TestWorker first(coordinator_->channel());
  first.register_as("w-twin");
  first.start_heartbeats(milliseconds(100));
  TestWorker second(coordinator_->channel());
  EXPECT_FALSE(try_register(second, "w-twin").has_value());
  const std::optional<grpc::Status> refused = second.wait_closed(seconds(10));
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(refused->error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_THAT(refused->error_message(), HasSubstr("worker w-twin is connected already"));
  // The first one still works: it gets the next job.
  EXPECT_FALSE(first.wait_closed(milliseconds(500)).has_value());
  v1::Job job;
  ASSERT_TRUE(submit(*jobs_, submit_request("for-the-first"), &job).ok());
  const auto assignment = first.next_assignment(seconds(10));
  ASSERT_TRUE(assignment.has_value());
  EXPECT_EQ(assignment->job_id(), job.id());
}

TEST_F(HardeningTest, AWorkerWhoseStreamWentSilentIsTakenOver) {
  TestWorker first(coordinator_->channel());
  first.register_as("w-silent");
  // No heartbeats: as a stream whose process hangs or whose network dropped it looks.
  std::unique_ptr<TestWorker> second;
  ASSERT_TRUE(wait_until(
      [&] {
        second = std::make_unique<TestWorker>(coordinator_->channel());
        return try_register(*second, "w-silent").has_value();
      },
      milliseconds(20000)));
  const std::optional<grpc::Status> replaced = first.wait_closed(seconds(10));
  ASSERT_TRUE(replaced.has_value());
  EXPECT_EQ(replaced->error_code(), grpc::StatusCode::ABORTED);
}

// ---------------------------------------------------------------------------------------------
// The store file.

class StoreFileTest : public ::testing::Test {
 protected:
  TempDir dir_;
  std::filesystem::path data() const { return dir_.path() / "data"; }
  std::string start_failure() {
    try {
      CoordinatorProcess coordinator{ProcessOptions(data())};
    } catch (const std::runtime_error& error) {
      return error.what();
    }
    return "";
  }
};

TEST_F(StoreFileTest, AZeroLengthStoreIsRefusedNamingTheFile) {
  std::filesystem::create_directories(data());
  std::ofstream(data() / "coordinator.db").close();
  const std::string failure = start_failure();
  EXPECT_THAT(failure, HasSubstr((data() / "coordinator.db").string() + ": zero-length file"));
  EXPECT_EQ(std::filesystem::file_size(data() / "coordinator.db"), 0u);
}

TEST_F(StoreFileTest, CorruptPagesAreRefusedAtStart) {
  {
    CoordinatorProcess coordinator{ProcessOptions(data())};
    auto jobs = coordinator.jobs();
    for (int i = 0; i < 40; ++i) {
      v1::Job job;
      ASSERT_TRUE(submit(*jobs, submit_request("job-" + std::to_string(i)), &job).ok());
    }
    ASSERT_EQ(coordinator.terminate(milliseconds(20000)), 0);
  }
  const auto file = data() / "coordinator.db";
  const auto size = std::filesystem::file_size(file);
  ASSERT_GE(size, 8192u);
  {
    // Garbage over every page after the first (the header stays: SQLite still opens it).
    std::fstream bytes(file, std::ios::in | std::ios::out | std::ios::binary);
    bytes.seekp(4096);
    const std::string garbage(size - 4096, '\x5a');
    bytes.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
  }
  const std::string failure = start_failure();
  EXPECT_THAT(failure, HasSubstr(file.string()));
  EXPECT_THAT(failure, ::testing::AnyOf(HasSubstr("integrity check"), HasSubstr("malformed")));
}

}  // namespace
}  // namespace lomo::server::testing
