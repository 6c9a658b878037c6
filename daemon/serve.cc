#include "daemon/serve.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <mutex>
#include <thread>

#include "common/advertise_address.h"
#include "common/flags.h"
#include "common/grpc_channel.h"
#include "common/log.h"
#include "common/stop_signals.h"
#include "daemon/daemon.h"

namespace lomo::daemon {
namespace {

constexpr const char* kUsage =
    "usage: lomo-worker serve --coordinator HOST:PORT [--device cpu|N] [--work-dir DIR]\n"
    "                         [--metrics-listen ADDR:PORT] [--worker-id ID]\n"
    "                         [--advertise-address ADDR]  (gang peers connect to it; default:\n"
    "                          this host's address on its route to the coordinator)\n"
    "                         [--cancel-grace SECONDS] [--shutdown-timeout SECONDS]\n"
    "                         [--keep-attempts N]  (ended attempt directories kept; default 3)\n"
    "                         [--trainer PATH]  (lomo-worker, run as `PATH train JOB.yaml`)\n"
    "                         [--log-format text|json]\n"
    "                         [--token-file PATH]  (a worker token; or $LOMO_TOKEN_FILE)\n"
    "                         [--ca-file PATH]  (the coordinator's CA: TLS; or $LOMO_CA_FILE)\n"
    "                         [--cert-file PATH --key-file PATH]  (this worker's certificate for\n"
    "                          mutual TLS; or $LOMO_CERT_FILE, $LOMO_KEY_FILE)\n";

int usage(const std::string& problem) {
  std::cerr << "lomo-worker serve: " << problem << "\n" << kUsage;
  return 2;
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

// Fills `options` from the command line. Throws FlagError for bad usage.
void read_flags(const ParsedFlags& parsed, DaemonOptions* options, std::string* device_flag) {
  for (const auto& [flag, value] : parsed.flags) {
    if (flag == "--coordinator") {
      options->coordinator = value;
    } else if (flag == "--device") {
      *device_flag = value;
    } else if (flag == "--work-dir") {
      options->work_dir = value;
    } else if (flag == "--metrics-listen") {
      options->metrics_listen = value;
    } else if (flag == "--trainer") {
      options->trainer_program = value;
    } else if (flag == "--worker-id") {
      options->worker_id = value;
    } else if (flag == "--advertise-address") {
      if (value.empty()) throw FlagError(flag + ": expected a host name or IP address");
      options->advertise_address = value;
    } else if (flag == "--cancel-grace") {
      options->cancel_grace = flag_seconds(flag, value);
    } else if (flag == "--shutdown-timeout") {
      options->shutdown_timeout = flag_seconds(flag, value);
    } else if (flag == "--keep-attempts") {
      const int64_t keep = flag_int(flag, value);
      if (keep < 0 || keep > 100000) throw FlagError(flag + ": expected 0 to 100000, got " + value);
      options->keep_attempts = static_cast<int>(keep);
    } else if (flag == "--token-file") {
      options->token_file = value;
    } else if (flag == "--ca-file") {
      options->ca_file = value;
    } else if (flag == "--cert-file") {
      options->cert_file = value;
    } else if (flag == "--key-file") {
      options->key_file = value;
    } else if (flag == "--log-format") {
      try {
        set_log_format(parse_log_format(value));
      } catch (const std::invalid_argument& error) {
        throw FlagError(flag + ": " + error.what());
      }
    } else {
      throw FlagError("unknown option '" + flag + "'");
    }
  }
  if (options->coordinator.empty()) throw FlagError("--coordinator HOST:PORT is required");
}

// Every channel of this process (session, checkpoint fetches, rendezvous) presents the worker's
// token and, with a CA bundle, speaks TLS. Throws std::runtime_error naming the file.
void set_channel_security(DaemonOptions* options) {
  const std::pair<std::string*, const char*> files[] = {{&options->token_file, "LOMO_TOKEN_FILE"},
                                                        {&options->ca_file, "LOMO_CA_FILE"},
                                                        {&options->cert_file, "LOMO_CERT_FILE"},
                                                        {&options->key_file, "LOMO_KEY_FILE"}};
  for (auto [value, env] : files) {
    const char* from_env = std::getenv(env);
    if (value->empty() && from_env != nullptr) *value = from_env;
    if (!value->empty()) *value = std::filesystem::absolute(*value);
  }
  ChannelSecurity security;
  if (!options->token_file.empty()) security.token = read_token_file(options->token_file);
  security.ca_file = options->ca_file;
  security.cert_file = options->cert_file;
  security.key_file = options->key_file;
  // The training children meet their peers through the coordinator themselves (rendezvous):
  // they find the same credentials in the environment they inherit.
  for (auto [value, env] : files) ::setenv(env, value->c_str(), 1);
  set_process_channel_security(std::move(security));
}

// The trainer executable: --trainer, or lomo-worker beside this program. "" with `*problem` set
// when there is none.
std::filesystem::path find_trainer(const std::filesystem::path& flag, std::string* problem) {
  std::filesystem::path trainer = flag;
  if (trainer.empty()) {
    std::error_code error;
    const auto self = std::filesystem::read_symlink("/proc/self/exe", error);
    if (error) {
      *problem = "cannot find its own executable: " + error.message();
      return {};
    }
    trainer = self.parent_path() / "lomo-worker";
  }
  trainer = std::filesystem::absolute(trainer);
  if (::access(trainer.c_str(), X_OK) != 0) {
    *problem = "the trainer " + trainer.string() + " is not an executable file (set --trainer)";
    return {};
  }
  return trainer;
}

// The address gang peers reach this worker at, when --advertise-address does not say: the local
// end of the route to the coordinator (127.0.0.1 for a coordinator on loopback), or the host name
// when the coordinator cannot be resolved yet (the daemon keeps dialling it anyway).
std::string default_advertise_address(const std::string& coordinator) {
  try {
    std::string address = local_address_toward(coordinator);
    // Right for a gang on this host only; a peer on another host would dial its own loopback.
    if (address == "127.0.0.1" || address == "::1") {
      log_line("advertising " + address + " to gang peers (the coordinator " + coordinator +
               " is reached over loopback): gangs with workers on other hosts need "
               "--advertise-address set to an address they can reach");
    }
    return address;
  } catch (const std::runtime_error& e) {
    log_line(std::string(e.what()) + "; advertising the host name " + host_name() +
             " to gang peers (set --advertise-address)");
    return host_name();
  }
}

// Runs the daemon until it stops; its exit code.
int run_daemon(const DaemonOptions& options) {
  ::signal(SIGPIPE, SIG_IGN);
  // Stop signals reach the daemon through a watcher thread; one that arrives while the daemon is
  // still being built is held and delivered once it exists. The watcher ends before the daemon
  // is destroyed, so no signal can reach a destroyed daemon.
  std::mutex signal_mutex;
  Daemon* signal_target = nullptr;
  int pending_signals = 0;
  std::unique_ptr<Daemon> daemon;
  try {
    int code;
    {
      // Constructed before the daemon starts any thread, so all of them inherit the mask.
      StopSignalWatcher signals([&](int, int) {
        std::lock_guard lock(signal_mutex);
        ++pending_signals;
        if (signal_target != nullptr) signal_target->request_shutdown();
      });
      daemon = std::make_unique<Daemon>(options);
      {
        std::lock_guard lock(signal_mutex);
        signal_target = daemon.get();
        for (int i = 0; i < pending_signals; ++i) daemon->request_shutdown();
      }
      code = daemon->run();
    }
    daemon.reset();
    return code;
  } catch (const std::exception& e) {
    std::cerr << "lomo-worker serve: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace

int serve_command(const std::vector<std::string>& args) {
  DaemonOptions options;
  std::string device_flag = "cpu";
  options.work_dir = "lomo-work";
  try {
    const ParsedFlags parsed = parse_flags(args);
    if (parsed.help) {
      std::cout << kUsage;
      return 0;
    }
    read_flags(parsed, &options, &device_flag);
  } catch (const FlagError& error) {
    return usage(error.what());
  }
  try {
    options.device = detect_device(device_flag);
  } catch (const std::invalid_argument& e) {
    std::cerr << "lomo-worker serve: " << e.what() << "\n";
    return 2;
  }
  try {
    set_channel_security(&options);
  } catch (const std::runtime_error& e) {
    std::cerr << "lomo-worker serve: " << e.what() << "\n";
    return 2;
  }
  if (options.worker_id.empty()) options.worker_id = host_name() + "-" + options.device.short_name;
  if (options.advertise_address.empty()) {
    options.advertise_address = default_advertise_address(options.coordinator);
  }
  std::string problem;
  options.trainer_program = find_trainer(options.trainer_program, &problem);
  if (!problem.empty()) {
    std::cerr << "lomo-worker serve: " << problem << "\n";
    return 1;
  }
  options.work_dir = std::filesystem::absolute(options.work_dir);
  options.version = "lomo-worker 0.1";
  return run_daemon(options);
}

}  // namespace lomo::daemon
