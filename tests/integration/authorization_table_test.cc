// Issue 12: one authorisation table that cannot go stale. A real lomo-coordinator with a tokens
// file; every method of every gRPC service it serves and every REST route it registers is called
// with no token, a bad token, and the tokens of each role (an admin, the job's owner, another
// user, a viewer, a worker), and each answer must be exactly what the table says:
// UNAUTHENTICATED / 401 without a valid token, PERMISSION_DENIED / 403 for a role or owner the
// rule excludes, anything else for a caller it admits. A method in the protos without a rule, or
// a rule for a method that does not exist, fails the test; so does a method here without a call.
#include <gmock/gmock.h>
#include <google/protobuf/descriptor.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "common/grpc_channel.h"
#include "common/sha256.h"
#include "server/auth.h"
#include "server/checkpoint_store.h"
#include "server/coordinator.h"
#include "server/metrics.h"
#include "server/rest.h"
#include "server/store.h"
#include "tests/integration/coordinator_harness.h"
#include "tests/integration/test_support.h"

namespace lomo::server::testing {
namespace {

using lomo::testing::run_program;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

// The callers of the matrix. kAlice owns the job every call is about; kBob is another user.
enum class Caller { kNone, kBadToken, kAdmin, kAlice, kBob, kViewer, kWorker };

const std::vector<Caller> kCallers = {Caller::kNone,  Caller::kBadToken, Caller::kAdmin,
                                      Caller::kAlice, Caller::kBob,      Caller::kViewer,
                                      Caller::kWorker};

std::string caller_name(Caller caller) {
  switch (caller) {
    case Caller::kNone:
      return "no token";
    case Caller::kBadToken:
      return "a bad token";
    case Caller::kAdmin:
      return "admin";
    case Caller::kAlice:
      return "the owner (user alice)";
    case Caller::kBob:
      return "another user (bob)";
    case Caller::kViewer:
      return "viewer";
    case Caller::kWorker:
      return "worker";
  }
  return "?";
}

// The policy, stated here independently of server/auth.cc: who each kind of access admits.
bool admitted(Access access, Caller caller) {
  if (access == Access::kPublic) return true;
  switch (caller) {
    case Caller::kNone:
    case Caller::kBadToken:
      return false;
    case Caller::kAdmin:
      return access != Access::kWorker;
    case Caller::kAlice:
      return access == Access::kSubmit || access == Access::kListJobs ||
             access == Access::kReadJob || access == Access::kChangeJob ||
             access == Access::kDownload;
    case Caller::kBob:  // not the job's owner
      return access == Access::kSubmit || access == Access::kListJobs;
    case Caller::kViewer:
      return access == Access::kListJobs || access == Access::kReadJob ||
             access == Access::kMetrics;
    case Caller::kWorker:
      return access == Access::kWorker;
  }
  return false;
}

// The code a refused caller gets.
grpc::StatusCode refusal(Caller caller) {
  return caller == Caller::kNone || caller == Caller::kBadToken
             ? grpc::StatusCode::UNAUTHENTICATED
             : grpc::StatusCode::PERMISSION_DENIED;
}

struct CallResult {
  bool answered = false;  // at least one response message came back
  grpc::Status status;
};

// One call of any kind (unary, server or bidi streaming) through the generic API: the request
// bytes, then the half-close; the first response (if any) shows that the call was admitted, and
// the call is then cancelled so that endless streams (Health.Watch) end.
CallResult call_raw(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                    const std::string& request_bytes, const std::string& token) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue queue;
  grpc::ClientContext context;
  context.set_deadline(deadline_in(20));
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  auto wait = [&queue] {
    void* tag = nullptr;
    bool ok = false;
    EXPECT_TRUE(queue.Next(&tag, &ok));
    return ok;
  };
  auto call = stub.PrepareCall(&context, method, &queue);
  call->StartCall(reinterpret_cast<void*>(1));
  wait();
  grpc::Slice slice(request_bytes);
  const grpc::ByteBuffer request(&slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  const bool written = wait();
  if (written) {
    call->WritesDone(reinterpret_cast<void*>(3));
    wait();
  }
  CallResult result;
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(4));
  result.answered = wait();
  if (result.answered) context.TryCancel();
  call->Finish(&result.status, reinterpret_cast<void*>(5));
  wait();
  queue.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (queue.Next(&tag, &ok)) {
  }
  return result;
}

// Tokens for each caller, written to a tokens file the coordinator reads.
class Tokens {
 public:
  explicit Tokens(const std::filesystem::path& file) {
    std::ofstream out(file);
    out << "tokens:\n";
    for (const auto& [caller, name, role] :
         std::vector<std::tuple<Caller, std::string, std::string>>{
             {Caller::kAdmin, "root", "admin"},
             {Caller::kAlice, "alice", "user"},
             {Caller::kBob, "bob", "user"},
             {Caller::kViewer, "dash", "viewer"},
             {Caller::kWorker, "node-a", "worker"}}) {
      const std::string token = "lomo_test_" + name + "_token";
      tokens_[caller] = token;
      out << "  - name: " << name << "\n    role: " << role << "\n    sha256: " << sha256_hex(token)
          << "\n";
      if (role == "worker") out << "    worker_ids: [\"w-*\"]\n";
    }
    tokens_[Caller::kBadToken] = "lomo_not_a_known_token";
    tokens_[Caller::kNone] = "";
  }
  const std::string& operator[](Caller caller) const { return tokens_.at(caller); }

