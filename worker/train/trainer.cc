#include "worker/train/trainer.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <cmath>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <system_error>

#include "worker/engine/atomic_file.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/comm/local_communicator.h"
#include "worker/engine/llama_model.h"
#include "worker/optim/lr_schedule.h"
#include "worker/optim/optimizer.h"
#include "worker/train/multiple_choice_eval.h"
#include "worker/train/token_dataset.h"
#include "worker/train/training_data.h"

namespace lomo {
namespace fs = std::filesystem;
namespace {

constexpr const char* kTrainerStateFile = "trainer_state.json";
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
  std::ifstream in(file);
  if (!in) throw CheckpointError(file.string() + ": cannot read the trainer state");
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
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

std::string step_directory_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

// Writes everything a resume needs into a temporary directory, then renames it into place and
// points `latest` at it: a crash at any moment leaves the previous checkpoint as the latest.
fs::path write_checkpoint(const fs::path& output_dir, const JobSpec& spec,
                          const LlamaWeights& weights, const Optimizer& optimizer,
                          const TrainerState& state) {
  const fs::path root = output_dir / "checkpoints";
  fs::create_directories(root);
  const std::string name = step_directory_name(state.step);
  const fs::path temporary = root / (".tmp-" + name);
  const fs::path final_dir = root / name;
  fs::remove_all(temporary);
  save_llama_checkpoint(weights, temporary);
  optimizer.save_state(temporary / kOptimizerStateFile);
  write_file_atomically(temporary / kTrainerStateFile, to_json(state).dump(2) + "\n");
  write_file_atomically(temporary / kJobSpecFile, job_spec_to_yaml(spec));
  fs::remove_all(final_dir);  // a checkpoint of the same step from an attempt that crashed after it
  fs::rename(temporary, final_dir);
  write_file_atomically(root / "latest", name + "\n");
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
EvalMetrics evaluate(LlamaModel& model, const TokenDataset& data, int64_t batch_size,
                     int64_t max_batches, int64_t step) {
  double loss_sum = 0.0;
  int64_t tokens = 0;
  for (const TokenBatch& batch : data.first_batches(batch_size, max_batches)) {
    const ForwardResult r = model.forward(batch);
    loss_sum += r.loss * static_cast<double>(r.counted_tokens);
    tokens += r.counted_tokens;
  }
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

nlohmann::json memory_json(const MemoryReport& memory) { return nlohmann::json::parse(memory.to_json()); }

}  // namespace

std::optional<fs::path> latest_checkpoint(const fs::path& output_dir) {
  const fs::path pointer = output_dir / "checkpoints" / "latest";
  std::ifstream in(pointer);
  if (!in) return std::nullopt;
  std::string name;
  std::getline(in, name);
  const fs::path dir = output_dir / "checkpoints" / name;
  if (name.empty() || name.find('/') != std::string::npos || !fs::is_directory(dir)) {
    throw CheckpointError(pointer.string() + ": names '" + name +
                          "', which is not a checkpoint directory beside it");
  }
  return dir;
}

TrainResult train(const JobSpec& spec, const TrainerOptions& options, const TrainerHooks& hooks) {
  auto log = [&](const std::string& line) {
    if (hooks.on_log) hooks.on_log(line);
  };
  const fs::path output_dir = spec.output.dir;
  fs::create_directories(output_dir);

  std::optional<fs::path> resume_from;
  if (options.resume) resume_from = latest_checkpoint(output_dir);
  const fs::path model_dir = resume_from ? *resume_from : fs::path(spec.model.path);

  MemoryAccountant accountant;
  const DType dtype = dtype_from_user_string(spec.precision.dtype);
  LlamaWeights weights = load_llama_checkpoint(model_dir, dtype, accountant);
  if (spec.data.max_length > weights.config().max_position_embeddings) {
    throw JobSpecError("job", "data.max_length",
                       std::to_string(spec.data.max_length) + " exceeds the model's "
                       "max_position_embeddings " +
                           std::to_string(weights.config().max_position_embeddings));
  }

  // One data-parallel rank for now; the dataset shards by (rank, world_size) when that changes.
  TrainingData data = load_training_data(spec, weights.config());
  TokenDataset& train_data = *data.train;
  auto report_skips = [&](const LoadReport& report, const std::string& list) {
    if (report.skipped == 0) return;
    std::string line = list + ": skipped " + std::to_string(report.skipped) + " bad record(s)";
    for (const std::string& example : report.skipped_examples) line += "\n  " + example;
    log(line);
  };
  report_skips(data.train_report, "data.train");
  report_skips(data.eval_report, "data.eval");
  const int64_t skipped_records = data.train_report.skipped;
  const int64_t batch_size = spec.training.batch_size;
  const int64_t total_steps =
      spec.training.steps ? *spec.training.steps
                          : train_data.batches_for_epochs(*spec.training.epochs, batch_size);

  LlamaModel model(weights, accountant, {spec.training.activation_checkpointing});
  LocalCommunicator communicator;
  std::unique_ptr<Optimizer> optimizer =
      make_optimizer(optimizer_options(spec), weights, accountant, &communicator);
  const LrSchedule schedule = LrSchedule::make(spec.optimizer.schedule, spec.optimizer.lr,
                                               spec.optimizer.warmup_steps,
                                               spec.optimizer.warmup_ratio, total_steps);

  TrainerState state;
  state.total_steps = total_steps;
  const uint64_t data_fingerprint = train_data.fingerprint();
  TrainResult result;
  result.total_steps = total_steps;
  if (resume_from) {
    state = read_trainer_state(*resume_from / kTrainerStateFile);
    if (state.total_steps != total_steps) {
      throw CheckpointError((*resume_from / kTrainerStateFile).string() + ": was written for " +
                            std::to_string(state.total_steps) + " total steps, the job now has " +
                            std::to_string(total_steps) +
                            " (steps, epochs, batch size or data changed); use a new output.dir");
    }
    if (state.data_fingerprint && *state.data_fingerprint != data_fingerprint) {
      throw CheckpointError((*resume_from / kTrainerStateFile).string() +
                            ": the training data (files, format, max_length or packing) changed "
                            "since this checkpoint; use a new output.dir");
    }
    optimizer->load_state(*resume_from / kOptimizerStateFile);
    try {
      train_data.restore(state.cursor);
    } catch (const std::invalid_argument& e) {
      throw CheckpointError((*resume_from / kTrainerStateFile).string() + ": " + e.what());
    }
    result.last_checkpoint = *resume_from;
    log("resuming from " + resume_from->string() + " at step " + std::to_string(state.step));
  }
  std::ofstream metrics = reopen_metrics(output_dir / kMetricsFile, state.step);

  auto checkpoint = [&]() {
    state.cursor = train_data.cursor();
    state.data_fingerprint = data_fingerprint;
    result.last_checkpoint = write_checkpoint(output_dir, spec, weights, *optimizer, state);
    log("checkpoint " + result.last_checkpoint.string());
    if (hooks.on_checkpoint) hooks.on_checkpoint(result.last_checkpoint, state.step);
  };
  auto run_eval = [&]() {
    if (!data.eval && data.eval_choices.empty()) return;
    const EvalMetrics m =
        data.eval ? evaluate(model, *data.eval, batch_size, spec.training.eval_batches, state.step)
                  : evaluate_choices(model, data.eval_choices, batch_size,
                                     spec.training.eval_batches, data.pad_id, state.step);
    nlohmann::json line = {{"step", m.step},
                           {"eval_loss", m.loss},
                           {"eval_perplexity", m.perplexity},
                           {"eval_tokens", m.tokens}};
    if (m.accuracy) {
      line["eval_accuracy"] = *m.accuracy;
      line["eval_examples"] = m.examples;
    }
    metrics << line.dump() << "\n" << std::flush;
    result.final_eval = m;
    if (hooks.on_eval) hooks.on_eval(m);
  };

  const auto start = Clock::now();
  const int64_t first_step = state.step;
  bool checkpointed_this_step = false;
  while (state.step < total_steps) {
    const auto step_start = Clock::now();
    const TokenBatch batch = train_data.next_batch(batch_size);
    ++state.step;
    const double loss = model.forward(batch).loss;
    const double lr = schedule.at(state.step);
    const StepResult step = optimizer->step(model, state.step, lr);
    const double step_seconds = std::chrono::duration<double>(Clock::now() - step_start).count();

    TrainingMetrics m;
    m.step = state.step;
    m.total_steps = total_steps;
    m.loss = loss;
    m.lr = lr;
    m.grad_norm = step.grad_norm;
    m.loss_scale = step.loss_scale;
    m.skipped = step.skipped;
    m.skipped_records = skipped_records;
    m.tokens_per_second = static_cast<double>(batch.batch_size * batch.seq_len) / step_seconds;
    m.elapsed_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    m.memory = accountant.report();
    metrics << nlohmann::json{{"step", m.step},
                              {"loss", m.loss},
                              {"lr", m.lr},
                              {"grad_norm", m.grad_norm},
                              {"loss_scale", m.loss_scale},
                              {"skipped", m.skipped},
                              {"skipped_records", m.skipped_records},
                              {"tokens_per_second", m.tokens_per_second},
                              {"memory", memory_json(m.memory)}}
                   .dump()
            << "\n" << std::flush;
    if (hooks.on_step) hooks.on_step(m);

    checkpointed_this_step = false;
    const bool last = state.step == total_steps;
    if (!last && spec.training.eval_every > 0 && state.step % spec.training.eval_every == 0) {
      run_eval();
    }
    if (!last && spec.training.checkpoint_every > 0 &&
        state.step % spec.training.checkpoint_every == 0) {
      checkpoint();
      checkpointed_this_step = true;
    }
    if (!last && options.stop_requested != nullptr && options.stop_requested->load()) {
      if (!checkpointed_this_step) checkpoint();
      result.stopped = true;
      log("stopped at step " + std::to_string(state.step) + " of " + std::to_string(total_steps));
      break;
    }
  }
  if (!result.stopped) {
    run_eval();
    if (state.step > first_step || !resume_from) checkpoint();
  }
  result.steps_done = state.step;
  result.memory = accountant.report();
  return result;
}

}  // namespace lomo
