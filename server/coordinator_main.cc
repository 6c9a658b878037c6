// lomo-coordinator: owns the job store and checkpoints, schedules jobs on workers, serves the
// gRPC API (JobService, WorkerService, health, reflection) and REST/JSON with /metrics.
//
//   lomo-coordinator [--config coordinator.yaml] [--grpc-listen 127.0.0.1:7070]
//                    [--http-listen 127.0.0.1:7080] [--data-dir DIR] [--heartbeat-timeout S]
//                    [--log-format text|json]
//
// SIGTERM or SIGINT: stop accepting, let calls in flight finish (shutdown_grace_seconds), exit 0.
#include <fcntl.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/bearer_token.h"
#include "common/flags.h"
#include "common/log.h"
#include "common/read_file.h"
#include "common/version.h"
#include "server/auth.h"
#include "server/checkpoint_store.h"
#include "server/config.h"
#include "server/coordinator.h"
#include "server/executor.h"
#include "server/in_flight.h"
#include "server/job_service.h"
#include "server/metrics.h"
#include "server/rest.h"
#include "server/store.h"
#include "server/tls.h"
#include "server/worker_session.h"

namespace lomo::server {
namespace {

namespace fs = std::filesystem;

// Checkpoint chunks are up to a few MiB; leave room for a worker that sends larger ones.
constexpr int kMaxMessageBytes = 64 << 20;

// An exclusive lock on <data_dir>/LOCK for the life of the process: two coordinators on one data
// directory would corrupt each other's checkpoints. The kernel drops it when the process dies,
// so a restart after kill -9 is never blocked.
int lock_data_dir(const fs::path& dir) {
  const fs::path path = dir / "LOCK";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw std::runtime_error("cannot open " + path.string() + ": " + std::strerror(errno));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    throw std::runtime_error("another lomo-coordinator is using " + dir.string());
  }
  return fd;
}

void write_ready_file(const std::string& path, const std::string& grpc_address,
                      const std::string& http_address) {
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << nlohmann::json{{"grpc", grpc_address}, {"http", http_address}, {"pid", ::getpid()}}
               .dump()
        << "\n";
    if (!out) throw std::runtime_error("cannot write " + temporary);
  }
  fs::rename(temporary, path);
}

std::string with_port(const std::string& address, int port) {
  return address.substr(0, address.rfind(':')) + ":" + std::to_string(port);
}

TlsFiles tls_files(const CoordinatorConfig& config) {
  return {config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file};
}

// The gRPC server with both services, health and reflection, listening on config.grpc_listen.
// `*address` gets the address with the port actually bound.
std::unique_ptr<grpc::Server> start_grpc(const CoordinatorConfig& config, JobServiceImpl& jobs,
                                         WorkerServiceImpl& workers, const TlsIdentity* tls,
                                         std::string* address) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(
      config.grpc_listen,
      tls != nullptr ? tls->grpc_credentials() : grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&jobs);
  builder.RegisterService(&workers);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    throw std::runtime_error("cannot listen for gRPC on " + config.grpc_listen +
                             " (in use, or not an address of this host)");
  }
  // grpc.health.v1 per service, as Kubernetes' and grpc_health_probe's `-service` checks ask for
  // it ("" is the server as a whole); SetServingStatus(false) at shutdown turns all of them.
  for (const char* service :
       {v1::JobService::service_full_name(), v1::WorkerService::service_full_name()}) {
    server->GetHealthCheckService()->SetServingStatus(service, true);
  }
  *address = with_port(config.grpc_listen, port);
  return server;
}

// REST and /metrics, unless config.http_listen is empty. `*address` gets the bound address.
std::unique_ptr<RestServer> start_rest(const CoordinatorConfig& config, Coordinator& coordinator,
                                       Metrics& metrics, const Authenticator& auth,
                                       TlsIdentity* tls, std::string* address) {
  if (config.http_listen.empty()) return nullptr;
  const HostPort http = split_host_port(config.http_listen, "listen.http");
  auto rest = std::make_unique<RestServer>(coordinator, metrics, config.http_threads, auth, tls);
  *address = with_port(config.http_listen, rest->bind(http.host, http.port));
  rest->start();
  return rest;
}

// Refuses new work and ends the long-lived streams (worker streams, followed watches); lets the
// calls in flight finish, up to the grace period; then closes every connection. gRPC's
// Shutdown(deadline) alone would also wait for idle client channels, which may never leave.
void shut_down(double grace_seconds, grpc::Server& server, RestServer* rest,
               Coordinator& coordinator, InFlight& in_flight, Executor& executor) {
  server.GetHealthCheckService()->SetServingStatus(false);
  coordinator.begin_shutdown();
  const auto grace = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(grace_seconds));
  if (!in_flight.wait_idle(std::chrono::steady_clock::now() + grace)) {
    log_line("calls still in flight after the grace period; cancelling them");
  }
  server.Shutdown(std::chrono::system_clock::now());
  if (rest != nullptr) rest->stop();
  executor.shutdown();
  coordinator.stop();
  server.Wait();
}