 private:
  std::map<Caller, std::string> tokens_;
};

std::shared_ptr<grpc::Channel> channel_with(const CoordinatorProcess& coordinator,
                                            const std::string& token) {
  ChannelSecurity security;
  security.token = token;
  return make_channel(coordinator.grpc_address(), {}, &security);
}

class AuthorizationTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokens_file_ = dir_.path() / "tokens.yaml";
    tokens_ = std::make_unique<Tokens>(tokens_file_);
    ProcessOptions options(dir_.path() / "data");
    options.extra_args = {"--tokens-file", tokens_file_.string()};
    coordinator_ = std::make_unique<CoordinatorProcess>(options);
  }

  v1::JobService::Stub& jobs_as(Caller caller) {
    auto& stub = stubs_[caller];
    if (!stub) stub = v1::JobService::NewStub(channel_with(*coordinator_, (*tokens_)[caller]));
    return *stub;
  }

  std::string submit_as(Caller caller, const std::string& name) {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(20));
    v1::SubmitJobResponse response;
    const grpc::Status status =
        jobs_as(caller).SubmitJob(&context, submit_request(name), &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.job().id();
  }

  // Alice's job, run by a worker with the worker token to a committed checkpoint and its end.
  // With `then_hold_a_running_job`, the second job (hold_a_running_job) is placed while w-1 is
  // still busy with this one, so that w-2 is the only idle worker: once w-1 ends its job and
  // closes, the coordinator may not have seen it go yet and could hand the next job to it (a test
  // run once waited 10 s for an assignment that had gone to the closed w-1).
  void run_alices_job(bool then_hold_a_running_job = false) {
    job_id_ = submit_as(Caller::kAlice, "alices");
    TestWorker worker(channel_with(*coordinator_, (*tokens_)[Caller::kWorker]));
    worker.register_as("w-1");
    worker.start_heartbeats(milliseconds(200));
    ASSERT_TRUE(worker.next_assignment(seconds(10)).has_value());
    worker.set_current(job_id_, 1);
    ASSERT_TRUE(worker.report(job_id_, 1, v1::JOB_STATE_RUNNING));
    const auto ack =
        worker.upload_checkpoint(job_id_, 1, 10, {{"model.safetensors", std::string(100, 'w')}});
    ASSERT_TRUE(ack.has_value() && ack->committed());
    if (then_hold_a_running_job) {
      ASSERT_NO_FATAL_FAILURE(hold_a_running_job());
    }
    ASSERT_TRUE(worker.report(job_id_, 1, v1::JOB_STATE_SUCCEEDED));
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::ListCheckpointsRequest list;
    list.set_job_id(job_id_);
    v1::ListCheckpointsResponse checkpoints;
    ASSERT_TRUE(jobs_as(Caller::kAdmin).ListCheckpoints(&context, list, &checkpoints).ok());
    ASSERT_EQ(checkpoints.checkpoints_size(), 1);
    checkpoint_id_ = checkpoints.checkpoints(0).checkpoint_id();
  }

  // A second job of Alice's, kept RUNNING on worker w-2 (connected with the worker token), for
  // the worker protocol's calls: they must reach the coordinator's own ownership checks and pass.
  void hold_a_running_job() {
    running_job_id_ = submit_as(Caller::kAlice, "running");
    running_worker_ =
        std::make_unique<TestWorker>(channel_with(*coordinator_, (*tokens_)[Caller::kWorker]));
    running_worker_->register_as("w-2");
    running_worker_->start_heartbeats(milliseconds(200));
    ASSERT_TRUE(running_worker_->next_assignment(seconds(10)).has_value());
    running_worker_->set_current(running_job_id_, 1);
    ASSERT_TRUE(running_worker_->report(running_job_id_, 1, v1::JOB_STATE_RUNNING));
  }

  // A request for each method the coordinator serves, about Alice's job. A method without one
  // here fails the test: whoever adds an RPC adds its call and its rule.
  std::map<std::string, std::string> grpc_requests() const {
    std::map<std::string, std::string> requests;
    auto add = [&](const std::string& method, const google::protobuf::Message& message) {
      requests[method] = message.SerializeAsString();
    };
    add("/lomo.v1.JobService/SubmitJob", submit_request("matrix"));
    v1::GetJobRequest get;
    get.set_job_id(job_id_);
    add("/lomo.v1.JobService/GetJob", get);
    add("/lomo.v1.JobService/ListJobs", v1::ListJobsRequest());
    v1::CancelJobRequest cancel;
    cancel.set_job_id(job_id_);
    add("/lomo.v1.JobService/CancelJob", cancel);
    v1::WatchJobRequest watch;
    watch.set_job_id(job_id_);
    add("/lomo.v1.JobService/WatchJob", watch);
    v1::ListCheckpointsRequest checkpoints;
    checkpoints.set_job_id(job_id_);
    add("/lomo.v1.JobService/ListCheckpoints", checkpoints);
    v1::DownloadCheckpointRequest download;
    download.set_checkpoint_id(checkpoint_id_);
    add("/lomo.v1.JobService/DownloadCheckpoint", download);
    v1::WorkerMessage hello;  // a CUDA worker, so that no CPU job is given to it
    hello.mutable_register_()->set_worker_id("w-probe");
    hello.mutable_register_()->mutable_device()->set_kind(v1::DEVICE_KIND_CUDA);
    add("/lomo.v1.WorkerService/Connect", hello);
    v1::FetchCheckpointRequest fetch;
    fetch.set_worker_id("w-2");
    fetch.set_job_id(running_job_id_);
    fetch.set_attempt(1);
    add("/lomo.v1.WorkerService/FetchCheckpoint", fetch);
    v1::RendezvousSetRequest set;
    set.set_worker_id("w-2");
    set.set_job_id(running_job_id_);
    set.set_attempt(1);
    set.set_key("k");
    add("/lomo.v1.WorkerService/RendezvousSet", set);
    v1::RendezvousGetRequest rendezvous_get;
    rendezvous_get.set_worker_id("w-2");
    rendezvous_get.set_job_id(running_job_id_);
    rendezvous_get.set_attempt(1);
    rendezvous_get.add_keys("k");
    add("/lomo.v1.WorkerService/RendezvousGet", rendezvous_get);
    requests["/grpc.health.v1.Health/Check"] = "";
    requests["/grpc.health.v1.Health/Watch"] = "";
    requests["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"] =
        std::string("\x3a\x01*", 3);  // ServerReflectionRequest{list_services: "*"}
    return requests;
  }

  TempDir dir_;
  std::filesystem::path tokens_file_;
  std::unique_ptr<Tokens> tokens_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::map<Caller, std::unique_ptr<v1::JobService::Stub>> stubs_;
  std::string job_id_;
  std::string checkpoint_id_;
  std::string running_job_id_;
  std::unique_ptr<TestWorker> running_worker_;
};

