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
// Errors: {"code": <grpc status code>, "message": "..."} with the matching HTTP status (400 for
// INVALID_ARGUMENT and FAILED_PRECONDITION, 404 NOT_FOUND, 503 UNAVAILABLE, ...). An error found
// after an event stream started ends it with one {"error": {"code": ..., "message": ...}} line.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "server/coordinator.h"
#include "server/metrics.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace lomo::server {

class RestServer {
 public:
  RestServer(Coordinator& coordinator, Metrics& metrics, int threads);
  ~RestServer();  // stop()
  RestServer(const RestServer&) = delete;
  RestServer& operator=(const RestServer&) = delete;

  // Binds host:port (port 0: any free port) and returns the port. Throws std::runtime_error.
  int bind(const std::string& host, int port);
  // Serves on a background thread.
  void start();
  // Stops accepting, ends open event streams, waits for handlers to return. Idempotent.
  void stop();

 private:
  void routes();
  // The job resources: submit, list, get, cancel, checkpoints.
  void job_routes();
  // GET /v1/jobs/{id}/events: NDJSON, followed through the event hub when asked.
  void serve_events(const httplib::Request& request, httplib::Response& response);
  // /metrics and /healthz.
  void operational_routes();

  Coordinator& coordinator_;
  Metrics& metrics_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace lomo::server
