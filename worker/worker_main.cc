// lomo-worker: the per-device training process.
//
//   lomo-worker train JOB.yaml [--set key=value]... [--restart] [--protocol-file FILE]
//       Runs one job with no daemon: progress on the terminal, checkpoints and metrics.jsonl in the
//       job's output.dir. An earlier attempt's latest checkpoint there is resumed unless --restart.
//       Ctrl-C or SIGTERM finishes the current step, checkpoints, and exits; a second one kills.
//       --protocol-file: the typed report for a supervisor (the worker daemon), and the exit
//       code says how the run ended; both are defined in common/trainer_protocol.h.
//       --nproc N: data-parallel training on N local processes (the spec's resources.world_size
//       must be N; without --nproc it gives N). This process spawns N ranks of itself, which meet
//       through a rendezvous directory (a Gloo FileStore), forwards Ctrl-C and SIGTERM to them and
//       ends them all when one fails; its exit code is that of the first rank that failed (0
//       when all succeeded). Rank 0 writes the protocol file, metrics.jsonl and the checkpoints.
//       --rank, --world-size and --rendezvous DIR are how it starts a rank; they are not for
//       people.
//       --rank R --world-size N --rendezvous coordinator://HOST:PORT --worker-id W --job-id J
//       --attempt A [--advertise-address ADDR]: one rank of a gang the coordinator scheduled, as
//       a worker daemon starts it. The ranks meet through the coordinator's rendezvous of that job
//       attempt (by way of a `lomo-workerd rendezvous-relay` child: this process cannot load
//       gRPC), under the prefix job/J/attempt/A; peers connect to ADDR (default: this host's
//       address on its route to the coordinator). Every rank writes its own protocol file;
//       rank 0 alone writes metrics.jsonl and checkpoints. A stop signal while the ranks are
//       still meeting ends the rank at once, interrupted (nothing was trained).
//       Test hook, never set otherwise: LOMO_TEST_FAULT=break_all_reduce_on_last_rank in the
//       environment makes the last rank of a gang keep its own gradients instead of the reduced
//       ones (worker/comm/fault_injection.h), so that tests can show the trajectory comparison and
//       the weight-hash check at a checkpoint catch a broken reduction. Any other non-empty value
//       fails the run.
//   lomo-worker generate --model DIR (--prompt TEXT | --prompt-file F | --prompt-ids 1,2,3) ...
//       Text from a model directory or checkpoint with a KV cache (worker/generate/
//       generate_command.h has every flag).
//   lomo-worker init-model DIR [--preset tiny|reference] [--seed N]
//       Writes a randomly initialised LLaMA in Hugging Face layout (for demos and benchmarks).
//   lomo-worker serve --coordinator HOST:PORT [--device cpu|N] [--work-dir DIR] ...
//       The worker daemon: registers the device with the coordinator and runs each assignment as
//       a `train` child process. It is the lomo-workerd executable beside this one
//       (daemon/), kept apart because gRPC's libprotobuf and libsentencepiece's bundled
//       protobuf-lite crash when loaded into one process. SIGTERM stops it gracefully.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/child_process.h"
#include "common/flags.h"
#include "common/stop_signals.h"
#include "common/trainer_protocol.h"
#include "common/version.h"
#include "jobspec/job_spec.h"
#include "worker/comm/communicator.h"
#include "worker/comm/fault_injection.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/generate/generate_command.h"
#include "worker/optim/optimizer.h"
#include "worker/train/trainer.h"

#ifdef LOMO_WORKER_HAVE_GLOO
#include <gloo/rendezvous/file_store.h>

#include "common/advertise_address.h"
#include "worker/comm/gloo_communicator.h"
#include "worker/rendezvous/coordinator_store.h"
#endif

#ifdef LOMO_WORKER_HAVE_NCCL
#include "kernels/cuda/cuda_backend.h"
#include "worker/comm/device_aware_communicator.h"
#include "worker/comm/nccl_rendezvous.h"
#endif

namespace {

std::atomic<bool> g_stop_requested{false};

// The first SIGINT/SIGTERM asks the run to finish its step and checkpoint; a second one kills.
// A rank installs this before anything slow (the rendezvous, loading the model): a stop request
// that arrives then is kept and honoured after the first step, instead of killing the rank.
// The signals are taken with sigwait on a thread of their own (common/stop_signals.h) and are
// blocked everywhere else, never delivered to a computing thread: a handler that interrupted
// oneDNN's GEMM corrupted the heap (SIGABRT "corrupted size vs. prev_size" after 21 of 40
// SIGTERMs to a training run; 0 of 200 with the watcher).
void install_stop_handlers() {
  static lomo::StopSignalWatcher watcher([](int signal, int count) {
    if (count == 1) {
      g_stop_requested = true;
      return;
    }
    std::signal(signal, SIG_DFL);
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, signal);
    pthread_sigmask(SIG_UNBLOCK, &only, nullptr);
    std::raise(signal);
  });
}

namespace protocol = lomo::trainer_protocol;

