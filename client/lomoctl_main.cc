// lomoctl: the command line of the lomo control plane (a thin client of lomo.v1.JobService).
//
//   lomoctl [--coordinator HOST:PORT] [--output text|json] [--timeout SECONDS] COMMAND ...
//
// Exit status: 0 success (watch/local: the job SUCCEEDED); 1 the job FAILED; 2 it was CANCELLED;
// 3 lomoctl could not do what was asked (bad usage, coordinator unreachable or rejecting the
// request); 130 interrupted.
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "client/commands.h"
#include "client/help.h"
#include "client/render.h"
#include "common/flags.h"
#include "common/version.h"
#include "jobspec/job_spec.h"

namespace {

using namespace lomo::client;

constexpr const char* kUsage =
    R"(usage: lomoctl [--coordinator HOST:PORT] [--output text|json] [--timeout SECONDS]
               [--token-file PATH] [--ca-file PATH] [--cert-file PATH --key-file PATH]
               COMMAND ...

commands:
  submit JOB.yaml [--set key=value]... [--watch]   submit a job (validated here first)
  list [--state STATE[,STATE]]... [--limit N|--all] jobs, newest first
  get JOB_ID                                        one job's state, progress and times
  watch JOB_ID [--logs]                             follow a job to its end with a progress bar
  logs JOB_ID [-f]                                  the job's log lines (-f: follow)
  cancel JOB_ID                                     cancel a job
  checkpoints JOB_ID                                committed checkpoints of a job
  download CHECKPOINT_ID DIR                        fetch a checkpoint, verifying every SHA-256
  local JOB.yaml [--workers N] [--set key=value]... [--state-dir DIR] [--out DIR]
                                                    run a coordinator and N CPU workers here
                                                    (default: the spec's world size, 1), run
                                                    the job on all of them, keep its final
                                                    checkpoint
  generate CHECKPOINT_DIR --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] ...
                                                    text from a downloaded checkpoint, here
                                                    (runs lomo-worker generate: its --help
                                                    lists every flag)

`lomoctl COMMAND --help` (or `lomoctl help COMMAND`) shows a command's flags and examples;
`lomoctl --version` the version. The coordinator's address: --coordinator, else $LOMO_COORDINATOR, else "coordinator:" in
~/.config/lomo/lomoctl.yaml, else 127.0.0.1:7070.
Exit status: 0 ok / job SUCCEEDED, 1 job FAILED, 2 job CANCELLED (watch, submit --watch, local),
3 lomoctl failed (usage, coordinator unreachable or rejecting the request), 130 interrupted.
)";

int terminal_width() {
  winsize size{};
  if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) return size.ws_col;
  return 80;
}

struct GlobalFlags {
  std::optional<std::string> coordinator;
  std::optional<std::string> timeout;
  SecurityFlags security;
  std::string output = "text";
  bool help = false;
  bool version = false;
  std::string command;
  std::vector<std::string> command_args;  // in order, for the command's own parse
};

// Global flags may come before or after the command; everything else belongs to the command, whose
// name is the first argument that is not "--flag=value". Throws lomo::FlagError.
GlobalFlags parse_global_flags(const std::vector<std::string>& args) {
  const lomo::ParsedFlags parsed = lomo::parse_flags(
      args, {.switches = {"--version"},
             .allow_positional = true,
             .with_value = {"--coordinator", "--output", "-o", "--timeout", "--token-file",
                            "--ca-file", "--cert-file", "--key-file"},
             .unknown = lomo::UnknownFlags::kPassOn});
  GlobalFlags global;
  global.help = parsed.help;
  for (const auto& [flag, value] : parsed.flags) {
    if (flag == "--version") {
      global.version = true;
    } else if (flag == "--coordinator") {
      global.coordinator = value;
    } else if (flag == "--timeout") {
      global.timeout = value;
    } else if (flag == "--token-file") {
      global.security.token_file = value;
    } else if (flag == "--ca-file") {
      global.security.ca_file = value;
    } else if (flag == "--cert-file") {
      global.security.cert_file = value;
    } else if (flag == "--key-file") {
      global.security.key_file = value;
    } else {
      global.output = value;  // --output or -o
    }
  }
  for (const std::string& arg : parsed.positional) {
    const bool inline_value = arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos;
    if (global.command.empty() && !inline_value) {
      global.command = arg;
    } else {
      global.command_args.push_back(arg);
    }
  }
  return global;
}

}  // namespace

