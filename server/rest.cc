#include "server/rest.h"

#include <google/protobuf/util/json_util.h>
#include <httplib.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace lomo::server {

namespace {

constexpr int kEventBatch = 256;
constexpr const char* kJson = "application/json";
// How often a waiting event stream checks that its client is still connected.
constexpr auto kStreamPoll = std::chrono::milliseconds(500);

int http_status(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return 200;
    case grpc::StatusCode::CANCELLED:
      return 499;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
      return 400;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return 504;
    case grpc::StatusCode::NOT_FOUND:
      return 404;
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::ABORTED:
      return 409;
    case grpc::StatusCode::PERMISSION_DENIED:
      return 403;
    case grpc::StatusCode::UNAUTHENTICATED:
      return 401;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return 429;
    case grpc::StatusCode::UNIMPLEMENTED:
      return 501;
    case grpc::StatusCode::UNAVAILABLE:
      return 503;
    default:
      return 500;
  }
}

nlohmann::json error_object(const grpc::Status& status) {
  return {{"code", static_cast<int>(status.error_code())}, {"message", status.error_message()}};
}

void reply_error(httplib::Response& response, const grpc::Status& status) {
  response.status = http_status(status.error_code());
  response.set_content(error_object(status).dump() + "\n", kJson);
}

std::string to_json(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;  // dashboards see every field, zero or not
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok())
    throw std::runtime_error("cannot encode JSON: " + std::string(status.message()));
  return json;
}

void reply(httplib::Response& response, const grpc::Status& status,
           const google::protobuf::Message& message) {
  if (!status.ok()) return reply_error(response, status);
  response.status = 200;
  response.set_content(to_json(message) + "\n", kJson);
}

// Runs one of the Coordinator's calls that answer through a callback, and waits for the answer.
template <typename Call>
grpc::Status wait_for(Call&& call) {
  std::promise<grpc::Status> answered;
  std::future<grpc::Status> status = answered.get_future();
  call([&answered](const grpc::Status& result) { answered.set_value(result); });
  return status.get();
}

grpc::Status invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

// A SubmitJobRequest from a POST /v1/jobs body. A "spec" object goes on as its JSON text
// (spec_text), not as a Struct: protobuf's JSON reader holds every number as a double, so an
// integer above 2^53 (a seed) would arrive changed. nlohmann keeps 64-bit integers exact and, as
// ordered_json, the keys in the order written. Anything else is protobuf's JSON mapping as is.
grpc::Status parse_submit_body(const std::string& body, v1::SubmitJobRequest* request) {
  auto json = nlohmann::ordered_json::parse(body, nullptr, /*allow_exceptions=*/false);
  std::string spec_text;
  const bool exact = json.is_object() && json.contains("spec") && json["spec"].is_object() &&
                     !json.contains("spec_text") && !json.contains("specText");
  if (exact) {
    spec_text = json["spec"].dump();
    json.erase("spec");
  }
  const auto parsed =
      google::protobuf::util::JsonStringToMessage(exact ? json.dump() : body, request);
  if (!parsed.ok()) {
    return invalid("request body: expected a SubmitJobRequest as JSON ({\"spec\": {...}}): " +
                   std::string(parsed.message()));
  }
  if (exact) request->set_spec_text(spec_text);
  return grpc::Status::OK;
}

grpc::Status parse_int(const httplib::Request& request, const std::string& name, int64_t* value) {
  if (!request.has_param(name.c_str())) return grpc::Status::OK;
  const std::string text = request.get_param_value(name.c_str());
  const auto parsed = std::from_chars(text.data(), text.data() + text.size(), *value);
  if (parsed.ec != std::errc() || parsed.ptr != text.data() + text.size()) {
    return invalid(name + ": expected an integer, got \"" + text.substr(0, 40) + "\"");
  }
  return grpc::Status::OK;
}

grpc::Status parse_bool(const httplib::Request& request, const std::string& name, bool* value) {
  if (!request.has_param(name.c_str())) return grpc::Status::OK;
  const std::string text = request.get_param_value(name.c_str());
  if (text == "true" || text == "1" || text.empty()) {
    *value = true;
  } else if (text == "false" || text == "0") {
    *value = false;
  } else {
    return invalid(name + ": expected true or false, got \"" + text.substr(0, 40) + "\"");
  }
  return grpc::Status::OK;
}