constexpr const char* kUsage =
    "usage:\n"
    "  lomo-worker train JOB.yaml [--set key=value]... [--restart]\n"
    "                    [--protocol-file FILE] [--nproc N]\n"
    "      --nproc N: train data-parallel on N local processes; N must equal the spec's\n"
    "      resources.world_size, which is also the default (--set resources.world_size=N)\n"
    "  lomo-worker train JOB.yaml --rank R --world-size N --rendezvous coordinator://HOST:PORT\n"
    "                    --worker-id W --job-id J --attempt A [--advertise-address ADDR]\n"
    "                    [--protocol-file FILE]\n"
    "      one rank of a gang scheduled by the coordinator (the worker daemon starts it)\n"
    "  test hook: LOMO_TEST_FAULT=break_all_reduce_on_last_rank makes a gang's last rank keep its\n"
    "      own gradients (a broken reduction the checks must catch); never set it otherwise\n"
    "  lomo-worker init-model DIR [--preset tiny|reference] [--seed N]\n"
    "  lomo-worker serve --coordinator HOST:PORT [--device cpu|N] [--work-dir DIR]\n"
    "                    [--metrics-listen ADDR:PORT] [--worker-id ID]\n"
    "                    [--advertise-address ADDR]\n";

int usage(const std::string& problem) {
  std::cerr << "lomo-worker: " << problem << "\n" << kUsage << lomo::kGenerateUsage;
  return protocol::kExitUsage;
}

// A subcommand's flags (all named: any other is an error) and exactly one positional argument,
// `what`. nullopt with `*problem` set when the command line cannot be used, or "" for --help.
std::optional<lomo::ParsedFlags> parse_subcommand(const std::vector<std::string>& args,
                                                  const std::string& command,
                                                  const std::string& what, lomo::FlagRules rules,
                                                  std::string* problem) {
  rules.allow_positional = true;
  rules.unknown = lomo::UnknownFlags::kRefuse;
  lomo::ParsedFlags parsed;
  try {
    parsed = lomo::parse_flags(args, rules);
  } catch (const lomo::FlagError& e) {
    *problem = command + ": " + e.what();
    return std::nullopt;
  }
  if (parsed.help) {
    problem->clear();
    return std::nullopt;
  }
  if (parsed.positional.size() != 1) {
    *problem = command + " needs " + what;
    if (parsed.positional.size() > 1) *problem += ", got \"" + parsed.positional[1] + "\" as well";
    return std::nullopt;
  }
  return parsed;
}

constexpr const char* kTrainHelp =
    R"(usage: lomo-worker train JOB.yaml [--set key=value]... [--restart]
                         [--protocol-file FILE] [--nproc N]

Trains the job of JOB.yaml on this machine (CPU, or the spec's device), writing metrics.jsonl
and Hugging Face checkpoints under the spec's output.dir.

flags:
  --set key=value       override a field of the spec (repeatable)
  --restart             start from step 0 instead of resuming the latest checkpoint in
                        the spec's output.dir
  --protocol-file FILE  write the supervisor's JSON-lines channel here (lomo-worker serve)
  --nproc N             train data-parallel on N local processes; N must equal the spec's
                        resources.world_size, which is also the default
  --rank R --world-size N --rendezvous coordinator://HOST:PORT --worker-id W --job-id J
  --attempt A [--advertise-address ADDR]
                        one rank of a gang scheduled by the coordinator (the worker daemon
                        passes these)

examples:
  lomo-worker train examples/tiny-lomo.yaml
  lomo-worker train job.yaml --set training.steps=50 --set resources.world_size=2 --nproc 2
)";

constexpr const char* kInitModelHelp =
    R"(usage: lomo-worker init-model DIR [--preset tiny|reference] [--seed N]

Writes a randomly initialised LLaMA in Hugging Face layout to DIR (demos and benchmarks).

flags:
  --preset tiny|reference   tiny (default): 0.76M parameters; reference: 58M
  --seed N                  the initialisation's seed (default 1)

example:
  lomo-worker init-model out/tiny-model --preset tiny --seed 7
)";

// --help prints the command's usage on stdout (exit 0); a problem prints the overview on stderr.
int usage_or_help(const std::string& problem, const char* help) {
  if (!problem.empty()) return usage(problem);
  std::cout << help;
  return 0;
}

std::string format_duration(double seconds) {
  const long s = std::lround(seconds);
  char text[32];
  std::snprintf(text, sizeof(text), "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  return text;
}

struct TrainArgs {
  std::string job_file;
  std::vector<std::string> overrides;  // --set key=value, in order
  bool restart = false;
  std::optional<std::filesystem::path> protocol_file;
  std::optional<int> nproc;
  // One rank of a gang (internal flags, set by the --nproc launcher or the worker daemon).
  std::optional<int> rank;
  std::optional<int> world_size;
  std::string rendezvous;  // a FileStore directory, or coordinator://HOST:PORT
  // With a coordinator rendezvous: who asks (the coordinator authorises each call by them) and
  // where this rank's peers reach it.
  std::string coordinator;  // HOST:PORT, from the --rendezvous URL
  std::string worker_id;
  std::string job_id;
  int64_t attempt = 0;
  std::optional<std::string> advertise_address;
};

constexpr std::string_view kCoordinatorScheme = "coordinator://";

// An integer flag value in [minimum, 1024]; nullopt when it is not one.
std::optional<int> small_int(const std::string& value, int minimum) {
  int number = 0;
  const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), number);
  if (error != std::errc() || end != value.data() + value.size() || number < minimum ||
      number > 1024) {
    return std::nullopt;
  }
  return number;
}

