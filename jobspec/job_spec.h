// The one job spec (DESIGN.md, "One job spec"): what `lomo-worker train JOB.yaml`, `lomoctl
// submit`, local mode and the REST API (as JSON, which YAML parses too) all accept. Every field has
// a default except model.path and data.train; unknown keys and invalid values are rejected with the
// field's path ("optimizer.lr: must be positive, got -1").
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lomo {

// The largest spec accepted anywhere (as submitted: YAML/JSON text or its Struct). A spec is a
// page of settings; a bigger one is a mistake or abuse, and every stored copy is kept and listed.
constexpr size_t kMaxSpecBytes = 256 * 1024;

// One problem of a spec: where (`source`: the file, "spec", or the override that set the field;
// `field`: the path, empty for the text as a whole) and what ("must be > 0, got -1 (line 7)").
struct JobSpecProblem {
  std::string source;
  std::string field;
  std::string message;

  // "job.yaml: optimizer.lr: must be > 0, got -1 (line 7)"
  std::string text() const;
  bool operator==(const JobSpecProblem&) const = default;
};

// A spec that cannot run, with every problem found (at least one). what() is one line per
// problem, each starting with its source and field path; with a single problem it reads
// "job.yaml: optimizer.lr: must be > 0, got -1 (line 7)". field() and source() are those of the
// first problem; field() is empty when the problem is the text as a whole (YAML syntax, a file
// that cannot be read, the top level not being a map).
class JobSpecError : public std::invalid_argument {
 public:
  JobSpecError(std::string source, std::string field, const std::string& message)
      : JobSpecError(std::vector<JobSpecProblem>{{std::move(source), std::move(field), message}}) {}
  explicit JobSpecError(std::vector<JobSpecProblem> problems);

  const std::string& source() const { return problems_.front().source; }
  const std::string& field() const { return problems_.front().field; }
  const std::vector<JobSpecProblem>& problems() const { return problems_; }

 private:
  std::vector<JobSpecProblem> problems_;
};

struct ModelSpec {
  std::string path;  // Hugging Face checkpoint directory (config.json + safetensors)

  bool operator==(const ModelSpec&) const = default;
};

struct TokenizerSpec {
  // "bytes": UTF-8 bytes are the token ids (the model needs vocab_size >= 256).
  // "auto": tokenizer.json or tokenizer.model from `path` (default: the model directory).
  std::string kind = "bytes";
  std::string path;

  bool operator==(const TokenizerSpec&) const = default;
};

// Formats (worker/data/sample_loader.h and jsonl_record.h say exactly how each becomes rows):
//   text               plain text files, concatenated into one token stream cut into full rows
//   jsonl_text         JSONL {"text"}: one sample per record, every token trained on
//   alpaca             JSONL {"instruction", "input", "output"}: Stanford Alpaca prompt
//   prompt_completion  JSONL {"prompt", "completion"}
//   chat               JSONL {"messages": [{"role", "content"}]} with data.chat_template
//   tokens             binary little-endian token ids (data.token_dtype), cut into full rows
//   multiple_choice    JSONL {"context", "choices", "label"}: evaluation only (accuracy)
// alpaca, prompt_completion and chat train on the response only unless train_on_prompt.
struct DataSpec {
  std::string format = "text";
  std::vector<std::string> train;
  std::vector<std::string> eval;           // empty: evaluation uses nothing and is skipped
  std::optional<std::string> eval_format;  // unset: data.format
  int64_t max_length = 512;                // input positions per training row
  // auto (the model's tokenizer_config.json chat_template; also when unset) | llama-2 | llama-3 |
  // chatml (format chat only)
  std::optional<std::string> chat_template;
  bool train_on_prompt = false;        // alpaca, prompt_completion, chat: also train on the prompt
  bool packing = false;                // several samples per row, attention kept inside each
  bool shuffle = true;                 // visit training samples in a seeded order per epoch
  std::string token_dtype = "uint16";  // uint16 | uint32 (format tokens)
  std::string on_bad_record = "fail";  // fail | skip (skipped records are counted in metrics)

  bool operator==(const DataSpec&) const = default;
};

struct LossScaleSpec {
  double initial = 65536.0;  // 2^16
  int64_t growth_interval = 1000;
  double factor = 2.0;
  double min = 1.0;

  bool operator==(const LossScaleSpec&) const = default;
};

struct AdaLomoSpec {
  double eps1 = 1e-30;  // added to g² before the second-moment average
  double eps2 = 1e-3;   // floor of RMS(θ) in the relative step
  double clip_threshold = 1.0;
  double decay_rate = -0.8;  // β_t = 1 − t^decay_rate

  bool operator==(const AdaLomoSpec&) const = default;
};

struct OptimizerSpec {
  std::string name = "lomo";  // lomo | adalomo | sgd | adamw
  double lr = 1e-3;
  std::string schedule = "constant";  // constant | linear | cosine (decay to 0 at the last step)
  int64_t warmup_steps = 0;           // at most one of warmup_steps / warmup_ratio is set
  double warmup_ratio = 0.0;
  double weight_decay = 0.0;
  bool weight_decay_on_norms = false;  // norm weights (and biases) are excluded by default
  std::optional<double> clip_grad_norm;
  std::optional<double> clip_grad_value;
  bool stochastic_rounding = false;               // bf16 storage only
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // adamw
  AdaLomoSpec adalomo;

  bool operator==(const OptimizerSpec&) const = default;
};

struct PrecisionSpec {
  std::string dtype = "fp32";  // fp32 | bf16 | fp16 (storage; arithmetic is fp32)
  LossScaleSpec loss_scale;    // used with fp16 only
  // Inputs of the linear layers' matrix products: auto (fp32; on a GPU bf16 for bf16 weights and
  // TF32 for fp16 ones) | fp32 | bf16 (bf16 inputs, fp32 accumulation: a GPU's tensor cores, or a
  // CPU with AVX512-BF16 or AMX).
  std::string matmul = "auto";

  bool operator==(const PrecisionSpec&) const = default;
};

struct TrainingSpec {
  int64_t batch_size = 4;
  std::optional<int64_t> steps;  // exactly one of steps / epochs
  std::optional<int64_t> epochs;
  int64_t gradient_accumulation_steps = 1;  // anything else is rejected: see job_spec.cc
  bool activation_checkpointing = false;
  uint64_t seed = 1;
  int64_t eval_every = 0;  // 0: only at the end (when eval data exists)
  int64_t eval_batches = 8;
  // Sample generations at every evaluation (eval_every and the end, with or without eval data):
  // rank 0 continues each prompt greedily with the KV-cache generator (BOS + the prompt's tokens,
  // up to eval_max_new_tokens or the tokenizer's EOS) and logs the text as a job event. Up to 16
  // non-empty prompts; empty: none.
  std::vector<std::string> eval_prompts;
  int64_t eval_max_new_tokens = 32;  // 1..4096
  int64_t checkpoint_every = 0;      // 0: only at the end
  int64_t log_every = 10;

  bool operator==(const TrainingSpec&) const = default;
};

struct OutputSpec {
  std::string dir = "out/run";

  bool operator==(const OutputSpec&) const = default;
};

// resources.collective_timeout_seconds at most: a day.
inline constexpr int64_t kMaxCollectiveTimeoutSeconds = 86400;

struct ResourcesSpec {
  int64_t world_size = 1;
  // cpu | cuda: each rank on a GPU of its own (a worker daemon's --device N), its gradients
  // reduced over NCCL when world_size > 1 (worker/comm/device_aware_communicator.h).
  std::string device = "cpu";
  // How many times the coordinator restarts the job's gang after a failure that can be transient
  // (a crash, a lost worker, a collective timeout) before the job fails; each new attempt resumes
  // from the last committed checkpoint. `retries` is read as its former name.
  int64_t max_restarts = 3;
  // Bounds every collective of a gang (gradient all-reduce, loss totals, stop votes): a rank whose
  // peer stopped answering fails after this many seconds, naming the peer, and the gang restarts.
  // It must exceed the longest pause one rank takes alone (rank 0 scores multiple-choice
  // evaluations and writes checkpoints while its peers wait in the next collective). The
  // rendezvous is bounded by the larger of this and 10 minutes: ranks start minutes apart when
  // each first fetches the checkpoint to resume from.
  int64_t collective_timeout_seconds = 600;

  bool operator==(const ResourcesSpec&) const = default;
};

struct JobSpec {
  std::string name;
  int64_t priority = 0;
  ModelSpec model;
  TokenizerSpec tokenizer;
  DataSpec data;
  OptimizerSpec optimizer;
  PrecisionSpec precision;
  TrainingSpec training;
  OutputSpec output;
  ResourcesSpec resources;

  bool operator==(const JobSpec&) const = default;
};

// Parses YAML (or JSON) text, one document, UTF-8; `source` names it in errors. Absent keys and
// sections keep their defaults; null means "unset" for the optional fields and "empty" for
// sections and data.eval. Throws JobSpecError listing every problem found, never anything else:
// first every field that does not read as its type (unknown keys, wrong kinds), or, when all
// read, every value rule broken (a rule about a field that could not be read would mislead).
JobSpec parse_job_spec(const std::string& text, const std::string& source);
// The same text with "a.b.c=value" overrides (lomoctl --set, lomo-worker train --set) applied
// in order and the result validated once, at the end: overrides that depend on each other
// (data.format=chat with data.chat_template=llama-3) pass in either order. A problem in a field
// an override set names that override as its source; the others name `source` and their line.
JobSpec parse_job_spec(const std::string& text, const std::string& source,
                       const std::vector<std::string>& overrides);
// Reads and parses a file, with overrides as above; errors name `path` as their source. Throws
// JobSpecError.
JobSpec load_job_spec(const std::string& path, const std::vector<std::string>& overrides = {});
// Reads a whole spec file as text (for callers that pass the original text on). Throws
// JobSpecError naming `path`.
std::string read_job_spec_file(const std::string& path);
// Applies one "a.b.c=value" override (lomoctl --set): the value is parsed as YAML ("3e-4",
// "[a.txt, b.txt]", "null"), and the whole result is validated as parse_job_spec would. Naming a
// section ("optimizer.adalomo={eps1: 1e-29}") replaces it: its unnamed fields take their
// defaults. On error `spec` is unchanged. Throws JobSpecError.
void apply_job_spec_override(JobSpec& spec, const std::string& assignment);
// Applies several overrides in order and validates once, at the end: switching from
// training.steps to training.epochs passes through "both" or "neither", which a single override
// would reject. Each value is still type-checked as it is applied. On error `spec` is unchanged.
void apply_job_spec_overrides(JobSpec& spec, const std::vector<std::string>& assignments);
// Canonical YAML with every field in declaration order (unset optionals as null), so that
// parse_job_spec(job_spec_to_yaml(s), ...) == s for every spec parse_job_spec returns. Strings
// that are not valid UTF-8 (which parse never returns) come out with U+FFFD in their place. This
// is the form the coordinator stores and sends to workers.
std::string job_spec_to_yaml(const JobSpec& spec);
// The same canonical form as one line of JSON (which parse_job_spec also reads back to `spec`).
// Numbers are written as exact decimal text, so an integer keeps all 64 bits here; a JSON reader
// that holds numbers as doubles (google.protobuf.Struct) does not.
std::string job_spec_to_json(const JobSpec& spec);

}  // namespace lomo
