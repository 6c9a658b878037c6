#include "worker/train/token_dataset.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

#include "kernels/counter_hash.h"
#include "kernels/cpu/cross_entropy.h"

namespace lomo {
namespace {

// Fisher-Yates over all N samples, seeded by (seed, epoch); the identity without shuffle. Every
// rank computes the same permutation and takes its own stride of it.
std::vector<int64_t> permutation(int64_t n, uint64_t seed, bool shuffle, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  if (shuffle) {
    uint64_t state = mix_bits(seed ^ mix_bits(static_cast<uint64_t>(epoch) + 1));
    for (int64_t i = n - 1; i > 0; --i) {
      state = mix_bits(state);
      std::swap(order[static_cast<size_t>(i)],
                order[static_cast<size_t>(state % static_cast<uint64_t>(i + 1))]);
    }
  }
  return order;
}

SampleStore stream_store(const std::vector<int32_t>& tokens, int64_t row_length) {
  if (row_length < 1) throw std::invalid_argument("row length must be positive");
  SampleStore store;
  if (store.add_stream_rows(tokens, row_length) == 0) {
    throw std::invalid_argument(std::to_string(tokens.size()) +
                                " tokens are too few for one row of " + std::to_string(row_length) +
                                " (+1) tokens");
  }
  return store;
}

DatasetOptions stream_options(int64_t row_length, uint64_t seed, bool shuffle) {
  DatasetOptions options;
  options.max_length = row_length;
  options.seed = seed;
  options.shuffle = shuffle;
  return options;
}

}  // namespace

TokenDataset::TokenDataset(SampleStore samples, const DatasetOptions& options)
    : store_(std::move(samples)), options_(options) {
  if (options.max_length < 1) throw std::invalid_argument("max_length must be positive");
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    throw std::invalid_argument("rank " + std::to_string(options.rank) + " is outside world size " +
                                std::to_string(options.world_size));
  }
  if (!store_.trainable.empty() && store_.trainable.size() != store_.tokens.size()) {
    throw std::invalid_argument("sample store: one trainable flag per token expected");
  }
  for (const SampleStore::Span& span : store_.samples) {
    if (span.begin < 0 || span.length < 2 ||
        span.begin + span.length > static_cast<int64_t>(store_.tokens.size())) {
      throw std::invalid_argument("sample store: a sample outside the tokens or shorter than 2");
    }
  }
  per_rank_ = store_.size() / options.world_size;
  if (per_rank_ < 1) {
    throw std::invalid_argument(std::to_string(store_.size()) + " samples are too few for " +
                                std::to_string(options.world_size) + " data-parallel ranks");
  }
}

TokenDataset::TokenDataset(const std::vector<int32_t>& tokens, int64_t row_length, uint64_t seed,
                           bool shuffle)
    : TokenDataset(stream_store(tokens, row_length), stream_options(row_length, seed, shuffle)) {}

int64_t TokenDataset::positions(int64_t sample) const {
  return std::min(store_.samples[static_cast<size_t>(sample)].length, options_.max_length + 1) - 1;
}

std::vector<int64_t> TokenDataset::epoch_order(int64_t epoch, int64_t rank) const {
  const std::vector<int64_t> all =
      permutation(store_.size(), options_.seed, options_.shuffle, epoch);
  std::vector<int64_t> order(static_cast<size_t>(per_rank_));
  for (int64_t j = 0; j < per_rank_; ++j) {
    order[static_cast<size_t>(j)] = all[static_cast<size_t>(rank + j * options_.world_size)];
  }
  return order;
}

std::vector<int64_t> TokenDataset::walk_order(int64_t epoch) const {
  if (options_.packing) return epoch_order(epoch, options_.rank);
  return permutation(store_.size(), options_.seed, options_.shuffle, epoch);
}

