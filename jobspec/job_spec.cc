#include "jobspec/job_spec.h"

#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <map>
#include <sstream>
#include <string_view>
#include <type_traits>

#include "common/printable.h"
#include "common/read_file.h"

namespace lomo {
namespace {

// ---------------------------------------------------------------------------------------------
// Text helpers for messages.

// Values are quoted back to the user, cut and escaped (common/printable.h).
std::string printable(std::string_view text) { return printable_excerpt(text, 80); }

std::string in_quotes(std::string_view text) { return "\"" + printable(text) + "\""; }

// Shortest text that reads back as the same double, so that job_spec_to_yaml round-trips and
// messages show "0.1" rather than "0.10000000000000001".
std::string number_text(double value) {
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return std::string(buffer, result.ptr);
}

std::string join(std::initializer_list<std::string_view> words) {
  std::string out;
  for (std::string_view word : words) {
    if (!out.empty()) out += ", ";
    out += word;
  }
  return out;
}

std::string child_path(const std::string& parent, std::string_view key) {
  return parent.empty() ? std::string(key) : parent + "." + std::string(key);
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF): the emitter replaces
// anything else with U+FFFD, which would break the round trip, and downstream consumers (JSON,
// protobuf strings) reject it anyway.
bool is_valid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    size_t length = 0;
    uint32_t code = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0u) == 0xc0u) {
      length = 2;
      code = c & 0x1fu;
    } else if ((c & 0xf0u) == 0xe0u) {
      length = 3;
      code = c & 0x0fu;
    } else if ((c & 0xf8u) == 0xf0u) {
      length = 4;
      code = c & 0x07u;
    } else {
      return false;
    }
    if (i + length > text.size()) return false;
    for (size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xc0u) != 0x80u) return false;
      code = (code << 6) | (next & 0x3fu);
    }
    constexpr uint32_t kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < kSmallest[length] || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) {
      return false;
    }
    i += length;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Reading: shapes and types. Value rules live in validate(), which sees the whole spec.

// One parse: where problems are collected, and where each field was written so that validate()
// can point at its line. Every problem is kept (one per field: a second complaint about a field
// adds nothing), so that the user fixes them all in one round.
class Context {
 public:
  Context(std::string source, bool report_lines)
      : source_(std::move(source)), report_lines_(report_lines) {}

  const std::string& source() const { return source_; }

  void remember(const std::string& path, const YAML::Node& node) {
    if (report_lines_) marks_[path] = node.Mark();
  }

  // `field` (a path, possibly a whole section) now holds what override `source` wrote: problems
  // under it name the override, and the lines of the text no longer apply to it.
  void set_by(const std::string& field, const std::string& source) {
    for (auto it = marks_.begin(); it != marks_.end();) {
      it = is_under(it->first, field) ? marks_.erase(it) : std::next(it);
    }
    std::erase_if(set_by_, [&](const auto& entry) { return is_under(entry.first, field); });
    set_by_.emplace_back(field, source);
  }

  void report(const std::string& path, const std::string& message) {
    const bool known = std::any_of(problems_.begin(), problems_.end(),
                                   [&](const JobSpecProblem& p) { return p.field == path; });
    if (known) return;
    const auto it = marks_.find(path);
    const std::string line = it == marks_.end() || it->second.line < 0
                                 ? ""
                                 : " (line " + std::to_string(it->second.line + 1) + ")";
    problems_.push_back({source_of(path), path, message + line});
  }

  // Throws one JobSpecError with every problem reported so far.
  void throw_if_any() const {
    if (!problems_.empty()) throw JobSpecError(problems_);
  }

 private:
  // `path` is `field` or inside it ("optimizer.adalomo.eps1" in "optimizer.adalomo",
  // "data.train[0]" in "data.train").
  static bool is_under(const std::string& path, const std::string& field) {
    if (path.compare(0, field.size(), field) != 0) return false;
    return path.size() == field.size() || path[field.size()] == '.' || path[field.size()] == '[';
  }

  const std::string& source_of(const std::string& path) const {
    for (auto it = set_by_.rbegin(); it != set_by_.rend(); ++it) {
      if (is_under(path, it->first)) return it->second;
    }
    return source_;
  }

  std::string source_;
  // Off for overrides: their nodes are built in memory and have no lines.
  bool report_lines_;
  std::map<std::string, YAML::Mark> marks_;
  std::vector<std::pair<std::string, std::string>> set_by_;  // field, override, in order
  std::vector<JobSpecProblem> problems_;
};

// yaml-cpp tags plain scalars "?", quoted ones "!", and nodes built in memory "". Only plain
// scalars may be numbers or booleans: "3e-4" in quotes is a string, in YAML as in JSON.
bool is_plain(const YAML::Node& node) { return node.Tag() == "?" || node.Tag().empty(); }

// What a node is, for "expected X, got Y".
std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
      return "null";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Scalar:
      if (node.Tag() == "!") return "the string " + in_quotes(node.Scalar());
      if (!is_plain(node)) return printable(node.Scalar()) + " tagged " + printable(node.Tag());
      return printable(node.Scalar());
    default:
      return "nothing";
  }
}

// YAML 1.2 core schema: [-+]?[0-9]+. Hex, octal and underscores are left out on purpose: nobody
// writes a step count that way, and a typo should not silently become a number.
bool is_decimal_integer(std::string_view text) {
  if (!text.empty() && (text[0] == '-' || text[0] == '+')) text.remove_prefix(1);
  return !text.empty() &&
         std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// YAML 1.2 core schema floats: [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
bool is_decimal_float(std::string_view text) {
  size_t i = 0;
  auto digits = [&] {
    const size_t start = i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') ++i;
    return i - start;
  };
  if (i < text.size() && (text[i] == '-' || text[i] == '+')) ++i;
  size_t mantissa = digits();
  if (i < text.size() && text[i] == '.') {
    ++i;
    mantissa += digits();
  }
  if (mantissa == 0) return false;
  if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    if (i < text.size() && (text[i] == '-' || text[i] == '+')) ++i;
    if (digits() == 0) return false;
  }
  return i == text.size();
}