// SIGHUP: new tokens take effect for calls that start from now on; a bad file changes nothing.
void reload_tokens(Authenticator& auth) {
  if (!auth.enabled()) return log_line("SIGHUP: no tokens file to reload");
  try {
    auth.reload();
    log_line("SIGHUP: tokens file reloaded");
  } catch (const std::exception& error) {
    log_line(std::string("SIGHUP: tokens file not reloaded, the previous tokens stay: ") +
             error.what());
  }
}

// SIGHUP: gRPC and HTTPS present the certificate files as they are now (server/tls.h); a bad
// file keeps the certificate in use.
void reload_certificate(TlsIdentity* tls) {
  if (tls == nullptr) return;
  try {
    tls->reload();
  } catch (const std::exception& error) {
    log_line(std::string("SIGHUP: TLS certificate not reloaded, the previous one stays: ") +
             error.what());
  }
}

// The certificate both listeners present, its checked copies under <data_dir>/tls; nullptr
// without TLS.
std::unique_ptr<TlsIdentity> load_tls(const CoordinatorConfig& config) {
  const TlsFiles files = tls_files(config);
  if (!files.enabled()) return nullptr;
  return std::make_unique<TlsIdentity>(files, fs::path(config.data_dir) / "tls");
}

// lomo-coordinator token create --tokens-file F --name N --role R [--worker-ids a,b]: adds a
// token to the file (created 0600 if missing) and prints the token, which is stored nowhere.
int create_token(const std::vector<std::string>& args) {
  FlagRules rules;
  rules.with_value = {"--tokens-file", "--name", "--role", "--worker-ids"};
  rules.unknown = UnknownFlags::kRefuse;
  const ParsedFlags parsed = parse_flags(args, rules);
  std::map<std::string, std::string> flags(parsed.flags.begin(), parsed.flags.end());
  for (const char* required : {"--tokens-file", "--name", "--role"}) {
    if (flags.count(required) == 0) throw FlagError(std::string(required) + ": required");
  }
  const fs::path file = flags["--tokens-file"];
  std::vector<TokenEntry> entries;
  if (fs::exists(file)) entries = parse_tokens(read_file(file), file.string());
  const std::string token = new_token();
  YAML::Node entry;
  entry["name"] = flags["--name"];
  entry["role"] = flags["--role"];
  entry["sha256"] = hex(token_hash(token));
  if (flags.count("--worker-ids") != 0) {
    std::stringstream ids(flags["--worker-ids"]);
    for (std::string id; std::getline(ids, id, ',');) entry["worker_ids"].push_back(id);
  }
  YAML::Node one;
  one["tokens"].push_back(entry);
  // The new entry goes through the same checks as a loaded file, then the whole file.
  std::vector<TokenEntry> added = parse_tokens(YAML::Dump(one), "--name/--role/--worker-ids");
  entries.push_back(added.front());
  const std::string text = tokens_to_yaml(entries);
  parse_tokens(text, file.string());  // a duplicate name or token is refused here
  write_private_file(file, text);
  std::cout << token << "\n";
  std::cerr << "lomo-coordinator: token \"" << flags["--name"] << "\" (" << flags["--role"]
            << ") added to " << file.string()
            << "; the token above is shown once. A running coordinator reads it on SIGHUP.\n";
  return 0;
}

// The data directory of `init` and `backup`: --data-dir DIR, or --config FILE's data_dir.
fs::path data_dir_from_flags(const ParsedFlags& parsed) {
  std::map<std::string, std::string> flags(parsed.flags.begin(), parsed.flags.end());
  if (flags.count("--data-dir") == flags.count("--config")) {
    throw FlagError("give one of --data-dir DIR and --config FILE (its data_dir)");
  }
  if (flags.count("--data-dir") != 0) return flags["--data-dir"];
  return parse_config(read_file(flags["--config"]), flags["--config"]).data_dir;
}

// <data_dir>/INITIALISED: written when --init (or `init`) made or found the store. A later --init
// over a data directory that has it but no store refuses: the store was lost, not never made.
constexpr const char* kInitMarker = "INITIALISED";

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

bool has_store(const fs::path& dir) {
  std::error_code error;
  const auto size = fs::file_size(dir / "coordinator.db", error);
  return !error && size > 0;
}

