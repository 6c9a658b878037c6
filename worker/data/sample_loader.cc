#include "worker/data/sample_loader.h"

#include <filesystem>
#include <string_view>
#include <system_error>

#include "common/read_file.h"

namespace lomo {
namespace {

std::string read_data_file(const std::string& path, size_t index) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    throw DataError(index, path + ": is a directory, not a data file");
  }
  try {
    return read_file(path);
  } catch (const FileReadError& e) {
    throw DataError(index, "cannot read '" + path + "': " + e.reason());
  }
}

bool is_blank(std::string_view line) {
  for (const char c : line) {
    if (c != ' ' && c != '\t' && c != '\r' && c != '\n' && c != '\f' && c != '\v') return false;
  }
  return true;
}

// Calls `record(line, line_number)` for every line of `text` that is not blank (1-based numbers,
// \r\n accepted, a leading UTF-8 byte order mark dropped). Returns the number of records.
template <typename Record>
int64_t for_each_record(std::string_view text, const Record& record) {
  if (text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);
  int64_t line_number = 0, records = 0;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(start, end - start);
    start = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (is_blank(line)) continue;
    ++records;
    record(line, line_number);
  }
  return records;
}

// Applies the policy to one bad record: rethrows it with its place (fail), or counts it (skip).
void bad_record(const LoadOptions& options, LoadReport& report, size_t index,
                const std::string& where, const std::string& message) {
  if (options.on_bad_record == BadRecordPolicy::kFail)
    throw DataError(index, where + ": " + message);
  ++report.skipped;
  if (report.skipped_examples.size() < LoadReport::kMaxExamples) {
    report.skipped_examples.push_back(where + ": " + message);
  }
}

// Cuts a training sample to max_length + 1 tokens; throws RecordError when nothing trainable is
// left.
void truncate_sample(TokenSample& sample, int64_t max_length, LoadReport& report) {
  const size_t keep = static_cast<size_t>(max_length) + 1;
  if (sample.ids.size() <= keep) return;
  const size_t original = sample.ids.size();
  sample.ids.resize(keep);
  sample.trainable.resize(keep);
  if (sample.target_count() == 0) {
    throw RecordError("", "no trainable tokens within data.max_length: the record has " +
                              std::to_string(original) + " tokens and only its first " +
                              std::to_string(keep) + " are used");
  }
  ++report.truncated;
}

// Keeps the last max_length + 1 tokens of a candidate, so that its scored tokens (at the end)
// stay; throws RecordError when the scored tokens alone do not fit.
bool truncate_candidate(TokenSample& sample, int64_t max_length, size_t choice) {
  const size_t keep = static_cast<size_t>(max_length) + 1;
  if (sample.ids.size() <= keep) return false;
  const int64_t scored = sample.target_count();
  if (scored > max_length) {
    throw RecordError("choices[" + std::to_string(choice) + "]",
                      std::to_string(scored) + " tokens to score do not fit data.max_length " +
                          std::to_string(max_length));
  }
  const auto drop = static_cast<std::ptrdiff_t>(sample.ids.size() - keep);
  sample.ids.erase(sample.ids.begin(), sample.ids.begin() + drop);
  sample.trainable.erase(sample.trainable.begin(), sample.trainable.begin() + drop);
  return true;
}

void require_not_empty(std::string_view bytes, const std::string& path, size_t index) {
  if (bytes.empty()) throw DataError(index, path + ": empty file");
}

std::vector<int32_t> read_token_file(const std::string& path, size_t index,
                                     const LoadOptions& options, int64_t vocab_size) {
  const std::string bytes = read_data_file(path, index);
  require_not_empty(bytes, path, index);
  const size_t width = options.token_dtype == TokenDtype::kUint16 ? 2 : 4;
  const char* dtype = width == 2 ? "uint16" : "uint32";
  if (bytes.size() % width != 0) {
    throw DataError(index, path + ": " + std::to_string(bytes.size()) +
                               " bytes is not a whole number of " + dtype +
                               " token ids (data.token_dtype)");
  }
  std::vector<int32_t> ids(bytes.size() / width);
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < ids.size(); ++i) {
    const unsigned char* p = data + i * width;
    uint64_t id = static_cast<uint64_t>(p[0]) | static_cast<uint64_t>(p[1]) << 8;
    if (width == 4) id |= static_cast<uint64_t>(p[2]) << 16 | static_cast<uint64_t>(p[3]) << 24;
    if (id >= static_cast<uint64_t>(vocab_size)) {
      throw DataError(index, path + ": token " + std::to_string(i) + " (byte offset " +
                                 std::to_string(i * width) + ") is " + std::to_string(id) +
                                 ", outside the vocabulary of " + std::to_string(vocab_size) +
                                 " (a " + dtype + " file? see data.token_dtype)");
    }
    ids[i] = static_cast<int32_t>(id);
  }
  return ids;
}