bool is_inf_or_nan(std::string_view text) {
  if (!text.empty() && (text[0] == '-' || text[0] == '+')) text.remove_prefix(1);
  return text == ".inf" || text == ".Inf" || text == ".INF" || text == ".nan" || text == ".NaN" ||
         text == ".NAN";
}

// A map section with a fixed set of keys. Construction reports anything but a map (null or
// absent means "all defaults"; another kind, "no keys"), unknown keys, duplicate keys and keys
// that are not strings, and keeps the rest. read() leaves a field at its default when the key is
// absent or its value is reported as unreadable.
class Section {
 public:
  // `node` is null when the section is absent.
  Section(Context& context, std::string path, const YAML::Node* node,
          std::initializer_list<std::string_view> keys)
      : context_(context), path_(std::move(path)) {
    if (node == nullptr || node->IsNull()) return;
    load(*node, keys);
  }

  Section section(std::string_view key, std::initializer_list<std::string_view> keys) {
    return Section(context_, path(key), find(key), keys);
  }

  bool has(std::string_view key) const { return find(key) != nullptr; }
  void report(std::string_view key, const std::string& message) {
    context_.report(path(key), message);
  }

  void read(std::string_view key, std::string& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    if (auto value = as_string(path(key), *node)) out = std::move(*value);
  }

  void read(std::string_view key, bool& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    const std::string text = node->IsScalar() && is_plain(*node) ? node->Scalar() : "";
    if (text == "true" || text == "True" || text == "TRUE") {
      out = true;
    } else if (text == "false" || text == "False" || text == "FALSE") {
      out = false;
    } else {
      context_.report(path(key), "expected true or false, got " + describe(*node));
    }
  }

  void read(std::string_view key, int64_t& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    if (const auto value = as_int64(path(key), *node)) out = *value;
  }

  void read(std::string_view key, uint64_t& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    const std::string field = path(key);
    if (!node->IsScalar() || !is_plain(*node) || !is_decimal_integer(node->Scalar()) ||
        node->Scalar()[0] == '-') {
      return context_.report(field, "expected a non-negative integer, got " + describe(*node));
    }
    std::string_view text = node->Scalar();
    if (text[0] == '+') text.remove_prefix(1);
    uint64_t value = 0;
    const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
    if (result.ec != std::errc() || result.ptr != text.data() + text.size()) {
      return context_.report(field,
                             "out of range (at most 18446744073709551615), got " + describe(*node));
    }
    out = value;
  }

  void read(std::string_view key, double& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    if (const auto value = as_double(path(key), *node)) out = *value;
  }

  void read(std::string_view key, std::optional<int64_t>& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    if (node->IsNull()) {
      out = std::nullopt;
    } else if (const auto value = as_int64(path(key), *node)) {
      out = *value;
    }
  }

  void read(std::string_view key, std::optional<std::string>& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    if (node->IsNull()) {
      out = std::nullopt;
    } else if (auto value = as_string(path(key), *node)) {
      out = std::move(*value);
    }
  }

  void read(std::string_view key, std::optional<double>& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    if (node->IsNull()) {
      out = std::nullopt;
    } else if (const auto value = as_double(path(key), *node)) {
      out = *value;
    }
  }

  // A list of strings; a single string is the one-element list, null the empty one.
  void read(std::string_view key, std::vector<std::string>& out) {
    const YAML::Node* node = find(key);
    if (node == nullptr) return;
    const std::string field = path(key);
    std::vector<std::string> values;
    bool readable = true;
    auto add = [&](const std::string& element, const YAML::Node& item) {
      auto value = as_string(element, item);
      readable = readable && value.has_value();
      if (value) values.push_back(std::move(*value));
    };
    if (node->IsScalar()) {
      add(field, *node);
    } else if (node->IsSequence()) {
      for (size_t i = 0; i < node->size(); ++i) {
        const std::string element = field + "[" + std::to_string(i) + "]";
        const YAML::Node item = (*node)[i];
        context_.remember(element, item);
        add(element, item);
      }
    } else if (!node->IsNull()) {
      return context_.report(field, "expected a list of strings, got " + describe(*node));
    }
    if (readable) out = std::move(values);
  }

 private:
  void load(const YAML::Node& node, std::initializer_list<std::string_view> keys) {
    if (!node.IsMap()) {
      return context_.report(
          path_, std::string(path_.empty() ? "expected a map of sections" : "expected a map") +
                     " (keys: " + join(keys) + "), got " + describe(node));
    }
    for (auto it = node.begin(); it != node.end(); ++it) {
      const YAML::Node key = it->first;
      if (!key.IsScalar()) {
        context_.remember(path_, key);
        context_.report(path_, "keys must be strings, got " + describe(key));
        continue;
      }
      const std::string& name = key.Scalar();
      const std::string field = child_path(path_, name);
      if (std::find(keys.begin(), keys.end(), name) == keys.end()) {
        context_.remember(field, key);
        context_.report(field, "unknown key (known: " + join(keys) + ")");
        continue;
      }
      // yaml-cpp keeps both entries of a repeated key and lookups would silently use the first.
      const bool seen = std::any_of(entries_.begin(), entries_.end(),
                                    [&](const auto& entry) { return entry.first == name; });
      context_.remember(field, key);
      if (seen) {
        context_.report(field, "duplicate key");
        continue;
      }
      entries_.emplace_back(name, it->second);
    }
  }

  std::string path(std::string_view key) const { return child_path(path_, key); }

  // The value under `key`, or null when the key is absent.
  const YAML::Node* find(std::string_view key) const {
    for (const auto& [name, value] : entries_) {
      if (name == key) return &value;
    }
    return nullptr;
  }

