#include "server/rest.h"

#include <arpa/inet.h>
#include <google/protobuf/util/json_util.h>
#include <httplib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "common/api_json.h"
#include "common/printable.h"
#include "server/job_service.h"

namespace lomo::server {

namespace {

constexpr int kEventBatch = 256;
constexpr const char* kJson = "application/json";
// How often a waiting event stream checks that its client is still connected.
constexpr auto kStreamPoll = std::chrono::milliseconds(500);
// A request body: a spec of kMaxSpecBytes with its envelope fits; nothing larger is read.
constexpr size_t kMaxBodyBytes = 1 << 20;
// JSON nesting accepted in a body (a spec is a few levels deep); checked in one linear pass
// before any parser sees the body, as deep nesting is what makes JSON parsers slow or recurse.
constexpr int kMaxJsonDepth = 64;
// The kernel's queue of connections not yet accepted (httplib's own is 5).
constexpr int kListenBacklog = 1024;
// Connections one slow client can hold a thread for: a read or write that stalls this long ends
// the connection, as does an idle keep-alive.
constexpr int kIoTimeoutSeconds = 5;

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
  // A message may quote request bytes (a method, a parameter) that are not UTF-8: replaced, never
  // thrown (an exception here would end the process).
  response.set_content(
      error_object(status).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n",
      kJson);
}

// The JSON `lomoctl --output json` prints too (common/api_json.h).
std::string to_json(const google::protobuf::Message& message) { return lomo::api_json(message); }

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
  if (valid_utf8(body) != body) return invalid("request body: not valid UTF-8");
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

// A query parameter by its proto name ("page_size") or its JSON name ("pageSize"), as gRPC-gateway
// accepts both; the one the request used, so that errors name what the client wrote.
std::string param_alias(const httplib::Request& request, const std::string& snake,
                        const std::string& camel) {
  return request.has_param(camel.c_str()) && !request.has_param(snake.c_str()) ? camel : snake;
}

// 400 naming every query parameter the route does not know (a misspelt "pagesize" would otherwise
// be ignored silently) and any given under both of its names.
grpc::Status check_params(const httplib::Request& request,
                          std::initializer_list<std::pair<const char*, const char*>> known) {
  std::set<std::string> unknown;
  for (const auto& [name, value] : request.params) {
    bool found = false;
    for (const auto& [snake, camel] : known) found = found || name == snake || name == camel;
    if (!found) unknown.insert(name.substr(0, 40));
  }
  if (!unknown.empty()) {
    std::string names;
    for (const std::string& name : unknown) names += (names.empty() ? "\"" : ", \"") + name + "\"";
    std::string accepted;
    for (const auto& [snake, camel] : known) {
      accepted += (accepted.empty() ? "" : ", ") + std::string(snake);
      if (std::string(camel) != snake) accepted += "/" + std::string(camel);
    }
    return invalid("unknown query parameter " + names + " (this route takes " +
                   (accepted.empty() ? std::string("none") : accepted) + ")");
  }
  for (const auto& [snake, camel] : known) {
    if (std::string(camel) != snake && request.has_param(snake) && request.has_param(camel)) {
      return invalid(std::string(snake) + " and " + camel + " name one parameter; give one");
    }
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
  // A follower holds one of RestServer's follower places until its last copy is gone.
  std::atomic<int>* followers = nullptr;
  ~EventStream() {
    if (followers != nullptr) followers->fetch_sub(1);
  }
};

// Writes the job's next events after stream.after to an NDJSON response; with `follow`, waits
// (up to kStreamPoll) for the event hub when there are none. False when the client is gone.
bool write_events(Coordinator& coordinator, EventStream& stream, const std::string& job_id,
                  bool follow, httplib::DataSink& sink) {
  EventBatch batch;
  const grpc::Status read = coordinator.read_events(job_id, stream.after, kEventBatch, &batch);
  if (!read.ok()) {
    const std::string line = nlohmann::json{{"error", error_object(read)}}.dump(
                                 -1, ' ', false, nlohmann::json::error_handler_t::replace) +
                             "\n";
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

// False when `body` nests arrays/objects deeper than `max_depth` (strings are skipped, escapes
// included). One pass, no allocation: safe on any bytes.
bool json_depth_within(std::string_view body, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < body.size(); ++i) {
    const char c = body[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > max_depth) return false;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return true;
}

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

// The host part of a Host header ("name", "name:port", "[v6]:port"), lower-cased.
std::string host_name(const std::string& header) {
  if (!header.empty() && header.front() == '[') {
    const size_t close = header.find(']');
    return close == std::string::npos ? header : lower(header.substr(1, close - 1));
  }
  return lower(header.substr(0, header.find(':')));
}

bool is_ip_literal(const std::string& host) {
  unsigned char address[16];
  return inet_pton(AF_INET, host.c_str(), address) == 1 ||
         inet_pton(AF_INET6, host.c_str(), address) == 1;
}

// httplib's task queue (one task per connection) that starts threads as connections need them,
// up to `max_threads`: a fixed pool of N lets N slow or streaming clients starve /healthz and
// /metrics. Threads, once started, wait for the next connection until shutdown.
class ElasticPool final : public httplib::TaskQueue {
 public:
  ElasticPool(size_t min_threads, size_t max_threads) : max_threads_(max_threads) {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < min_threads; ++i) spawn();
  }
  ~ElasticPool() override { shutdown(); }

  void enqueue(std::function<void()> task) override {
    std::lock_guard lock(mu_);
    tasks_.push_back(std::move(task));
    if (!stopping_ && idle_ < tasks_.size() && threads_.size() < max_threads_) spawn();
    ready_.notify_one();
  }

  void shutdown() override {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    ready_.notify_all();
    for (std::thread& thread : threads_) thread.join();
  }

 private:
  void spawn() {  // mu_ held
    threads_.emplace_back([this] { run(); });
  }

  void run() {
    std::unique_lock lock(mu_);
    while (true) {
      ++idle_;
      ready_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      --idle_;
      if (tasks_.empty()) return;  // stopping, nothing left
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  const size_t max_threads_;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  std::vector<std::thread> threads_;
  size_t idle_ = 0;
  bool stopping_ = false;
};

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

namespace {

std::unique_ptr<httplib::Server> plain_or_tls_server(TlsIdentity* tls) {
  if (tls == nullptr) return std::make_unique<httplib::Server>();
  auto server = std::make_unique<httplib::SSLServer>(
      [tls](SSL_CTX& context) { return tls->configure(context); });
  if (!server->is_valid()) throw std::runtime_error("cannot set up TLS for HTTPS");
  return server;
}

}  // namespace

RestServer::RestServer(Coordinator& coordinator, Metrics& metrics, int threads,
                       const Authenticator& auth, TlsIdentity* tls)
    : coordinator_(coordinator),
      metrics_(metrics),
      auth_(auth),
      server_(plain_or_tls_server(tls)),
      max_followers_(follower_limit(threads)) {
  const size_t max_threads = static_cast<size_t>(connection_limit(threads));
  server_->new_task_queue = [threads, max_threads] {
    return new ElasticPool(static_cast<size_t>(threads), max_threads);
  };
  server_->set_payload_max_length(kMaxBodyBytes);
  server_->set_read_timeout(kIoTimeoutSeconds);
  server_->set_write_timeout(kIoTimeoutSeconds);
  server_->set_keep_alive_timeout(kIoTimeoutSeconds);
  // SO_REUSEADDR only: httplib's default SO_REUSEPORT would let a second coordinator bind the
  // same port and take half of its requests. The socket is kept so bind() can raise its backlog.
  server_->set_socket_options([this](int socket) {
    const int yes = 1;
    ::setsockopt(socket, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    listen_socket_ = socket;
  });
  allowed_hosts_ = {"localhost"};
  char hostname[256] = {};
  if (::gethostname(hostname, sizeof(hostname) - 1) == 0 && hostname[0] != '\0') {
    allow_host(hostname);
  }
  routes();
}

void RestServer::allow_host(const std::string& name) { allowed_hosts_.insert(lower(name)); }

int RestServer::follower_limit(int threads) { return std::max(4, 2 * threads); }

int RestServer::connection_limit(int threads) { return 4 * follower_limit(threads) + threads; }

RestServer::~RestServer() { stop(); }

int RestServer::bind(const std::string& host, int port) {
  if (!is_ip_literal(host) && !host.empty() && host != "0.0.0.0" && host != "::") allow_host(host);
  int bound = port;
  if (port == 0) {
    bound = server_->bind_to_any_port(host);
    if (bound < 0) throw std::runtime_error("cannot listen for HTTP on " + host + ":0");
  } else if (!server_->bind_to_port(host, port)) {
    throw std::runtime_error("cannot listen for HTTP on " + host + ":" + std::to_string(port) +
                             " (in use, or not an address of this host)");
  }
  // listen() again on a listening socket only changes its backlog (Linux).
  if (listen_socket_ >= 0) ::listen(listen_socket_, kListenBacklog);
  return bound;
}

void RestServer::start() {
  thread_ = std::thread([this] {
    server_->listen_after_bind();
    listen_returned_ = true;
  });
}

void RestServer::stop() {
  if (!thread_.joinable()) return;
  // httplib's stop() does nothing before the listening loop runs, which would then never end
  // (a coordinator stopped right after it started would hang): wait for the loop first.
  while (!server_->is_running() && !listen_returned_) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  server_->stop();
  thread_.join();
}

// Before routing and before the body is read: a web page the operator opens may send requests to
// loopback (CSRF) or rebind its own name to it (DNS rebinding). Its Host is then not one of ours,
// and it cannot send application/json cross-origin without a preflight that we never answer.
void RestServer::guard_requests() {
  server_->set_pre_routing_handler(
      [this](const httplib::Request& request, httplib::Response& response) {
        const grpc::Status refused = refusal(request);
        if (refused.ok()) return httplib::Server::HandlerResponse::Unhandled;
        reply_error(response, refused);
        response.status = refused.error_code() == grpc::StatusCode::PERMISSION_DENIED ? 421 : 415;
        response.set_header("Connection", "close");
        return httplib::Server::HandlerResponse::Handled;
      });
}

grpc::Status RestServer::refusal(const httplib::Request& request) const {
  // Probes and scrapers (kubelet, Prometheus) name the address they were given; these two
  // endpoints change nothing and say nothing about jobs.
  const bool operational = request.path == "/healthz" || request.path == "/metrics";
  const std::string host = host_name(request.get_header_value("Host"));
  if (!operational && !is_ip_literal(host) && allowed_hosts_.count(host) == 0) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "Host \"" + request.get_header_value("Host").substr(0, 100) +
                            "\" is not a name of this coordinator (use its IP address, "
                            "localhost or its host name)");
  }
  if (request.method == "POST") {
    const std::string type = lower(request.get_header_value("Content-Type"));
    if (type.rfind(kJson, 0) != 0 || (type.size() > 16 && type[16] != ';' && type[16] != ' ')) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "POST " + request.path +
                              ": Content-Type must be application/json, got \"" +
                              request.get_header_value("Content-Type").substr(0, 100) + "\"");
    }
  }
  return grpc::Status::OK;
}

void RestServer::add_route(const std::string& method, const std::string& pattern, Access access,
                           Handler handler) {
  routes_.push_back(Route{method, pattern, access});
  auto checked = [this, access, what = method + " " + pattern, handler = std::move(handler)](
                     const httplib::Request& request, httplib::Response& response) {
    Principal caller;
    const grpc::Status status =
        auth_.authorize(request.get_header_value("Authorization"), access, what, &caller);
    if (!status.ok()) {
      if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
        response.set_header("WWW-Authenticate", "Bearer realm=\"lomo\"");
      }
      return reply_error(response, status);
    }
    handler(request, response, caller);
  };
  if (method == "GET") {
    server_->Get(pattern, std::move(checked));
  } else if (method == "POST") {
    server_->Post(pattern, std::move(checked));
  } else {
    throw std::logic_error("REST route " + pattern + ": method " + method + " is not served");
  }
}

void RestServer::routes() {
  guard_requests();
  job_routes();
  add_route("GET", R"(/v1/jobs/([^/:]+)/events)", Access::kReadJob,
            [this](const httplib::Request& request, httplib::Response& response,
                   const Principal& caller) {
              const grpc::Status owner =
                  check_job_access(coordinator_, caller, Access::kReadJob, request.matches[1]);
              if (!owner.ok()) return reply_error(response, owner);
              serve_events(request, response);
            });
  operational_routes();
  install_error_handlers(*server_);
}

void RestServer::job_routes() {
  add_route("POST", "/v1/jobs", Access::kSubmit,
            [this](const httplib::Request& request, httplib::Response& response,
                   const Principal& caller) {
              if (!json_depth_within(request.body, kMaxJsonDepth)) {
                return reply_error(response, invalid("request body: JSON nested deeper than " +
                                                     std::to_string(kMaxJsonDepth) + " levels"));
              }
              v1::SubmitJobRequest submit;
              grpc::Status parsed = check_params(request, {});
              if (parsed.ok()) parsed = parse_submit_body(request.body, &submit);
              if (parsed.ok()) parsed = check_spec_size(submit);
              if (!parsed.ok()) return reply_error(response, parsed);
              v1::SubmitJobResponse submitted;
              const grpc::Status status = wait_for([&](Coordinator::Done done) {
                coordinator_.submit_job(submit, caller.name, &submitted, std::move(done));
              });
              reply(response, status, submitted);
            });

  add_route(
      "GET", "/v1/jobs", Access::kListJobs,
      [this](const httplib::Request& request, httplib::Response& response,
             const Principal& caller) {
        v1::ListJobsRequest list;
        int64_t page_size = 0;
        const std::string size_name = param_alias(request, "page_size", "pageSize");
        grpc::Status status = check_params(request, {{"states", "states"},
                                                     {"state", "state"},
                                                     {"page_size", "pageSize"},
                                                     {"page_token", "pageToken"}});
        if (status.ok()) status = parse_states(request, &list);
        if (status.ok()) status = parse_int(request, size_name, &page_size);
        if (status.ok() && (page_size < 0 || page_size > INT32_MAX)) {
          status = invalid(size_name + ": must be in [0, 2^31), got " + std::to_string(page_size));
        }
        if (!status.ok()) return reply_error(response, status);
        list.set_page_size(static_cast<int32_t>(page_size));
        list.set_page_token(
            request.get_param_value(param_alias(request, "page_token", "pageToken").c_str()));
        v1::ListJobsResponse jobs;
        const bool own_jobs_only = caller.role == Role::kUser;
        reply(response, coordinator_.list_jobs(list, &jobs, own_jobs_only ? &caller.name : nullptr),
              jobs);
      });

  add_route("GET", R"(/v1/jobs/([^/:]+))", Access::kReadJob,
            [this](const httplib::Request& request, httplib::Response& response,
                   const Principal& caller) {
              if (const auto bad = check_params(request, {}); !bad.ok()) {
                return reply_error(response, bad);
              }
              v1::GetJobRequest get;
              get.set_job_id(request.matches[1]);
              v1::GetJobResponse job;
              grpc::Status status = coordinator_.get_job(get, &job);
              if (status.ok()) {
                status = check_job_owner(caller, Access::kReadJob, job.job().owner(), get.job_id());
              }
              reply(response, status, job);
            });

  add_route("POST", R"(/v1/jobs/([^/:]+):cancel)", Access::kChangeJob,
            [this](const httplib::Request& request, httplib::Response& response,
                   const Principal& caller) {
              if (const auto bad = check_params(request, {}); !bad.ok()) {
                return reply_error(response, bad);
              }
              if (const auto owner = check_job_access(coordinator_, caller, Access::kChangeJob,
                                                      request.matches[1]);
                  !owner.ok()) {
                return reply_error(response, owner);
              }
              v1::CancelJobRequest cancel;
              cancel.set_job_id(request.matches[1]);
              v1::CancelJobResponse job;
              const grpc::Status status = wait_for([&](Coordinator::Done done) {
                coordinator_.cancel_job(cancel, &job, std::move(done));
              });
              reply(response, status, job);
            });

  add_route("GET", R"(/v1/jobs/([^/:]+)/checkpoints)", Access::kReadJob,
            [this](const httplib::Request& request, httplib::Response& response,
                   const Principal& caller) {
              if (const auto bad = check_params(request, {}); !bad.ok()) {
                return reply_error(response, bad);
              }
              if (const auto owner =
                      check_job_access(coordinator_, caller, Access::kReadJob, request.matches[1]);
                  !owner.ok()) {
                return reply_error(response, owner);
              }
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
  grpc::Status status =
      check_params(request, {{"after_sequence", "afterSequence"}, {"follow", "follow"}});
  if (status.ok()) {
    status =
        parse_int(request, param_alias(request, "after_sequence", "afterSequence"), &stream->after);
  }
  if (status.ok()) status = parse_bool(request, "follow", &follow);
  // A first read answers "no such job" with a proper status before the stream starts.
  EventBatch probe;
  if (status.ok()) status = coordinator_.read_events(job_id, stream->after, 0, &probe);
  if (!status.ok()) return reply_error(response, status);
  if (follow) {
    if (followers_.fetch_add(1) >= max_followers_) {
      followers_.fetch_sub(1);
      return reply_error(response, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                                std::to_string(max_followers_) +
                                                    " event streams are followed already; "
                                                    "retry later, or use WatchJob over gRPC"));
    }
    stream->followers = &followers_;
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
  add_route("GET", "/metrics", Access::kMetrics,
            [this](const httplib::Request&, httplib::Response& response, const Principal&) {
              response.set_content(metrics_.serialize(),
                                   "text/plain; version=0.0.4; charset=utf-8");
            });

  add_route("GET", "/healthz", Access::kPublic,
            [this](const httplib::Request&, httplib::Response& response, const Principal&) {
              const std::string problem = health_problem_ ? health_problem_() : "";
              const bool serving = !coordinator_.shutting_down() && problem.empty();
              response.status = serving ? 200 : 503;
              nlohmann::json body{{"status", serving ? "SERVING" : "NOT_SERVING"}};
              if (!problem.empty()) body["reason"] = problem;
              response.set_content(body.dump() + "\n", kJson);
            });
}

}  // namespace lomo::server
