#include "common/trainer_protocol.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "common/fd_io.h"

namespace lomo::trainer_protocol {
namespace {

using nlohmann::json;
// Written in the order given, so that every line starts with "v" and "type" for a person reading
// the file; readers do not depend on the order.
using ordered_json = nlohmann::ordered_json;

struct StatusWords {
  Status status;
  std::string_view name;
  int exit_code;
};

constexpr std::array<StatusWords, 6> kStatuses = {{
    {Status::kSucceeded, "succeeded", kExitSucceeded},
    {Status::kFailed, "failed", kExitFailed},
    {Status::kBadSpec, "bad_spec", kExitBadSpec},
    {Status::kBadData, "bad_data", kExitBadData},
    {Status::kNonFinite, "non_finite", kExitNonFinite},
    {Status::kInterrupted, "interrupted", kExitInterrupted},
}};

const StatusWords& words_of(Status status) {
  for (const StatusWords& w : kStatuses) {
    if (w.status == status) return w;
  }
  return kStatuses[1];  // unreachable for a valid enumerator
}

// JSON has no literal for inf or NaN: they travel as strings.
ordered_json number(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return value;
}

// A line being parsed: field access that names the line and the field in its errors.
class LineReader {
 public:
  LineReader(const json& object, int64_t line_number, std::string_view line)
      : object_(object), line_number_(line_number), line_(line) {}

  [[noreturn]] void fail(const std::string& problem) const {
    constexpr size_t kQuoted = 80;
    std::string quote(line_.substr(0, kQuoted));
    if (line_.size() > kQuoted) quote += "…";
    throw ProtocolError("trainer protocol line " + std::to_string(line_number_) + ": " + problem +
                        " (the line: '" + quote + "')");
  }

  const json& field(const char* name) const {
    const auto it = object_.find(name);
    if (it == object_.end()) fail(std::string("field '") + name + "' is missing");
    return *it;
  }
  int64_t integer(const char* name) const {
    const json& value = field(name);
    if (!value.is_number_integer()) fail(std::string("field '") + name + "' is not an integer");
    return value.get<int64_t>();
  }
  double real(const char* name) const {
    const json& value = field(name);
    if (value.is_number()) return value.get<double>();
    if (value == "inf") return std::numeric_limits<double>::infinity();
    if (value == "-inf") return -std::numeric_limits<double>::infinity();
    if (value == "nan") return std::numeric_limits<double>::quiet_NaN();
    fail(std::string("field '") + name + "' is not a number");
  }
  bool boolean(const char* name) const {
    const json& value = field(name);
    if (!value.is_boolean()) fail(std::string("field '") + name + "' is not true or false");
    return value.get<bool>();
  }
  std::string text(const char* name) const {
    const json& value = field(name);
    if (!value.is_string()) fail(std::string("field '") + name + "' is not a string");
    return value.get<std::string>();
  }
  bool has(const char* name) const { return object_.contains(name); }