template <typename OrderFor>
TokenBatch TokenDataset::build(DatasetCursor& cursor, int64_t batch_size, bool stay_in_epoch,
                               bool packing, int64_t world, OrderFor&& order) const {
  const int64_t max_length = options_.max_length;
  std::vector<std::vector<int64_t>> rows;
  int64_t longest = 0;
  // Unpacked: the next batch_size × world samples of the walk are the global batch; this rank's
  // rows are those at positions ≡ rank (mod world).
  for (int64_t i = 0; !packing && i < batch_size * world; ++i) {
    if (cursor.offset == static_cast<int64_t>(order(cursor.epoch).size())) {
      if (stay_in_epoch) break;
      ++cursor.epoch;
      cursor.offset = 0;
    }
    const int64_t sample = order(cursor.epoch)[static_cast<size_t>(cursor.offset++)];
    if (i % world != (world == 1 ? 0 : options_.rank)) continue;
    longest = std::max(longest, positions(sample));
    rows.push_back({sample});
  }
  while (packing && static_cast<int64_t>(rows.size()) < batch_size) {
    std::vector<int64_t> row;
    int64_t fill = 0;
    while (true) {
      if (cursor.offset == static_cast<int64_t>(order(cursor.epoch).size())) {
        if (stay_in_epoch) break;
        ++cursor.epoch;
        cursor.offset = 0;
      }
      const int64_t sample = order(cursor.epoch)[static_cast<size_t>(cursor.offset)];
      const int64_t p = positions(sample);
      if (!row.empty() && fill + p > max_length) break;
      row.push_back(sample);
      fill += p;
      ++cursor.offset;
    }
    if (row.empty()) break;
    longest = std::max(longest, fill);
    rows.push_back(std::move(row));
  }

  TokenBatch batch;
  batch.batch_size = static_cast<int64_t>(rows.size());
  batch.seq_len = longest;
  const size_t cells = static_cast<size_t>(batch.batch_size * batch.seq_len);
  batch.input_ids.assign(cells, options_.pad_id);
  batch.targets.assign(cells, cpu::kIgnoreIndex);
  if (packing) batch.segment_ids.assign(cells, 0);
  for (size_t r = 0; r < rows.size(); ++r) {
    size_t at = r * static_cast<size_t>(longest);
    const size_t row_end = at + static_cast<size_t>(longest);
    int32_t segment = 0;
    for (const int64_t sample : rows[r]) {
      const int64_t begin = store_.samples[static_cast<size_t>(sample)].begin;
      const int64_t p = positions(sample);
      for (int64_t i = 0; i < p; ++i, ++at) {
        batch.input_ids[at] = store_.tokens[static_cast<size_t>(begin + i)];
        if (store_.is_trainable(begin + i + 1)) {
          batch.targets[at] = store_.tokens[static_cast<size_t>(begin + i + 1)];
        }
        if (packing) batch.segment_ids[at] = segment;
      }
      ++segment;
    }
    // Padding after the last sample is a segment of its own when packed.
    if (packing) {
      std::fill(batch.segment_ids.begin() + static_cast<std::ptrdiff_t>(at),
                batch.segment_ids.begin() + static_cast<std::ptrdiff_t>(row_end), segment);
    }
  }
  return batch;
}

TokenBatch TokenDataset::next_batch(int64_t batch_size) {
  if (batch_size < 1) throw std::invalid_argument("batch size must be positive");
  return build(cursor_, batch_size, /*stay_in_epoch=*/false, options_.packing, options_.world_size,
               [this](int64_t epoch) -> const std::vector<int64_t>& {
                 if (order_epoch_ != epoch) {
                   order_ = walk_order(epoch);
                   order_epoch_ = epoch;
                 }
                 return order_;
               });
}

std::vector<TokenBatch> TokenDataset::first_batches(int64_t batch_size, int64_t max_batches) const {
  if (batch_size < 1) throw std::invalid_argument("batch size must be positive");
  const std::vector<int64_t> order = walk_order(0);
  auto order_for = [&](int64_t) -> const std::vector<int64_t>& { return order; };
  std::vector<TokenBatch> batches;
  DatasetCursor cursor;
  while (static_cast<int64_t>(batches.size()) < max_batches) {
    TokenBatch batch = build(cursor, batch_size, /*stay_in_epoch=*/true, options_.packing,
                             options_.world_size, order_for);
    if (batch.batch_size == 0) break;
    batches.push_back(std::move(batch));
  }
  return batches;
}