// An attempt number (>= 1); nullopt when `value` is not one.
std::optional<int64_t> attempt_number(const std::string& value) {
  int64_t number = 0;
  const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), number);
  if (error != std::errc() || end != value.data() + value.size() || number < 1) return std::nullopt;
  return number;
}

// Stores one flag's value in `parsed`; "" or what is wrong with it.
std::string read_train_flag(const std::string& flag, const std::string& value, TrainArgs& parsed) {
  if (flag == "--set") {
    parsed.overrides.push_back(value);
  } else if (flag == "--protocol-file") {
    parsed.protocol_file = value;
  } else if (flag == "--restart") {
    parsed.restart = true;
  } else if (flag == "--rendezvous") {
    parsed.rendezvous = value;
  } else if (flag == "--worker-id") {
    parsed.worker_id = value;
  } else if (flag == "--job-id") {
    parsed.job_id = value;
  } else if (flag == "--advertise-address") {
    parsed.advertise_address = value;
  } else if (flag == "--attempt") {
    const std::optional<int64_t> attempt = attempt_number(value);
    if (!attempt) return "--attempt: expected an attempt number >= 1, got \"" + value + "\"";
    parsed.attempt = *attempt;
  } else {  // --nproc, --rank, --world-size
    const std::optional<int> number = small_int(value, flag == "--rank" ? 0 : 1);
    if (!number) return flag + ": expected a small integer, got \"" + value + "\"";
    if (flag == "--nproc") parsed.nproc = number;
    if (flag == "--rank") parsed.rank = number;
    if (flag == "--world-size") parsed.world_size = *number;
  }
  return "";
}

// The flags that only make sense together, checked together; "" or what is wrong.
std::string check_rank_flags(TrainArgs& parsed) {
  const bool identity = !parsed.worker_id.empty() || !parsed.job_id.empty() ||
                        parsed.attempt != 0 || parsed.advertise_address.has_value();
  if (!parsed.rank) {
    if (parsed.world_size || !parsed.rendezvous.empty() || identity) {
      return "--world-size, --rendezvous, --worker-id, --job-id, --attempt and "
             "--advertise-address start one rank of a gang and need --rank";
    }
    return "";
  }
  if (parsed.nproc) return "--nproc launches ranks; it cannot be given with --rank";
  if (!parsed.world_size || *parsed.rank >= *parsed.world_size) {
    return "--rank " + std::to_string(*parsed.rank) + " needs --world-size above it";
  }
  if (parsed.rendezvous.empty()) {
    return "--rank needs --rendezvous (a directory, or coordinator://HOST:PORT)";
  }
  if (!parsed.rendezvous.starts_with(kCoordinatorScheme)) {
    if (identity) {
      return "--worker-id, --job-id, --attempt and --advertise-address go with --rendezvous "
             "coordinator://HOST:PORT, not a rendezvous directory";
    }
    return "";
  }
  parsed.coordinator = parsed.rendezvous.substr(kCoordinatorScheme.size());
  if (parsed.coordinator.find(':') == std::string::npos) {
    return "--rendezvous " + parsed.rendezvous + ": expected coordinator://HOST:PORT";
  }
  std::vector<std::string> missing;
  if (parsed.worker_id.empty()) missing.push_back("--worker-id");
  if (parsed.job_id.empty()) missing.push_back("--job-id");
  if (parsed.attempt == 0) missing.push_back("--attempt");
  if (!missing.empty()) {
    std::string list;
    for (const std::string& flag : missing) list += (list.empty() ? "" : ", ") + flag;
    return "--rendezvous coordinator://... needs --worker-id, --job-id and --attempt (missing: " +
           list + ")";
  }
  if (parsed.advertise_address && parsed.advertise_address->empty()) {
    return "--advertise-address: expected a host name or IP address";
  }
  return "";
}

// nullopt when the command line cannot be used (`*problem` says why) or asks for --help ("").
std::optional<TrainArgs> parse_train_args(const std::vector<std::string>& args,
                                          std::string* problem) {
  const std::optional<lomo::ParsedFlags> flags =
      parse_subcommand(args, "train", "a job file",
                       {.switches = {"--restart"},
                        .with_value = {"--set", "--protocol-file", "--nproc", "--rank",
                                       "--world-size", "--rendezvous", "--worker-id", "--job-id",
                                       "--attempt", "--advertise-address"}},
                       problem);
  if (!flags) return std::nullopt;
  TrainArgs parsed;
  parsed.job_file = flags->positional[0];
  for (const auto& [flag, value] : flags->flags) {
    if (std::string wrong = read_train_flag(flag, value, parsed); !wrong.empty()) {
      *problem = "train: " + wrong;
      return std::nullopt;
    }
  }
  if (std::string wrong = check_rank_flags(parsed); !wrong.empty()) {
    *problem = "train: " + wrong;
    return std::nullopt;
  }
  return parsed;
}

lomo::JobSpec load_spec(const TrainArgs& args) {
  // Every override applied, then the whole validated once: overrides that need each other
  // (data.format=chat, data.chat_template=llama-3) pass in either order.
  return lomo::load_job_spec(args.job_file, args.overrides);
}