  // Each as_*() reports why `node` is not of its type and returns nothing, or returns the value.
  std::optional<std::string> as_string(const std::string& field, const YAML::Node& node) const {
    // Any scalar is a string (a file may be called 2024 or true); null is not, so that "path:"
    // with the value forgotten is an error rather than an empty path.
    if (!node.IsScalar()) {
      context_.report(field, "expected a string, got " + describe(node) +
                                 (node.IsNull() ? " (write \"\" for an empty string)" : ""));
      return std::nullopt;
    }
    const std::string& text = node.Scalar();
    if (!is_valid_utf8(text)) {
      context_.report(field, "not valid UTF-8 text");
      return std::nullopt;
    }
    // A NUL would silently cut a path short when it reaches the operating system.
    if (text.find('\0') != std::string::npos) {
      context_.report(field, "contains a NUL character");
      return std::nullopt;
    }
    return text;
  }

  std::optional<int64_t> as_int64(const std::string& field, const YAML::Node& node) const {
    if (!node.IsScalar() || !is_plain(node) || !is_decimal_integer(node.Scalar())) {
      context_.report(field, "expected an integer, got " + describe(node));
      return std::nullopt;
    }
    std::string_view text = node.Scalar();
    if (text[0] == '+') text.remove_prefix(1);
    int64_t value = 0;
    const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
    if (result.ec != std::errc() || result.ptr != text.data() + text.size()) {
      context_.report(field, "out of the 64-bit integer range, got " + describe(node));
      return std::nullopt;
    }
    return value;
  }

  std::optional<double> as_double(const std::string& field, const YAML::Node& node) const {
    if (node.IsScalar() && is_plain(node) && is_inf_or_nan(node.Scalar())) {
      context_.report(field, "must be a finite number, got " + describe(node));
      return std::nullopt;
    }
    if (!node.IsScalar() || !is_plain(node) || !is_decimal_float(node.Scalar())) {
      context_.report(field, "expected a number, got " + describe(node));
      return std::nullopt;
    }
    std::string_view text = node.Scalar();
    if (text[0] == '+') text.remove_prefix(1);
    double value = 0;
    const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
    // from_chars reports overflow and underflow alike; both mean the number is not usable.
    if (result.ec != std::errc() || result.ptr != text.data() + text.size() ||
        !std::isfinite(value)) {
      context_.report(field, "out of the double-precision range, got " + describe(node));
      return std::nullopt;
    }
    return value;
  }

  Context& context_;
  std::string path_;
  std::vector<std::pair<std::string, YAML::Node>> entries_;
};

// resources.max_restarts, or `retries`, its name until restarts existed: every canonical spec
// stored before then says "retries: 0" (a job that was never restarted), and a coordinator must
// still restore those jobs. Both at once is ambiguous and refused.
void read_max_restarts(Section& resources, ResourcesSpec& out) {
  if (resources.has("retries") && resources.has("max_restarts")) {
    resources.report("retries", "renamed to resources.max_restarts; give only max_restarts");
    return;
  }
  resources.read(resources.has("retries") ? "retries" : "max_restarts", out.max_restarts);
}

JobSpec read_spec(Context& context, const YAML::Node& root) {
  JobSpec spec;
  Section top(context, "", &root,
              {"name", "priority", "model", "tokenizer", "data", "optimizer", "precision",
               "training", "output", "resources"});
  top.read("name", spec.name);
  top.read("priority", spec.priority);

  Section model = top.section("model", {"path"});
  model.read("path", spec.model.path);

  Section tokenizer = top.section("tokenizer", {"kind", "path"});
  tokenizer.read("kind", spec.tokenizer.kind);
  tokenizer.read("path", spec.tokenizer.path);

  Section data = top.section(
      "data", {"format", "train", "eval", "eval_format", "max_length", "chat_template",
               "train_on_prompt", "packing", "shuffle", "token_dtype", "on_bad_record"});
  data.read("format", spec.data.format);
  data.read("train", spec.data.train);
  data.read("eval", spec.data.eval);
  data.read("eval_format", spec.data.eval_format);
  data.read("max_length", spec.data.max_length);
  data.read("chat_template", spec.data.chat_template);
  data.read("train_on_prompt", spec.data.train_on_prompt);
  data.read("packing", spec.data.packing);
  data.read("shuffle", spec.data.shuffle);
  data.read("token_dtype", spec.data.token_dtype);
  data.read("on_bad_record", spec.data.on_bad_record);

  OptimizerSpec& o = spec.optimizer;
  Section optimizer = top.section(
      "optimizer", {"name", "lr", "schedule", "warmup_steps", "warmup_ratio", "weight_decay",
                    "weight_decay_on_norms", "clip_grad_norm", "clip_grad_value",
                    "stochastic_rounding", "beta1", "beta2", "eps", "adalomo"});
  optimizer.read("name", o.name);
  optimizer.read("lr", o.lr);
  optimizer.read("schedule", o.schedule);
  optimizer.read("warmup_steps", o.warmup_steps);
  optimizer.read("warmup_ratio", o.warmup_ratio);
  optimizer.read("weight_decay", o.weight_decay);
  optimizer.read("weight_decay_on_norms", o.weight_decay_on_norms);
  optimizer.read("clip_grad_norm", o.clip_grad_norm);
  optimizer.read("clip_grad_value", o.clip_grad_value);
  optimizer.read("stochastic_rounding", o.stochastic_rounding);
  optimizer.read("beta1", o.beta1);
  optimizer.read("beta2", o.beta2);
  optimizer.read("eps", o.eps);
  Section adalomo = optimizer.section("adalomo", {"eps1", "eps2", "clip_threshold", "decay_rate"});
  adalomo.read("eps1", o.adalomo.eps1);
  adalomo.read("eps2", o.adalomo.eps2);
  adalomo.read("clip_threshold", o.adalomo.clip_threshold);
  adalomo.read("decay_rate", o.adalomo.decay_rate);

  Section precision = top.section("precision", {"dtype", "loss_scale", "matmul"});
  precision.read("dtype", spec.precision.dtype);
  precision.read("matmul", spec.precision.matmul);
  LossScaleSpec& s = spec.precision.loss_scale;
  Section loss_scale =
      precision.section("loss_scale", {"initial", "growth_interval", "factor", "min"});
  loss_scale.read("initial", s.initial);
  loss_scale.read("growth_interval", s.growth_interval);
  loss_scale.read("factor", s.factor);
  loss_scale.read("min", s.min);

  TrainingSpec& t = spec.training;
  Section training = top.section(
      "training", {"batch_size", "steps", "epochs", "gradient_accumulation_steps",
                   "activation_checkpointing", "seed", "eval_every", "eval_batches", "eval_prompts",
                   "eval_max_new_tokens", "checkpoint_every", "log_every"});
  training.read("batch_size", t.batch_size);
  training.read("steps", t.steps);
  training.read("epochs", t.epochs);
  training.read("gradient_accumulation_steps", t.gradient_accumulation_steps);
  training.read("activation_checkpointing", t.activation_checkpointing);
  training.read("seed", t.seed);
  training.read("eval_every", t.eval_every);
  training.read("eval_batches", t.eval_batches);
  training.read("eval_prompts", t.eval_prompts);
  training.read("eval_max_new_tokens", t.eval_max_new_tokens);
  training.read("checkpoint_every", t.checkpoint_every);
  training.read("log_every", t.log_every);

  Section output = top.section("output", {"dir"});
  output.read("dir", spec.output.dir);

  Section resources = top.section("resources", {"world_size", "device", "max_restarts", "retries",
                                                "collective_timeout_seconds"});
  resources.read("world_size", spec.resources.world_size);
  resources.read("device", spec.resources.device);
  read_max_restarts(resources, spec.resources);
  resources.read("collective_timeout_seconds", spec.resources.collective_timeout_seconds);
  return spec;
}

