#include "daemon/serve.h"

#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <memory>
#include <mutex>
#include <thread>

#include "common/stop_signals.h"
#include "daemon/daemon.h"

namespace lomo::daemon {
namespace {

constexpr const char* kUsage =
    "usage: lomo-worker serve --coordinator HOST:PORT [--device cpu|N] [--work-dir DIR]\n"
    "                         [--metrics-listen ADDR:PORT] [--worker-id ID]\n"
    "                         [--cancel-grace SECONDS] [--shutdown-timeout SECONDS]\n"
    "                         [--trainer PATH]  (lomo-worker, run as `PATH train JOB.yaml`)\n";

int usage(const std::string& problem) {
  std::cerr << "lomo-worker serve: " << problem << "\n" << kUsage;
  return 2;
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

}  // namespace

int serve_command(const std::vector<std::string>& args) {
  DaemonOptions options;
  std::string device_flag = "cpu";
  options.work_dir = "lomo-work";
  for (size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i];
    std::string value;
    const size_t equals = flag.find('=');
    if (flag.rfind("--", 0) == 0 && equals != std::string::npos) {
      value = flag.substr(equals + 1);
      flag = flag.substr(0, equals);
    } else if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return usage(flag.rfind("--", 0) == 0 ? flag + " needs a value"
                                            : "unexpected argument '" + flag + "'");
    }
    auto seconds = [&](std::chrono::milliseconds* out) {
      try {
        size_t used = 0;
        const double s = std::stod(value, &used);
        if (used != value.size() || s < 0) throw std::invalid_argument(value);
        *out = std::chrono::milliseconds(static_cast<int64_t>(s * 1000));
        return true;
      } catch (const std::exception&) {
        return false;
      }
    };
    if (flag == "--coordinator") {
      options.coordinator = value;
    } else if (flag == "--device") {
      device_flag = value;
    } else if (flag == "--work-dir") {
      options.work_dir = value;
    } else if (flag == "--metrics-listen") {
      options.metrics_listen = value;
    } else if (flag == "--trainer") {
      options.trainer_program = value;
    } else if (flag == "--worker-id") {
      options.worker_id = value;
    } else if (flag == "--cancel-grace") {
      if (!seconds(&options.cancel_grace)) return usage("--cancel-grace: expected seconds");
    } else if (flag == "--shutdown-timeout") {
      if (!seconds(&options.shutdown_timeout)) return usage("--shutdown-timeout: expected seconds");
    } else {
      return usage("unknown option '" + flag + "'");
    }
  }
  if (options.coordinator.empty()) return usage("--coordinator HOST:PORT is required");

  try {
    options.device = detect_device(device_flag);
  } catch (const std::invalid_argument& e) {
    std::cerr << "lomo-worker serve: " << e.what() << "\n";
    return 2;
  }
  if (options.worker_id.empty()) options.worker_id = host_name() + "-" + options.device.short_name;
  if (options.trainer_program.empty()) {
    std::error_code error;
    const auto self = std::filesystem::read_symlink("/proc/self/exe", error);
    if (error) {
      std::cerr << "lomo-worker serve: cannot find its own executable: " << error.message() << "\n";
      return 1;
    }
    options.trainer_program = self.parent_path() / "lomo-worker";
  }
  options.trainer_program = std::filesystem::absolute(options.trainer_program);
  if (::access(options.trainer_program.c_str(), X_OK) != 0) {
    std::cerr << "lomo-worker serve: the trainer " << options.trainer_program.string()
              << " is not an executable file (set --trainer)\n";
    return 1;
  }
  options.work_dir = std::filesystem::absolute(options.work_dir);
  options.version = "lomo-worker 0.1";

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

}  // namespace lomo::daemon
