#include "server/config.h"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <charconv>
#include <type_traits>

#include "common/flags.h"
#include "common/log.h"
#include "common/read_file.h"

namespace lomo::server {

const char* const kCoordinatorUsage =
    "usage: lomo-coordinator [--config FILE] [--grpc-listen HOST:PORT] [--http-listen HOST:PORT]\n"
    "                        [--data-dir DIR] [--heartbeat-timeout SECONDS]\n"
    "                        [--heartbeat-interval-ms MS] [--threads N] [--ready-file PATH]\n"
    "                        [--log-format text|json] [--keep-checkpoints K]\n"
    "                        [--keep-best-checkpoint]\n"
    "                        [--assigned-timeout SECONDS] [--cancel-timeout SECONDS]\n"
    "                        [--reattach-window SECONDS] [--tokens-file PATH] [--insecure]\n"
    "                        [--max-queued-jobs-per-user N] [--init]\n"
    "                        [--tls-cert PATH --tls-key PATH [--tls-client-ca PATH]]\n"
    "       lomo-coordinator init (--data-dir DIR | --config FILE)\n"
    "       lomo-coordinator backup (--data-dir DIR | --config FILE) --out FILE\n"
    "       lomo-coordinator token create --tokens-file PATH --name NAME\n"
    "                        --role admin|user|viewer|worker [--worker-ids GLOB,GLOB]\n"
    "Serves the lomo JobService and WorkerService over gRPC, REST/JSON and /metrics over HTTP.\n"
    "A port of 0 lets the system choose; --ready-file receives the addresses in use.\n";

namespace {

std::string key_error(const std::string& source, const std::string& key, const std::string& what) {
  return source + ": " + key + ": " + what;
}

template <typename T>
T scalar(const YAML::Node& node, const std::string& source, const std::string& key) {
  if (!node.IsScalar()) throw ConfigError(key_error(source, key, "expected a single value"));
  try {
    return node.as<T>();
  } catch (const YAML::Exception&) {
    throw ConfigError(key_error(source, key,
                                "cannot read \"" + node.Scalar() + "\" as " +
                                    (std::is_same_v<T, std::string> ? "a string"
                                     : std::is_floating_point_v<T>  ? "a number"
                                                                    : "an integer")));
  }
}

void parse_auth(const YAML::Node& value, const std::string& source, CoordinatorConfig* config) {
  if (!value.IsMap()) {
    throw ConfigError(
        key_error(source, "auth", "expected {tokens_file:, insecure:, max_queued_jobs_per_user:}"));
  }
  for (const auto& entry : value) {
    const std::string sub = entry.first.as<std::string>();
    if (sub == "tokens_file") {
      config->tokens_file = scalar<std::string>(entry.second, source, "auth.tokens_file");
    } else if (sub == "insecure") {
      config->insecure = scalar<bool>(entry.second, source, "auth.insecure");
    } else if (sub == "max_queued_jobs_per_user") {
      config->max_queued_jobs_per_user =
          scalar<int64_t>(entry.second, source, "auth.max_queued_jobs_per_user");
    } else {
      throw ConfigError(
          key_error(source, "auth." + sub,
                    "unknown key (expected tokens_file, insecure, max_queued_jobs_per_user)"));
    }
  }
}

void parse_tls(const YAML::Node& value, const std::string& source, CoordinatorConfig* config) {
  if (!value.IsMap()) {
    throw ConfigError(
        key_error(source, "tls", "expected {cert_file:, key_file:, client_ca_file:}"));
  }
  for (const auto& entry : value) {
    const std::string sub = entry.first.as<std::string>();
    std::string* field = sub == "cert_file"        ? &config->tls_cert_file
                         : sub == "key_file"       ? &config->tls_key_file
                         : sub == "client_ca_file" ? &config->tls_client_ca_file
                                                   : nullptr;
    if (field == nullptr) {
      throw ConfigError(key_error(source, "tls." + sub,
                                  "unknown key (expected cert_file, key_file, client_ca_file)"));
    }
    *field = scalar<std::string>(entry.second, source, "tls." + sub);
  }
}

}  // namespace

CoordinatorConfig parse_config(const std::string& yaml_text, const std::string& source) {
  CoordinatorConfig config;
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& error) {
    throw ConfigError(source + ": invalid YAML: " + error.what());
  }
  if (root.IsNull()) return config;
  if (!root.IsMap()) throw ConfigError(source + ": expected a map of settings at the top level");
  for (const auto& entry : root) {
    const std::string key = entry.first.as<std::string>();
    const YAML::Node& value = entry.second;
    if (key == "listen") {
      if (!value.IsMap()) throw ConfigError(key_error(source, key, "expected {grpc:, http:}"));
      for (const auto& listen : value) {
        const std::string sub = listen.first.as<std::string>();
        if (sub == "grpc") {
          config.grpc_listen = scalar<std::string>(listen.second, source, "listen.grpc");
        } else if (sub == "http") {
          config.http_listen = listen.second.IsNull()
                                   ? ""
                                   : scalar<std::string>(listen.second, source, "listen.http");
        } else {
          throw ConfigError(
              key_error(source, "listen." + sub, "unknown key (expected grpc, http)"));
        }
      }
    } else if (key == "data_dir") {
      config.data_dir = scalar<std::string>(value, source, key);
    } else if (key == "heartbeat_interval_ms") {
      config.heartbeat_interval_ms = scalar<int64_t>(value, source, key);
    } else if (key == "heartbeat_timeout_seconds") {
      config.heartbeat_timeout_seconds = scalar<double>(value, source, key);
    } else if (key == "threads") {
      config.threads = scalar<int>(value, source, key);
    } else if (key == "http_threads") {
      config.http_threads = scalar<int>(value, source, key);
    } else if (key == "shutdown_grace_seconds") {
      config.shutdown_grace_seconds = scalar<double>(value, source, key);
    } else if (key == "log_format") {
      config.log_format = scalar<std::string>(value, source, key);
    } else if (key == "keep_checkpoints") {
      config.keep_checkpoints = scalar<int>(value, source, key);
    } else if (key == "keep_best_checkpoint") {
      config.keep_best_checkpoint = scalar<bool>(value, source, key);
    } else if (key == "assigned_timeout_seconds") {
      config.assigned_timeout_seconds = scalar<double>(value, source, key);
    } else if (key == "cancel_timeout_seconds") {
      config.cancel_timeout_seconds = scalar<double>(value, source, key);
    } else if (key == "reattach_window_seconds") {
      config.reattach_window_seconds = scalar<double>(value, source, key);
    } else if (key == "auth") {
      parse_auth(value, source, &config);
    } else if (key == "tls") {
      parse_tls(value, source, &config);
    } else {
      throw ConfigError(key_error(source, key,
                                  "unknown key (expected listen, data_dir, heartbeat_interval_ms, "
                                  "heartbeat_timeout_seconds, threads, http_threads, "
                                  "shutdown_grace_seconds, log_format, keep_checkpoints, "
                                  "keep_best_checkpoint, "
                                  "assigned_timeout_seconds, cancel_timeout_seconds, "
                                  "reattach_window_seconds, auth, tls)"));
    }
  }
  validate_config(config, source);
  return config;
}