// ---------------------------------------------------------------------------------------------
// Validation: value rules, in the order the fields are declared; every broken rule is reported.

// training.eval_prompts / eval_max_new_tokens: bounded, since every evaluation generates them all
// on rank 0 while the other ranks wait.
void validate_eval_samples(Context& c, const TrainingSpec& t) {
  constexpr size_t kMaxPrompts = 16;
  constexpr int64_t kMaxNewTokens = 4096;
  if (t.eval_prompts.size() > kMaxPrompts) {
    c.report("training.eval_prompts", "at most " + std::to_string(kMaxPrompts) + " prompts, got " +
                                          std::to_string(t.eval_prompts.size()));
  }
  for (size_t i = 0; i < t.eval_prompts.size(); ++i) {
    if (t.eval_prompts[i].empty()) {
      c.report("training.eval_prompts[" + std::to_string(i) + "]", "must be a non-empty prompt");
    }
  }
  if (t.eval_max_new_tokens < 1 || t.eval_max_new_tokens > kMaxNewTokens) {
    c.report("training.eval_max_new_tokens", "must be in [1, " + std::to_string(kMaxNewTokens) +
                                                 "], got " + std::to_string(t.eval_max_new_tokens));
  }
}

void at_least(Context& c, const std::string& path, int64_t value, int64_t minimum) {
  if (value < minimum) {
    c.report(path, "must be >= " + std::to_string(minimum) + ", got " + std::to_string(value));
  }
}

void positive(Context& c, const std::string& path, double value) {
  if (!(value > 0)) c.report(path, "must be > 0, got " + number_text(value));
}

void non_negative(Context& c, const std::string& path, double value) {
  if (!(value >= 0)) c.report(path, "must be >= 0, got " + number_text(value));
}

// [0, 1): a probability-like coefficient where 1 would stop the quantity from ever changing.
void unit_interval(Context& c, const std::string& path, double value) {
  if (!(value >= 0 && value < 1)) c.report(path, "must be in [0, 1), got " + number_text(value));
}

void one_of(Context& c, const std::string& path, const std::string& value,
            std::initializer_list<std::string_view> allowed) {
  if (std::find(allowed.begin(), allowed.end(), value) == allowed.end()) {
    c.report(path, "must be one of " + join(allowed) + "; got " + in_quotes(value));
  }
}