void check_max_length(const LoadOptions& options) {
  if (options.max_length < 1) throw std::invalid_argument("max_length must be positive");
}

std::string too_short(int64_t tokens, int64_t max_length) {
  return std::to_string(tokens) + " tokens are too few for one row of data.max_length + 1 = " +
         std::to_string(max_length + 1) + " tokens";
}

}  // namespace

LoadedSamples load_samples(const std::vector<std::string>& files, const Tokenizer& tokenizer,
                           const LoadOptions& options) {
  check_max_length(options);
  if (options.format == DataFormat::kMultipleChoice) {
    throw std::invalid_argument(
        "multiple_choice is an evaluation format: use load_multiple_choice");
  }
  LoadedSamples out;
  LoadReport& report = out.report;

  if (options.format == DataFormat::kText) {
    std::vector<int32_t> stream;
    for (size_t i = 0; i < files.size(); ++i) {
      const std::string text = read_data_file(files[i], i);
      require_not_empty(text, files[i], i);
      if (const auto bos = tokenizer.bos_id()) stream.push_back(*bos);
      const std::vector<int32_t> ids = tokenizer.encode(text);
      stream.insert(stream.end(), ids.begin(), ids.end());
      if (const auto eos = tokenizer.eos_id()) stream.push_back(*eos);
    }
    report.samples = out.store.add_stream_rows(stream, options.max_length);
    if (report.samples == 0) {
      throw DataError(
          std::nullopt,
          "the files hold " + too_short(static_cast<int64_t>(stream.size()), options.max_length));
    }
    return out;
  }

  if (options.format == DataFormat::kTokens) {
    const int64_t vocab_size = options.vocab_size > 0 ? options.vocab_size : tokenizer.vocab_size();
    for (size_t i = 0; i < files.size(); ++i) {
      const std::vector<int32_t> ids = read_token_file(files[i], i, options, vocab_size);
      const int64_t rows = out.store.add_stream_rows(ids, options.max_length);
      if (rows == 0) {
        throw DataError(
            i, files[i] + ": " + too_short(static_cast<int64_t>(ids.size()), options.max_length));
      }
      report.samples += rows;
    }
    return out;
  }

  const RecordParser parser(tokenizer,
                            {options.format, options.chat_template, options.train_on_prompt});
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string text = read_data_file(files[i], i);
    const int64_t records = for_each_record(text, [&](std::string_view line, int64_t number) {
      try {
        TokenSample sample = parser.sample(line);
        truncate_sample(sample, options.max_length, report);
        out.store.add(sample);
        ++report.samples;
      } catch (const RecordError& e) {
        bad_record(options, report, i, files[i] + ":" + std::to_string(number), e.what());
      }
    });
    if (records == 0) throw DataError(i, files[i] + ": empty file (no records)");
  }
  if (report.samples == 0) {
    throw DataError(std::nullopt, "no usable record in any file (" +
                                      std::to_string(report.skipped) + " skipped)");
  }
  return out;
}

LoadedMultipleChoice load_multiple_choice(const std::vector<std::string>& files,
                                          const Tokenizer& tokenizer, const LoadOptions& options) {
  check_max_length(options);
  const RecordParser parser(tokenizer, {DataFormat::kMultipleChoice, std::nullopt, false});
  LoadedMultipleChoice out;
  LoadReport& report = out.report;
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string text = read_data_file(files[i], i);
    const int64_t records = for_each_record(text, [&](std::string_view line, int64_t number) {
      try {
        MultipleChoiceRecord record = parser.multiple_choice(line);
        bool truncated = false;
        for (size_t c = 0; c < record.candidates.size(); ++c) {
          truncated |= truncate_candidate(record.candidates[c], options.max_length, c);
        }
        report.truncated += truncated ? 1 : 0;
        out.records.push_back(std::move(record));
        ++report.samples;
      } catch (const RecordError& e) {
        bad_record(options, report, i, files[i] + ":" + std::to_string(number), e.what());
      }
    });
    if (records == 0) throw DataError(i, files[i] + ": empty file (no records)");
  }
  if (report.samples == 0) {
    throw DataError(std::nullopt, "no usable record in any file (" +
                                      std::to_string(report.skipped) + " skipped)");
  }
  return out;
}

}  // namespace lomo
