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
#include <string>
#include <vector>

#include "client/commands.h"
#include "client/render.h"
#include "jobspec/job_spec.h"

namespace {

using namespace lomo::client;

constexpr const char* kUsage =
    R"(usage: lomoctl [--coordinator HOST:PORT] [--output text|json] [--timeout SECONDS] COMMAND ...

commands:
  submit JOB.yaml [--set key=value]... [--watch]   submit a job (validated here first)
  list [--state STATE[,STATE]]... [--limit N|--all] jobs, newest first
  get JOB_ID                                        one job's state, progress and times
  watch JOB_ID [--logs]                             follow a job to its end with a progress bar
  logs JOB_ID [-f]                                  the job's log lines (-f: follow)
  cancel JOB_ID                                     cancel a job
  checkpoints JOB_ID                                committed checkpoints of a job
  download CHECKPOINT_ID DIR                        fetch a checkpoint, verifying every SHA-256
  local JOB.yaml [--set key=value]... [--state-dir DIR] [--out DIR]
                                                    run a coordinator and one CPU worker here,
                                                    run the job, keep its final checkpoint

The coordinator's address: --coordinator, else $LOMO_COORDINATOR, else "coordinator:" in
~/.config/lomo/lomoctl.yaml, else 127.0.0.1:7070.
Exit status: 0 ok / job SUCCEEDED, 1 job FAILED, 2 job CANCELLED (watch, submit --watch, local),
3 lomoctl failed (usage, coordinator unreachable or rejecting the request), 130 interrupted.
)";

int terminal_width() {
  winsize size{};
  if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) return size.ws_col;
  return 80;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::optional<std::string> coordinator_flag;
  std::optional<std::string> timeout_flag;
  std::string output = "text";
  std::string command;
  std::vector<std::string> command_args;
  // Global flags may come before or after the command; everything else belongs to the command.
  for (size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    std::optional<std::string> inline_value;
    if (const size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    auto take = [&]() -> std::optional<std::string> {
      if (inline_value) return inline_value;
      if (i + 1 < args.size()) return args[++i];
      return std::nullopt;
    };
    if (arg == "--coordinator" || arg == "--output" || arg == "-o" || arg == "--timeout") {
      const auto value = take();
      if (!value) {
        std::cerr << "lomoctl: " << arg << " needs a value\n" << kUsage;
        return kExitError;
      }
      if (arg == "--coordinator") coordinator_flag = *value;
      if (arg == "--output" || arg == "-o") output = *value;
      if (arg == "--timeout") timeout_flag = *value;
    } else if ((arg == "--help" || arg == "-h") && command.empty()) {
      std::cout << kUsage;
      return 0;
    } else if (command.empty() && !inline_value) {
      command = arg;
    } else {
      command_args.push_back(args[i]);
    }
  }
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
      {"local", local_command}};
  const auto it = commands.find(command);
  if (it == commands.end()) {
    std::cerr << "lomoctl: unknown command '" << command << "'\n" << kUsage;
    return kExitError;
  }

  CommandContext context;
  try {
    context.config =
        resolve_config(coordinator_flag, std::getenv("LOMO_COORDINATOR"), default_config_path());
    if (timeout_flag) {
      size_t used = 0;
      const double seconds = std::stod(*timeout_flag, &used);
      if (used != timeout_flag->size() || !(seconds > 0)) throw std::invalid_argument("timeout");
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
  context.args = command_args;
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
  } catch (const lomo::JobSpecError& e) {
    std::cerr << "lomoctl: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "lomoctl " << command << ": " << e.what() << "\n";
  }
  return kExitError;
}