void validate(Context& c, const JobSpec& spec) {
  if (spec.model.path.empty()) {
    c.report("model.path", "required: the Hugging Face checkpoint directory to fine-tune");
  }
  one_of(c, "tokenizer.kind", spec.tokenizer.kind, {"bytes", "auto"});

  const DataSpec& d = spec.data;
  if (d.format == "multiple_choice") {
    c.report("data.format",
             "multiple_choice is an evaluation format: set data.eval_format: multiple_choice and "
             "train on another format");
  }
  one_of(c, "data.format", d.format,
         {"text", "jsonl_text", "alpaca", "prompt_completion", "chat", "tokens"});
  if (d.train.empty()) c.report("data.train", "required: a non-empty list of training files");
  for (const auto& [list, paths] : {std::pair{"data.train", &d.train}, {"data.eval", &d.eval}}) {
    for (size_t i = 0; i < paths->size(); ++i) {
      if ((*paths)[i].empty()) {
        c.report(std::string(list) + "[" + std::to_string(i) + "]", "must be a non-empty path");
      }
    }
  }
  if (d.eval_format) {
    one_of(
        c, "data.eval_format", *d.eval_format,
        {"text", "jsonl_text", "alpaca", "prompt_completion", "chat", "tokens", "multiple_choice"});
  }
  // A training row needs at least one input token and the token that follows it.
  at_least(c, "data.max_length", d.max_length, 2);
  const bool chat = d.format == "chat" || d.eval_format == "chat";
  if (d.chat_template) {
    one_of(c, "data.chat_template", *d.chat_template, {"auto", "llama-2", "llama-3", "chatml"});
    if (!chat) {
      c.report("data.chat_template",
               "only used with data.format (or data.eval_format) chat; got format " +
                   in_quotes(d.format));
    }
  }  // absent means auto: the model's own tokenizer_config.json chat_template (checked by the
     // worker, which has the model directory)
  if (chat && spec.tokenizer.kind == "bytes") {
    c.report("tokenizer.kind",
             "bytes has no special tokens, which chat templates need: use auto with a model "
             "directory that holds tokenizer files");
  }
  const bool has_prompt =
      d.format == "alpaca" || d.format == "prompt_completion" || d.format == "chat";
  if (d.train_on_prompt && !has_prompt) {
    c.report("data.train_on_prompt",
             "only used with formats alpaca, prompt_completion and chat; format " +
                 in_quotes(d.format) + " trains on every token");
  }
  if (d.packing && (d.format == "text" || d.format == "tokens")) {
    c.report("data.packing", "format " + in_quotes(d.format) +
                                 " already fills every row from one token stream; packing applies "
                                 "to the JSONL formats");
  }
  // A packed batch draws a varying number of samples on each rank, so each rank's data position
  // differs, and a checkpoint keeps only rank 0's: a resume would shift the other ranks' data.
  if (d.packing && spec.resources.world_size > 1) {
    c.report("data.packing",
             "not available with resources.world_size > 1 yet (a checkpoint keeps "
             "one data position, and packed ranks each have their own)");
  }
  one_of(c, "data.token_dtype", d.token_dtype, {"uint16", "uint32"});
  one_of(c, "data.on_bad_record", d.on_bad_record, {"fail", "skip"});

  const OptimizerSpec& o = spec.optimizer;
  one_of(c, "optimizer.name", o.name, {"lomo", "adalomo", "sgd", "adamw"});
  positive(c, "optimizer.lr", o.lr);
  one_of(c, "optimizer.schedule", o.schedule, {"constant", "linear", "cosine"});
  at_least(c, "optimizer.warmup_steps", o.warmup_steps, 0);
  unit_interval(c, "optimizer.warmup_ratio", o.warmup_ratio);
  if (o.warmup_steps > 0 && o.warmup_ratio > 0) {
    c.report("optimizer.warmup_ratio",
             "set only one of optimizer.warmup_steps and optimizer.warmup_ratio");
  }
  non_negative(c, "optimizer.weight_decay", o.weight_decay);
  if (o.clip_grad_norm) positive(c, "optimizer.clip_grad_norm", *o.clip_grad_norm);
  if (o.clip_grad_value) positive(c, "optimizer.clip_grad_value", *o.clip_grad_value);
  if (o.stochastic_rounding && spec.precision.dtype != "bf16") {
    c.report("optimizer.stochastic_rounding",
             "needs precision.dtype bf16 (it rounds fp32 updates into bf16 storage), not " +
                 in_quotes(spec.precision.dtype));
  }
  unit_interval(c, "optimizer.beta1", o.beta1);
  unit_interval(c, "optimizer.beta2", o.beta2);
  positive(c, "optimizer.eps", o.eps);
  positive(c, "optimizer.adalomo.eps1", o.adalomo.eps1);
  positive(c, "optimizer.adalomo.eps2", o.adalomo.eps2);
  positive(c, "optimizer.adalomo.clip_threshold", o.adalomo.clip_threshold);
  // β_t = 1 − t^decay_rate only grows towards 1 (a longer average) for a negative exponent.
  if (!(o.adalomo.decay_rate < 0)) {
    c.report("optimizer.adalomo.decay_rate",
             "must be < 0, got " + number_text(o.adalomo.decay_rate));
  }

  one_of(c, "precision.dtype", spec.precision.dtype, {"fp32", "bf16", "fp16"});
  one_of(c, "precision.matmul", spec.precision.matmul, {"auto", "fp32", "bf16"});
  const LossScaleSpec& s = spec.precision.loss_scale;
  positive(c, "precision.loss_scale.initial", s.initial);
  at_least(c, "precision.loss_scale.growth_interval", s.growth_interval, 1);
  if (!(s.factor > 1)) {
    c.report("precision.loss_scale.factor", "must be > 1, got " + number_text(s.factor));
  }
  positive(c, "precision.loss_scale.min", s.min);
  if (s.min > s.initial) {
    c.report("precision.loss_scale.min", "must be <= precision.loss_scale.initial (" +
                                             number_text(s.initial) + "), got " +
                                             number_text(s.min));
  }

  const TrainingSpec& t = spec.training;
  at_least(c, "training.batch_size", t.batch_size, 1);
  // The global batch: each of the world_size ranks takes an equal share of its rows.
  if (t.batch_size >= 1 && spec.resources.world_size >= 1 &&
      t.batch_size % spec.resources.world_size != 0) {
    c.report("training.batch_size",
             "must be divisible by resources.world_size (" +
                 std::to_string(spec.resources.world_size) + "), got " +
                 std::to_string(t.batch_size) +
                 ": training.batch_size is the global batch, split into equal shares of rows, "
                 "one per rank");
  }
  if (!t.steps && !t.epochs) {
    c.report("training.steps", "required: set training.steps or training.epochs");
  }
  if (t.steps && t.epochs) {
    c.report("training.epochs", "set only one of training.steps and training.epochs");
  }
  if (t.steps) at_least(c, "training.steps", *t.steps, 1);
  if (t.epochs) at_least(c, "training.epochs", *t.epochs, 1);
  // Rejected for every optimizer, not only the fused ones, so that a spec means the same thing
  // whichever optimizer it names.
  if (t.gradient_accumulation_steps != 1) {
    c.report("training.gradient_accumulation_steps",
             "must be 1, got " + std::to_string(t.gradient_accumulation_steps) +
                 ": fused optimizers (LOMO, AdaLomo) update each parameter during backward, so "
                 "gradients of several micro-batches cannot be summed before the update; increase "
                 "training.batch_size instead (other tools silently update per micro-batch). The "
                 "rule holds for every optimizer so that a spec behaves the same with each.");
  }
  at_least(c, "training.eval_every", t.eval_every, 0);
  at_least(c, "training.eval_batches", t.eval_batches, 1);
  validate_eval_samples(c, t);
  at_least(c, "training.checkpoint_every", t.checkpoint_every, 0);
  at_least(c, "training.log_every", t.log_every, 1);

  if (spec.output.dir.empty()) c.report("output.dir", "must be a non-empty directory path");

  const ResourcesSpec& r = spec.resources;
  // Any N >= 1: `lomo-worker train --nproc N` runs N ranks on one host. The coordinator refuses
  // N > 1 at submission until it can schedule gangs (server/job_lifecycle.cc).
  at_least(c, "resources.world_size", r.world_size, 1);
  one_of(c, "resources.device", r.device, {"cpu", "cuda"});
  at_least(c, "resources.max_restarts", r.max_restarts, 0);
  at_least(c, "resources.collective_timeout_seconds", r.collective_timeout_seconds, 1);
  if (r.collective_timeout_seconds > kMaxCollectiveTimeoutSeconds) {
    c.report("resources.collective_timeout_seconds",
             "must be <= " + std::to_string(kMaxCollectiveTimeoutSeconds) + " (a day), got " +
                 std::to_string(r.collective_timeout_seconds));
  }
}