// The data directory is created only for a new deployment (--init): a missing one means a lost
// volume, which must not come up as an empty store; nor may --init replace a store that was lost.
void prepare_data_dir(const fs::path& dir, bool init) {
  if (!init) {
    if (fs::is_directory(dir)) return;
    throw std::runtime_error(
        "data directory " + dir.string() +
        " does not exist, so there is no store to serve. A new store is created only when asked: "
        "lomo-coordinator --init, for a new deployment. If this deployment had one, its volume "
        "is missing: restore coordinator.db from a backup (server/README.md)");
  }
  fs::create_directories(dir);
  const fs::path marker = dir / kInitMarker;
  if (!has_store(dir) && fs::exists(marker)) {
    throw std::runtime_error(
        (dir / "coordinator.db").string() + " is missing or empty, but " + marker.string() +
        " says this data directory was initialised (" + first_line(read_file(marker)) +
        "): --init does not start a new store over a lost one. Restore coordinator.db from a "
        "backup (server/README.md), or remove " +
        marker.string() + " to start empty on purpose");
  }
}

// Records that the data directory holds an initialised store (once; synced).
void mark_initialised(const fs::path& dir) {
  const fs::path marker = dir / kInitMarker;
  if (fs::exists(marker)) return;
  const std::time_t now = std::time(nullptr);
  char when[64];
  std::strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  write_private_file(marker,
                     std::string(when) +
                         "\nThis data directory holds a lomo store made by lomo-coordinator "
                         "--init; see server/README.md before removing this file.\n");
}

// lomo-coordinator init (--data-dir DIR | --config FILE): --init without serving, for a
// deployment's one-time setup (deploy/k8s runs it as an init container): makes the store unless
// one is there (then only checks that it opens), and refuses where the marker says a store was
// lost.
int init_store(const std::vector<std::string>& args) {
  FlagRules rules;
  rules.with_value = {"--data-dir", "--config"};
  rules.unknown = UnknownFlags::kRefuse;
  const fs::path dir = data_dir_from_flags(parse_flags(args, rules));
  prepare_data_dir(dir, /*init=*/true);
  const bool existed = has_store(dir);
  const int lock_fd = lock_data_dir(dir);
  { Store store(dir / "coordinator.db", /*reader_connections=*/1, StoreOpen::kCreate); }
  mark_initialised(dir);
  ::close(lock_fd);
  std::cerr << "lomo-coordinator init: " << (dir / "coordinator.db").string()
            << (existed ? ": a store is there already; it opens (nothing changed)\n"
                        : ": new, empty store created\n");
  return 0;
}

// lomo-coordinator backup (--data-dir DIR | --config FILE) --out FILE: an online copy of
// DIR/coordinator.db (Store::backup), safe while a coordinator serves from it.
int backup_store(const std::vector<std::string>& args) {
  FlagRules rules;
  rules.with_value = {"--data-dir", "--config", "--out"};
  rules.unknown = UnknownFlags::kRefuse;
  const ParsedFlags parsed = parse_flags(args, rules);
  std::map<std::string, std::string> flags(parsed.flags.begin(), parsed.flags.end());
  if (flags.count("--out") == 0) throw FlagError("--out: required");
  const fs::path data_dir = data_dir_from_flags(parsed);
  const fs::path file = data_dir / "coordinator.db";
  const auto start = std::chrono::steady_clock::now();
  const BackupSummary copied = Store::backup(file, flags["--out"]);
  const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - start);
  std::cerr << "lomo-coordinator backup: " << file.string() << " copied to " << flags["--out"]
            << " in " << elapsed.count() << " ms: " << copied.bytes << " bytes, schema version "
            << copied.schema_version << ", " << copied.jobs << " jobs, " << copied.events
            << " events, " << copied.checkpoints << " checkpoint records (their files, under "
            << (data_dir / "checkpoints").string() << ", are not in the copy)\n";
  return 0;
}

