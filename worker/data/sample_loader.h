// Data files to token samples, per format, with the bad-record policy.
//
// How each format's files become samples:
//   text       Each file is read as bytes and encoded whole (BOS? text EOS?, with the tokenizer's
//              BOS/EOS where it has them; the bytes tokenizer has neither); the files' tokens are
//              concatenated into one stream, which is cut into rows of max_length + 1 tokens with
//              stride max_length (row r is stream[r·T, r·T + T + 1)): inputs are its first T
//              tokens, targets the last T, every token trainable. The tail that does not fill a
//              row is dropped.
//   tokens     Binary files of little-endian uint16 or uint32 token ids (llama2.c / nanoGPT .bin:
//              documents already joined with whatever separator the preprocessor wrote). Each file
//              is cut on its own exactly as the text stream is: a file of N tokens gives
//              floor((N − 1) / T) rows, row r = file[r·T, r·T + T + 1), targets = inputs shifted
//              by one, every token trainable, the tail dropped. Ids must be below vocab_size.
//   JSONL formats (jsonl_text, alpaca, prompt_completion, chat): one record per line, each one
//              sample (jsonl_record.h, chat_template.h); a sample longer than max_length + 1
//              tokens is cut to its first max_length + 1 (counted as truncated). Lines of only
//              white space are ignored; a UTF-8 byte order mark and a trailing \r are removed.
//   multiple_choice: load_multiple_choice; a candidate longer than max_length + 1 tokens loses
//              tokens from the front of its context instead, so that the scored tokens stay.
//
// Bad input: a record that does not parse, has a wrong type, an unknown role, or no trainable
// tokens (also after truncation) is an error "FILE:LINE: field 'messages[2].role': ..." under
// BadRecordPolicy::kFail, and skipped and counted under kSkip. Files that cannot be read, empty
// files, token files of a size that is not a whole number of ids or too short for one row, ids
// outside the vocabulary, and data with no usable sample at all are errors under either policy.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "worker/data/data_format.h"
#include "worker/data/jsonl_record.h"
#include "worker/data/sample_store.h"
#include "worker/data/tokenizer.h"

namespace lomo {

struct LoadOptions {
  DataFormat format = DataFormat::kText;
  std::optional<ChatTemplate> chat_template;  // format chat
  bool train_on_prompt = false;
  int64_t max_length = 512;  // input positions per row: samples keep at most max_length + 1 tokens
  TokenDtype token_dtype = TokenDtype::kUint16;  // format tokens
  BadRecordPolicy on_bad_record = BadRecordPolicy::kFail;
  int64_t vocab_size = 0;  // format tokens: ids must be below this (0: the tokenizer's vocab_size)
};

struct LoadReport {
  int64_t samples = 0;    // samples (rows for text and tokens) loaded
  int64_t skipped = 0;    // bad records skipped under BadRecordPolicy::kSkip
  int64_t truncated = 0;  // samples cut to max_length + 1 tokens
  static constexpr size_t kMaxExamples = 5;
  std::vector<std::string>
      skipped_examples;  // the first kMaxExamples skip messages, "FILE:LINE: ..."
};

// A file (or the data as a whole) that cannot be used. what() names the file and, for a record,
// the line ("train.jsonl:17: field 'messages[2].role': unknown role 'bot' ..."). file_index() is
// the file's index in the list given to the loader, nullopt when the problem is the list as a
// whole (no usable sample in any file).
class DataError : public std::invalid_argument {
 public:
  DataError(std::optional<size_t> file_index, const std::string& message)
      : std::invalid_argument(message), file_index_(file_index) {}
  std::optional<size_t> file_index() const { return file_index_; }

 private:
  std::optional<size_t> file_index_;
};

struct LoadedSamples {
  SampleStore store;
  LoadReport report;
};

// Samples of a training format (every format but multiple_choice) from `files`, in file and line
// order. Throws DataError (see the file comment) and std::invalid_argument for options that cannot
// load anything (chat without a template, a template the tokenizer lacks tokens for).
LoadedSamples load_samples(const std::vector<std::string>& files, const Tokenizer& tokenizer,
                           const LoadOptions& options);

struct LoadedMultipleChoice {
  std::vector<MultipleChoiceRecord> records;
  LoadReport report;
};

// multiple_choice records from JSONL `files`, in order. Errors as load_samples.
LoadedMultipleChoice load_multiple_choice(const std::vector<std::string>& files,
                                          const Tokenizer& tokenizer, const LoadOptions& options);

}  // namespace lomo