// yaml-cpp may throw from node access in ways its API does not document; every such exception
// becomes a JobSpecError so that callers need to catch only one type. Throws every problem read.
JobSpec read_checked(Context& context, const YAML::Node& root) {
  JobSpec spec;
  try {
    spec = read_spec(context, root);
  } catch (const YAML::Exception& error) {
    throw JobSpecError(context.source(), "", "unexpected YAML error: " + error.msg);
  }
  context.throw_if_any();
  return spec;
}

// Throws every broken value rule.
void validate_checked(Context& context, const JobSpec& spec) {
  try {
    validate(context, spec);
  } catch (const YAML::Exception& error) {
    throw JobSpecError(context.source(), "", "unexpected YAML error: " + error.msg);
  }
  context.throw_if_any();
}

// "line 3, column 7: " for a yaml-cpp exception, or "" when it carries no position.
std::string position(const YAML::Mark& mark) {
  if (mark.line < 0) return "";
  return "line " + std::to_string(mark.line + 1) + ", column " + std::to_string(mark.column + 1) +
         ": ";
}

// Sees only where each document starts. yaml-cpp 0.7 cannot be trusted to find the end of a
// stream: a token that no grammar rule consumes (a stray ',' at the top level) makes every
// further call report another empty document at the same place, so YAML::LoadAll loops forever
// and allocates until the process dies (jbeder/yaml-cpp#1040, fixed after 0.8).
class DocumentStarts : public YAML::EventHandler {
 public:
  void OnDocumentStart(const YAML::Mark& mark) override { last = mark; }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t,
                const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}

  YAML::Mark last;
};

// Parses text that must hold at most one YAML document (none: an empty spec). `what` names the
// text in messages ("the document", "the value").
YAML::Node load_one_document(const std::string& text, const std::string& source,
                             const std::string& what) {
  try {
    // A first pass that counts documents and stops where the parser stops making progress; the
    // node is then built by YAML::Load, which reads only the first document.
    std::istringstream stream(text);
    YAML::Parser parser(stream);
    DocumentStarts starts;
    int documents = 0;
    int previous_start = -1;
    while (parser.HandleNextDocument(starts)) {
      if (starts.last.pos <= previous_start) {
        throw JobSpecError(source, "", position(starts.last) + "invalid YAML: unexpected token");
      }
      previous_start = starts.last.pos;
      ++documents;
    }
    if (documents > 1) {
      throw JobSpecError(
          source, "",
          "expected one YAML document, found " + std::to_string(documents) + " (separated by ---)");
    }
    return documents == 0 ? YAML::Node() : YAML::Load(text);
  } catch (const YAML::DeepRecursion& error) {
    // yaml-cpp bounds its own recursion and reports it as "bad file"; say what it means.
    throw JobSpecError(source, "",
                       position(error.mark) + what + " is nested too deeply to be a job spec");
  } catch (const YAML::Exception& error) {
    throw JobSpecError(source, "", position(error.mark) + "invalid YAML: " + error.msg);
  }
}

// ---------------------------------------------------------------------------------------------
// Writing.

// A string value. For JSON it is tagged "!" (yaml-cpp's mark for a quoted scalar), so that
// to_json() can tell it from the numbers and booleans, which the tree also holds as text.
YAML::Node string_node(const std::string& value, bool tag_strings) {
  YAML::Node node(value);
  if (tag_strings) node.SetTag("!");
  return node;
}

YAML::Node string_list(const std::vector<std::string>& values, bool tag_strings) {
  YAML::Node list(YAML::NodeType::Sequence);
  list.SetStyle(YAML::EmitterStyle::Flow);
  for (const std::string& value : values) list.push_back(string_node(value, tag_strings));
  return list;
}

std::string bool_text(bool value) { return value ? "true" : "false"; }

template <typename T>
YAML::Node optional_number(const std::optional<T>& value) {
  if (!value) return YAML::Node(YAML::NodeType::Null);
  if constexpr (std::is_floating_point_v<T>) return YAML::Node(number_text(*value));
  return YAML::Node(std::to_string(*value));
}

YAML::Node optional_string(const std::optional<std::string>& value, bool tag_strings) {
  return value ? string_node(*value, tag_strings) : YAML::Node(YAML::NodeType::Null);
}