void validate_config(const CoordinatorConfig& config, const std::string& source) {
  auto fail = [&](const std::string& key, const std::string& what) {
    throw ConfigError(key_error(source, key, what));
  };
  if (config.grpc_listen.empty()) fail("listen.grpc", "must not be empty");
  split_host_port(config.grpc_listen, source + ": listen.grpc");
  if (!config.http_listen.empty()) split_host_port(config.http_listen, source + ": listen.http");
  if (config.data_dir.empty()) fail("data_dir", "must not be empty");
  if (!(config.heartbeat_timeout_seconds > 0) || config.heartbeat_timeout_seconds > 86400) {
    fail("heartbeat_timeout_seconds",
         "must be in (0, 86400], got " + std::to_string(config.heartbeat_timeout_seconds));
  }
  if (config.heartbeat_interval_ms <= 0) {
    fail("heartbeat_interval_ms",
         "must be > 0, got " + std::to_string(config.heartbeat_interval_ms));
  }
  // A worker must get at least two heartbeats in before it is declared dead.
  if (static_cast<double>(config.heartbeat_interval_ms) * 2 >
      config.heartbeat_timeout_seconds * 1000) {
    fail("heartbeat_interval_ms", "must be at most half of heartbeat_timeout_seconds (" +
                                      std::to_string(config.heartbeat_interval_ms) + " ms vs " +
                                      std::to_string(config.heartbeat_timeout_seconds) + " s)");
  }
  if (config.threads < 1 || config.threads > 256) {
    fail("threads", "must be in [1, 256], got " + std::to_string(config.threads));
  }
  if (config.http_threads < 1 || config.http_threads > 1024) {
    fail("http_threads", "must be in [1, 1024], got " + std::to_string(config.http_threads));
  }
  if (config.keep_checkpoints < 0) {
    fail("keep_checkpoints",
         "must be >= 0 (0 keeps all), got " + std::to_string(config.keep_checkpoints));
  }
  for (const auto& [key, value] :
       {std::pair{"assigned_timeout_seconds", config.assigned_timeout_seconds},
        std::pair{"cancel_timeout_seconds", config.cancel_timeout_seconds},
        std::pair{"reattach_window_seconds", config.reattach_window_seconds}}) {
    if (!(value > 0) || value > 7 * 86400) {
      fail(key, "must be in (0, 604800], got " + std::to_string(value));
    }
  }
  if (config.max_queued_jobs_per_user < 0) {
    fail("auth.max_queued_jobs_per_user",
         "must be >= 0 (0: no limit), got " + std::to_string(config.max_queued_jobs_per_user));
  }
  if (config.tls_cert_file.empty() != config.tls_key_file.empty()) {
    fail(config.tls_cert_file.empty() ? "tls.cert_file" : "tls.key_file",
         "TLS needs both a certificate and its key (--tls-cert and --tls-key)");
  }
  if (!config.tls_client_ca_file.empty() && config.tls_cert_file.empty()) {
    fail("tls.client_ca_file", "needs tls.cert_file and tls.key_file (--tls-cert, --tls-key)");
  }
  if (!(config.shutdown_grace_seconds >= 0)) {
    fail("shutdown_grace_seconds", "must be >= 0");
  }
  try {
    parse_log_format(config.log_format);
  } catch (const std::invalid_argument& error) {
    fail("log_format", error.what());
  }
}

