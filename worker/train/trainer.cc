#include "worker/train/trainer.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "common/atomic_file.h"
#include "common/checkpoint_layout.h"
#include "common/checkpoint_manifest.h"
#include "common/printable.h"
#include "common/read_file.h"
#include "kernels/cpu/gemm_dispatch.h"
#include "worker/comm/local_communicator.h"
#include "worker/comm/metered_communicator.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/engine/kv_cache_model.h"
#include "worker/engine/llama_model.h"
#include "worker/engine/model_files.h"
#include "worker/generate/generation.h"
#include "worker/optim/lr_schedule.h"
#include "worker/optim/optimizer.h"
#include "worker/train/multiple_choice_eval.h"
#include "worker/train/token_dataset.h"
#include "worker/train/training_data.h"

namespace lomo {
namespace fs = std::filesystem;
namespace {

// lomo's own state, named apart from the trainer_state.json of Hugging Face's Trainer (another
// schema) so that tools reading a checkpoint never mistake one for the other. Checkpoints written
// before the rename hold kLegacyTrainerStateFile, which resume still reads.
constexpr const char* kTrainerStateFile = "lomo_trainer_state.json";
constexpr const char* kLegacyTrainerStateFile = "trainer_state.json";
constexpr const char* kOptimizerStateFile = "optimizer.safetensors";
constexpr const char* kJobSpecFile = "job.yaml";
constexpr const char* kMetricsFile = "metrics.jsonl";

using Clock = std::chrono::steady_clock;

OptimizerOptions optimizer_options(const JobSpec& spec) {
  const OptimizerSpec& o = spec.optimizer;
  OptimizerOptions options;
  options.kind = optimizer_kind_from_name(o.name);
  options.clip_grad_norm = o.clip_grad_norm;
  options.clip_grad_value = o.clip_grad_value;
  options.weight_decay = o.weight_decay;
  options.weight_decay_on_norms = o.weight_decay_on_norms;
  options.stochastic_rounding = o.stochastic_rounding;
  options.seed = spec.training.seed;
  options.beta1 = o.beta1;
  options.beta2 = o.beta2;
  options.eps = o.eps;
  options.adalomo_eps1 = o.adalomo.eps1;
  options.adalomo_eps2 = o.adalomo.eps2;
  options.adalomo_clip_threshold = o.adalomo.clip_threshold;
  options.adalomo_decay_rate = o.adalomo.decay_rate;
  if (spec.precision.dtype == "fp16") {
    const LossScaleSpec& s = spec.precision.loss_scale;
    options.loss_scaling = LossScalerOptions{s.initial, s.growth_interval, s.factor, s.min};
  }
  return options;
}

struct TrainerState {
  int64_t step = 0;
  int64_t total_steps = 0;
  DatasetCursor cursor;
  // TokenDataset::fingerprint() of the training data; absent in states written before it existed.
  std::optional<uint64_t> data_fingerprint;
};

std::string hex(uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

nlohmann::json to_json(const TrainerState& s) {
  nlohmann::json cursor = {{"epoch", s.cursor.epoch}, {"offset", s.cursor.offset}};
  if (s.data_fingerprint) cursor["fingerprint"] = hex(*s.data_fingerprint);
  return {{"step", s.step}, {"total_steps", s.total_steps}, {"data_cursor", cursor}, {"format", 1}};
}

TrainerState read_trainer_state(const fs::path& file) {
  std::string bytes;
  try {
    bytes = read_file(file);
  } catch (const FileReadError& e) {
    throw CheckpointError(file.string() + ": cannot read the trainer state (" + e.reason() + ")");
  }
  try {
    const nlohmann::json j = nlohmann::json::parse(bytes);
    TrainerState s;
    s.step = j.at("step").get<int64_t>();
    s.total_steps = j.at("total_steps").get<int64_t>();
    s.cursor.epoch = j.at("data_cursor").at("epoch").get<int64_t>();
    s.cursor.offset = j.at("data_cursor").at("offset").get<int64_t>();
    if (const auto it = j.at("data_cursor").find("fingerprint"); it != j.at("data_cursor").end()) {
      const std::string text = it->get<std::string>();
      size_t used = 0;
      s.data_fingerprint = std::stoull(text, &used, 16);
      if (used != text.size() || text.size() != 16) throw std::out_of_range("bad fingerprint");
    }
    if (s.step < 0 || s.total_steps < 0) throw std::out_of_range("negative step");
    return s;
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(file.string() + ": malformed trainer state: " + e.what());
  } catch (const std::logic_error& e) {  // out_of_range, and invalid_argument from stoull
    throw CheckpointError(file.string() + ": malformed trainer state: " + e.what());
  }
}

// The state file of a checkpoint: lomo_trainer_state.json, or the name older checkpoints used.
fs::path trainer_state_file(const fs::path& checkpoint) {
  fs::path current = checkpoint / kTrainerStateFile;
  std::error_code error;
  if (!fs::exists(current, error) && fs::exists(checkpoint / kLegacyTrainerStateFile, error)) {
    return checkpoint / kLegacyTrainerStateFile;
  }
  return current;
}

// Where the files that make a checkpoint a complete Hugging Face model directory come from: the
// model directory (the tokenizer's own directory when tokenizer.path names one); a resumed run
// whose model directory is not on this machine takes them from the checkpoint it resumed, which
// carries them.
struct CompanionSources {
  fs::path model_dir;
  fs::path tokenizer_dir;
};

CompanionSources companion_sources(const JobSpec& spec,
                                   const std::optional<fs::path>& resumed_from) {
  CompanionSources sources{spec.model.path, spec.model.path};
  std::error_code error;
  if (!fs::is_directory(sources.model_dir, error) && resumed_from) {
    sources = {*resumed_from, *resumed_from};
  }
  if (!spec.tokenizer.path.empty()) sources.tokenizer_dir = spec.tokenizer.path;
  return sources;
}

// Writes everything a resume needs into a temporary directory, then renames it into place and
// points `latest` at it: a crash at any moment leaves the previous checkpoint as the latest.
fs::path write_checkpoint(const fs::path& output_dir, const JobSpec& spec,
                          const LlamaWeights& weights, const Optimizer& optimizer,
                          const TrainerState& state, const CompanionSources& companions) {
  const fs::path root = checkpoints_directory(output_dir);
  fs::create_directories(root);
  const fs::path temporary = temporary_checkpoint_directory(root, state.step);
  fs::path final_dir = checkpoint_directory(root, state.step);
  fs::remove_all(temporary);
  save_llama_checkpoint(weights, temporary);
  write_model_companion_files(companions.model_dir, companions.tokenizer_dir, temporary,
                              weights.config());
  optimizer.save_state(temporary / kOptimizerStateFile);
  write_file_atomically(temporary / kTrainerStateFile, to_json(state).dump(2) + "\n");
  write_file_atomically(temporary / kJobSpecFile, job_spec_to_yaml(spec));
  // Last, so that it lists every file: what a resume, the upload and a download check against.
  write_checkpoint_manifest(temporary);
  fs::remove_all(final_dir);  // a checkpoint of the same step from an attempt that crashed after it
  fs::rename(temporary, final_dir);
  write_latest_checkpoint(root, state.step);
  return final_dir;
}

// Keeps the metrics of steps up to `step` (an earlier attempt may have logged past its last
// checkpoint) and reopens the file for appending.
std::ofstream reopen_metrics(const fs::path& file, int64_t step) {
  std::string kept;
  if (step > 0) {
    std::ifstream in(file);
    std::string line;
    while (std::getline(in, line)) {
      try {
        const auto j = nlohmann::json::parse(line);
        if (j.value("step", int64_t{0}) <= step) kept += line + "\n";
      } catch (const nlohmann::json::exception&) {
        // A torn last line from a crash: drop it.
      }
    }
  }
  write_file_atomically(file, kept);
  return std::ofstream(file, std::ios::app);
}

// The first max_batches batches of the evaluation rows (in file order): mean token loss.
// With several ranks, each scores its share of those rows (batch_size being its share of the
// global batch) and the sums are all-reduced: every rank returns the same metrics.
EvalMetrics evaluate(LlamaModel& model, const TokenDataset& data, int64_t batch_size,
                     int64_t max_batches, int64_t step, Communicator& communicator) {
  double loss_sum = 0.0;
  int64_t tokens = 0;
  for (const TokenBatch& batch : data.first_batches(batch_size, max_batches)) {
    const ForwardResult r = model.evaluate(batch);
    loss_sum += r.loss * static_cast<double>(r.counted_tokens);
    tokens += r.counted_tokens;
  }
  communicator.all_reduce(&loss_sum, 1, ReduceOp::kSum);
  communicator.all_reduce(&tokens, 1, ReduceOp::kSum);
  EvalMetrics m;
  m.step = step;
  m.tokens = tokens;
  m.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : 0.0;
  m.perplexity = std::exp(m.loss);
  return m;
}

// Multiple-choice accuracy over the first max_batches · batch_size records; the loss is that of
// the correct candidates' scored tokens.
EvalMetrics evaluate_choices(LlamaModel& model, const std::vector<MultipleChoiceRecord>& records,
                             int64_t batch_size, int64_t max_batches, int32_t pad_id,
                             int64_t step) {
  // batch_size · max_batches records, without overflowing for large settings.
  const auto wanted = static_cast<uint64_t>(batch_size);
  const auto batches = static_cast<uint64_t>(max_batches);
  const size_t count = batches >= records.size() / wanted + 1
                           ? records.size()
                           : static_cast<size_t>(wanted * batches);
  const MultipleChoiceResult r = score_multiple_choice(
      model, std::span<const MultipleChoiceRecord>(records.data(), count), batch_size, pad_id);
  EvalMetrics m;
  m.step = step;
  m.tokens = r.scored_tokens;
  m.loss = r.loss;
  m.perplexity = std::exp(m.loss);
  m.accuracy = r.accuracy;
  m.examples = static_cast<int64_t>(count);
  return m;
}

// FNV-1a over every parameter's bytes (copied to the host first when they live on a GPU): equal
// weights give equal hashes, and ranks that drifted apart almost surely differ.
uint64_t weights_hash(const LlamaWeights& weights) {
  uint64_t hash = 14695981039346656037ull;
  std::vector<unsigned char> host;
  for (const Parameter& p : weights.parameters()) {
    const auto* bytes = static_cast<const unsigned char*>(p.storage.data());
    if (!p.storage.device().is_cpu()) {
      host.resize(p.size_bytes());
      backend_for(p.storage.device()).copy_to_host(host.data(), bytes, host.size());
      bytes = host.data();
    }
    for (size_t i = 0; i < p.size_bytes(); ++i) hash = (hash ^ bytes[i]) * 1099511628211ull;
  }
  return hash;
}

// Gathers every rank's weights hash; throws std::runtime_error naming the ranks whose weights
// differ from rank 0's. `when`: "at the start", "at step 12".
void check_same_weights(const LlamaWeights& weights, Communicator& communicator,
                        const std::string& when) {
  if (communicator.world_size() == 1) return;
  const uint64_t mine = weights_hash(weights);
  std::vector<uint64_t> all(static_cast<size_t>(communicator.world_size()));
  communicator.all_gather(&mine, all.data(), sizeof(mine));
  std::string differing;
  for (size_t r = 1; r < all.size(); ++r) {
    if (all[r] == all[0]) continue;
    differing += (differing.empty() ? "" : ", ") + std::to_string(r) + " (" + hex(all[r]) + ")";
  }
  if (differing.empty()) return;
  throw std::runtime_error("data-parallel ranks hold different weights " + when + ": rank(s) " +
                           differing + " differ from rank 0 (" + hex(all[0]) +
                           "); the ranks must start from the same model and checkpoint");
}

nlohmann::json memory_json(const MemoryReport& memory) {
  return nlohmann::json::parse(memory.to_json());
}

}  // namespace

Backend::MatmulPrecision matmul_precision_for(const JobSpec& spec, DType storage, Device device,
                                              bool cpu_bf16) {
  const std::string& matmul = spec.precision.matmul;
  if (matmul == "fp32") return Backend::MatmulPrecision::kFp32;
  if (matmul == "bf16") {
    if (device.is_cpu() && !cpu_bf16) {
      throw JobSpecError("job", "precision.matmul",
                         "bf16 needs a CPU with AVX512-BF16 or AMX-BF16, and this worker's CPU "
                         "has neither: use auto or fp32");
    }
    return Backend::MatmulPrecision::kBf16;
  }
  if (storage == DType::kBF16 && !device.is_cpu()) return Backend::MatmulPrecision::kBf16;
  return storage != DType::kF32 ? Backend::MatmulPrecision::kTf32 : Backend::MatmulPrecision::kFp32;
}

std::optional<fs::path> latest_checkpoint(const fs::path& output_dir) {
  try {
    return read_latest_checkpoint(checkpoints_directory(output_dir));
  } catch (const std::runtime_error& e) {
    throw CheckpointError(e.what());
  }
}

namespace {

// The model weights a run starts from, checked against the spec's sequence length.
LlamaWeights load_weights(const JobSpec& spec, const fs::path& model_dir,
                          MemoryAccountant& accountant) {
  LlamaWeights weights =
      load_llama_checkpoint(model_dir, dtype_from_user_string(spec.precision.dtype), accountant);
  if (spec.data.max_length > weights.config().max_position_embeddings) {
    throw JobSpecError("job", "data.max_length",
                       std::to_string(spec.data.max_length) +
                           " exceeds the model's "
                           "max_position_embeddings " +
                           std::to_string(weights.config().max_position_embeddings));
  }
  return weights;
}

}  // namespace

// The device this rank computes on: the CPU, or for `resources.device: cuda` the first GPU this
// process sees (a worker daemon started with --device N shows its child only GPU N, and
// `train --nproc N` each rank its own GPU, through CUDA_VISIBLE_DEVICES). Throws JobSpecError when
// there is none.
Device training_device(const JobSpec& spec) {
  if (spec.resources.device != "cuda") return Device::cpu();
  for (Device device : available_backends()) {
    if (!device.is_cpu()) return device;
  }
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  throw JobSpecError("job", "resources.device",
                     "cuda, but this trainer finds no usable CUDA device (CUDA_VISIBLE_DEVICES=" +
                         std::string(visible != nullptr ? visible : "unset") +
                         "; a build without the CUDA backend finds none either)");
}

namespace {

// Refuses a checkpoint whose files differ from its manifest: resuming from corrupted weights or
// optimizer state would silently train something else. A checkpoint without a manifest (written
// before manifests existed) is used as before, and the log says it was not verified.
void verify_checkpoint_files(const fs::path& checkpoint, const TrainerHooks& hooks) {
  std::optional<std::vector<ManifestEntry>> manifest;
  try {
    manifest = read_checkpoint_manifest(checkpoint);
  } catch (const ManifestError& e) {
    throw CheckpointError(e.what());
  }
  if (!manifest) {
    if (hooks.on_log) {
      hooks.on_log("checkpoint " + checkpoint.string() + " has no " + kCheckpointManifestFile +
                   "; its files are not verified");
    }
    return;
  }
  if (const std::string mismatch = checkpoint_manifest_mismatch(checkpoint, *manifest);
      !mismatch.empty()) {
    throw CheckpointError("checkpoint " + checkpoint.string() +
                          " does not match its manifest, refusing to resume from it: " +
                          (checkpoint / mismatch).string());
  }
}

// The checkpoint an earlier attempt left in output.dir, when the run may resume from it.
std::optional<fs::path> resume_point(const fs::path& output_dir, const TrainerOptions& options,
                                     const TrainerHooks& hooks) {
  fs::create_directories(output_dir);
  if (!options.resume) return std::nullopt;
  std::optional<fs::path> checkpoint = latest_checkpoint(output_dir);
  if (checkpoint) verify_checkpoint_files(*checkpoint, hooks);
  return checkpoint;
}

// Every rank steps this many times: batches_for_epochs agrees across ranks.
int64_t total_steps_of(const JobSpec& spec, const TokenDataset& train_data, int64_t rows_per_rank) {
  return spec.training.steps ? *spec.training.steps
                             : train_data.batches_for_epochs(*spec.training.epochs, rows_per_rank);
}

// This rank's rows of each global batch. Throws JobSpecError when the communicator's world is not
// the one the spec was written for (batch_size is only known to divide that one).
int64_t rows_per_rank(const JobSpec& spec, const Communicator& communicator) {
  if (communicator.world_size() != spec.resources.world_size) {
    throw JobSpecError("job", "resources.world_size",
                       std::to_string(spec.resources.world_size) + ", but this run has " +
                           std::to_string(communicator.world_size()) +
                           " data-parallel rank(s) (lomo-worker train --nproc N runs N)");
  }
  return spec.training.batch_size / communicator.world_size();
}

// In this order (not sorted): the step's deterministic figures first, then the measured ones
// (timings, memory), so two runs' lines can be compared up to "tokens_per_second".
nlohmann::ordered_json metrics_line(const TrainingMetrics& m) {
  return {{"step", m.step},
          {"loss", m.loss},
          {"lr", m.lr},
          {"grad_norm", m.grad_norm},
          {"loss_scale", m.loss_scale},
          {"skipped", m.skipped},
          {"skipped_records", m.skipped_records},
          {"tokens_per_second", m.tokens_per_second},
          {"step_seconds", m.step_seconds},
          {"communication_seconds", m.communication_seconds},
          {"communication_bytes", m.communication_bytes},
          {"memory", memory_json(m.memory)}};
}

// One training.eval_prompts entry continued greedily by the weights as they are now, as a log
// line: the prompt and the text quoted and escaped (printable.h), so that generated control
// characters or newlines cannot break the job's log or a terminal showing it.
std::string eval_sample_line(LlamaWeights& weights, MemoryAccountant& accountant,
                             const Tokenizer& tokenizer, const TrainingSpec& t, size_t index,
                             int64_t step) {
  const std::string& text = t.eval_prompts[index];
  const std::string head = "eval sample at step " + std::to_string(step) + " (" +
                           std::to_string(index + 1) + "/" + std::to_string(t.eval_prompts.size()) +
                           "): \"" + printable_excerpt(text, 200) + "\"";
  // As `lomo-worker generate` encodes a plain prompt (and transformers' tokenizer(text)).
  std::vector<int32_t> prompt;
  if (tokenizer.bos_id()) prompt.push_back(*tokenizer.bos_id());
  const std::vector<int32_t> encoded = tokenizer.encode(text);
  prompt.insert(prompt.end(), encoded.begin(), encoded.end());
  const int64_t room =
      weights.config().max_position_embeddings - static_cast<int64_t>(prompt.size()) + 1;
  if (room < 1) {
    return head + ": not generated, the prompt's " + std::to_string(prompt.size()) +
           " tokens exceed max_position_embeddings " +
           std::to_string(weights.config().max_position_embeddings);
  }
  GenerationOptions options;
  options.max_new_tokens = std::min(t.eval_max_new_tokens, room);
  if (tokenizer.eos_id()) options.stop_token_ids.push_back(*tokenizer.eos_id());
  KvCacheModel model(weights, accountant,
                     static_cast<int64_t>(prompt.size()) + options.max_new_tokens - 1);
  const GenerationResult result = generate(model, prompt, options, &tokenizer);
  return head + " -> \"" + printable_excerpt(result.text, 4096) + "\"";
}

nlohmann::json eval_line(const EvalMetrics& m) {
  nlohmann::json line = {{"step", m.step},
                         {"eval_loss", m.loss},
                         {"eval_perplexity", m.perplexity},
                         {"eval_tokens", m.tokens}};
  if (m.accuracy) {
    line["eval_accuracy"] = *m.accuracy;
    line["eval_examples"] = m.examples;
  }
  return line;
}

// One call of train(): what it loaded, where it stands, and one method per thing a run does.
class TrainingRun {
 public:
  TrainingRun(const JobSpec& spec, const TrainerOptions& options, const TrainerHooks& hooks)
      : spec_(spec),
        options_(options),
        hooks_(hooks),
        metered_(options.communicator != nullptr ? *options.communicator : local_communicator_),
        communicator_(metered_),
        rank_(communicator_.rank()),
        rows_per_rank_(rows_per_rank(spec, communicator_)),
        output_dir_(spec.output.dir),
        resume_from_(resume_point(output_dir_, options, hooks)),
        accountant_(training_device(spec)),
        buffer_accounting_(communicator_, accountant_),
        weights_(load_weights(spec, resume_from_ ? *resume_from_ : fs::path(spec.model.path),
                              accountant_)),
        data_(load_training_data(spec, weights_.config(), rank_, communicator_.world_size())),
        train_data_(*data_.train),
        total_steps_(total_steps_of(spec, train_data_, rows_per_rank_)),
        model_(weights_, accountant_, {spec.training.activation_checkpointing}),
        optimizer_(make_optimizer(optimizer_options(spec), weights_, accountant_, &communicator_)),
        schedule_(LrSchedule::make(spec.optimizer.schedule, spec.optimizer.lr,
                                   spec.optimizer.warmup_steps, spec.optimizer.warmup_ratio,
                                   total_steps_)),
        data_fingerprint_(train_data_.fingerprint()) {
    report_skips(data_.train_report, "data.train");
    report_skips(data_.eval_report, "data.eval");
    state_.total_steps = total_steps_;
    result_.total_steps = total_steps_;
    // See Backend::MatmulPrecision. Set either way: the backend outlives this run, and a later
    // fp32 run in the same process must not inherit TF32.
    backend_for(accountant_.device())
        .set_matmul_precision(
            matmul_precision_for(spec_, weights_.storage_dtype(), accountant_.device(),
                                 accountant_.device().is_cpu() && cpu::bf16_matmul_supported()));
    if (resume_from_) restore(*resume_from_);
    check_same_weights(weights_, communicator_, "at the start");
    if (rank_ == 0) metrics_ = reopen_metrics(output_dir_ / kMetricsFile, state_.step);
  }