// Every field, in declaration order, numbers as their shortest exact text (the node holds strings
// so that yaml-cpp's own float formatting, which rounds to a fixed precision, never applies).
YAML::Node to_node(const JobSpec& spec, bool tag_strings = false) {
  const auto text = [tag_strings](const std::string& value) {
    return string_node(value, tag_strings);
  };
  YAML::Node root(YAML::NodeType::Map);
  root["name"] = text(spec.name);
  root["priority"] = std::to_string(spec.priority);

  root["model"]["path"] = text(spec.model.path);

  root["tokenizer"]["kind"] = text(spec.tokenizer.kind);
  root["tokenizer"]["path"] = text(spec.tokenizer.path);

  YAML::Node data(YAML::NodeType::Map);
  data["format"] = text(spec.data.format);
  data["train"] = string_list(spec.data.train, tag_strings);
  data["eval"] = string_list(spec.data.eval, tag_strings);
  data["eval_format"] = optional_string(spec.data.eval_format, tag_strings);
  data["max_length"] = std::to_string(spec.data.max_length);
  data["chat_template"] = optional_string(spec.data.chat_template, tag_strings);
  data["train_on_prompt"] = bool_text(spec.data.train_on_prompt);
  data["packing"] = bool_text(spec.data.packing);
  data["shuffle"] = bool_text(spec.data.shuffle);
  data["token_dtype"] = text(spec.data.token_dtype);
  data["on_bad_record"] = text(spec.data.on_bad_record);
  root["data"] = data;

  const OptimizerSpec& o = spec.optimizer;
  YAML::Node optimizer(YAML::NodeType::Map);
  optimizer["name"] = text(o.name);
  optimizer["lr"] = number_text(o.lr);
  optimizer["schedule"] = text(o.schedule);
  optimizer["warmup_steps"] = std::to_string(o.warmup_steps);
  optimizer["warmup_ratio"] = number_text(o.warmup_ratio);
  optimizer["weight_decay"] = number_text(o.weight_decay);
  optimizer["weight_decay_on_norms"] = bool_text(o.weight_decay_on_norms);
  optimizer["clip_grad_norm"] = optional_number(o.clip_grad_norm);
  optimizer["clip_grad_value"] = optional_number(o.clip_grad_value);
  optimizer["stochastic_rounding"] = bool_text(o.stochastic_rounding);
  optimizer["beta1"] = number_text(o.beta1);
  optimizer["beta2"] = number_text(o.beta2);
  optimizer["eps"] = number_text(o.eps);
  optimizer["adalomo"]["eps1"] = number_text(o.adalomo.eps1);
  optimizer["adalomo"]["eps2"] = number_text(o.adalomo.eps2);
  optimizer["adalomo"]["clip_threshold"] = number_text(o.adalomo.clip_threshold);
  optimizer["adalomo"]["decay_rate"] = number_text(o.adalomo.decay_rate);
  root["optimizer"] = optimizer;

  const LossScaleSpec& s = spec.precision.loss_scale;
  YAML::Node precision(YAML::NodeType::Map);
  precision["dtype"] = text(spec.precision.dtype);
  precision["matmul"] = text(spec.precision.matmul);
  precision["loss_scale"]["initial"] = number_text(s.initial);
  precision["loss_scale"]["growth_interval"] = std::to_string(s.growth_interval);
  precision["loss_scale"]["factor"] = number_text(s.factor);
  precision["loss_scale"]["min"] = number_text(s.min);
  root["precision"] = precision;

  const TrainingSpec& t = spec.training;
  YAML::Node training(YAML::NodeType::Map);
  training["batch_size"] = std::to_string(t.batch_size);
  training["steps"] = optional_number(t.steps);
  training["epochs"] = optional_number(t.epochs);
  training["gradient_accumulation_steps"] = std::to_string(t.gradient_accumulation_steps);
  training["activation_checkpointing"] = bool_text(t.activation_checkpointing);
  training["seed"] = std::to_string(t.seed);
  training["eval_every"] = std::to_string(t.eval_every);
  training["eval_batches"] = std::to_string(t.eval_batches);
  // Only when used, so that the canonical text of every earlier spec stays as it was.
  if (!t.eval_prompts.empty()) training["eval_prompts"] = string_list(t.eval_prompts, tag_strings);
  if (!t.eval_prompts.empty() || t.eval_max_new_tokens != TrainingSpec().eval_max_new_tokens) {
    training["eval_max_new_tokens"] = std::to_string(t.eval_max_new_tokens);
  }
  training["checkpoint_every"] = std::to_string(t.checkpoint_every);
  training["log_every"] = std::to_string(t.log_every);
  root["training"] = training;

  root["output"]["dir"] = text(spec.output.dir);

  root["resources"]["world_size"] = std::to_string(spec.resources.world_size);
  root["resources"]["device"] = text(spec.resources.device);
  root["resources"]["max_restarts"] = std::to_string(spec.resources.max_restarts);
  root["resources"]["collective_timeout_seconds"] =
      std::to_string(spec.resources.collective_timeout_seconds);
  return root;
}

// Sets `field` ("optimizer.adalomo.eps1") in the node tree of a whole spec, where every field
// exists, so a path that is not found there names no field.
void set_field(YAML::Node& root, const std::string& field, const YAML::Node& value,
               const std::string& source) {
  YAML::Node parent = root;
  std::string parent_path;
  size_t start = 0;
  while (true) {
    const size_t dot = field.find('.', start);
    const std::string key =
        field.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const std::string path = child_path(parent_path, key);
    if (!parent.IsMap()) {
      throw JobSpecError(source, field,
                         "unknown field (" + parent_path + " is a value, not a section)");
    }
    const YAML::Node& lookup = parent;  // the const operator[] looks up without inserting
    const YAML::Node child = lookup[key];
    if (!child.IsDefined()) {
      std::string known;
      for (auto it = parent.begin(); it != parent.end(); ++it) {
        known += (known.empty() ? "" : ", ") + it->first.Scalar();
      }
      throw JobSpecError(source, path, "unknown key (known: " + known + ")");
    }
    if (dot == std::string::npos) {
      parent[key] = value;
      return;
    }
    // reset() rebinds the handle; assignment would overwrite the parent's contents instead.
    parent.reset(child);
    parent_path = path;
    start = dot + 1;
  }
}

