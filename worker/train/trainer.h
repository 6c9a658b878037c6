// One training job from a JobSpec, start to finish: load the model (or the latest checkpoint of an
// earlier attempt), train for the spec's steps with its optimizer, evaluate, checkpoint, and report
// progress. Usable without any daemon: `lomo-worker train JOB.yaml` is this class plus a terminal.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "jobspec/job_spec.h"
#include "kernels/backend.h"
#include "worker/comm/communicator.h"
#include "worker/engine/memory.h"

namespace lomo {

struct TrainingMetrics {
  int64_t step = 0;
  int64_t total_steps = 0;
  double loss = 0.0;
  double lr = 0.0;
  double grad_norm = 0.0;
  double loss_scale = 1.0;
  bool skipped = false;
  int64_t skipped_records = 0;  // bad training records skipped at load (data.on_bad_record: skip)
  int64_t tokens = 0;           // input positions of the step's batch, padding included
  double tokens_per_second = 0.0;  // input positions (padding included) per second of the step
  double elapsed_seconds = 0.0;
  MemoryReport memory;
  // This rank's own (not reduced): the step's wall time (forward to update), the part of it spent
  // in collectives (waiting for peers included), and the payload bytes it all-reduced (0 with one
  // rank). Their share shows a straggler or a communication-bound step.
  double step_seconds = 0.0;
  double communication_seconds = 0.0;
  int64_t communication_bytes = 0;
};

struct EvalMetrics {
  int64_t step = 0;
  double loss = 0.0;
  double perplexity = 0.0;
  int64_t tokens = 0;
  // data.eval_format multiple_choice: the fraction of records whose highest-likelihood candidate
  // is the labelled one, over `examples` records; loss and tokens then cover the correct
  // candidates' scored tokens.
  std::optional<double> accuracy;
  int64_t examples = 0;
};

// What a run is about to do, once it has loaded everything and before its first step.
struct TrainStart {
  int64_t total_steps = 0;
  int64_t first_step = 0;  // the step it continues after: 0, or the resumed checkpoint's
  std::optional<std::filesystem::path> resumed_from;
};

struct TrainerHooks {
  std::function<void(const TrainStart&)> on_start;
  std::function<void(const TrainingMetrics&)> on_step;
  std::function<void(const EvalMetrics&)> on_eval;
  std::function<void(const std::filesystem::path&, int64_t step)> on_checkpoint;  // committed
  std::function<void(const std::string&)> on_log;
};

struct TrainerOptions {
  bool resume = true;  // continue from the latest committed checkpoint in output.dir if present
  // Set from another thread or a signal handler: the trainer finishes the current step, writes a
  // checkpoint, and returns with `stopped`.
  const std::atomic<bool>* stop_requested = nullptr;
  // This process's data-parallel rank among communicator->world_size() (which must equal the
  // spec's resources.world_size); null: one rank alone (a LocalCommunicator). Every rank trains on
  // its disjoint training_batch_size / world_size rows of each global batch and evaluates its share
  // of the evaluation rows (multiple-choice evaluation: rank 0 alone); only rank 0 writes
  // metrics.jsonl and checkpoints. Every rank calls its hooks with the same values (losses are
  // reduced). Ranks check at the start and at every checkpoint that they hold the same weights.
  Communicator* communicator = nullptr;
};

struct TrainResult {
  int64_t steps_done = 0;
  int64_t total_steps = 0;
  bool stopped = false;  // stop_requested ended the run early (after a checkpoint)
  std::optional<EvalMetrics> final_eval;
  std::filesystem::path last_checkpoint;
  MemoryReport memory;
};

// Checkpoints live in <output.dir>/checkpoints/step-NNNNNNNN/ (common/checkpoint_layout.h),
// written under a temporary name and renamed when complete; <output.dir>/checkpoints/latest names
// the newest committed one. Throws CheckpointError when `latest` names no checkpoint directory.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& output_dir);

// The matrix-product precision of a run from precision.matmul. auto: fp32 for fp32 weights; for
// bf16 weights on a GPU, bf16 products (the weights multiply as stored, as PyTorch's bf16 autocast
// does); otherwise TF32 for bf16/fp16 ones (no coarser than the weights; only a GPU uses it, and
// fp16 activations could overflow where bf16 ones cannot). bf16 on the CPU needs `cpu_bf16`
// (AVX512-BF16 or AMX-BF16, cpu::bf16_matmul_supported()): without it, throws a JobSpecError naming
// precision.matmul; every GPU the CUDA backend runs on multiplies bf16.
// The device a rank of `spec` computes on: the CPU, or for `resources.device: cuda` the first GPU
// this process sees. Throws JobSpecError naming resources.device when there is none.
Device training_device(const JobSpec& spec);

Backend::MatmulPrecision matmul_precision_for(const JobSpec& spec, DType storage, Device device,
                                              bool cpu_bf16);

// Throws JobSpecError / CheckpointError / std::runtime_error with context for anything that stops
// the job (bad data, a model that does not fit the spec, a non-finite gradient...).
TrainResult train(const JobSpec& spec, const TrainerOptions& options, const TrainerHooks& hooks);

}  // namespace lomo
