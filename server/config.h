// The coordinator's settings: a YAML file (--config) with command-line overrides on top.
//
//   listen:
//     grpc: 127.0.0.1:7070      # JobService, WorkerService, health, reflection
//     http: 127.0.0.1:7080      # REST/JSON and /metrics; "" turns it off
//   data_dir: lomo-data         # SQLite store and checkpoints
//   heartbeat_interval_ms: 1000 # what workers are told to use
//   heartbeat_timeout_seconds: 10
//   threads: 8                  # blocking work: SQLite, checkpoint files
//   http_threads: 16            # REST connections (an event stream holds one)
//   shutdown_grace_seconds: 5   # SIGTERM: how long calls in flight may take to finish
//   log_format: text            # or json: one JSON object per log line
//   keep_checkpoints: 3         # committed checkpoints kept per job (newest); 0 keeps all
//   keep_best_checkpoint: false # also keep the checkpoint with the lowest eval loss at its step
//   assigned_timeout_seconds: 600 # ASSIGNED without any rank reporting RUNNING: a transient
//   failure cancel_timeout_seconds: 300 # a cancel no worker confirms: CANCELLED, saying so
//   reattach_window_seconds: 30 # a worker whose stream broke may take this long to come back
#pragma once

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/reconnect.h"

namespace lomo::server {

struct CoordinatorConfig {
  std::string grpc_listen = "127.0.0.1:7070";
  std::string http_listen = "127.0.0.1:7080";
  std::string data_dir = "lomo-data";
  int64_t heartbeat_interval_ms = 1000;
  double heartbeat_timeout_seconds = 10.0;
  int threads = 8;
  int http_threads = 16;
  double shutdown_grace_seconds = 5.0;
  std::string log_format = "text";    // common/log.h: text or json
  int keep_checkpoints = 3;           // committed checkpoints kept per job, newest first; 0: all
  bool keep_best_checkpoint = false;  // and the one with the lowest eval loss at its step
  // Operational timeouts (JobLifecycle::check_timeouts). The assignment's includes the workers'
  // fetch of the checkpoint to resume from, which precedes RUNNING: hence minutes.
  double assigned_timeout_seconds = 600;
  double cancel_timeout_seconds = 300;
  // How long a worker whose stream broke (or which has not come back since a coordinator restart)
  // keeps its job attempt. Derived from the workers' reconnect backoff (common/reconnect.h): the
  // default exceeds their largest backoff delay plus one dial, so an outage of the coordinator
  // never ends attempts of workers that are still training. Never below heartbeat_timeout.
  double reattach_window_seconds = std::chrono::duration<double>(kDefaultReattachWindow).count();
  // auth: who may call (docs/SECURITY.md). No tokens file: authentication off, and then the
  // listeners must be loopback addresses unless `insecure` says otherwise.
  //   auth:
  //     tokens_file: /etc/lomo/tokens.yaml   # reloaded on SIGHUP
  //     insecure: false
  //     max_queued_jobs_per_user: 1000       # 0: no limit
  std::string tokens_file;
  bool insecure = false;
  int64_t max_queued_jobs_per_user = 1000;
  // tls: one certificate for gRPC and HTTPS (server/tls.h); a client CA makes gRPC require
  // client certificates it signed (mutual TLS). Files are re-read when they change and on SIGHUP.
  //   tls:
  //     cert_file: /etc/lomo/tls/server.crt   # with its chain
  //     key_file: /etc/lomo/tls/server.key
  //     client_ca_file: /etc/lomo/tls/client-ca.pem   # optional
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Not in the file: where to write {"grpc": "host:port", "http": "host:port"} once both listen
  // (ports chosen by the system when the address says :0). Tests and scripts wait for it.
  std::string ready_file;
  // Not in the file either: --init, this is a new deployment. Only then does a missing (or
  // zero-length) <data_dir>/coordinator.db become a new, empty store; without it the coordinator
  // refuses to start, so a lost volume never comes up empty. Harmless on an existing store.
  bool init = false;
};

// A setting that cannot be used; what() names the source and the key ("coordinator.yaml:
// heartbeat_timeout_seconds: must be > 0, got -1").
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Parses YAML text; unknown keys and invalid values throw ConfigError naming `source`.
CoordinatorConfig parse_config(const std::string& yaml_text, const std::string& source);

// Reads --config FILE first (if given), then applies --grpc-listen, --http-listen, --data-dir,
// --heartbeat-timeout SECONDS, --heartbeat-interval-ms MS, --threads N, --ready-file PATH,
// --log-format text|json, --keep-checkpoints K, --assigned-timeout SECONDS,
// --cancel-timeout SECONDS, --reattach-window SECONDS, --tokens-file PATH, --insecure,
// --max-queued-jobs-per-user N, --init, --tls-cert PATH, --tls-key PATH, --tls-client-ca PATH
// on top.
// Both "--flag value" and "--flag=value" work. Throws ConfigError; `*help` is set for --help.
CoordinatorConfig config_from_command_line(const std::vector<std::string>& args, bool* help);

// Checks the values that every source must respect. Throws ConfigError naming `source`.
void validate_config(const CoordinatorConfig& config, const std::string& source);

extern const char* const kCoordinatorUsage;

// "host:port" (or "[v6]:port") split for listeners that want them apart. Throws ConfigError.
struct HostPort {
  std::string host;
  int port = 0;
};
HostPort split_host_port(const std::string& address, const std::string& what);

// ConfigError when authentication is off (no tokens file) and a listener is not on a loopback
// address, unless `insecure` is set: anyone who reaches the port could run code on the workers.
void refuse_open_listeners(const CoordinatorConfig& config);

}  // namespace lomo::server