// Which outcome an error that ended the run is (the exit code follows from it).
protocol::Status status_of_error(const std::exception& e) {
  if (const auto* spec_error = dynamic_cast<const lomo::JobSpecError*>(&e)) {
    // The data loader reports an unusable file or record against the list that names it.
    const std::string& field = spec_error->field();
    const bool data = field.rfind("data.train", 0) == 0 || field.rfind("data.eval", 0) == 0;
    return data ? protocol::Status::kBadData : protocol::Status::kBadSpec;
  }
  if (dynamic_cast<const lomo::NonFiniteGradientError*>(&e) != nullptr) {
    return protocol::Status::kNonFinite;
  }
  return protocol::Status::kFailed;
}

// Peak bytes by memory kind and "total", as the metrics record carries them.
std::map<std::string, int64_t> peak_memory_bytes(const lomo::MemoryReport& memory) {
  std::map<std::string, int64_t> peaks;
  for (size_t k = 0; k < lomo::kMemoryKindCount; ++k) {
    const auto kind = static_cast<lomo::MemoryKind>(k);
    peaks[std::string(lomo::memory_kind_name(kind))] = static_cast<int64_t>(memory.peak(kind));
  }
  peaks["total"] = static_cast<int64_t>(memory.peak_total_bytes);
  return peaks;
}

// The run as the trainer's supervisor sees it (through the protocol file, when there is one) and as
// a person at a terminal sees it (stdout). Only the first is ever read by a program. In a gang,
// rank 0 shows the progress; another rank reports to its own supervisor (its metrics carry its
// own step and communication times) but prints no progress and names no checkpoint (it writes
// none).
class RunReporter {
 public:
  // Throws std::runtime_error when the protocol file cannot be created.
  explicit RunReporter(const std::optional<std::filesystem::path>& protocol_file, int rank = 0)
      : rank_(rank) {
    if (protocol_file) channel_ = std::make_unique<protocol::ProtocolWriter>(*protocol_file);
  }
  // Progress lines on stdout every `log_every` steps (and the first and last).
  void set_log_every(int64_t log_every) { log_every_ = log_every; }

  lomo::TrainerHooks hooks() {
    lomo::TrainerHooks hooks;
    if (rank_ == 0) {
      hooks.on_log = [](const std::string& line) { std::printf("%s\n", line.c_str()); };
      hooks.on_checkpoint = [this](const std::filesystem::path& dir, int64_t step) {
        send(protocol::Checkpoint{step, dir.string()});
      };
    }
    hooks.on_start = [this](const lomo::TrainStart& s) { on_start(s); };
    hooks.on_step = [this](const lomo::TrainingMetrics& m) { on_step(m); };
    hooks.on_eval = [this](const lomo::EvalMetrics& m) { on_eval(m); };
    return hooks;
  }

  // The last record: how the run ended, with the progress seen so far.
  void outcome(protocol::Status status, const std::string& reason,
               std::optional<int64_t> peer_rank = std::nullopt) {
    send(protocol::Outcome{status, reason, steps_done_, total_steps_, peer_rank});
  }

 private:
  void send(const protocol::Record& record) {
    if (channel_) channel_->write(record);
  }

  void on_start(const lomo::TrainStart& s) {
    total_steps_ = s.total_steps;
    steps_done_ = s.first_step;
    send(protocol::Started{s.total_steps, s.first_step,
                           s.resumed_from ? s.resumed_from->string() : ""});
  }

  void on_step(const lomo::TrainingMetrics& m) {
    steps_done_ = m.step;
    protocol::Metrics record{m.step,
                             m.total_steps,
                             m.loss,
                             m.lr,
                             m.grad_norm,
                             m.loss_scale,
                             m.skipped,
                             m.skipped_records,
                             m.tokens,
                             m.tokens_per_second,
                             m.elapsed_seconds,
                             {}};
    record.peak_memory_bytes = peak_memory_bytes(m.memory);
    record.step_seconds = m.step_seconds;
    record.communication_seconds = m.communication_seconds;
    record.communication_bytes = m.communication_bytes;
    send(record);
    if (rank_ == 0) print_step(m);
  }

  void print_step(const lomo::TrainingMetrics& m) const {
    if (m.step % log_every_ != 0 && m.step != 1 && m.step != m.total_steps) return;
    const double eta = m.elapsed_seconds / m.step * (m.total_steps - m.step);
    std::printf(
        "step %6lld/%lld  loss %.4f  lr %.3e  grad_norm %.3f%s  %.0f tok/s  peak %.1f MiB"
        "  eta %s\n",
        static_cast<long long>(m.step), static_cast<long long>(m.total_steps), m.loss, m.lr,
        m.grad_norm, m.skipped ? " (skipped: fp16 overflow)" : "", m.tokens_per_second,
        m.memory.peak_total_bytes / 1048576.0, format_duration(eta).c_str());
    std::fflush(stdout);
  }

  void on_eval(const lomo::EvalMetrics& m) {
    send(protocol::Eval{m.step, m.loss, m.perplexity, m.tokens, m.accuracy, m.examples});
    if (rank_ != 0) return;
    std::printf("eval at step %lld: loss %.4f  perplexity %.2f  (%lld tokens)",
                static_cast<long long>(m.step), m.loss, m.perplexity,
                static_cast<long long>(m.tokens));
    if (m.accuracy) {
      std::printf("  accuracy %.3f (%lld examples)", *m.accuracy,
                  static_cast<long long>(m.examples));
    }
    std::printf("\n");
  }