// "RUNNING", "running" or "JOB_STATE_RUNNING"; several as repeated parameters or comma-separated.
grpc::Status parse_states(const httplib::Request& request, v1::ListJobsRequest* list) {
  for (const char* name : {"states", "state"}) {
    const size_t count = request.get_param_value_count(name);
    for (size_t i = 0; i < count; ++i) {
      const std::string value = request.get_param_value(name, i);
      size_t start = 0;
      while (start <= value.size()) {
        const size_t end = std::min(value.find(',', start), value.size());
        std::string word = value.substr(start, end - start);
        start = end + 1;
        if (word.empty()) continue;
        std::transform(word.begin(), word.end(), word.begin(),
                       [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
        if (word.rfind("JOB_STATE_", 0) != 0) word = "JOB_STATE_" + word;
        v1::JobState state;
        if (!v1::JobState_Parse(word, &state) || state == v1::JOB_STATE_UNSPECIFIED) {
          return invalid(std::string(name) + ": \"" + value.substr(0, 40) +
                         "\" is not a job state (QUEUED, ASSIGNED, RUNNING, SUCCEEDED, FAILED, "
                         "CANCELLED)");
        }
        list->add_states(state);
      }
    }
  }
  return grpc::Status::OK;
}

// The state one REST event stream shares with its hub subscription.
struct EventStream {
  std::mutex mu;
  std::condition_variable wake;
  bool woken = false;
  uint64_t subscription = 0;
  int64_t after = 0;
};

// Writes the job's next events after stream.after to an NDJSON response; with `follow`, waits
// (up to kStreamPoll) for the event hub when there are none. False when the client is gone.
bool write_events(Coordinator& coordinator, EventStream& stream, const std::string& job_id,
                  bool follow, httplib::DataSink& sink) {
  EventBatch batch;
  const grpc::Status read = coordinator.read_events(job_id, stream.after, kEventBatch, &batch);
  if (!read.ok()) {
    const std::string line = nlohmann::json{{"error", error_object(read)}}.dump() + "\n";
    sink.write(line.data(), line.size());
    sink.done();
    return true;
  }
  if (!batch.events.empty()) {
    for (v1::JobEvent& event : batch.events) {
      stream.after = event.sequence();
      v1::WatchJobResponse item;
      *item.mutable_event() = std::move(event);
      *item.mutable_job() = batch.job.job;
      const std::string line = to_json(item) + "\n";
      if (!sink.write(line.data(), line.size())) return false;
    }
    return true;
  }
  if (!follow || is_terminal(batch.job.job.state()) || coordinator.event_hub().closed()) {
    sink.done();
    return true;
  }
  std::unique_lock lock(stream.mu);
  stream.wake.wait_for(lock, kStreamPoll, [&] { return stream.woken; });
  stream.woken = false;
  return sink.is_writable();
}

// JSON error bodies for what httplib answers on its own, and for exceptions from handlers.
void install_error_handlers(httplib::Server& server) {
  server.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& request,
                                                                   httplib::Response& response) {
    if (!response.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    // httplib answers on its own for unknown paths and for requests it cannot read.
    const int http = response.status;
    const std::string what = request.method + " " + request.path;
    const grpc::Status status =
        http == 404   ? grpc::Status(grpc::StatusCode::NOT_FOUND, "no endpoint " + what)
        : http == 405 ? grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "method not allowed: " + what)
                      : grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                     "cannot read the HTTP request " + what + " (HTTP " +
                                         std::to_string(http) +
                                         "; a POST without a body needs Content-Length: 0)");
    reply_error(response, status);
    response.status = http;
    return httplib::Server::HandlerResponse::Handled;
  }));

  server.set_exception_handler(
      [](const httplib::Request&, httplib::Response& response, const std::exception_ptr& error) {
        std::string what = "unknown error";
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        reply_error(response, grpc::Status(grpc::StatusCode::INTERNAL, what));
      });
}

}  // namespace

RestServer::RestServer(Coordinator& coordinator, Metrics& metrics, int threads)
    : coordinator_(coordinator), metrics_(metrics), server_(std::make_unique<httplib::Server>()) {
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server_->set_payload_max_length(16 << 20);
  routes();
}

RestServer::~RestServer() { stop(); }

int RestServer::bind(const std::string& host, int port) {
  if (port == 0) {
    const int bound = server_->bind_to_any_port(host);
    if (bound < 0) throw std::runtime_error("cannot listen for HTTP on " + host + ":0");
    return bound;
  }
  if (!server_->bind_to_port(host, port)) {
    throw std::runtime_error("cannot listen for HTTP on " + host + ":" + std::to_string(port) +
                             " (in use, or not an address of this host)");
  }
  return port;
}

void RestServer::start() {
  thread_ = std::thread([this] { server_->listen_after_bind(); });
}

void RestServer::stop() {
  if (!thread_.joinable()) return;
  server_->stop();
  thread_.join();
}