  TrainResult run() {
    start_ = Clock::now();
    if (hooks_.on_start) hooks_.on_start({total_steps_, state_.step, resume_from_});
    const int64_t first_step = state_.step;
    while (state_.step < total_steps_) {
      train_step();
      const bool checkpointed = evaluate_and_checkpoint_on_schedule();
      if (stop_requested()) {
        if (!checkpointed) checkpoint();
        result_.stopped = true;
        log("stopped at step " + std::to_string(state_.step) + " of " +
            std::to_string(total_steps_));
        break;
      }
    }
    if (!result_.stopped) {
      run_eval();
      if (state_.step > first_step || !resume_from_) checkpoint();
    }
    result_.steps_done = state_.step;
    result_.memory = accountant_.report();
    return result_;
  }

 private:
  void log(const std::string& line) const {
    if (hooks_.on_log) hooks_.on_log(line);
  }

  void report_skips(const LoadReport& report, const std::string& list) const {
    if (report.skipped == 0) return;
    std::string line = list + ": skipped " + std::to_string(report.skipped) + " bad record(s)";
    for (const std::string& example : report.skipped_examples) line += "\n  " + example;
    log(line);
  }

  // Continues from `checkpoint`: step, optimizer state and data cursor, after checking that the
  // job still describes the run that wrote it.
  void restore(const fs::path& checkpoint) {
    const fs::path state_file = trainer_state_file(checkpoint);
    state_ = read_trainer_state(state_file);
    if (state_.total_steps != total_steps_) {
      throw CheckpointError(state_file.string() + ": was written for " +
                            std::to_string(state_.total_steps) + " total steps, the job now has " +
                            std::to_string(total_steps_) +
                            " (steps, epochs, batch size or data changed); use a new output.dir");
    }
    if (state_.data_fingerprint && *state_.data_fingerprint != data_fingerprint_) {
      throw CheckpointError(state_file.string() +
                            ": the training data (files, format, max_length or packing) changed "
                            "since this checkpoint; use a new output.dir");
    }
    optimizer_->load_state(checkpoint / kOptimizerStateFile);
    try {
      train_data_.restore(state_.cursor);
    } catch (const std::invalid_argument& e) {
      throw CheckpointError(state_file.string() + ": " + e.what());
    }
    result_.last_checkpoint = checkpoint;
    log("resuming from " + checkpoint.string() + " at step " + std::to_string(state_.step));
  }