int main(int argc, char** argv) {
  GlobalFlags global;
  try {
    global = parse_global_flags(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const lomo::FlagError& e) {
    std::cerr << "lomoctl: " << e.what() << "\n" << kUsage;
    return kExitError;
  }
  if (global.version) {
    std::cout << lomo::version_text("lomoctl");
    return 0;
  }
  // "lomoctl COMMAND --help": that command's text; "lomoctl --help": the overview.
  if (global.help) {
    const auto help = command_help(global.command);
    std::cout << (help ? *help : std::string(kUsage));
    return 0;
  }
  if (global.command == "help" && !global.command_args.empty()) {
    const auto help = command_help(global.command_args[0]);
    if (!help) {
      std::cerr << "lomoctl help: unknown command '" << global.command_args[0] << "'\n" << kUsage;
      return kExitError;
    }
    std::cout << *help;
    return 0;
  }
  const std::string& command = global.command;
  const std::string& output = global.output;
  const std::optional<std::string>& timeout_flag = global.timeout;
  if (command.empty() || command == "help") {
    (command.empty() ? std::cerr : std::cout) << kUsage;
    return command.empty() ? kExitError : 0;
  }
  if (output != "text" && output != "json") {
    std::cerr << "lomoctl: --output " << output << ": expected text or json\n";
    return kExitError;
  }

  const std::map<std::string, int (*)(CommandContext&)> commands{
      {"submit", submit_command},
      {"list", list_command},
      {"get", get_command},
      {"watch", watch_command},
      {"logs", logs_command},
      {"cancel", cancel_command},
      {"checkpoints", checkpoints_command},
      {"download", download_command},
      {"local", local_command},
      {"generate", generate_command}};
  const auto it = commands.find(command);
  if (it == commands.end()) {
    std::cerr << "lomoctl: unknown command '" << command << "'\n" << kUsage;
    return kExitError;
  }

  CommandContext context;
  try {
    context.config =
        resolve_config(global.coordinator, std::getenv("LOMO_COORDINATOR"), default_config_path());
    resolve_security(global.security, &context.config);
    if (timeout_flag) {
      const double seconds = lomo::flag_double("--timeout", *timeout_flag);
      if (!(seconds > 0)) throw std::invalid_argument("timeout");
      context.config.timeout_seconds = seconds;
    }
  } catch (const ConfigError& e) {
    std::cerr << "lomoctl: " << e.what() << "\n";
    return kExitError;
  } catch (const std::exception&) {
    std::cerr << "lomoctl: --timeout " << *timeout_flag << ": expected a number of seconds\n";
    return kExitError;
  }
  context.json = output == "json";
  context.args = global.command_args;
  context.stdout_is_tty = ::isatty(STDOUT_FILENO) == 1;
  context.terminal_width = terminal_width();
  try {
    return it->second(context);
  } catch (const UsageError& e) {
    std::cerr << e.what() << "\n(see lomoctl --help)\n";  // it starts "lomoctl <command>"
  } catch (const Interrupted& e) {
    std::cerr << "lomoctl: " << e.what() << "\n";
    return 130;
  } catch (const ClientError& e) {
    std::cerr << "lomoctl: " << e.what() << "\n";
    if (e.code() == grpc::StatusCode::UNAUTHENTICATED ||
        e.code() == grpc::StatusCode::PERMISSION_DENIED) {
      const std::string& source = context.config.token_source;
      std::cerr << "lomoctl: "
                << (source.empty() ? "no token was sent (give --token-file, $LOMO_TOKEN or "
                                     "token_file: in the config file)"
                                   : "the token came from " + source)
                << "\n";
    }
  } catch (const lomo::JobSpecError& e) {
    std::cerr << "lomoctl: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "lomoctl " << command << ": " << e.what() << "\n";
  }
  return kExitError;
}