  int rank_ = 0;
  int64_t log_every_ = 1;
  int64_t steps_done_ = 0;
  int64_t total_steps_ = 0;
  std::unique_ptr<protocol::ProtocolWriter> channel_;
};

// Trains and prints how it ended; returns the outcome.
protocol::Status run_training(const lomo::JobSpec& spec, const TrainArgs& args,
                              const lomo::TrainerHooks& hooks,
                              lomo::Communicator* communicator = nullptr) {
  lomo::TrainerOptions options;
  options.resume = !args.restart;
  options.communicator = communicator;
  install_stop_handlers();
  options.stop_requested = &g_stop_requested;
  std::printf("job %s: %s on %s, output %s\n",
              spec.name.empty() ? args.job_file.c_str() : spec.name.c_str(),
              spec.optimizer.name.c_str(), spec.model.path.c_str(), spec.output.dir.c_str());
  const lomo::TrainResult result = lomo::train(spec, options, hooks);
  std::printf("peak memory by kind:\n%s", result.memory.to_string().c_str());
  if (result.stopped) {
    std::printf("stopped at step %lld of %lld; run the same command to resume from %s\n",
                static_cast<long long>(result.steps_done),
                static_cast<long long>(result.total_steps), result.last_checkpoint.c_str());
    return protocol::Status::kInterrupted;
  }
  std::printf("done: %lld steps; checkpoint %s\n", static_cast<long long>(result.steps_done),
              result.last_checkpoint.c_str());
  return protocol::Status::kSucceeded;
}

// Prints the error that ended a run and reports it; returns the exit code.
int fail(const std::exception& e, const std::string& who, RunReporter* reporter) {
  std::fflush(stdout);
  std::cerr << who << ": " << e.what() << "\n";
  const protocol::Status status = status_of_error(e);
  // A collective that failed with a known peer: the peer's own end is the likely cause, and the
  // coordinator waits for it before it blames this rank (JobStatusUpdate.peer_rank).
  std::optional<int64_t> peer_rank;
  if (const auto* lost = dynamic_cast<const lomo::CommunicatorError*>(&e)) peer_rank = lost->peer();
  if (reporter != nullptr) reporter->outcome(status, e.what(), peer_rank);
  return protocol::exit_code_for(status);
}

#ifdef LOMO_WORKER_HAVE_GLOO
constexpr const char* kNoGloo = nullptr;
#else
constexpr const char* kNoGloo =
    "this lomo-worker was built without Gloo (Debian libgloo-dev), which data-parallel ranks "
    "need to talk to each other; resources.world_size must be 1";
#endif

#ifdef LOMO_WORKER_HAVE_GLOO
// A program installed beside this one (lomo-workerd).
std::filesystem::path sibling_program(const std::string& name) {
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) throw std::runtime_error("cannot find its own executable: " + error.message());
  return self.parent_path() / name;
}

#ifdef LOMO_WORKER_HAVE_NCCL
// A GPU rank's communicator: gradients (device memory) over NCCL, host values over `host` (Gloo).
// The NCCL ranks meet through the same store under the same prefix; collectives start after the
// CUDA backend's queued work (set_input_stream), so the trainer never synchronises for them.
std::unique_ptr<lomo::Communicator> with_nccl(std::unique_ptr<lomo::Communicator> host,
                                              const lomo::JobSpec& spec,
                                              const lomo::GlooCommunicatorOptions& options,
                                              gloo::rendezvous::Store& store) {
  const lomo::Device gpu = lomo::training_device(spec);  // the trainer's device, or it throws
  lomo::NcclCommunicatorOptions nccl;
  nccl.rank = options.rank;
  nccl.world_size = options.world_size;
  nccl.device = gpu.index;
  nccl.timeout = options.timeout;
  std::unique_ptr<lomo::NcclCommunicator> device = lomo::connect_nccl(nccl, store, options.prefix);
  device->set_input_stream(dynamic_cast<lomo::cuda::CudaBackend&>(lomo::backend_for(gpu)).stream());
  return std::make_unique<lomo::DeviceAwareCommunicator>(std::move(host), std::move(device));
}
#endif

// The rank's communicator, meeting its peers through `store` under options.prefix: Gloo, and for
// a GPU gang also NCCL (with_nccl).
std::unique_ptr<lomo::Communicator> connect_over(const lomo::JobSpec& spec,
                                                 const lomo::GlooCommunicatorOptions& options,
                                                 gloo::rendezvous::Store& store) {
  auto host = std::make_unique<lomo::GlooCommunicator>(options, store);
  // Every GPU rank, even of a world of one (which scripts/gpu_check.sh starts with --rank 0
  // --world-size 1 to run this path on a single GPU).
  if (spec.resources.device != "cuda") return host;
#ifdef LOMO_WORKER_HAVE_NCCL
  return with_nccl(std::move(host), spec, options, store);
#else
  throw std::runtime_error(
      "resources.device cuda with world_size " + std::to_string(options.world_size) +
      ": this lomo-worker was built without NCCL, which GPU ranks reduce their gradients with");
#endif
}