int run(const CoordinatorConfig& config) {
  // Block the stop signals in every thread (threads inherit the mask); main waits for them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGHUP);  // reloads the tokens file
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  Authenticator auth =
      config.tokens_file.empty() ? Authenticator() : Authenticator(config.tokens_file);
  // Bad certificate files stop the start here, naming the file, before anything else happens.
  if (!config.tls_cert_file.empty()) check_tls_files(tls_files(config));

  const fs::path data_dir = config.data_dir;
  prepare_data_dir(data_dir, config.init);
  const int lock_fd = lock_data_dir(data_dir);
  const std::unique_ptr<TlsIdentity> tls = load_tls(config);

  Store store(data_dir / "coordinator.db", /*reader_connections=*/8,
              config.init ? StoreOpen::kCreate : StoreOpen::kExisting);
  if (config.init) mark_initialised(data_dir);
  CheckpointStore checkpoints(data_dir / "checkpoints");
  Metrics metrics;
  CoordinatorOptions options{config.heartbeat_timeout_seconds, config.heartbeat_interval_ms,
                             config.keep_checkpoints};
  options.keep_best_checkpoint = config.keep_best_checkpoint;
  options.assigned_timeout_seconds = config.assigned_timeout_seconds;
  options.cancel_timeout_seconds = config.cancel_timeout_seconds;
  options.reattach_window_seconds = config.reattach_window_seconds;
  options.max_queued_jobs_per_owner = config.max_queued_jobs_per_user;
  Coordinator coordinator(options, store, checkpoints, metrics);
  coordinator.start();
  Executor executor(config.threads);

  InFlight in_flight;
  JobServiceImpl job_service(coordinator, executor, in_flight, auth);
  WorkerServiceImpl worker_service(coordinator, executor, in_flight, auth);
  std::string grpc_address, http_address;
  std::unique_ptr<grpc::Server> server =
      start_grpc(config, job_service, worker_service, tls.get(), &grpc_address);
  std::unique_ptr<RestServer> rest =
      start_rest(config, coordinator, metrics, auth, tls.get(), &http_address);
  coordinator.serving_from_now();
  // A corrupt store found while serving: both health checks say NOT_SERVING from then on.
  if (rest != nullptr) rest->set_health_problem([&store] { return store.corruption(); });
  store.set_on_corruption([&server](const std::string& what) {
    log_line("store: " + what + "; health is NOT_SERVING");
    server->GetHealthCheckService()->SetServingStatus(false);
  });
  log_line(
      "serving gRPC on " + grpc_address +
      (http_address.empty() ? "" : ", HTTP on " + http_address) + "; data in " + data_dir.string() +
      (auth.enabled() ? "; tokens from " + config.tokens_file
                      : "; authentication off (no tokens file)") +
      (tls == nullptr
           ? "; no TLS"
           : "; TLS with " + config.tls_cert_file +
                 (config.tls_client_ca_file.empty()
                      ? ""
                      : ", gRPC clients need a certificate from " + config.tls_client_ca_file)));
  if (!config.ready_file.empty()) write_ready_file(config.ready_file, grpc_address, http_address);

  int signal = 0;
  while (sigwait(&stop_signals, &signal) == 0 && signal == SIGHUP) {
    reload_tokens(auth);
    reload_certificate(tls.get());
  }
  log_line(std::string("received ") + (signal == SIGTERM ? "SIGTERM" : "SIGINT") +
           "; shutting down");
  shut_down(config.shutdown_grace_seconds, *server, rest.get(), coordinator, in_flight, executor);
  store.set_on_corruption(nullptr);
  ::close(lock_fd);
  log_line("stopped");
  return 0;
}

}  // namespace
}  // namespace lomo::server

int main(int argc, char** argv) {
  using namespace lomo::server;
  lomo::set_log_program("lomo-coordinator");
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (lomo::asks_for_version(args)) {
    std::cout << lomo::version_text("lomo-coordinator");
    return 0;
  }
  if (args.size() >= 2 && args[0] == "token" && args[1] == "create") {
    try {
      return create_token(std::vector<std::string>(args.begin() + 2, args.end()));
    } catch (const std::exception& error) {
      std::cerr << "lomo-coordinator token create: " << error.what() << "\n";
      return 2;
    }
  }
  if (!args.empty() && (args[0] == "backup" || args[0] == "init")) {
    const std::vector<std::string> rest(args.begin() + 1, args.end());
    if (std::find(rest.begin(), rest.end(), "--help") != rest.end()) {
      std::cout << kCoordinatorUsage;
      return 0;
    }
    try {
      return args[0] == "backup" ? backup_store(rest) : init_store(rest);
    } catch (const lomo::FlagError& error) {
      std::cerr << "lomo-coordinator " << args[0] << ": " << error.what() << "\n"
                << kCoordinatorUsage;
      return 2;
    } catch (const std::exception& error) {
      std::cerr << "lomo-coordinator " << args[0] << ": " << error.what() << "\n";
      return 1;
    }
  }
  CoordinatorConfig config;
  try {
    bool help = false;
    config = config_from_command_line(args, &help);
    if (help) {
      std::cout << kCoordinatorUsage;
      return 0;
    }
    refuse_open_listeners(config);
  } catch (const ConfigError& error) {
    std::cerr << "lomo-coordinator: " << error.what() << "\n" << kCoordinatorUsage;
    return 2;
  }
  lomo::set_log_format(lomo::parse_log_format(config.log_format));  // validated with the config
  try {
    return run(config);
  } catch (const std::exception& error) {
    lomo::log_line(std::string("fatal: ") + error.what());
    return 1;
  }
}
