// The trainer→daemon protocol: everything a training child (`lomo-worker train`) tells whoever
// supervises it — totals, per-step metrics, evaluations, committed checkpoints and its outcome —
// as typed records, plus the exit codes of the train command. The supervisor decides what became
// of a job from these records and the exit code only; the child's stdout/stderr are for people
// (they become log events and the words of a failure reason) and no decision reads them.
//
// Channel: a file, named by `lomo-worker train JOB.yaml --protocol-file FILE` (the daemon uses
// <attempt dir>/protocol.jsonl, common/checkpoint_layout.h), created empty by the child and only
// appended to. A file rather than a pipe because
//   - the child never blocks on a slow reader (a full pipe would stall training),
//   - the reader sees every record after the child has exited (no race between a pipe's end of
//     file and the exit status), and the file stays in the attempt directory for a post-mortem,
//   - the daemon already follows files by offset; no extra descriptor crosses exec.
// Not metrics.jsonl: that file is the user's record of a run in output.dir, it has its own stable
// format, and the trainer rewrites it on resume (keeping the steps up to the checkpoint), which a
// channel must never do.
//
// Format: JSON lines, one record per line, each written with a single write(2) and a '\n'. Every
// record has "v" (the protocol version, kVersion) and "type":
//   {"v":1,"type":"started","total_steps":20,"first_step":0,"resumed_from":""}
//   {"v":1,"type":"metrics","step":3,"total_steps":20,"loss":2.5,"lr":0.001,"grad_norm":1.2,
//    "loss_scale":1,"skipped":false,"skipped_records":0,"tokens":512,"tokens_per_second":900.5,
//    "elapsed_seconds":1.7,"peak_memory_bytes":{"total":123,"weights":100}}
//   {"v":1,"type":"eval","step":20,"loss":3.1,"perplexity":22.2,"tokens":256,
//    "accuracy":0.75,"examples":4}               (accuracy/examples: multiple-choice eval only)
//   {"v":1,"type":"checkpoint","step":20,"dir":"/…/out/checkpoints/step-00000020"}
//   {"v":1,"type":"outcome","status":"succeeded","reason":"","steps_done":20,"total_steps":20}
//   (a failure that a collective with a peer caused adds "peer_rank":1)
// A run writes one "started" first and one "outcome" last (none if it crashed or was killed).
// Non-finite numbers (an fp16 overflow's grad_norm) are written as the strings "inf", "-inf" and
// "nan"; JSON has no literal for them.
// Compatibility: within a version a writer may add fields and readers ignore fields they do not
// know; a new record type, a removed or retyped field, or a changed meaning is a new version.
// A reader refuses versions it does not know: the trainer and daemon come from different builds.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>