  // Forward, backward and update of the next batch; its metrics go to metrics.jsonl and on_step.
  void train_step() {
    const auto step_start = Clock::now();
    const CommunicationTotals communication_before = metered_.totals();
    const TokenBatch batch = train_data_.next_batch(rows_per_rank_);
    ++state_.step;
    model_.forward(batch);
    const double lr = schedule_.at(state_.step);
    const StepResult step = optimizer_->step(model_, state_.step, lr);
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_start).count();
    const CommunicationTotals communication_after = metered_.totals();

    TrainingMetrics m;
    m.step = state_.step;
    m.total_steps = total_steps_;
    m.loss = step.loss;  // the mean over every rank's tokens (the forward's loss with one rank)
    m.lr = lr;
    m.grad_norm = step.grad_norm;
    m.loss_scale = step.loss_scale;
    m.skipped = step.skipped;
    m.skipped_records = data_.train_report.skipped;
    m.tokens = batch.batch_size * batch.seq_len;  // this rank's share, then every rank's
    if (communicator_.world_size() > 1) communicator_.all_reduce(&m.tokens, 1, ReduceOp::kSum);
    m.tokens_per_second = static_cast<double>(m.tokens) / step_seconds;
    m.step_seconds = step_seconds;
    m.communication_seconds = communication_after.seconds - communication_before.seconds;
    m.communication_bytes =
        communication_after.all_reduce_bytes - communication_before.all_reduce_bytes;
    m.elapsed_seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    m.memory = accountant_.report();
    if (rank_ == 0) metrics_ << metrics_line(m).dump() << "\n" << std::flush;
    if (hooks_.on_step) hooks_.on_step(m);
  }