// A rank the coordinator scheduled: its peers meet it through the coordinator's rendezvous of
// the job attempt, and connect to its advertised address.
std::unique_ptr<lomo::Communicator> connect_through_coordinator(
    const TrainArgs& args, const lomo::JobSpec& spec, lomo::GlooCommunicatorOptions options) {
  lomo::CoordinatorStoreOptions store_options;
  store_options.relay_program = sibling_program("lomo-workerd");
  store_options.coordinator = args.coordinator;
  store_options.worker_id = args.worker_id;
  store_options.job_id = args.job_id;
  store_options.attempt = args.attempt;
  store_options.timeout = options.rendezvous_timeout;
  store_options.stop_requested = &g_stop_requested;
  lomo::CoordinatorStore store(store_options);
  options.prefix = "job/" + args.job_id + "/attempt/" + std::to_string(args.attempt);
  options.hostname = args.advertise_address ? *args.advertise_address
                                            : lomo::local_address_toward(args.coordinator);
  return connect_over(spec, options, store);
}
#endif

// The LOMO_TEST_FAULT test hook (worker/comm/fault_injection.h): kNone unless a test sets it.
// Throws std::invalid_argument for a name that is no fault.
lomo::CommunicatorFault fault_from_environment() {
  const char* name = std::getenv(lomo::kTestFaultVariable);
  return lomo::parse_communicator_fault(name == nullptr ? "" : name);
}

// This rank's communicator: its peers meet it through the coordinator (coordinator://HOST:PORT)
// or through the FileStore in args.rendezvous under a prefix of the launching process's id.
// Throws CommunicatorError when they do not all arrive.
std::unique_ptr<lomo::Communicator> connect_rank(const TrainArgs& args, const lomo::JobSpec& spec) {
#ifdef LOMO_WORKER_HAVE_GLOO
  lomo::GlooCommunicatorOptions options;
  options.rank = *args.rank;
  options.world_size = *args.world_size;
  // resources.collective_timeout_seconds (jobspec/job_spec.h says why the rendezvous gets at
  // least 10 minutes).
  options.timeout = std::chrono::seconds(spec.resources.collective_timeout_seconds);
  options.rendezvous_timeout =
      std::max<std::chrono::milliseconds>(options.timeout, std::chrono::minutes(10));
  if (!args.coordinator.empty()) return connect_through_coordinator(args, spec, options);
  gloo::rendezvous::FileStore store(args.rendezvous);
  options.prefix = "standalone/" + std::to_string(::getppid());
  return connect_over(spec, options, store);
#else
  (void)args;
  (void)spec;
  throw std::runtime_error(kNoGloo);
#endif
}

// One rank of a gang. Rank 0 shows the progress; every rank with a protocol file (rank 0 of a
// --nproc launch; every rank a worker daemon starts) reports its run there. The others print only
// their errors.
int train_rank(const TrainArgs& args) {
  install_stop_handlers();  // first: the rendezvous may wait minutes for the other ranks
  const int rank = *args.rank;
  const std::string who = "lomo-worker train (rank " + std::to_string(rank) + ")";
  std::unique_ptr<RunReporter> reporter;
  try {
    reporter = std::make_unique<RunReporter>(args.protocol_file, rank);
  } catch (const std::exception& e) {
    return fail(e, who, nullptr);
  }
  try {
    const lomo::JobSpec spec = load_spec(args);
    const lomo::CommunicatorFault fault = fault_from_environment();
    std::unique_ptr<lomo::Communicator> communicator;
    try {
      communicator = connect_rank(args, spec);
    } catch (const std::exception& e) {
      if (!g_stop_requested.load()) throw;
      // Asked to stop before the ranks had all met (the coordinator's rendezvous gives up on a
      // stop): nothing was trained, so there is nothing to save, and the run was interrupted
      // rather than failed.
      std::cerr << who << ": " << e.what() << "\n";
      reporter->outcome(protocol::Status::kInterrupted,
                        std::string("stopped before training began: ") + e.what());
      return protocol::exit_code_for(protocol::Status::kInterrupted);
    }
    if (fault != lomo::CommunicatorFault::kNone) {
      std::cerr << who << ": " << lomo::kTestFaultVariable << "="
                << std::getenv(lomo::kTestFaultVariable)
                << ": a test fault is injected into the gang's collectives\n";
      communicator = lomo::with_fault(std::move(communicator), fault);
    }
    reporter->set_log_every(spec.training.log_every);
    const protocol::Status status = run_training(spec, args, reporter->hooks(), communicator.get());
    reporter->outcome(status, "");
    return protocol::exit_code_for(status);
  } catch (const std::exception& e) {
    return fail(e, who, reporter.get());
  }
}

std::atomic<int> g_launcher_signal{0};

void on_launcher_signal(int signal) { g_launcher_signal.store(signal); }

// OMP_NUM_THREADS for each of n ranks: this process's share of the threads, at least one.
std::string threads_per_rank(int n) {
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  if (const char* set = std::getenv("OMP_NUM_THREADS")) threads = std::atoi(set);
  return std::to_string(std::max(1, threads / n));
}

// The exit code of a launch: 0 when every rank succeeded, else the code of the rank that failed
// first (its own failure; the ranks after it mostly fail because of it), or that of a failed run
// when that rank was killed by a signal.
int launch_exit_code(const std::optional<lomo::ExitStatus>& first_failure) {
  if (!first_failure) return protocol::kExitSucceeded;
  if (first_failure->signaled || first_failure->code == 0) return protocol::kExitFailed;
  return first_failure->code;
}