namespace lomo::trainer_protocol {

inline constexpr int kVersion = 1;

// How a training run ended. Each status has exactly one exit code of `lomo-worker train`.
enum class Status {
  kSucceeded,    // every step ran; the final evaluation and checkpoint are written
  kFailed,       // an error of no kind below: a model or checkpoint that cannot be read, I/O...
  kBadSpec,      // the job spec cannot run (JobSpecError): retrying cannot help
  kBadData,      // the training or evaluation data cannot be used (file and line in the reason)
  kNonFinite,    // a non-finite gradient that no loss scaler could skip: the weights are unusable
  kInterrupted,  // SIGINT/SIGTERM: stopped after a step and a checkpoint; running again resumes
};

// The exit codes. 2 is a bad command line (no record is written: the channel may not be open).
enum ExitCode : int {
  kExitSucceeded = 0,
  kExitFailed = 1,
  kExitUsage = 2,
  kExitBadSpec = 3,
  kExitBadData = 4,
  kExitNonFinite = 5,
  kExitInterrupted = 6,
};

int exit_code_for(Status status);
// "succeeded", "failed", "bad_spec", "bad_data", "non_finite", "interrupted": the record's word.
std::string_view status_name(Status status);
std::optional<Status> status_from_name(std::string_view name);

struct Started {
  int64_t total_steps = 0;
  int64_t first_step = 0;    // the step a resumed run continues after; 0 for a fresh run
  std::string resumed_from;  // the checkpoint directory resumed from; empty for a fresh run
  bool operator==(const Started&) const = default;
};

struct Metrics {
  int64_t step = 0;  // 1-based
  int64_t total_steps = 0;
  double loss = 0.0;
  double lr = 0.0;
  double grad_norm = 0.0;
  double loss_scale = 1.0;
  bool skipped = false;         // fp16 overflow: the step changed no parameter
  int64_t skipped_records = 0;  // bad training records skipped at load
  int64_t tokens = 0;           // input positions of the step's batch, padding included
  double tokens_per_second = 0.0;
  double elapsed_seconds = 0.0;                      // since this run (not the job) started
  std::map<std::string, int64_t> peak_memory_bytes;  // by memory kind, and "total"
  // This rank's own figures for the step (every rank writes them, so a straggler shows):
  double step_seconds = 0.0;           // wall time of the step, forward to update
  double communication_seconds = 0.0;  // in collectives during the step, waiting included
  int64_t communication_bytes = 0;     // payload bytes this rank all-reduced in the step
  bool operator==(const Metrics&) const = default;
};

struct Eval {
  int64_t step = 0;
  double loss = 0.0;
  double perplexity = 0.0;
  int64_t tokens = 0;
  std::optional<double> accuracy;  // multiple-choice evaluation: fraction of `examples` right
  int64_t examples = 0;
  bool operator==(const Eval&) const = default;
};

struct Checkpoint {
  int64_t step = 0;
  std::string dir;  // the committed checkpoint directory, as the trainer named it
  bool operator==(const Checkpoint&) const = default;
};

struct Outcome {
  Status status = Status::kFailed;
  std::string reason;  // the error for a failure; empty on success
  int64_t steps_done = 0;
  int64_t total_steps = 0;
  // A failure caused by a collective with this peer rank (CommunicatorError::peer()): the peer's
  // own end is the likely cause. Written as "peer_rank" only when set (added within version 1).
  std::optional<int64_t> peer_rank = std::nullopt;
  bool operator==(const Outcome&) const = default;
};

using Record = std::variant<Started, Metrics, Eval, Checkpoint, Outcome>;

// A line that is not a record this reader knows. what() names the line ("trainer protocol line
// 3: ...") and quotes its start.
class ProtocolError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One record as its JSON line, '\n' included.
std::string to_line(const Record& record);
// One line (without its '\n') as a record. Throws ProtocolError for anything else: not JSON, no
// or an unknown "v", an unknown "type", a missing or mistyped field (named). `line_number` only
// labels the message.
Record parse_line(std::string_view line, int64_t line_number = 0);

// Writes records to the channel file. Each record is one write(2) of a whole line, so a reader
// following the file sees either nothing or a whole line per record (and a torn last line only
// if the writer died inside the call).
class ProtocolWriter {
 public:
  // Creates (or empties) `file`. Throws std::runtime_error naming it when it cannot.
  explicit ProtocolWriter(const std::filesystem::path& file);
  ~ProtocolWriter();
  ProtocolWriter(const ProtocolWriter&) = delete;
  ProtocolWriter& operator=(const ProtocolWriter&) = delete;

  // Throws std::runtime_error naming the file when the write fails.
  void write(const Record& record);

 private:
  std::filesystem::path file_;
  int fd_ = -1;
};

// Turns a byte stream (the channel file read in arbitrary pieces) into records.
class ProtocolReader {
 public:
  // Appends `bytes` and hands each complete line's record to `on_record`, in order. A partial last
  // line is kept until its '\n' arrives. On a bad line: the records before it are delivered, the
  // line is consumed, and ProtocolError is thrown; a later call goes on after it.
  void feed(std::string_view bytes, const std::function<void(Record)>& on_record);
  // Bytes of a line still waiting for its '\n' (at the end of a run: the writer died mid-line).
  size_t pending_bytes() const { return pending_.size(); }
  int64_t lines_read() const { return line_number_; }

 private:
  std::string pending_;
  int64_t line_number_ = 0;
};

}  // namespace lomo::trainer_protocol