TokenBatch TokenDataset::rows_in_order(int64_t first, int64_t count) const {
  if (first < 0 || count < 1 || first + count > store_.size()) {
    throw std::invalid_argument("rows_in_order: samples [" + std::to_string(first) + ", " +
                                std::to_string(first + count) + ") are outside the store");
  }
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), first);
  DatasetCursor cursor;
  return build(cursor, count, /*stay_in_epoch=*/true, /*packing=*/false, /*world=*/1,
               [&](int64_t) -> const std::vector<int64_t>& { return order; });
}

int64_t TokenDataset::batches_for_epochs(int64_t epochs, int64_t batch_size) const {
  if (epochs < 1 || batch_size < 1)
    throw std::invalid_argument("epochs and batch size must be >= 1");
  auto batches = [](int64_t rows, int64_t per_batch) { return (rows + per_batch - 1) / per_batch; };
  if (!options_.packing) return batches(epochs * store_.size(), batch_size * options_.world_size);
  // Replays the packing of build(), for every rank, over the epochs' orders.
  const int64_t world = options_.world_size;
  std::vector<int64_t> rows(static_cast<size_t>(world), 0), fill(static_cast<size_t>(world), 0);
  std::vector<bool> open(static_cast<size_t>(world), false);
  for (int64_t e = 0; e < epochs; ++e) {
    const std::vector<int64_t> all = permutation(store_.size(), options_.seed, options_.shuffle, e);
    for (int64_t r = 0; r < world; ++r) {
      const size_t k = static_cast<size_t>(r);
      for (int64_t j = 0; j < per_rank_; ++j) {
        const int64_t p = positions(all[static_cast<size_t>(r + j * world)]);
        if (open[k] && fill[k] + p > options_.max_length) {
          ++rows[k];
          fill[k] = 0;
        }
        fill[k] += p;
        open[k] = true;
      }
    }
  }
  int64_t fewest = -1;
  for (int64_t r = 0; r < world; ++r) {
    const int64_t n =
        batches(rows[static_cast<size_t>(r)] + (open[static_cast<size_t>(r)] ? 1 : 0), batch_size);
    fewest = fewest < 0 ? n : std::min(fewest, n);
  }
  return fewest;
}

uint64_t TokenDataset::fingerprint() const {
  uint64_t h = mix_bits(static_cast<uint64_t>(store_.size()));
  h = mix_bits(h ^ static_cast<uint64_t>(options_.max_length));
  h = mix_bits(h ^ (options_.packing ? 1u : 0u));
  for (int64_t s = 0; s < store_.size(); ++s) {
    const SampleStore::Span& span = store_.samples[static_cast<size_t>(s)];
    const int64_t used = positions(s) + 1;
    h = mix_bits(h ^ static_cast<uint64_t>(used));
    for (int64_t i = span.begin; i < span.begin + used; ++i) {
      const uint64_t token = static_cast<uint32_t>(store_.tokens[static_cast<size_t>(i)]);
      h = mix_bits(h ^ (token << 1 | (store_.is_trainable(i) ? 1u : 0u)));
    }
  }
  return h;
}

void TokenDataset::restore(const DatasetCursor& cursor) {
  if (cursor.epoch < 0 || cursor.offset < 0 || cursor.offset > sample_count()) {
    throw std::invalid_argument("data cursor (epoch " + std::to_string(cursor.epoch) + ", offset " +
                                std::to_string(cursor.offset) + ") does not fit a dataset of " +
                                std::to_string(sample_count()) +
                                " samples: the data changed since the "
                                "checkpoint");
  }
  cursor_ = cursor;
}

}  // namespace lomo
