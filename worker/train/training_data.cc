#include "worker/train/training_data.h"

#include <stdexcept>

#include "worker/data/byte_tokenizer.h"

namespace lomo {
namespace {

LoadOptions load_options(const JobSpec& spec, DataFormat format, const LlamaConfig& model) {
  const DataSpec& d = spec.data;
  LoadOptions options;
  options.format = format;
  if (d.chat_template) options.chat_template = chat_template_from_name(*d.chat_template);
  options.train_on_prompt = d.train_on_prompt;
  options.max_length = d.max_length;
  options.token_dtype = token_dtype_from_name(d.token_dtype).value_or(TokenDtype::kUint16);
  options.on_bad_record =
      bad_record_policy_from_name(d.on_bad_record).value_or(BadRecordPolicy::kFail);
  options.vocab_size = model.vocab_size;
  return options;
}

DataFormat format_named(const std::string& name, const std::string& field) {
  const std::optional<DataFormat> format = data_format_from_name(name);
  if (!format) throw JobSpecError("job", field, "unknown format \"" + name + "\"");
  return *format;
}

// Runs a loader, turning its errors into JobSpecErrors that name the file list (`list`, e.g.
// "data.train") and the file's index in it.
template <typename Load>
auto load_with_context(const std::string& list, const Load& load) {
  try {
    return load();
  } catch (const DataError& e) {
    const std::string field =
        e.file_index() ? list + "[" + std::to_string(*e.file_index()) + "]" : list;
    throw JobSpecError("job", field, e.what());
  } catch (const RecordError& e) {
    throw JobSpecError("job", list, e.what());
  } catch (const std::invalid_argument& e) {
    // Options that cannot load anything: a template the tokenizer lacks tokens for.
    throw JobSpecError("job", "data.chat_template", e.what());
  }
}

}  // namespace

std::unique_ptr<Tokenizer> make_tokenizer(const JobSpec& spec, const LlamaConfig& model) {
  std::unique_ptr<Tokenizer> tokenizer;
  if (spec.tokenizer.kind == "bytes") {
    tokenizer = std::make_unique<ByteTokenizer>();
  } else {
    const std::string dir = spec.tokenizer.path.empty() ? spec.model.path : spec.tokenizer.path;
    const std::string field = spec.tokenizer.path.empty() ? "tokenizer.kind" : "tokenizer.path";
    try {
      tokenizer = load_tokenizer(dir);
    } catch (const std::exception& e) {
      throw JobSpecError("job", field, std::string("cannot load the tokenizer: ") + e.what());
    }
  }
  if (tokenizer->vocab_size() > model.vocab_size) {
    throw JobSpecError("job", "tokenizer.kind",
                       "the tokenizer has " + std::to_string(tokenizer->vocab_size()) +
                           " tokens, more than the model's vocab_size " +
                           std::to_string(model.vocab_size));
  }
  return tokenizer;
}

TrainingData load_training_data(const JobSpec& spec, const LlamaConfig& model, int64_t rank,
                                int64_t world_size) {
  const DataSpec& d = spec.data;
  TrainingData data;
  data.tokenizer = make_tokenizer(spec, model);
  const Tokenizer& tokenizer = *data.tokenizer;
  data.pad_id = tokenizer.pad_id().value_or(tokenizer.eos_id().value_or(0));

  DatasetOptions options;
  options.max_length = d.max_length;
  options.packing = d.packing;
  options.shuffle = d.shuffle;
  options.seed = spec.training.seed;
  options.rank = rank;
  options.world_size = world_size;
  options.pad_id = data.pad_id;

  const DataFormat train_format = format_named(d.format, "data.format");
  LoadedSamples train = load_with_context("data.train", [&] {
    return load_samples(d.train, tokenizer, load_options(spec, train_format, model));
  });
  data.train_report = train.report;
  try {
    data.train.emplace(std::move(train.store), options);
  } catch (const std::invalid_argument& e) {
    throw JobSpecError("job", "data.train", e.what());
  }

  if (d.eval.empty()) return data;
  const DataFormat eval_format = format_named(d.eval_format.value_or(d.format), "data.eval_format");
  const LoadOptions eval_options = load_options(spec, eval_format, model);
  if (eval_format == DataFormat::kMultipleChoice) {
    LoadedMultipleChoice eval = load_with_context(
        "data.eval", [&] { return load_multiple_choice(d.eval, tokenizer, eval_options); });
    data.eval_choices = std::move(eval.records);
    data.eval_report = eval.report;
    return data;
  }
  LoadedSamples eval =
      load_with_context("data.eval", [&] { return load_samples(d.eval, tokenizer, eval_options); });
  data.eval_report = eval.report;
  options.shuffle = false;
  try {
    data.eval.emplace(std::move(eval.store), options);
  } catch (const std::invalid_argument& e) {
    throw JobSpecError("job", "data.eval", e.what());
  }
  return data;
}

}  // namespace lomo