// Every method of lomo's services in the protos has a rule, and every rule names a method that
// exists (lomo's, or one of the two services gRPC itself serves: health and reflection).
TEST_F(AuthorizationTableTest, EveryMethodInTheProtosHasExactlyOneRule) {
  std::set<std::string> in_protos;
  const auto* pool = google::protobuf::DescriptorPool::generated_pool();
  for (const char* file : {"lomo/v1/jobs.proto", "lomo/v1/workers.proto"}) {
    const google::protobuf::FileDescriptor* descriptor = pool->FindFileByName(file);
    ASSERT_NE(descriptor, nullptr) << file;
    for (int s = 0; s < descriptor->service_count(); ++s) {
      const google::protobuf::ServiceDescriptor* service = descriptor->service(s);
      for (int m = 0; m < service->method_count(); ++m) {
        in_protos.insert("/" + service->full_name() + "/" + service->method(m)->name());
      }
    }
  }
  ASSERT_GE(in_protos.size(), 11u);
  const auto& table = grpc_method_access();
  for (const std::string& method : in_protos) {
    EXPECT_EQ(table.count(method), 1u) << method << " has no rule in grpc_method_access()";
  }
  for (const auto& [method, access] : table) {
    const bool served_by_grpc = method.rfind("/grpc.health.v1.Health/", 0) == 0 ||
                                method.rfind("/grpc.reflection.v1alpha.ServerReflection/", 0) == 0;
    EXPECT_TRUE(in_protos.count(method) == 1 || served_by_grpc)
        << "rule for " << method << ", which no service has";
    if (served_by_grpc) {
      EXPECT_EQ(access, Access::kPublic) << method << ": gRPC serves it";
    }
  }
}