// CUDA_VISIBLE_DEVICES for rank r of a local GPU gang: the r-th GPU this process sees (the r-th
// entry of its own CUDA_VISIBLE_DEVICES when set), so each rank computes on a GPU of its own, as
// NCCL requires.
std::string gpu_of_rank(int r, int n) {
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  if (visible == nullptr || *visible == '\0') return std::to_string(r);
  std::vector<std::string> gpus;
  std::string entry;
  for (const char* c = visible;; ++c) {
    if (*c == ',' || *c == '\0') {
      if (!entry.empty()) gpus.push_back(entry);
      entry.clear();
      if (*c == '\0') break;
    } else {
      entry += *c;
    }
  }
  if (static_cast<size_t>(r) >= gpus.size()) {
    throw std::runtime_error("train --nproc " + std::to_string(n) +
                             " on cuda needs a GPU per rank; CUDA_VISIBLE_DEVICES=" + visible +
                             " lists " + std::to_string(gpus.size()));
  }
  return gpus[static_cast<size_t>(r)];
}

// Starts the n ranks of `args` and waits for all of them; when one fails, ends the others. On
// cuda (`on_gpus`) each rank sees one GPU of its own.
int launch_ranks(const TrainArgs& args, int n, bool on_gpus) {
  if (kNoGloo != nullptr) throw std::runtime_error(kNoGloo);
  char pattern[] = "/tmp/lomo-rendezvous-XXXXXX";
  if (::mkdtemp(pattern) == nullptr) {
    throw std::runtime_error(std::string("cannot create a rendezvous directory: ") +
                             std::strerror(errno));
  }
  const std::filesystem::path rendezvous = pattern;
  // Removed on every way out, a rank that could not be started included; declared before `ranks`,
  // so the ranks (ended by their destructors) are gone before their rendezvous directory is.
  struct RemoveOnExit {
    std::filesystem::path path;
    ~RemoveOnExit() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  } const remove_rendezvous{rendezvous};
  std::signal(SIGINT, on_launcher_signal);
  std::signal(SIGTERM, on_launcher_signal);
  std::vector<std::unique_ptr<lomo::ChildProcess>> ranks;
  for (int r = 0; r < n; ++r) {
    lomo::ChildOptions child;
    child.argv = {"/proc/self/exe",  "train",           args.job_file,
                  "--rank",          std::to_string(r), "--world-size",
                  std::to_string(n), "--rendezvous",    rendezvous.string()};
    for (const std::string& o : args.overrides) child.argv.insert(child.argv.end(), {"--set", o});
    if (args.restart) child.argv.push_back("--restart");
    if (r == 0 && args.protocol_file) {
      child.argv.insert(child.argv.end(), {"--protocol-file", args.protocol_file->string()});
    }
    child.env = {"OMP_NUM_THREADS=" + threads_per_rank(n)};
    if (on_gpus) child.env.push_back("CUDA_VISIBLE_DEVICES=" + gpu_of_rank(r, n));
    // Rank 0 shows the progress; the others would print the same lines (errors go to stderr).
    if (r > 0) child.stdout_mode = lomo::ChildOutput::kDiscard;
    ranks.push_back(std::make_unique<lomo::ChildProcess>(child));
  }
  std::vector<std::optional<lomo::ExitStatus>> ended(ranks.size());
  std::optional<lomo::ExitStatus> first_failure;  // in the order the ranks were seen to end
  auto note_end = [&](size_t r) {
    if (!ended[r]->success() && !first_failure) first_failure = ended[r];
  };
  size_t running = ranks.size();
  bool stopping = false;  // a signal was forwarded: the ranks end on their own
  while (running > 0) {
    if (const int signal = g_launcher_signal.exchange(0); signal != 0) {
      stopping = true;
      // The ranks checkpoint and stop on the first signal, die on the second.
      for (auto& rank : ranks) {
        if (rank->running()) rank->send_signal(signal);
      }
    }
    for (size_t r = 0; r < ranks.size(); ++r) {
      if (ended[r]) continue;
      ended[r] = ranks[r]->wait_for(std::chrono::milliseconds(20));
      if (!ended[r]) continue;
      --running;
      note_end(r);
      if (ended[r]->success() || stopping) continue;
      // A failed rank: the others fail at their next collective, naming it, and rank 0 writes
      // that outcome. Give them a few seconds to do so on their own before ending them: a SIGTERM
      // first would turn the failure into a stop request racing the broken collective.
      std::cerr << "lomo-worker train: rank " << r << " " << ended[r]->describe()
                << "; stopping the other ranks\n";
      const auto grace_end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      for (size_t other = 0; other < ranks.size(); ++other) {
        if (ended[other]) continue;
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            grace_end - std::chrono::steady_clock::now());
        ended[other] = ranks[other]->wait_for(std::max(left, std::chrono::milliseconds(0)));
        if (!ended[other]) ended[other] = ranks[other]->terminate(std::chrono::seconds(10));
        --running;
        note_end(other);
      }
    }
  }
  return launch_exit_code(first_failure);
}