 private:
  const json& object_;
  int64_t line_number_;
  std::string_view line_;
};

ordered_json to_json(const Started& r) {
  return {{"type", "started"},
          {"total_steps", r.total_steps},
          {"first_step", r.first_step},
          {"resumed_from", r.resumed_from}};
}

ordered_json to_json(const Metrics& r) {
  return {{"type", "metrics"},
          {"step", r.step},
          {"total_steps", r.total_steps},
          {"loss", number(r.loss)},
          {"lr", number(r.lr)},
          {"grad_norm", number(r.grad_norm)},
          {"loss_scale", number(r.loss_scale)},
          {"skipped", r.skipped},
          {"skipped_records", r.skipped_records},
          {"tokens", r.tokens},
          {"tokens_per_second", number(r.tokens_per_second)},
          {"elapsed_seconds", number(r.elapsed_seconds)},
          {"peak_memory_bytes", r.peak_memory_bytes},
          {"step_seconds", number(r.step_seconds)},
          {"communication_seconds", number(r.communication_seconds)},
          {"communication_bytes", r.communication_bytes}};
}

ordered_json to_json(const Eval& r) {
  ordered_json j = {{"type", "eval"},
                    {"step", r.step},
                    {"loss", number(r.loss)},
                    {"perplexity", number(r.perplexity)},
                    {"tokens", r.tokens}};
  if (r.accuracy) {
    j["accuracy"] = number(*r.accuracy);
    j["examples"] = r.examples;
  }
  return j;
}

ordered_json to_json(const Checkpoint& r) {
  return {{"type", "checkpoint"}, {"step", r.step}, {"dir", r.dir}};
}

ordered_json to_json(const Outcome& r) {
  ordered_json record = {{"type", "outcome"},
                         {"status", status_name(r.status)},
                         {"reason", r.reason},
                         {"steps_done", r.steps_done},
                         {"total_steps", r.total_steps}};
  if (r.peer_rank) record["peer_rank"] = *r.peer_rank;
  return record;
}

Started read_started(const LineReader& in) {
  return {in.integer("total_steps"), in.integer("first_step"), in.text("resumed_from")};
}

Metrics read_metrics(const LineReader& in) {
  Metrics r;
  r.step = in.integer("step");
  r.total_steps = in.integer("total_steps");
  r.loss = in.real("loss");
  r.lr = in.real("lr");
  r.grad_norm = in.real("grad_norm");
  r.loss_scale = in.real("loss_scale");
  r.skipped = in.boolean("skipped");
  r.skipped_records = in.integer("skipped_records");
  r.tokens = in.integer("tokens");
  r.tokens_per_second = in.real("tokens_per_second");
  r.elapsed_seconds = in.real("elapsed_seconds");
  const json& memory = in.field("peak_memory_bytes");
  if (!memory.is_object()) in.fail("field 'peak_memory_bytes' is not an object");
  for (const auto& [kind, bytes] : memory.items()) {
    if (!bytes.is_number_integer()) in.fail("field 'peak_memory_bytes." + kind + "' is not bytes");
    r.peak_memory_bytes[kind] = bytes.get<int64_t>();
  }
  // Added with data parallelism (issue 9): a line from an earlier trainer has none of them.
  if (in.has("step_seconds")) r.step_seconds = in.real("step_seconds");
  if (in.has("communication_seconds")) r.communication_seconds = in.real("communication_seconds");
  if (in.has("communication_bytes")) r.communication_bytes = in.integer("communication_bytes");
  return r;
}

Eval read_eval(const LineReader& in) {
  Eval r;
  r.step = in.integer("step");
  r.loss = in.real("loss");
  r.perplexity = in.real("perplexity");
  r.tokens = in.integer("tokens");
  if (in.has("accuracy")) {
    r.accuracy = in.real("accuracy");
    r.examples = in.integer("examples");
  }
  return r;
}

Checkpoint read_checkpoint(const LineReader& in) { return {in.integer("step"), in.text("dir")}; }

Outcome read_outcome(const LineReader& in) {
  Outcome r;
  const std::string status = in.text("status");
  const std::optional<Status> known = status_from_name(status);
  if (!known) in.fail("unknown outcome status '" + status + "'");
  r.status = *known;
  r.reason = in.text("reason");
  r.steps_done = in.integer("steps_done");
  r.total_steps = in.integer("total_steps");
  if (in.has("peer_rank")) r.peer_rank = in.integer("peer_rank");
  return r;
}

}  // namespace

int exit_code_for(Status status) { return words_of(status).exit_code; }

std::string_view status_name(Status status) { return words_of(status).name; }

std::optional<Status> status_from_name(std::string_view name) {
  for (const StatusWords& w : kStatuses) {
    if (w.name == name) return w.status;
  }
  return std::nullopt;
}

std::string to_line(const Record& record) {
  ordered_json line = {{"v", kVersion}};
  line.update(std::visit([](const auto& r) { return to_json(r); }, record));
  // Reasons quote the trainer's inputs (file names, dataset text), which need not be UTF-8: the
  // bytes that are not become U+FFFD instead of an exception that would lose the outcome.
  return line.dump(-1, ' ', false, ordered_json::error_handler_t::replace) + "\n";
}

Record parse_line(std::string_view line, int64_t line_number) {
  const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  const LineReader in(j, line_number, line);
  if (!j.is_object()) in.fail("not a JSON object");
  const json& version = in.field("v");
  if (!version.is_number_integer()) in.fail("field 'v' (the protocol version) is not an integer");
  if (version.get<int64_t>() != kVersion) {
    in.fail("protocol version " + version.dump() + " is not supported (this reader knows version " +
            std::to_string(kVersion) +
            "); the trainer and its supervisor come from different builds");
  }
  const std::string type = in.text("type");
  if (type == "started") return read_started(in);
  if (type == "metrics") return read_metrics(in);
  if (type == "eval") return read_eval(in);
  if (type == "checkpoint") return read_checkpoint(in);
  if (type == "outcome") return read_outcome(in);
  in.fail("unknown record type '" + type + "'");
}

ProtocolWriter::ProtocolWriter(const std::filesystem::path& file) : file_(file) {
  fd_ = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw std::runtime_error("cannot create the trainer protocol file " + file.string() + ": " +
                             std::strerror(errno));
  }
}

ProtocolWriter::~ProtocolWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void ProtocolWriter::write(const Record& record) {
  const std::string line = to_line(record);
  // One call for the whole line; a regular file takes it whole unless the disk is full, and a
  // short write is finished rather than left torn.
  if (!write_all(fd_, line)) {
    throw std::runtime_error("cannot write to the trainer protocol file " + file_.string() + ": " +
                             std::strerror(errno));
  }
}

void ProtocolReader::feed(std::string_view bytes, const std::function<void(Record)>& on_record) {
  pending_.append(bytes);
  size_t start = 0;
  for (size_t newline; (newline = pending_.find('\n', start)) != std::string::npos;) {
    const std::string line = pending_.substr(start, newline - start);
    start = newline + 1;
    ++line_number_;
    Record record;
    try {
      record = parse_line(line, line_number_);
    } catch (const ProtocolError&) {
      pending_.erase(0, start);
      throw;
    }
    on_record(std::move(record));
  }
  pending_.erase(0, start);
}

}  // namespace lomo::trainer_protocol
