// Training rows and batches from token samples (worker/data/sample_store.h), visited in a seeded
// order per epoch, sharded across data-parallel ranks, with a cursor that a checkpoint saves so
// that a resumed run sees exactly the batches an uninterrupted one would.
//
// Rows. A sample of n tokens (at most T + 1, T = max_length; longer ones are cut to their first
// T + 1) gives n − 1 positions: input_ids[i] = ids[i] and targets[i] = ids[i + 1] when token i + 1
// is trainable, else −100, for i in [0, n − 1). Its last token is a target but never an input.
//   - Unpacked: one sample per row. A batch's rows are padded on the right to the longest row in
//     the batch with pad_id inputs and −100 targets; causal attention means no real token ever
//     attends to padding, so the padding changes nothing but the batch's shape.
//   - Packed: each row takes whole samples, in visiting order, while they fit in T positions; the
//     first sample that does not fit starts the next row (samples are never split). segment_ids
//     number the samples of a row 0, 1, ...; padding after them is a segment of its own. The model
//     keeps attention inside each segment and restarts positions at each segment's start, so a
//     packed row computes exactly what its samples would alone. A batch is padded to its longest
//     row.
//   - The stream formats (text, tokens) give samples of exactly T + 1 tokens that overlap by one
//     (row r = stream[r·T, r·T + T + 1)): every row is full, nothing is padded.
//
// Order. Epoch e visits the samples in a Fisher-Yates permutation of the store seeded by
// (seed, e) (identity without shuffle). A batch that runs past the end of an epoch continues with
// the next epoch's order. With world_size W:
//   - Unpacked, every rank walks the whole permutation with the same cursor: a step's global batch
//     is the next batch_size × W samples, and rank r takes those at positions r, r + W, ... of it.
//     The global batches are therefore the ones a single rank takes with batch_size × W rows,
//     whatever W, and no sample is left over: a data-parallel run follows the single-process
//     trajectory across epoch boundaries too (up to fp32 summation order).
//   - Packed, rank r packs the permutation's elements r, r + W, r + 2W, ... up to floor(N / W) of
//     them (disjoint samples of equal count; the N mod W left over differ each epoch when
//     shuffled). The trainer refuses packing with several ranks; this form is kept for the tests.
//
// Cursor. (epoch, offset): offset samples of the epoch's walk are consumed (unpacked: the global
// walk, the same on every rank; packed: this rank's). Batches are whole rows, so the cursor after
// a batch fully determines every later batch.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/data/sample_store.h"
#include "worker/engine/llama_model.h"

namespace lomo {

struct DatasetCursor {
  int64_t epoch = 0;
  int64_t offset = 0;  // samples of this epoch's order (this rank's share) already consumed
  bool operator==(const DatasetCursor&) const = default;
};

struct DatasetOptions {
  int64_t max_length = 512;  // T: input positions per row
  bool packing = false;
  bool shuffle = true;
  uint64_t seed = 0;
  int64_t rank = 0;  // this data-parallel rank, in [0, world_size)
  int64_t world_size = 1;
  int32_t pad_id = 0;  // input id of padding positions (any id in the vocabulary: never attended)
};

class TokenDataset {
 public:
  // Throws std::invalid_argument for bad options or when this rank gets no sample.
  TokenDataset(SampleStore samples, const DatasetOptions& options);
  // A token stream cut into rows of row_length + 1 tokens (SampleStore::add_stream_rows),
  // unpacked, one rank. Throws std::invalid_argument when the stream is too short for one row.
  TokenDataset(const std::vector<int32_t>& tokens, int64_t row_length, uint64_t seed, bool shuffle);

  // Samples an epoch's walk holds (for a stream: rows): all of them unpacked (the ranks share
  // each global batch), this rank's share packed.
  int64_t sample_count() const { return options_.packing ? per_rank_ : store_.size(); }
  int64_t row_count() const { return sample_count(); }
  int64_t row_length() const { return options_.max_length; }
  const DatasetOptions& options() const { return options_; }
  const SampleStore& store() const { return store_; }

  // The next `batch_size` rows in visiting order; advances the cursor.
  TokenBatch next_batch(int64_t batch_size);

  // Evaluation: the rows of epoch 0 (this rank's share, in visiting order: store order without
  // shuffle), `batch_size` rows a batch, at most `max_batches` batches; the last may be smaller
  // (with several ranks, a rank's last may be missing: the global batches are what counts).
  // Does not move the cursor.
  std::vector<TokenBatch> first_batches(int64_t batch_size, int64_t max_batches) const;

  // Unpacked rows of store samples [first, first + count), padded to the longest (tests).
  TokenBatch rows_in_order(int64_t first, int64_t count) const;

  // Steps that visit every sample `epochs` times with `batch_size` rows a step: the number of
  // rows over that many epochs' orders, divided by batch_size, rounded up. Packed, the row count
  // depends on the order; the smallest over all ranks is returned, so that every rank agrees.
  int64_t batches_for_epochs(int64_t epochs, int64_t batch_size) const;

  // Store indices of the samples `rank` packs in `epoch`, in order (with one rank: the epoch's
  // permutation).
  std::vector<int64_t> epoch_order(int64_t epoch, int64_t rank) const;

  // A hash of the samples, T and packing: equal fingerprints mean equal batches for equal
  // cursors, seeds and ranks. Checkpoints keep it so that a resume can refuse changed data.
  uint64_t fingerprint() const;

  const DatasetCursor& cursor() const { return cursor_; }
  // Throws std::invalid_argument for a cursor outside this dataset.
  void restore(const DatasetCursor& cursor);

 private:
  int64_t positions(int64_t sample) const;
  // Up to `batch_size` rows from `cursor` on, advancing it; stops early at the end of the epoch
  // when `stay_in_epoch`. order(epoch) gives an epoch's visiting order (store indices).
  // The order the cursor walks in `epoch`: the whole permutation unpacked, this rank's share
  // packed.
  std::vector<int64_t> walk_order(int64_t epoch) const;
  // Unpacked, this rank's rows of the global batch of batch_size × world samples.
  template <typename OrderFor>
  TokenBatch build(DatasetCursor& cursor, int64_t batch_size, bool stay_in_epoch, bool packing,
                   int64_t world, OrderFor&& order) const;

  SampleStore store_;
  DatasetOptions options_;
  int64_t per_rank_ = 0;
  DatasetCursor cursor_;
  int64_t order_epoch_ = -1;
  std::vector<int64_t> order_;  // walk_order(order_epoch_)
};

}  // namespace lomo