TEST_F(AuthorizationTableTest, EveryGrpcMethodAnswersEachCallerAsItsRuleSays) {
  ASSERT_NO_FATAL_FAILURE(run_alices_job(/*then_hold_a_running_job=*/true));
  const std::map<std::string, std::string> requests = grpc_requests();
  for (const auto& [method, access] : grpc_method_access()) {
    const auto request = requests.find(method);
    ASSERT_NE(request, requests.end()) << method << ": the test has no call for it";
    for (const Caller caller : kCallers) {
      SCOPED_TRACE(method + " as " + caller_name(caller));
      const CallResult result =
          call_raw(channel_with(*coordinator_, ""), method, request->second, (*tokens_)[caller]);
      const grpc::StatusCode code = result.status.error_code();
      if (admitted(access, caller)) {
        EXPECT_TRUE(result.answered || (code != grpc::StatusCode::UNAUTHENTICATED &&
                                        code != grpc::StatusCode::PERMISSION_DENIED))
            << "refused: " << result.status.error_message();
      } else {
        EXPECT_FALSE(result.answered);
        EXPECT_EQ(code, refusal(caller)) << result.status.error_message();
      }
    }
  }
}

// The REST routes the server registers (RestServer::route_table(): a route exists only with its
// rule), each called by each caller over HTTP.
TEST_F(AuthorizationTableTest, EveryRestRouteAnswersEachCallerAsItsRuleSays) {
  ASSERT_NO_FATAL_FAILURE(run_alices_job());
  // An in-process server, never bound, only to read the routes it registers.
  TempDir scratch;
  Store store(scratch.path() / "coordinator.db");
  CheckpointStore checkpoints(scratch.path() / "checkpoints");
  Metrics metrics;
  Coordinator coordinator(CoordinatorOptions{}, store, checkpoints, metrics);
  Authenticator auth;
  const RestServer rest(coordinator, metrics, 2, auth);
  ASSERT_GE(rest.route_table().size(), 8u);

  httplib::Client client(coordinator_->http_host(), coordinator_->http_port());
  client.set_read_timeout(10, 0);
  const std::string submit_body =
      R"({"spec": {"name": "rest", "model": {"path": "m"}, "data": {"train": "d.jsonl"}}})";
  for (const RestServer::Route& route : rest.route_table()) {
    std::string path = route.pattern;
    if (const size_t group = path.find("([^/:]+)"); group != std::string::npos) {
      path.replace(group, 8, job_id_);
    }
    ASSERT_EQ(path.find('('), std::string::npos) << route.pattern << ": cannot fill it in";
    for (const Caller caller : kCallers) {
      SCOPED_TRACE(route.method + " " + path + " as " + caller_name(caller));
      httplib::Headers headers;
      if (!(*tokens_)[caller].empty()) {
        headers.emplace("Authorization", "Bearer " + (*tokens_)[caller]);
      }
      const httplib::Result result =
          route.method == "POST"
              ? client.Post(path.c_str(), headers, path == "/v1/jobs" ? submit_body : "{}",
                            "application/json")
              : client.Get(path.c_str(), headers);
      ASSERT_TRUE(result) << "no response";
      if (admitted(route.access, caller)) {
        EXPECT_NE(result->status, 401) << result->body;
        EXPECT_NE(result->status, 403) << result->body;
      } else {
        const bool unauthenticated = refusal(caller) == grpc::StatusCode::UNAUTHENTICATED;
        EXPECT_EQ(result->status, unauthenticated ? 401 : 403) << result->body;
        if (unauthenticated) {
          EXPECT_THAT(result->get_header_value("WWW-Authenticate"), HasSubstr("Bearer"));
        }
      }
    }
  }
}