// Exit codes and the outcome record: common/trainer_protocol.h.
int train_command(const std::vector<std::string>& args) {
  std::string problem;
  const std::optional<TrainArgs> parsed = parse_train_args(args, &problem);
  if (!parsed) return usage_or_help(problem, kTrainHelp);
  if (parsed->rank) return train_rank(*parsed);
  std::optional<lomo::JobSpec> spec;
  try {
    spec = load_spec(*parsed);
    fault_from_environment();  // a misspelt test fault fails every run, not only a gang's ranks
  } catch (const std::exception& e) {
    RunReporter reporter(parsed->protocol_file);  // a spec that does not parse is reported too
    return fail(e, "lomo-worker train", &reporter);
  }
  const int64_t world_size = spec->resources.world_size;
  if (parsed->nproc && *parsed->nproc != world_size) {
    return usage("train: --nproc " + std::to_string(*parsed->nproc) +
                 " differs from the spec's resources.world_size " + std::to_string(world_size) +
                 " (the global batch is split over that many ranks); add --set "
                 "resources.world_size=" +
                 std::to_string(*parsed->nproc) + " to change it");
  }
  if (world_size > 1) {
    try {
      return launch_ranks(*parsed, static_cast<int>(world_size), spec->resources.device == "cuda");
    } catch (const std::exception& e) {
      RunReporter reporter(parsed->protocol_file);
      return fail(e, "lomo-worker train", &reporter);
    }
  }
  install_stop_handlers();  // before any thread starts: every thread inherits the blocked mask
  RunReporter reporter(parsed->protocol_file);
  try {
    reporter.set_log_every(spec->training.log_every);
    const protocol::Status status = run_training(*spec, *parsed, reporter.hooks());
    reporter.outcome(status, "");
    return protocol::exit_code_for(status);
  } catch (const std::exception& e) {
    return fail(e, "lomo-worker train", &reporter);
  }
}

// Replaces this process with lomo-workerd (beside this executable), telling it to run this
// executable for training. Returns only if that fails.
int serve_command(const std::vector<std::string>& args) {
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) {
    std::cerr << "lomo-worker serve: cannot find its own executable: " << error.message() << "\n";
    return 1;
  }
  const std::filesystem::path daemon = self.parent_path() / "lomo-workerd";
  std::vector<std::string> daemon_args{daemon.string(), "--trainer", self.string()};
  daemon_args.insert(daemon_args.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : daemon_args) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(daemon.c_str(), argv.data());
  std::cerr << "lomo-worker serve: cannot run " << daemon.string() << ": " << std::strerror(errno)
            << " (it is built beside lomo-worker: target lomo-workerd)\n";
  return 1;
}

int init_model_command(const std::vector<std::string>& args) {
  std::string problem;
  const std::optional<lomo::ParsedFlags> flags = parse_subcommand(
      args, "init-model", "a directory", {.with_value = {"--preset", "--seed"}}, &problem);
  if (!flags) return usage_or_help(problem, kInitModelHelp);
  const std::string& directory = flags->positional[0];
  std::string preset = "tiny";
  uint64_t seed = 1;
  for (const auto& [flag, value] : flags->flags) {
    if (flag == "--preset") {
      preset = value;
    } else {  // --seed
      const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), seed);
      if (error != std::errc() || end != value.data() + value.size()) {
        return usage("init-model: --seed: expected an integer >= 0, got \"" + value + "\"");
      }
    }
  }
  lomo::LlamaConfig config;
  if (preset == "tiny") {  // 0.76M parameters: the README's demo
    config.vocab_size = 256;
    config.hidden_size = 128;
    config.intermediate_size = 344;
    config.num_hidden_layers = 4;
    config.num_attention_heads = 4;
    config.num_key_value_heads = 2;
    config.head_dim = 32;
    config.max_position_embeddings = 1024;
    config.tie_word_embeddings = true;
  } else if (preset == "reference") {  // 58M parameters: the benchmarks' reference config
    config.vocab_size = 32000;
    config.hidden_size = 512;
    config.intermediate_size = 1376;
    config.num_hidden_layers = 8;
    config.num_attention_heads = 8;
    config.num_key_value_heads = 8;
    config.head_dim = 64;
    config.max_position_embeddings = 2048;
  } else {
    return usage("unknown preset '" + preset + "'");
  }
  lomo::MemoryAccountant accountant;
  lomo::LlamaWeights weights(config, lomo::DType::kF32, accountant);
  weights.init_random(seed, 0.02f);
  lomo::save_llama_checkpoint(weights, directory);
  std::printf("wrote a random %.2fM-parameter LLaMA (%s) to %s\n", weights.parameter_count() / 1e6,
              preset.c_str(), directory.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage("no command");
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  if (command == "--version" || lomo::asks_for_version(args)) {
    std::cout << lomo::version_text("lomo-worker");
    return 0;
  }
  if (command == "--help" || command == "-h" || command == "help") {
    std::cout << kUsage << lomo::kGenerateUsage
              << "\n`lomo-worker COMMAND --help` shows a command's flags and examples; "
                 "`lomo-worker --version` the version.\n";
    return 0;
  }
  try {
    if (command == "train") return train_command(args);
    if (command == "init-model") return init_model_command(args);
    if (command == "generate") return lomo::generate_command(args, std::cout, std::cerr);
    if (command == "serve") return serve_command(args);
    return usage("unknown command '" + command + "'");
  } catch (const std::exception& e) {
    std::cerr << "lomo-worker " << command << ": " << e.what() << "\n";
    return 1;
  }
}