  // eval_every and checkpoint_every between steps (the last step's come after the loop). Returns
  // whether it wrote a checkpoint.
  bool evaluate_and_checkpoint_on_schedule() {
    if (state_.step == total_steps_) return false;
    const TrainingSpec& t = spec_.training;
    if (t.eval_every > 0 && state_.step % t.eval_every == 0) run_eval();
    if (t.checkpoint_every > 0 && state_.step % t.checkpoint_every == 0) {
      checkpoint();
      return true;
    }
    return false;
  }

  // With several ranks, a stop any of them saw stops all of them after the same step (a signal
  // reaches the ranks at different moments).
  bool stop_requested() {
    if (state_.step >= total_steps_) return false;
    int64_t stop = options_.stop_requested != nullptr && options_.stop_requested->load() ? 1 : 0;
    if (communicator_.world_size() > 1) communicator_.all_reduce(&stop, 1, ReduceOp::kSum);
    return stop > 0;
  }

  // Rank 0 writes what every rank holds (after checking that they do): the weights, its optimizer
  // state and the data cursor (the same on every rank: they walk one global order).
  void checkpoint() {
    check_same_weights(weights_, communicator_, "at step " + std::to_string(state_.step));
    state_.cursor = train_data_.cursor();
    state_.data_fingerprint = data_fingerprint_;
    if (rank_ == 0) {
      result_.last_checkpoint = write_checkpoint(output_dir_, spec_, weights_, *optimizer_, state_,
                                                 companion_sources(spec_, resume_from_));
    } else {
      result_.last_checkpoint =
          checkpoint_directory(checkpoints_directory(output_dir_), state_.step);
    }
    // Nobody goes on (and may be stopped) before the checkpoint is committed.
    communicator_.barrier();
    log("checkpoint " + result_.last_checkpoint.string());
    if (hooks_.on_checkpoint) hooks_.on_checkpoint(result_.last_checkpoint, state_.step);
  }

