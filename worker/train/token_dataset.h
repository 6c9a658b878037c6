// Fixed-length training rows cut from one token stream, visited in a seeded order per epoch, with a
// cursor that a checkpoint saves so that a resumed run sees exactly the rows an uninterrupted one
// would.
//
// Cutting: a stream of N tokens gives (N − 1) / T rows; row r holds tokens [r·T, r·T + T) as inputs
// and [r·T + 1, r·T + T + 1) as targets (the next token of each input). The trailing tokens that
// do not fill a row are not used. Epoch e visits the rows in a Fisher-Yates permutation seeded by
// (seed, e); a batch that runs past the end of an epoch continues with the next epoch's order.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/engine/llama_model.h"

namespace lomo {

struct DatasetCursor {
  int64_t epoch = 0;
  int64_t offset = 0;  // rows of this epoch's order already consumed
  bool operator==(const DatasetCursor&) const = default;
};

class TokenDataset {
 public:
  // Throws std::invalid_argument when the stream is too short for one row.
  TokenDataset(std::vector<int32_t> tokens, int64_t row_length, uint64_t seed, bool shuffle);

  int64_t row_count() const { return row_count_; }
  int64_t row_length() const { return row_length_; }
  // The next `batch_size` rows in visiting order; advances the cursor.
  TokenBatch next_batch(int64_t batch_size);
  // Rows [first, first + count) in stream order (evaluation).
  TokenBatch rows_in_order(int64_t first, int64_t count) const;

  const DatasetCursor& cursor() const { return cursor_; }
  void restore(const DatasetCursor& cursor);

 private:
  void append_row(TokenBatch& batch, int64_t row) const;
  const std::vector<int64_t>& order_for(int64_t epoch);

  std::vector<int32_t> tokens_;
  int64_t row_length_;
  int64_t row_count_;
  uint64_t seed_;
  bool shuffle_;
  DatasetCursor cursor_;
  int64_t order_epoch_ = -1;
  std::vector<int64_t> order_;
};

}  // namespace lomo