void RestServer::routes() {
  job_routes();
  server_->Get(R"(/v1/jobs/([^/:]+)/events)",
               [this](const httplib::Request& request, httplib::Response& response) {
                 serve_events(request, response);
               });
  operational_routes();
  install_error_handlers(*server_);
}

void RestServer::job_routes() {
  httplib::Server& server = *server_;

  server.Post("/v1/jobs", [this](const httplib::Request& request, httplib::Response& response) {
    v1::SubmitJobRequest submit;
    if (const grpc::Status parsed = parse_submit_body(request.body, &submit); !parsed.ok()) {
      return reply_error(response, parsed);
    }
    v1::SubmitJobResponse submitted;
    const grpc::Status status = wait_for([&](Coordinator::Done done) {
      coordinator_.submit_job(submit, &submitted, std::move(done));
    });
    reply(response, status, submitted);
  });

  server.Get("/v1/jobs", [this](const httplib::Request& request, httplib::Response& response) {
    v1::ListJobsRequest list;
    int64_t page_size = 0;
    grpc::Status status = parse_states(request, &list);
    if (status.ok()) status = parse_int(request, "page_size", &page_size);
    if (status.ok() && (page_size < 0 || page_size > INT32_MAX)) {
      status = invalid("page_size: must be in [0, 2^31), got " + std::to_string(page_size));
    }
    if (!status.ok()) return reply_error(response, status);
    list.set_page_size(static_cast<int32_t>(page_size));
    list.set_page_token(request.get_param_value("page_token"));
    v1::ListJobsResponse jobs;
    reply(response, coordinator_.list_jobs(list, &jobs), jobs);
  });

  server.Get(R"(/v1/jobs/([^/:]+))",
             [this](const httplib::Request& request, httplib::Response& response) {
               v1::GetJobRequest get;
               get.set_job_id(request.matches[1]);
               v1::GetJobResponse job;
               reply(response, coordinator_.get_job(get, &job), job);
             });

  server.Post(R"(/v1/jobs/([^/:]+):cancel)",
              [this](const httplib::Request& request, httplib::Response& response) {
                v1::CancelJobRequest cancel;
                cancel.set_job_id(request.matches[1]);
                v1::CancelJobResponse job;
                const grpc::Status status = wait_for([&](Coordinator::Done done) {
                  coordinator_.cancel_job(cancel, &job, std::move(done));
                });
                reply(response, status, job);
              });

  server.Get(R"(/v1/jobs/([^/:]+)/checkpoints)",
             [this](const httplib::Request& request, httplib::Response& response) {
               v1::ListCheckpointsRequest list;
               list.set_job_id(request.matches[1]);
               v1::ListCheckpointsResponse checkpoints;
               reply(response, coordinator_.list_checkpoints(list, &checkpoints), checkpoints);
             });
}

void RestServer::serve_events(const httplib::Request& request, httplib::Response& response) {
  const std::string job_id = request.matches[1];
  auto stream = std::make_shared<EventStream>();
  bool follow = false;
  grpc::Status status = parse_int(request, "after_sequence", &stream->after);
  if (status.ok()) status = parse_bool(request, "follow", &follow);
  // A first read answers "no such job" with a proper status before the stream starts.
  EventBatch probe;
  if (status.ok()) status = coordinator_.read_events(job_id, stream->after, 0, &probe);
  if (!status.ok()) return reply_error(response, status);
  if (follow) {
    std::weak_ptr<EventStream> weak = stream;
    stream->subscription = coordinator_.event_hub().subscribe(job_id, [weak] {
      if (auto alive = weak.lock()) {
        std::lock_guard lock(alive->mu);
        alive->woken = true;
        alive->wake.notify_all();
      }
    });
  }
  response.set_chunked_content_provider(
      "application/x-ndjson",
      [this, stream, job_id, follow](size_t /*offset*/, httplib::DataSink& sink) {
        return write_events(coordinator_, *stream, job_id, follow, sink);
      },
      [this, stream](bool /*success*/) {
        // Response copies share this releaser; unsubscribing twice is harmless.
        if (stream->subscription != 0) coordinator_.event_hub().unsubscribe(stream->subscription);
      });
}

void RestServer::operational_routes() {
  httplib::Server& server = *server_;

  server.Get("/metrics", [this](const httplib::Request&, httplib::Response& response) {
    response.set_content(metrics_.serialize(), "text/plain; version=0.0.4; charset=utf-8");
  });

  server.Get("/healthz", [this](const httplib::Request&, httplib::Response& response) {
    const bool serving = !coordinator_.shutting_down();
    response.status = serving ? 200 : 503;
    response.set_content(
        nlohmann::json{{"status", serving ? "SERVING" : "NOT_SERVING"}}.dump() + "\n", kJson);
  });
}

}  // namespace lomo::server