// JSON text of a string: quotes, backslashes and control characters escaped; bytes that are not
// UTF-8 (only a spec built in code can hold them) become U+FFFD, as the YAML emitter does.
void append_json_string(std::string& out, std::string_view text) {
  out += '"';
  size_t i = 0;
  while (i < text.size()) {
    size_t length = 1;
    while (length <= 4 && i + length <= text.size() && !is_valid_utf8(text.substr(i, length))) {
      ++length;
    }
    if (length > 4 || i + length > text.size()) {
      out += "\xef\xbf\xbd";
      ++i;
      continue;
    }
    const std::string_view piece = text.substr(i, length);
    i += length;
    const auto c = static_cast<unsigned char>(piece[0]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char code[8];
      std::snprintf(code, sizeof(code), "\\u%04x", c);
      out += code;
    } else {
      out += piece;
    }
  }
  out += '"';
}

// The tree of to_node(spec, /*tag_strings=*/true) as JSON: scalars tagged "!" are strings, the
// others are number or boolean literals already written exactly.
void append_json(std::string& out, const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: {
      out += '{';
      bool first = true;
      for (auto it = node.begin(); it != node.end(); ++it) {
        if (!first) out += ',';
        first = false;
        append_json_string(out, it->first.Scalar());
        out += ':';
        append_json(out, it->second);
      }
      out += '}';
      return;
    }
    case YAML::NodeType::Sequence: {
      out += '[';
      for (size_t i = 0; i < node.size(); ++i) {
        if (i > 0) out += ',';
        append_json(out, node[i]);
      }
      out += ']';
      return;
    }
    case YAML::NodeType::Scalar:
      if (node.Tag() == "!") {
        append_json_string(out, node.Scalar());
      } else {
        out += node.Scalar();
      }
      return;
    default:
      out += "null";
      return;
  }
}

// "override \"optimizer.lr=3e-4\"": how messages name one override.
std::string override_source(const std::string& assignment) {
  return "override " + in_quotes(assignment);
}

// Applies one override to `spec` and reads the result (types and keys, not value rules); returns
// the field it set. Throws JobSpecError naming the override.
std::string apply_one(JobSpec& spec, const std::string& assignment) {
  const std::string source = override_source(assignment);
  const size_t equals = assignment.find('=');
  if (equals == std::string::npos || equals == 0) {
    throw JobSpecError(source, "", "expected FIELD=VALUE, e.g. optimizer.lr=3e-4");
  }
  std::string field = assignment.substr(0, equals);
  const YAML::Node value = load_one_document(assignment.substr(equals + 1), source, "the value");
  YAML::Node root = to_node(spec);
  set_field(root, field, value, source);
  Context context(source, /*report_lines=*/false);
  spec = read_checked(context, root);
  return field;
}

// Applies every override in order, then validates once in `context`, whose problems in a field an
// override set name that override. Reading (types, keys) as each is applied and validating only
// at the end lets a later override name a field of a section an earlier one replaced, and pass
// through combinations that are invalid only half-way.
JobSpec apply_and_validate(JobSpec spec, const std::vector<std::string>& assignments,
                           Context& context) {
  for (const std::string& assignment : assignments) {
    context.set_by(apply_one(spec, assignment), override_source(assignment));
  }
  validate_checked(context, spec);
  return spec;
}

}  // namespace

std::string JobSpecProblem::text() const {
  return source + ": " + (field.empty() ? "" : field + ": ") + message;
}

namespace {

std::string all_problems_text(const std::vector<JobSpecProblem>& problems) {
  std::string text;
  for (const JobSpecProblem& problem : problems) {
    text += (text.empty() ? "" : "\n") + problem.text();
  }
  return text.empty() ? "invalid job spec" : text;
}

}  // namespace

JobSpecError::JobSpecError(std::vector<JobSpecProblem> problems)
    : std::invalid_argument(all_problems_text(problems)), problems_(std::move(problems)) {
  if (problems_.empty()) problems_.push_back({"", "", "invalid job spec"});
}

JobSpec parse_job_spec(const std::string& text, const std::string& source) {
  return parse_job_spec(text, source, {});
}

JobSpec parse_job_spec(const std::string& text, const std::string& source,
                       const std::vector<std::string>& overrides) {
  const YAML::Node root = load_one_document(text, source, "the document");
  Context context(source, /*report_lines=*/true);
  const JobSpec spec = read_checked(context, root);
  return apply_and_validate(spec, overrides, context);
}

std::string read_job_spec_file(const std::string& path) {
  try {
    return read_file(path);
  } catch (const FileReadError& error) {
    throw JobSpecError(path, "", "cannot read the job spec: " + error.reason());
  }
}

JobSpec load_job_spec(const std::string& path, const std::vector<std::string>& overrides) {
  return parse_job_spec(read_job_spec_file(path), path, overrides);
}

void apply_job_spec_override(JobSpec& spec, const std::string& assignment) {
  apply_job_spec_overrides(spec, {assignment});
}

void apply_job_spec_overrides(JobSpec& spec, const std::vector<std::string>& assignments) {
  const std::string source =
      assignments.size() == 1 ? override_source(assignments.front()) : std::string("overrides");
  Context context(source, /*report_lines=*/false);
  spec = apply_and_validate(spec, assignments, context);
}

std::string job_spec_to_yaml(const JobSpec& spec) {
  YAML::Emitter out;
  out.SetNullFormat(YAML::LowerNull);
  out << to_node(spec);
  if (!out.good()) {
    // Only reachable through a yaml-cpp defect: every node above is a plain map, list or scalar.
    throw JobSpecError("job_spec_to_yaml", "", "cannot emit YAML: " + out.GetLastError());
  }
  return std::string(out.c_str()) + "\n";
}

std::string job_spec_to_json(const JobSpec& spec) {
  std::string out;
  append_json(out, to_node(spec, /*tag_strings=*/true));
  return out;
}

}  // namespace lomo