  void run_eval() {
    log_eval_samples();
    if (!data_.eval && data_.eval_choices.empty()) return;
    EvalMetrics m;
    if (data_.eval) {
      m = evaluate(model_, *data_.eval, rows_per_rank_, spec_.training.eval_batches, state_.step,
                   communicator_);
    } else {
      // The records are not sharded: rank 0 scores them all and sends the result to the others.
      if (rank_ == 0) {
        m = evaluate_choices(model_, data_.eval_choices, spec_.training.batch_size,
                             spec_.training.eval_batches, data_.pad_id, state_.step);
      }
      if (communicator_.world_size() > 1) broadcast_eval(m);
    }
    if (rank_ == 0) metrics_ << eval_line(m).dump() << "\n" << std::flush;
    result_.final_eval = m;
    if (hooks_.on_eval) hooks_.on_eval(m);
  }

  // training.eval_prompts, on rank 0 alone (the others go on to the next step's collectives and
  // wait there).
  void log_eval_samples() {
    const TrainingSpec& t = spec_.training;
    if (rank_ != 0) return;
    for (size_t i = 0; i < t.eval_prompts.size(); ++i) {
      log(eval_sample_line(weights_, accountant_, *data_.tokenizer, t, i, state_.step));
    }
  }

  // Rank 0's multiple-choice metrics on every rank.
  void broadcast_eval(EvalMetrics& m) {
    double values[3] = {m.loss, m.perplexity, m.accuracy.value_or(0.0)};
    int64_t counts[3] = {m.step, m.tokens, m.examples};
    communicator_.broadcast(values, sizeof(values), 0);
    communicator_.broadcast(counts, sizeof(counts), 0);
    m.loss = values[0];
    m.perplexity = values[1];
    m.accuracy = values[2];
    m.step = counts[0];
    m.tokens = counts[1];
    m.examples = counts[2];
  }

  const JobSpec& spec_;
  const TrainerOptions& options_;
  const TrainerHooks& hooks_;
  LocalCommunicator local_communicator_;
  MeteredCommunicator metered_;  // options.communicator, else local_communicator_, measured
  Communicator& communicator_;   // metered_
  const int rank_;
  const int64_t rows_per_rank_;
  const fs::path output_dir_;
  const std::optional<fs::path> resume_from_;
  MemoryAccountant accountant_;
  CommunicationBufferAccounting buffer_accounting_;  // the communicator's staging, in accountant_
  LlamaWeights weights_;
  TrainingData data_;
  TokenDataset& train_data_;
  const int64_t total_steps_;
  LlamaModel model_;
  std::unique_ptr<Optimizer> optimizer_;
  const LrSchedule schedule_;
  const uint64_t data_fingerprint_;
  TrainerState state_;
  TrainResult result_;
  std::ofstream metrics_;
  Clock::time_point start_;
};

}  // namespace

TrainResult train(const JobSpec& spec, const TrainerOptions& options, const TrainerHooks& hooks) {
  return TrainingRun(spec, options, hooks).run();
}

}  // namespace lomo
