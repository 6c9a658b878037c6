// `lomoctl local`: a coordinator and N CPU workers (one by default) started as child processes with
// their state in a local directory, one job submitted and watched to its end, its final checkpoint
// downloaded, and every process stopped. The README's main command.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace lomo::client {

// The program to run for `name`: `flag` when given, else $`env_var`, else the first of
// `candidates` that is an executable file, else `name` looked up in PATH. Throws
// std::runtime_error saying where it looked.
std::filesystem::path find_program(const std::string& name, const std::optional<std::string>& flag,
                                   const char* env_var,
                                   const std::vector<std::filesystem::path>& candidates);

// The coordinator's gRPC address from its --ready-file JSON ({"grpc": "host:port", ...}), or
// nullopt while the file is absent or incomplete.
std::optional<std::string> read_ready_address(const std::filesystem::path& ready_file);

// The most workers one local run starts. Each is a daemon plus a training process holding a full
// replica of the model, and the ranks of a gang wait on each other every step: far more ranks than
// cores only makes every step slower, so a larger number is taken for a typo.
inline constexpr int kMaxLocalWorkers = 64;

// How many workers a local run starts, and what it adds to the user's --set overrides so that the
// job is a gang of exactly that size.
struct LocalGangPlan {
  int workers = 1;
  std::vector<std::string> overrides;  // "resources.world_size=N" when the spec does not say N
};

// `workers_flag`: --workers as given (nullopt when absent); `spec_world_size`: the spec's
// resources.world_size with the user's overrides applied. Without --workers the spec's world size
// is the number of workers (1 unless the spec asks for a gang). --workers N with a spec of world
// size 1 makes it N; with a spec that asks for another world size it is an error. Throws
// UsageError (client/commands.h) for a number below 1, above kMaxLocalWorkers, or not a number.
LocalGangPlan plan_local_gang(const std::optional<std::string>& workers_flag,
                              int64_t spec_world_size);

// OMP_NUM_THREADS for each of `workers` local workers: nullopt when the user set
// $OMP_NUM_THREADS (`omp_num_threads_env` non-empty: it is passed on unchanged) or for one worker
// (which keeps the default, every core); otherwise the hardware threads shared out, at least one
// each, so that N ranks do not fight over the same cores.
std::optional<int> threads_per_local_worker(int workers, unsigned hardware_threads,
                                            const char* omp_num_threads_env);

// One local worker: its id, work directory and log file under the state directory. One worker
// keeps the names it always had (local-cpu, worker/, worker.log); worker i of several is
// local-cpu-i in worker-i/ logging to worker-i.log.
struct LocalWorkerLayout {
  std::string id;
  std::filesystem::path work_dir;
  std::filesystem::path log;
};
std::vector<LocalWorkerLayout> local_worker_layouts(const std::filesystem::path& state_dir,
                                                    int workers);

}  // namespace lomo::client