// A worker's identity is bound to its token: worker ids outside its worker_ids are refused on the
// stream and on every call that names one, so no worker speaks for another's assignment.
TEST_F(AuthorizationTableTest, AWorkerTokenActsOnlyAsTheWorkerIdsItWasGiven) {
  const auto channel = channel_with(*coordinator_, (*tokens_)[Caller::kWorker]);
  TestWorker impostor(channel);
  v1::WorkerMessage hello;
  hello.mutable_register_()->set_worker_id("other-node-1");
  hello.mutable_register_()->mutable_device()->set_kind(v1::DEVICE_KIND_CPU);
  impostor.send(hello);
  const auto closed = impostor.wait_closed(seconds(10));
  ASSERT_TRUE(closed.has_value());
  EXPECT_EQ(closed->error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(closed->error_message(), HasSubstr("other-node-1"));
  EXPECT_THAT(closed->error_message(), HasSubstr("node-a"));

  auto stub = v1::WorkerService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::RendezvousGetRequest request;
  request.set_worker_id("other-node-1");
  request.set_job_id("job-x");
  request.set_attempt(1);
  request.add_keys("k");
  v1::RendezvousGetResponse response;
  EXPECT_EQ(stub->RendezvousGet(&context, request, &response).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);

  TestWorker real(channel);
  EXPECT_NO_THROW(real.register_as("w-7"));
}

TEST_F(AuthorizationTableTest, AUserListsOnlyItsOwnJobsWhileAdminsAndViewersSeeAll) {
  const std::string alices = submit_as(Caller::kAlice, "a");
  const std::string bobs = submit_as(Caller::kBob, "b");
  auto ids = [&](Caller caller) {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::ListJobsResponse response;
    EXPECT_TRUE(jobs_as(caller).ListJobs(&context, v1::ListJobsRequest(), &response).ok());
    std::set<std::string> seen;
    for (const v1::Job& job : response.jobs()) seen.insert(job.id() + "@" + job.owner());
    return seen;
  };
  EXPECT_EQ(ids(Caller::kAlice), (std::set<std::string>{alices + "@alice"}));
  EXPECT_EQ(ids(Caller::kBob), (std::set<std::string>{bobs + "@bob"}));
  const std::set<std::string> all{alices + "@alice", bobs + "@bob"};
  EXPECT_EQ(ids(Caller::kAdmin), all);
  EXPECT_EQ(ids(Caller::kViewer), all);
}

// Tokens are read again on SIGHUP: a revoked token stops working without a restart, and a file
// that does not parse keeps the tokens in force.
TEST_F(AuthorizationTableTest, SighupReloadsTheTokensFileAndABadFileChangesNothing) {
  submit_as(Caller::kBob, "before");
  {
    std::ofstream out(tokens_file_);
    out << "tokens:\n  - name: root\n    role: admin\n    sha256: "
        << sha256_hex((*tokens_)[Caller::kAdmin]) << "\n";
  }
  ::kill(coordinator_->pid(), SIGHUP);
  auto bob_status = [&] {
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::ListJobsResponse response;
    auto stub = v1::JobService::NewStub(channel_with(*coordinator_, (*tokens_)[Caller::kBob]));
    return stub->ListJobs(&context, v1::ListJobsRequest(), &response).error_code();
  };
  EXPECT_TRUE(
      wait_until([&] { return bob_status() == grpc::StatusCode::UNAUTHENTICATED; }, seconds(10)));
  {
    std::ofstream out(tokens_file_);
    out << "tokens: [not, a, list, of, tokens\n";
  }
  ::kill(coordinator_->pid(), SIGHUP);
  EXPECT_TRUE(wait_until(
      [&] { return coordinator_->log().find("tokens file not reloaded") != std::string::npos; },
      seconds(10)));
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::ListJobsResponse response;
  EXPECT_TRUE(jobs_as(Caller::kAdmin).ListJobs(&context, v1::ListJobsRequest(), &response).ok());
}

TEST(AuthorizationLimitsTest, QueuedJobsPerUserAreLimitedPerOwner) {
  TempDir dir;
  const Tokens tokens(dir.path() / "tokens.yaml");
  ProcessOptions options(dir.path() / "data");
  options.extra_args = {"--tokens-file", (dir.path() / "tokens.yaml").string(),
                        "--max-queued-jobs-per-user", "2"};
  CoordinatorProcess coordinator(options);
  auto submit = [&](Caller caller) {
    auto stub = v1::JobService::NewStub(channel_with(coordinator, tokens[caller]));
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::SubmitJobResponse response;
    return stub->SubmitJob(&context, submit_request("q"), &response);
  };
  EXPECT_TRUE(submit(Caller::kAlice).ok());
  EXPECT_TRUE(submit(Caller::kAlice).ok());
  const grpc::Status third = submit(Caller::kAlice);
  EXPECT_EQ(third.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(third.error_message(), HasSubstr("max_queued_jobs_per_user: 2"));
  EXPECT_TRUE(submit(Caller::kBob).ok()) << "the limit is per user";
}

// Without a tokens file the coordinator refuses an address other machines can reach, unless
// told --insecure; loopback needs nothing.
TEST(AuthorizationLimitsTest, AnOpenListenerWithoutAuthenticationNeedsInsecure) {
  TempDir dir;
  std::string output;
  const ExitStatus refused =
      run_program({LOMO_COORDINATOR_BIN, "--data-dir", (dir.path() / "d").string(), "--grpc-listen",
                   "0.0.0.0:0", "--http-listen", ""},
                  &output, seconds(30));
  EXPECT_EQ(refused.code, 2) << output;
  EXPECT_THAT(output, HasSubstr("--insecure"));
  EXPECT_THAT(output, HasSubstr("--tokens-file"));

  ProcessOptions insecure(dir.path() / "d");
  insecure.extra_args = {"--grpc-listen", "0.0.0.0:0", "--insecure"};
  CoordinatorProcess coordinator(insecure);
  EXPECT_THAT(coordinator.log(), HasSubstr("authentication off"));
}

// lomoctl, the real client: its token file works, and without one it says what was missing.
TEST_F(AuthorizationTableTest, LomoctlSendsItsTokenAndExplainsARefusal) {
  const std::filesystem::path token_file = dir_.path() / "alice.token";
  std::ofstream(token_file) << (*tokens_)[Caller::kAlice] << "\n";
  std::string output;
  const std::vector<std::string> base = {LOMO_LOMOCTL_BIN, "--coordinator",
                                         coordinator_->grpc_address()};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = base;
    argv.insert(argv.end(), extra.begin(), extra.end());
    return argv;
  };
  EXPECT_EQ(run_program(with({"list"}), &output).code, 3);
  EXPECT_THAT(output, HasSubstr("UNAUTHENTICATED"));
  EXPECT_THAT(output, HasSubstr("--token-file"));
  const std::string id = submit_as(Caller::kAlice, "mine");
  EXPECT_TRUE(run_program(with({"--token-file", token_file.string(), "list"}), &output).success())
      << output;
  EXPECT_THAT(output, HasSubstr("OWNER"));
  EXPECT_THAT(output, HasSubstr(id));
  EXPECT_THAT(output, HasSubstr("alice"));
  EXPECT_TRUE(run_program(with({"list"}), &output, seconds(60),
                          {"LOMO_TOKEN=" + (*tokens_)[Caller::kAlice]})
                  .success())
      << output;
}

}  // namespace
}  // namespace lomo::server::testing
