// REST/JSON for dashboards, in the coordinator process (cpp-httplib). Bodies are the gRPC request
// and response messages in protobuf's JSON mapping, so the two APIs cannot drift apart:
//
//   POST /v1/jobs                    SubmitJobRequest  → SubmitJobResponse
//   GET  /v1/jobs?states=RUNNING,QUEUED&page_size=&page_token=   → ListJobsResponse
//   GET  /v1/jobs/{id}               → GetJobResponse
//   POST /v1/jobs/{id}:cancel        → CancelJobResponse
//   GET  /v1/jobs/{id}/events?after_sequence=&follow=true
//                                    → WatchJobResponse per line (application/x-ndjson, chunked)
//   GET  /v1/jobs/{id}/checkpoints   → ListCheckpointsResponse
//   GET  /metrics                    Prometheus text format
//   GET  /healthz                    {"status": "SERVING"} (503 while shutting down)
//
// Hardening (each a regression test in tests/integration/coordinator_hardening_test.cc):
// - Host must be an IP address, localhost, this machine's host name, the listen host, or a name
//   given to allow_host(); otherwise 421 (DNS rebinding). /healthz and /metrics take any Host.
// - POST needs Content-Type: application/json, else 415 (a cross-site form cannot send it).
// - Bodies up to 1 MiB (413 beyond), JSON nested at most 64 deep (400, found in one linear pass
//   before parsing), specs up to kMaxSpecBytes (400 naming the limit).
// - Connections get threads as they come, up to connection_limit(threads); followed event
//   streams at most follower_limit(threads) at a time (429 beyond); reads, writes and idle
//   keep-alives time out after 5 s; listen backlog 1024.
//
// Errors: {"code": <grpc status code>, "message": "..."} with the matching HTTP status (400 for
// INVALID_ARGUMENT and FAILED_PRECONDITION, 404 NOT_FOUND, 503 UNAVAILABLE, ...). An error found
// after an event stream started ends it with one {"error": {"code": ..., "message": ...}} line.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "server/auth.h"
#include "server/coordinator.h"
#include "server/metrics.h"
#include "server/tls.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace lomo::server {

class RestServer {
 public:
  // One route and its rule (server/auth.h). Routes exist only through this table.
  struct Route {
    std::string method;   // GET or POST
    std::string pattern;  // httplib's regular expression, e.g. /v1/jobs/([^/:]+)
    Access access;
  };

  // `auth` decides who may call what: a missing or bad token gets 401 (with
  // WWW-Authenticate: Bearer), a token whose role or ownership does not allow the call 403.
  // With `tls` (outliving the server), it serves HTTPS with that certificate (server/tls.h).
  RestServer(Coordinator& coordinator, Metrics& metrics, int threads, const Authenticator& auth,
             TlsIdentity* tls = nullptr);
  ~RestServer();  // stop()
  RestServer(const RestServer&) = delete;
  RestServer& operator=(const RestServer&) = delete;

  // Also accept requests whose Host header names `name` (a DNS name of this coordinator).
  void allow_host(const std::string& name);
  // /healthz answers NOT_SERVING (503) with `problem()` while it is not "" (a corrupt store).
  void set_health_problem(std::function<std::string()> problem) {
    health_problem_ = std::move(problem);
  }
  // How many followed event streams, and how many connections with a thread each, at most.
  static int follower_limit(int threads);
  static int connection_limit(int threads);

  // Binds host:port (port 0: any free port) and returns the port. Throws std::runtime_error.
  int bind(const std::string& host, int port);
  // Every route served, with its rule (authorization_table_test walks them).
  const std::vector<Route>& route_table() const { return routes_; }
  // Serves on a background thread.
  void start();
  // Stops accepting, ends open event streams, waits for handlers to return. Idempotent.
  void stop();

 private:
  using Handler =
      std::function<void(const httplib::Request&, httplib::Response&, const Principal& caller)>;
  // Registers `handler` for `method` and `pattern` behind the check of `access`.
  void add_route(const std::string& method, const std::string& pattern, Access access,
                 Handler handler);
  void routes();
  // Host and Content-Type checks before routing.
  void guard_requests();
  grpc::Status refusal(const httplib::Request& request) const;
  // The job resources: submit, list, get, cancel, checkpoints.
  void job_routes();
  // GET /v1/jobs/{id}/events: NDJSON, followed through the event hub when asked.
  void serve_events(const httplib::Request& request, httplib::Response& response);
  // /metrics and /healthz.
  void operational_routes();

  Coordinator& coordinator_;
  Metrics& metrics_;
  const Authenticator& auth_;
  std::vector<Route> routes_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> listen_returned_{false};  // the listening loop has ended (or never ran)
  std::set<std::string> allowed_hosts_;       // lower-case
  std::function<std::string()> health_problem_;
  int listen_socket_ = -1;
  const int max_followers_;
  std::atomic<int> followers_{0};
};

}  // namespace lomo::server