namespace {

// Applies one command-line override on top of the configuration.
void apply_flag(const std::string& flag, const std::string& value, CoordinatorConfig* config) {
  if (flag == "--grpc-listen") {
    config->grpc_listen = value;
  } else if (flag == "--http-listen") {
    config->http_listen = value;
  } else if (flag == "--data-dir") {
    config->data_dir = value;
  } else if (flag == "--heartbeat-timeout") {
    config->heartbeat_timeout_seconds = flag_double(flag, value);
  } else if (flag == "--heartbeat-interval-ms") {
    config->heartbeat_interval_ms = flag_int(flag, value);
  } else if (flag == "--threads") {
    config->threads = static_cast<int>(flag_int(flag, value));
  } else if (flag == "--keep-checkpoints") {
    config->keep_checkpoints = static_cast<int>(flag_int(flag, value));
  } else if (flag == "--keep-best-checkpoint") {
    config->keep_best_checkpoint = value == "true";
  } else if (flag == "--assigned-timeout") {
    config->assigned_timeout_seconds = flag_double(flag, value);
  } else if (flag == "--cancel-timeout") {
    config->cancel_timeout_seconds = flag_double(flag, value);
  } else if (flag == "--reattach-window") {
    config->reattach_window_seconds = flag_double(flag, value);
  } else if (flag == "--ready-file") {
    config->ready_file = value;
  } else if (flag == "--log-format") {
    config->log_format = value;
  } else if (flag == "--tokens-file") {
    config->tokens_file = value;
  } else if (flag == "--insecure") {
    config->insecure = value == "true";
  } else if (flag == "--max-queued-jobs-per-user") {
    config->max_queued_jobs_per_user = flag_int(flag, value);
  } else if (flag == "--tls-cert") {
    config->tls_cert_file = value;
  } else if (flag == "--tls-key") {
    config->tls_key_file = value;
  } else if (flag == "--tls-client-ca") {
    config->tls_client_ca_file = value;
  } else if (flag == "--init") {
    config->init = value == "true";
  } else {
    throw ConfigError("unknown flag " + flag);
  }
}

}  // namespace

