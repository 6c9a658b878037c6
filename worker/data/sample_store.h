// Token samples stored back to back in two flat arrays, so that millions of short samples cost
// five bytes a token and no allocation each.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "worker/data/token_sample.h"

namespace lomo {

struct SampleStore {
  // Sample s is tokens[samples[s].begin .. samples[s].begin + samples[s].length).
  struct Span {
    int64_t begin = 0;
    int64_t length = 0;
  };

  std::vector<int32_t> tokens;
  // One flag per token (TokenSample::trainable); empty when every token is trainable (the text
  // and tokens formats), which saves a byte a token.
  std::vector<uint8_t> trainable;
  // Spans may overlap: the rows of a token stream share their boundary token.
  std::vector<Span> samples;

  int64_t size() const { return static_cast<int64_t>(samples.size()); }
  bool is_trainable(int64_t token) const {
    return trainable.empty() || trainable[static_cast<size_t>(token)] != 0;
  }

  // Appends one sample (ids and trainable flags); a store whose flags were implicit gets explicit
  // ones first.
  void add(const TokenSample& sample) {
    if (trainable.empty() && !tokens.empty()) trainable.assign(tokens.size(), 1);
    samples.push_back(
        {static_cast<int64_t>(tokens.size()), static_cast<int64_t>(sample.ids.size())});
    tokens.insert(tokens.end(), sample.ids.begin(), sample.ids.end());
    trainable.insert(trainable.end(), sample.trainable.begin(), sample.trainable.end());
  }

  // Cuts a token stream into rows of `row_length` + 1 tokens with stride `row_length` (row r holds
  // stream[r·T, r·T + T + 1)), every token trainable, and appends them; the tail that does not
  // fill a row is dropped. Returns the number of rows.
  int64_t add_stream_rows(std::span<const int32_t> stream, int64_t row_length) {
    const int64_t n = static_cast<int64_t>(stream.size());
    const int64_t rows = n < 1 ? 0 : (n - 1) / row_length;
    if (rows == 0) return 0;
    const int64_t begin = static_cast<int64_t>(tokens.size());
    const int64_t used = rows * row_length + 1;
    tokens.insert(tokens.end(), stream.begin(), stream.begin() + used);
    if (!trainable.empty()) trainable.insert(trainable.end(), static_cast<size_t>(used), 1);
    for (int64_t r = 0; r < rows; ++r) samples.push_back({begin + r * row_length, row_length + 1});
    return rows;
  }
};

}  // namespace lomo
