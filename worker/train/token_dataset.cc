#include "worker/train/token_dataset.h"

#include <numeric>
#include <stdexcept>
#include <string>

#include "worker/engine/counter_hash.h"

namespace lomo {

TokenDataset::TokenDataset(std::vector<int32_t> tokens, int64_t row_length, uint64_t seed,
                           bool shuffle)
    : tokens_(std::move(tokens)), row_length_(row_length), seed_(seed), shuffle_(shuffle) {
  if (row_length < 1) throw std::invalid_argument("row length must be positive");
  row_count_ = tokens_.empty() ? 0 : (static_cast<int64_t>(tokens_.size()) - 1) / row_length;
  if (row_count_ < 1) {
    throw std::invalid_argument(std::to_string(tokens_.size()) +
                                " tokens are too few for one row of " + std::to_string(row_length) +
                                " (+1) tokens");
  }
}

const std::vector<int64_t>& TokenDataset::order_for(int64_t epoch) {
  if (order_epoch_ == epoch) return order_;
  order_.resize(static_cast<size_t>(row_count_));
  std::iota(order_.begin(), order_.end(), 0);
  if (shuffle_) {
    uint64_t state = mix_bits(seed_ ^ mix_bits(static_cast<uint64_t>(epoch) + 1));
    for (int64_t i = row_count_ - 1; i > 0; --i) {
      state = mix_bits(state);
      std::swap(order_[static_cast<size_t>(i)],
                order_[static_cast<size_t>(state % static_cast<uint64_t>(i + 1))]);
    }
  }
  order_epoch_ = epoch;
  return order_;
}

void TokenDataset::append_row(TokenBatch& batch, int64_t row) const {
  const int32_t* start = tokens_.data() + row * row_length_;
  batch.input_ids.insert(batch.input_ids.end(), start, start + row_length_);
  batch.targets.insert(batch.targets.end(), start + 1, start + row_length_ + 1);
}

TokenBatch TokenDataset::next_batch(int64_t batch_size) {
  TokenBatch batch;
  batch.batch_size = batch_size;
  batch.seq_len = row_length_;
  for (int64_t i = 0; i < batch_size; ++i) {
    if (cursor_.offset == row_count_) {
      ++cursor_.epoch;
      cursor_.offset = 0;
    }
    append_row(batch, order_for(cursor_.epoch)[static_cast<size_t>(cursor_.offset++)]);
  }
  return batch;
}

TokenBatch TokenDataset::rows_in_order(int64_t first, int64_t count) const {
  TokenBatch batch;
  batch.batch_size = count;
  batch.seq_len = row_length_;
  for (int64_t r = first; r < first + count; ++r) append_row(batch, r);
  return batch;
}

void TokenDataset::restore(const DatasetCursor& cursor) {
  if (cursor.epoch < 0 || cursor.offset < 0 || cursor.offset > row_count_) {
    throw std::invalid_argument("data cursor (epoch " + std::to_string(cursor.epoch) + ", offset " +
                                std::to_string(cursor.offset) + ") does not fit a dataset of " +
                                std::to_string(row_count_) +
                                " rows: the data changed since the "
                                "checkpoint");
  }
  cursor_ = cursor;
}

}  // namespace lomo