CoordinatorConfig config_from_command_line(const std::vector<std::string>& args, bool* help) {
  *help = false;
  try {
    FlagRules rules;
    rules.switches = {"--insecure", "--init", "--keep-best-checkpoint"};
    const ParsedFlags parsed = parse_flags(args, rules);
    if (parsed.help) {
      *help = true;
      return CoordinatorConfig{};
    }
    // --config is applied before any override, wherever it appears.
    CoordinatorConfig config;
    std::string source = "defaults";
    for (const auto& [flag, value] : parsed.flags) {
      if (flag != "--config") continue;
      try {
        config = parse_config(read_file(value), value);
      } catch (const FileReadError& error) {
        throw ConfigError(error.what());
      }
      source = value;
    }
    bool overridden = false;
    for (const auto& [flag, value] : parsed.flags) {
      if (flag == "--config") continue;
      if (flag != "--ready-file") overridden = true;
      apply_flag(flag, value, &config);
    }
    validate_config(config, overridden ? source + " with command-line overrides" : source);
    return config;
  } catch (const FlagError& error) {
    throw ConfigError(error.what());
  }
}

HostPort split_host_port(const std::string& address, const std::string& what) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) {
    throw ConfigError(what + ": expected HOST:PORT, got \"" + address + "\"");
  }
  HostPort result;
  result.host = address.substr(0, colon);
  if (result.host.size() >= 2 && result.host.front() == '[' && result.host.back() == ']') {
    result.host = result.host.substr(1, result.host.size() - 2);
  }
  if (result.host.empty()) result.host = "0.0.0.0";
  const std::string port = address.substr(colon + 1);
  int value = -1;
  const auto parsed = std::from_chars(port.data(), port.data() + port.size(), value);
  if (parsed.ec != std::errc() || parsed.ptr != port.data() + port.size() || value < 0 ||
      value > 65535) {
    throw ConfigError(what + ": invalid port \"" + port + "\" in \"" + address + "\"");
  }
  result.port = value;
  return result;
}

namespace {

bool is_loopback_host(const std::string& host) {
  if (host == "localhost" || host == "::1") return true;
  in_addr address{};
  return ::inet_pton(AF_INET, host.c_str(), &address) == 1 && (ntohl(address.s_addr) >> 24) == 127;
}

}  // namespace

void refuse_open_listeners(const CoordinatorConfig& config) {
  if (!config.tokens_file.empty() || config.insecure) return;
  for (const auto& [key, address] :
       {std::pair<std::string, std::string>{"listen.grpc", config.grpc_listen},
        {"listen.http", config.http_listen}}) {
    if (address.empty()) continue;
    const HostPort listen = split_host_port(address, key);
    if (is_loopback_host(listen.host)) continue;
    throw ConfigError(key + ": " + address +
                      " is reachable from other machines, and authentication is off (no "
                      "tokens file): anyone who reaches it could submit jobs, which run code on "
                      "the workers. Give --tokens-file (see docs/SECURITY.md), listen on "
                      "127.0.0.1, or pass --insecure on a network you trust");
  }
}

}  // namespace lomo::server
