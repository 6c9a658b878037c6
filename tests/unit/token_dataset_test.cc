// Batching (worker/train/token_dataset.h): padding, truncation, packing, seeded shuffling, the
// cursor, sharding; packing checked through the model's outputs; multiple-choice scoring against
// a reference computation; and the trainer end to end on the JSONL formats.
#include "worker/train/token_dataset.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/cross_entropy.h"
#include "worker/data/byte_tokenizer.h"
#include "worker/data/jsonl_record.h"
#include "worker/data/tokenizer.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/train/multiple_choice_eval.h"
#include "worker/train/trainer.h"

namespace lomo {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const fs::path kLlama3Tokenizer = fs::path(LOMO_TEST_DATA_DIR) / "tokenizers" / "llama3_style";
constexpr int32_t kIgnore = cpu::kIgnoreIndex;

// A sample of `length` tokens first, first + 1, ...; tokens from `trainable_from` on trainable.
TokenSample counting_sample(int32_t first, int64_t length, int64_t trainable_from = 1) {
  TokenSample s;
  for (int64_t i = 0; i < length; ++i) {
    s.ids.push_back(first + static_cast<int32_t>(i));
    s.trainable.push_back(i >= trainable_from ? 1 : 0);
  }
  return s;
}

SampleStore store_of(const std::vector<TokenSample>& samples) {
  SampleStore store;
  for (const TokenSample& s : samples) store.add(s);
  return store;
}

// Samples of varied lengths (2 to 9 tokens) whose first token (100·i) names them.
SampleStore varied_store(int64_t count) {
  std::vector<TokenSample> samples;
  for (int64_t i = 0; i < count; ++i) {
    samples.push_back(counting_sample(static_cast<int32_t>(100 * i), 2 + (i * 7) % 8));
  }
  return store_of(samples);
}

DatasetOptions options(int64_t max_length, bool packing, bool shuffle = true, uint64_t seed = 5) {
  DatasetOptions o;
  o.max_length = max_length;
  o.packing = packing;
  o.shuffle = shuffle;
  o.seed = seed;
  o.pad_id = 3;
  return o;
}

// The samples (named by their first token / 100) that start in a batch's rows, in order.
std::vector<int64_t> samples_in(const TokenBatch& batch) {
  std::vector<int64_t> names;
  for (int64_t r = 0; r < batch.batch_size; ++r) {
    for (int64_t t = 0; t < batch.seq_len; ++t) {
      const size_t i = static_cast<size_t>(r * batch.seq_len + t);
      const bool starts = t == 0 || (!batch.segment_ids.empty() &&
                                     batch.segment_ids[i] != batch.segment_ids[i - 1]);
      if (starts && batch.input_ids[i] != 3 && batch.input_ids[i] % 100 == 0) {
        names.push_back(batch.input_ids[i] / 100);
      }
    }
  }
  return names;
}

TEST(TokenDatasetTest, UnpackedRowsArePaddedToTheLongestWithIgnoredTargets) {
  // Sample 0: 4 tokens, prompt of 2 (targets from token 2 on); sample 1: 6 tokens, all trainable.
  TokenDataset data(store_of({counting_sample(10, 4, 2), counting_sample(20, 6)}),
                    options(8, false, /*shuffle=*/false));
  const TokenBatch b = data.next_batch(2);
  EXPECT_EQ(b.batch_size, 2);
  EXPECT_EQ(b.seq_len, 5);  // the longer sample's 6 − 1 positions
  EXPECT_THAT(b.input_ids, ElementsAre(10, 11, 12, 3, 3, /**/ 20, 21, 22, 23, 24));
  EXPECT_THAT(b.targets, ElementsAre(kIgnore, 12, 13, kIgnore, kIgnore, /**/ 21, 22, 23, 24, 25));
  EXPECT_TRUE(b.segment_ids.empty());
  EXPECT_TRUE(b.positions.empty());
}

TEST(TokenDatasetTest, SamplesLongerThanMaxLengthKeepTheirFirstMaxLengthPlusOneTokens) {
  TokenDataset data(store_of({counting_sample(10, 9)}), options(4, false));
  const TokenBatch b = data.next_batch(1);
  EXPECT_EQ(b.seq_len, 4);
  EXPECT_THAT(b.input_ids, ElementsAre(10, 11, 12, 13));
  EXPECT_THAT(b.targets, ElementsAre(11, 12, 13, 14));
}

TEST(TokenDatasetTest, PackedRowsHoldWholeSamplesAndNoTargetCrossesABoundary) {
  // Positions per sample: 2, 3, 1, 4, 2 with T = 5: rows [0, 1] (5), [2, 3] (5), and [4] (2),
  // which goes on with the next epoch's first sample (2 more positions; the next, 3, does not fit).
  TokenDataset data(
      store_of({counting_sample(100, 3), counting_sample(200, 4, 2), counting_sample(300, 2),
                counting_sample(400, 5), counting_sample(500, 3)}),
      options(5, true, /*shuffle=*/false));
  const TokenBatch b = data.next_batch(3);
  EXPECT_EQ(b.batch_size, 3);
  EXPECT_EQ(b.seq_len, 5);
  EXPECT_THAT(b.input_ids, ElementsAre(100, 101, 200, 201, 202,  //
                                       300, 400, 401, 402, 403,  //
                                       500, 501, 100, 101, 3));
  // The last position of each sample predicts that sample's last token, never the next sample's
  // first; the prompt token 201 of sample 200 is not a target.
  EXPECT_THAT(b.targets, ElementsAre(101, 102, kIgnore, 202, 203,  //
                                     301, 401, 402, 403, 404,      //
                                     501, 502, 101, 102, kIgnore));
  EXPECT_THAT(b.segment_ids, ElementsAre(0, 0, 1, 1, 1, /**/ 0, 1, 1, 1, 1, /**/ 0, 0, 1, 1, 2));
  EXPECT_EQ(data.cursor(), (DatasetCursor{1, 1}));
  // Evaluation batches stay inside epoch 0.
  const std::vector<TokenBatch> eval = data.first_batches(2, 10);
  ASSERT_EQ(eval.size(), 2u);
  EXPECT_EQ(eval[1].batch_size, 1);
  EXPECT_THAT(eval[1].input_ids, ElementsAre(500, 501));
}

TEST(TokenDatasetTest, EveryEpochVisitsEverySampleOnceInASeededOrder) {
  for (const bool packing : {false, true}) {
    TokenDataset a(varied_store(23), options(12, packing, true, 7));
    TokenDataset same(varied_store(23), options(12, packing, true, 7));
    TokenDataset other(varied_store(23), options(12, packing, true, 8));
    std::vector<int64_t> seen_a, seen_other;
    // Three epochs' worth of samples, batch by batch.
    while (a.cursor().epoch < 3) {
      const TokenBatch batch = a.next_batch(2);
      EXPECT_EQ(batch.input_ids, same.next_batch(2).input_ids);
      const std::vector<int64_t> names = samples_in(batch);
      seen_a.insert(seen_a.end(), names.begin(), names.end());
    }
    while (other.cursor().epoch < 3) {
      const std::vector<int64_t> names = samples_in(other.next_batch(2));
      seen_other.insert(seen_other.end(), names.begin(), names.end());
    }
    EXPECT_NE(a.epoch_order(0, 0), a.epoch_order(1, 0)) << "epochs were not reshuffled";
    for (int64_t e = 0; e < 3; ++e) {
      std::vector<int64_t> epoch(seen_a.begin() + e * 23, seen_a.begin() + (e + 1) * 23);
      EXPECT_EQ(epoch, a.epoch_order(e, 0)) << "epoch " << e;
      std::sort(epoch.begin(), epoch.end());
      for (int64_t i = 0; i < 23; ++i) EXPECT_EQ(epoch[static_cast<size_t>(i)], i);
    }
    EXPECT_NE(std::vector<int64_t>(seen_a.begin(), seen_a.begin() + 23),
              std::vector<int64_t>(seen_other.begin(), seen_other.begin() + 23))
        << "another seed gave the same order";
    // Without shuffling: store order.
    TokenDataset in_order(varied_store(23), options(12, packing, /*shuffle=*/false));
    std::vector<int64_t> expected(23);
    for (int64_t i = 0; i < 23; ++i) expected[static_cast<size_t>(i)] = i;
    EXPECT_EQ(in_order.epoch_order(4, 0), expected);
  }
}

TEST(TokenDatasetTest, ARestoredCursorGivesExactlyTheBatchesOfAnUninterruptedRun) {
  for (const bool packing : {false, true}) {
    for (const int64_t stop : {1, 4, 9, 13}) {  // 9 and 13 are past epoch boundaries
      TokenDataset straight(varied_store(17), options(10, packing));
      TokenDataset interrupted(varied_store(17), options(10, packing));
      for (int64_t i = 0; i < stop; ++i) {
        EXPECT_EQ(straight.next_batch(3).input_ids, interrupted.next_batch(3).input_ids);
      }
      TokenDataset resumed(varied_store(17), options(10, packing));
      resumed.restore(interrupted.cursor());
      for (int64_t i = 0; i < 12; ++i) {
        const TokenBatch a = straight.next_batch(3), b = resumed.next_batch(3);
        EXPECT_EQ(a.input_ids, b.input_ids) << "packing " << packing << ", stop " << stop;
        EXPECT_EQ(a.targets, b.targets);
        EXPECT_EQ(a.segment_ids, b.segment_ids);
      }
      EXPECT_EQ(straight.cursor(), resumed.cursor());
    }
  }
  TokenDataset data(varied_store(17), options(10, false));
  EXPECT_THROW(data.restore(DatasetCursor{0, 18}), std::invalid_argument);
  EXPECT_THROW(data.restore(DatasetCursor{-1, 0}), std::invalid_argument);
  EXPECT_NO_THROW(data.restore(DatasetCursor{3, 17}));
}

// Unpacked, a step's global batch is the single-rank batch of batch_size × W rows, whatever W:
// rank r holds its rows r, r + W, ... and every rank's cursor is the single rank's. Checked over
// steps that cross epoch boundaries with a sample count no batch size divides (nothing left over,
// nothing seen twice within an epoch), shuffled and not.
TEST(TokenDatasetTest, UnpackedRanksSplitTheSingleRanksGlobalBatchesAcrossEpochs) {
  for (const int64_t count : {12, 14}) {
    for (const bool shuffle : {false, true}) {
      const int64_t world = 3;
      const int64_t rows_per_rank = 2;
      DatasetOptions single_options = options(10, false);
      single_options.shuffle = shuffle;
      TokenDataset single(varied_store(count), single_options);
      std::vector<TokenDataset> ranks;
      for (int64_t rank = 0; rank < world; ++rank) {
        DatasetOptions o = single_options;
        o.rank = rank;
        o.world_size = world;
        ranks.emplace_back(varied_store(count), o);
      }
      for (int step = 0; step < 9; ++step) {  // 54 rows: several epochs of 12 or 14
        const std::vector<int64_t> global = samples_in(single.next_batch(rows_per_rank * world));
        for (int64_t rank = 0; rank < world; ++rank) {
          const std::vector<int64_t> mine =
              samples_in(ranks[static_cast<size_t>(rank)].next_batch(rows_per_rank));
          ASSERT_EQ(mine.size(), static_cast<size_t>(rows_per_rank));
          for (int64_t j = 0; j < rows_per_rank; ++j) {
            EXPECT_EQ(mine[static_cast<size_t>(j)], global[static_cast<size_t>(rank + j * world)])
                << "count " << count << " step " << step << " rank " << rank << " row " << j;
          }
          EXPECT_EQ(ranks[static_cast<size_t>(rank)].cursor().epoch, single.cursor().epoch);
          EXPECT_EQ(ranks[static_cast<size_t>(rank)].cursor().offset, single.cursor().offset);
        }
      }
      EXPECT_EQ(ranks[0].batches_for_epochs(3, rows_per_rank),
                single.batches_for_epochs(3, rows_per_rank * world));
    }
  }
}

// Packed (which the trainer allows with one rank only), each rank packs its own share.
TEST(TokenDatasetTest, PackedRanksSeeDisjointSamplesThatTogetherCoverTheSet) {
  for (const int64_t count : {12, 14}) {  // 14 = 4·3 + 2: two samples left over each epoch
    for (const bool packing : {true}) {
      const int64_t world = 3;
      for (int64_t epoch = 0; epoch < 3; ++epoch) {
        std::set<int64_t> all;
        std::set<int64_t> per_rank_union;
        size_t total = 0;
        for (int64_t rank = 0; rank < world; ++rank) {
          DatasetOptions o = options(10, packing);
          o.rank = rank;
          o.world_size = world;
          TokenDataset data(varied_store(count), o);
          EXPECT_EQ(data.sample_count(), count / world);
          // What the rank actually consumes through next_batch in this epoch.
          data.restore(DatasetCursor{epoch, 0});
          std::vector<int64_t> seen;
          while (data.cursor().epoch == epoch && data.cursor().offset < data.sample_count()) {
            const std::vector<int64_t> names = samples_in(data.next_batch(1));
            seen.insert(seen.end(), names.begin(), names.end());
          }
          // A packed row may run on into the next epoch's samples.
          seen.resize(std::min(seen.size(), static_cast<size_t>(data.sample_count())));
          EXPECT_EQ(seen, data.epoch_order(epoch, rank));
          total += seen.size();
          per_rank_union.insert(seen.begin(), seen.end());
        }
        EXPECT_EQ(per_rank_union.size(), total) << "two ranks saw the same sample";
        EXPECT_EQ(total, static_cast<size_t>(count / world * world));
        if (count % world == 0) {
          EXPECT_EQ(per_rank_union.size(), static_cast<size_t>(count));
        }
      }
    }
  }
  DatasetOptions o = options(10, false);
  o.world_size = 5;
  o.rank = 5;
  EXPECT_THROW(TokenDataset(varied_store(10), o), std::invalid_argument);
  o.rank = 0;
  EXPECT_THROW(TokenDataset(varied_store(4), o), std::invalid_argument);  // no sample for rank 4
}

TEST(TokenDatasetTest, BatchesForEpochsIsTheNumberOfBatchesThatVisitEverySample) {
  for (const bool packing : {false, true}) {
    for (const int64_t batch_size : {1, 2, 5}) {
      for (const int64_t epochs : {1, 3}) {
        TokenDataset data(varied_store(19), options(11, packing));
        const int64_t batches = data.batches_for_epochs(epochs, batch_size);
        auto consumed = [&] { return data.cursor().epoch * 19 + data.cursor().offset; };
        for (int64_t b = 0; b + 1 < batches; ++b) data.next_batch(batch_size);
        EXPECT_LT(consumed(), epochs * 19) << "one batch fewer would have seen every sample";
        data.next_batch(batch_size);
        EXPECT_GE(consumed(), epochs * 19);
      }
    }
  }
  // Unpacked: every epoch has the same number of rows.
  EXPECT_EQ(TokenDataset(varied_store(19), options(11, false)).batches_for_epochs(2, 4), 10);
}

TEST(TokenDatasetTest, StreamRowsAreTheOldFixedRowCut) {
  std::vector<int32_t> tokens(101);
  for (int i = 0; i < 101; ++i) tokens[static_cast<size_t>(i)] = i;
  TokenDataset data(tokens, 10, 7, false);
  EXPECT_EQ(data.row_count(), 10);
  const TokenBatch b = data.next_batch(2);
  EXPECT_EQ(b.seq_len, 10);
  EXPECT_EQ(b.input_ids.front(), 0);
  EXPECT_EQ(b.targets[9], 10);
  EXPECT_EQ(b.input_ids[10], 10);  // row 1 starts at the token row 0 last predicted
  EXPECT_EQ(b.targets.back(), 20);
}

TEST(TokenDatasetTest, FingerprintChangesWithTheData) {
  const uint64_t base = TokenDataset(varied_store(9), options(10, false)).fingerprint();
  EXPECT_EQ(TokenDataset(varied_store(9), options(10, false, false, 99)).fingerprint(), base);
  EXPECT_NE(TokenDataset(varied_store(10), options(10, false)).fingerprint(), base);
  EXPECT_NE(TokenDataset(varied_store(9), options(10, true)).fingerprint(), base);
  EXPECT_NE(TokenDataset(varied_store(9), options(7, false)).fingerprint(), base);
  SampleStore changed = varied_store(9);
  changed.trainable[1] = 0;
  EXPECT_NE(TokenDataset(changed, options(10, false)).fingerprint(), base);
}

// ---------------------------------------------------------------------------------------------
// Through the model.

LlamaConfig tiny_config(int64_t vocab_size) {
  LlamaConfig c;
  c.vocab_size = vocab_size;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 256;
  return c;
}

// Σ −log p(target) per (row, segment) of the last forward, in row-major order of first
// appearance: one entry per sample of the batch.
std::vector<double> loss_per_sample(const LlamaModel& model, const TokenBatch& batch,
                                    int64_t vocab) {
  std::vector<double> losses;
  const float* logits = model.logits();
  for (int64_t r = 0; r < batch.batch_size; ++r) {
    int32_t segment = -1;
    for (int64_t t = 0; t < batch.seq_len; ++t) {
      const size_t i = static_cast<size_t>(r * batch.seq_len + t);
      const int32_t s = batch.segment_ids.empty() ? 0 : batch.segment_ids[i];
      if (batch.targets[i] == kIgnore) continue;
      if (s != segment) {
        losses.push_back(0.0);
        segment = s;
      }
      const float* row = logits + static_cast<int64_t>(i) * vocab;
      double total = 0.0;
      for (int64_t v = 0; v < vocab; ++v) total += std::exp(static_cast<double>(row[v]));
      losses.back() -= static_cast<double>(row[batch.targets[i]]) - std::log(total);
    }
  }
  return losses;
}

TEST(PackingThroughTheModel, APackedBatchGivesEachSampleTheLossItHasAlone) {
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(256), DType::kF32, accountant);
  weights.init_random(11, 0.3f);  // large weights: attention leakage would show
  LlamaModel model(weights, accountant);
  // Records through the pipeline: prompt/completion pairs of varied lengths, bytes tokenizer.
  const ByteTokenizer bytes;
  const RecordParser parser(bytes, {DataFormat::kPromptCompletion, std::nullopt, false});
  SampleStore store;
  for (int i = 0; i < 9; ++i) {
    const std::string prompt = std::string(1 + i % 4, static_cast<char>('a' + i)) + "?";
    const std::string completion = " " + std::string(2 + (i * 5) % 7, static_cast<char>('k' + i));
    store.add(parser.sample(nlohmann::json{{"prompt", prompt}, {"completion", completion}}.dump()));
  }
  const TokenDataset packed(store, options(24, true, /*shuffle=*/false));
  const TokenDataset unpacked(store, options(24, false, /*shuffle=*/false));
  std::vector<double> packed_losses, unpacked_losses, leaking_losses;
  int64_t packed_rows = 0;
  for (const TokenBatch& batch : packed.first_batches(2, 100)) {
    packed_rows += batch.batch_size;
    model.forward(batch);
    for (double l : loss_per_sample(model, batch, 256)) packed_losses.push_back(l);
    // Control: the same rows without segments let later samples attend to earlier ones.
    TokenBatch leaking = batch;
    leaking.segment_ids.clear();
    model.forward(leaking);
    for (double l : loss_per_sample(model, batch, 256)) leaking_losses.push_back(l);
  }
  for (const TokenBatch& batch : unpacked.first_batches(3, 100)) {
    model.forward(batch);
    for (double l : loss_per_sample(model, batch, 256)) unpacked_losses.push_back(l);
  }
  EXPECT_LT(packed_rows, 9) << "the samples should share rows";
  ASSERT_EQ(packed_losses.size(), 9u);
  ASSERT_EQ(unpacked_losses.size(), 9u);
  double largest_leak = 0.0;
  for (size_t s = 0; s < 9; ++s) {
    // fp32 logits through differently shaped matmuls: agreement to ~1e-6 relative; 1e-4 leaves
    // room while any attention across samples moves the loss by far more (the control below).
    EXPECT_NEAR(packed_losses[s], unpacked_losses[s], 1e-4 * std::max(1.0, unpacked_losses[s]))
        << "sample " << s;
    largest_leak = std::max(largest_leak, std::abs(leaking_losses[s] - unpacked_losses[s]));
  }
  EXPECT_GT(largest_leak, 1e-2) << "without segment ids the packed samples should interact";
}

TEST(MultipleChoiceEval, ScoresMatchAReferenceComputationCandidateByCandidate) {
  const std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(kLlama3Tokenizer);
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(tokenizer->vocab_size()), DType::kF32, accountant);
  weights.init_random(3, 0.2f);
  LlamaModel model(weights, accountant);
  const RecordParser parser(*tokenizer, {DataFormat::kMultipleChoice, std::nullopt, false});
  const std::vector<std::string> lines = {
      R"({"context": "The sky is", "choices": [" blue", " green", " made of cheese"], "label": 0})",
      R"({"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 1})",
      R"({"context": "Paris is in", "choices": [" France", " Peru", " Spain", " Chad"], "label": 3})",
      R"({"context": "Yes or no?", "choices": ["Yes", "No"], "label": 0})"};
  std::vector<MultipleChoiceRecord> records;
  for (const std::string& line : lines) records.push_back(parser.multiple_choice(line));

  const MultipleChoiceResult result = score_multiple_choice(model, records, 3, 0);
  ASSERT_EQ(result.log_likelihoods.size(), records.size());
  const int64_t vocab = tokenizer->vocab_size();
  int64_t correct = 0;
  for (size_t r = 0; r < records.size(); ++r) {
    const nlohmann::json record = nlohmann::json::parse(lines[r]);
    std::vector<double> reference;
    for (const auto& choice : record["choices"]) {
      // Reference: BOS + context + candidate + EOS run alone; the candidate's tokens and EOS
      // scored with a log-softmax in double.
      std::vector<int32_t> ids = {*tokenizer->bos_id()};
      const std::vector<int32_t> context = tokenizer->encode(record["context"].get<std::string>());
      const std::vector<int32_t> answer = tokenizer->encode(choice.get<std::string>());
      ids.insert(ids.end(), context.begin(), context.end());
      ids.insert(ids.end(), answer.begin(), answer.end());
      ids.push_back(*tokenizer->eos_id());
      const size_t scored_from = 1 + context.size();  // index of the first scored token
      TokenBatch alone;
      alone.batch_size = 1;
      alone.seq_len = static_cast<int64_t>(ids.size());
      alone.input_ids = ids;
      alone.targets.assign(ids.size(), kIgnore);
      model.forward(alone);
      double log_likelihood = 0.0;
      for (size_t i = scored_from; i < ids.size(); ++i) {
        const float* row = model.logits() + static_cast<int64_t>(i - 1) * vocab;
        double total = 0.0;
        for (int64_t v = 0; v < vocab; ++v) total += std::exp(static_cast<double>(row[v]));
        log_likelihood += static_cast<double>(row[ids[i]]) - std::log(total);
      }
      reference.push_back(log_likelihood);
    }
    ASSERT_EQ(result.log_likelihoods[r].size(), reference.size());
    for (size_t c = 0; c < reference.size(); ++c) {
      // fp32 logits, padded batch against a lone row: 1e-4 absolute on sums of a few log-probs.
      EXPECT_NEAR(result.log_likelihoods[r][c], reference[c], 1e-4) << "record " << r << " " << c;
    }
    const int64_t best = std::max_element(reference.begin(), reference.end()) - reference.begin();
    EXPECT_EQ(result.predictions[r], best);
    correct += best == record["label"].get<int64_t>() ? 1 : 0;
  }
  EXPECT_EQ(result.correct, correct);
  EXPECT_DOUBLE_EQ(result.accuracy, static_cast<double>(correct) / 4.0);
  // One candidate per forward gives the same scores: padding never matters.
  const MultipleChoiceResult one_by_one = score_multiple_choice(model, records, 1, 0);
  for (size_t r = 0; r < records.size(); ++r) {
    for (size_t c = 0; c < records[r].candidates.size(); ++c) {
      EXPECT_NEAR(one_by_one.log_likelihoods[r][c], result.log_likelihoods[r][c], 1e-4);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The trainer on JSONL data.

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::path(::testing::TempDir()) / ("token_dataset_test_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string chat_line(int i, const std::string& role = "assistant") {
  nlohmann::json messages = nlohmann::json::array();
  messages.push_back({{"role", "system"}, {"content", "Count."}});
  messages.push_back({{"role", "user"}, {"content", "After " + std::to_string(i) + "?"}});
  messages.push_back({{"role", role}, {"content", std::to_string(i + 1) + " comes next."}});
  return nlohmann::json{{"messages", messages}}.dump();
}

// A model with the Llama 3 style test tokenizer's vocabulary and chat data on disk.
struct ChatWorkspace {
  explicit ChatWorkspace(const std::string& name) : root(fresh_dir(name)) {
    MemoryAccountant accountant;
    LlamaWeights weights(tiny_config(1008), DType::kF32, accountant);
    weights.init_random(2, 0.05f);
    save_llama_checkpoint(weights, root / "model");
    std::ofstream train(root / "train.jsonl");
    for (int i = 0; i < 24; ++i) train << chat_line(i) << "\n";
    std::ofstream eval(root / "eval.jsonl");
    for (int i = 0; i < 6; ++i) {
      eval << nlohmann::json{{"context", "After " + std::to_string(i) + " comes"},
                             {"choices",
                              {" " + std::to_string(i + 1), " " + std::to_string(i + 7)}},
                             {"label", 0}}
                  .dump()
           << "\n";
    }
  }

  JobSpec spec(const std::string& output) const {
    JobSpec s;
    s.model.path = (root / "model").string();
    s.tokenizer.kind = "auto";
    s.tokenizer.path = kLlama3Tokenizer.string();
    s.data.format = "chat";
    s.data.chat_template = "llama-3";
    s.data.train = {(root / "train.jsonl").string()};
    s.data.eval = {(root / "eval.jsonl").string()};
    s.data.eval_format = "multiple_choice";
    s.data.max_length = 96;
    s.data.packing = true;
    s.optimizer.name = "adalomo";
    s.optimizer.lr = 1e-2;
    s.training.batch_size = 2;
    s.training.steps = 8;
    s.training.eval_every = 4;
    s.training.eval_batches = 2;
    s.output.dir = (root / output).string();
    return s;
  }

  fs::path root;
};

std::vector<nlohmann::json> metric_lines(const JobSpec& spec) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(fs::path(spec.output.dir) / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

TEST(TrainerOnJsonl, PackedChatTrainingResumesBitForBitAndReportsAccuracy) {
  ChatWorkspace ws("chat_resume");
  const JobSpec straight = ws.spec("straight");
  std::vector<EvalMetrics> evals;
  TrainerHooks hooks;
  hooks.on_eval = [&](const EvalMetrics& m) { evals.push_back(m); };
  const TrainResult full = train(straight, {}, hooks);
  EXPECT_EQ(full.steps_done, 8);
  ASSERT_EQ(evals.size(), 2u);  // step 4 and the end
  ASSERT_TRUE(evals.back().accuracy.has_value());
  EXPECT_EQ(evals.back().examples, 4);  // eval_batches 2 × batch_size 2 of the 6 records
  EXPECT_GE(*evals.back().accuracy, 0.0);
  EXPECT_LE(*evals.back().accuracy, 1.0);

  const JobSpec interrupted = ws.spec("interrupted");
  std::atomic<bool> stop{false};
  TrainerHooks stop_hooks;
  stop_hooks.on_step = [&](const TrainingMetrics& m) {
    if (m.step == 3) stop = true;
  };
  TrainerOptions options;
  options.stop_requested = &stop;
  EXPECT_TRUE(train(interrupted, options, stop_hooks).stopped);
  const TrainResult second = train(interrupted, {}, {});
  EXPECT_EQ(second.steps_done, 8);
  for (const char* file :
       {"model.safetensors", "optimizer.safetensors", "lomo_trainer_state.json"}) {
    EXPECT_EQ(file_bytes(full.last_checkpoint / file), file_bytes(second.last_checkpoint / file))
        << file;
  }
  const nlohmann::json state =
      nlohmann::json::parse(file_bytes(full.last_checkpoint / "lomo_trainer_state.json"));
  EXPECT_EQ(state["data_cursor"]["fingerprint"].get<std::string>().size(), 16u);

  const std::vector<nlohmann::json> lines = metric_lines(straight);
  int eval_lines = 0;
  for (const nlohmann::json& line : lines) {
    if (line.contains("eval_accuracy")) {
      ++eval_lines;
      EXPECT_EQ(line["eval_examples"], 4);
    } else {
      EXPECT_EQ(line["skipped_records"], 0);
    }
  }
  EXPECT_EQ(eval_lines, 2);
  EXPECT_EQ(lines.size(), metric_lines(interrupted).size());
}

TEST(TrainerOnJsonl, BadRecordsFailWithFileAndLineOrAreSkippedAndCounted) {
  ChatWorkspace ws("bad_records");
  {
    std::ofstream train(ws.root / "train.jsonl", std::ios::app);
    train << chat_line(90, "bot") << "\n"
          << "{\"messages\": 3}\n";
  }
  JobSpec spec = ws.spec("fail");
  try {
    train(spec, {}, {});
    FAIL() << "a bad record was accepted";
  } catch (const JobSpecError& e) {
    EXPECT_EQ(e.field(), "data.train[0]");
    EXPECT_THAT(e.what(),
                HasSubstr("train.jsonl:25: field 'messages[2].role': unknown role 'bot' (expected "
                          "system, user, assistant)"));
  }
  spec = ws.spec("skip");
  spec.data.on_bad_record = "skip";
  std::vector<std::string> logs;
  int64_t skipped = -1;
  TrainerHooks hooks;
  hooks.on_log = [&](const std::string& line) { logs.push_back(line); };
  hooks.on_step = [&](const TrainingMetrics& m) { skipped = m.skipped_records; };
  train(spec, {}, hooks);
  EXPECT_EQ(skipped, 2);
  EXPECT_EQ(metric_lines(spec).front()["skipped_records"], 2);
  ASSERT_FALSE(logs.empty());
  EXPECT_THAT(logs.front(), HasSubstr("data.train: skipped 2 bad record(s)"));
  EXPECT_THAT(logs.front(), HasSubstr("train.jsonl:26: field 'messages': expected an array"));
}

TEST(TrainerOnJsonl, ChangedDataOrATokenizerWithoutTheTemplatesTokensIsRefused) {
  ChatWorkspace ws("changed");
  JobSpec spec = ws.spec("out");
  spec.training.steps = 2;
  train(spec, {}, {});
  std::ofstream(ws.root / "train.jsonl", std::ios::app) << chat_line(50) << "\n";
  spec.training.steps = 2;
  EXPECT_THAT([&] { train(spec, {}, {}); },
              ::testing::ThrowsMessage<CheckpointError>(HasSubstr("the training data")));
  spec = ws.spec("chatml");
  spec.data.chat_template = "chatml";
  try {
    train(spec, {}, {});
    FAIL();
  } catch (const JobSpecError& e) {
    EXPECT_EQ(e.field(), "data.chat_template");
    EXPECT_THAT(e.what(), HasSubstr("chat template chatml needs the token <|im_start|>"));
  }
}

TEST(TrainerOnJsonl, EveryTrainingFormatRuns) {
  ChatWorkspace ws("formats");
  std::ofstream(ws.root / "alpaca.jsonl")
      << R"({"instruction": "Add one.", "input": "1", "output": "2"})"
      << "\n"
      << R"({"instruction": "Say hi.", "output": "hi"})"
      << "\n";
  std::ofstream(ws.root / "pc.jsonl") << R"({"prompt": "1+1=", "completion": " 2"})"
                                      << "\n"
                                      << R"({"prompt": "2+2=", "completion": " 4"})"
                                      << "\n";
  std::ofstream(ws.root / "text.jsonl") << R"({"text": "Hello there."})"
                                        << "\n"
                                        << R"({"text": "General Kenobi."})"
                                        << "\n";
  {
    std::ofstream bin(ws.root / "tokens.bin", std::ios::binary);
    for (uint32_t i = 0; i < 400; ++i) {
      const uint32_t id = (i * 37) % 1008;
      const char le[4] = {static_cast<char>(id & 0xff), static_cast<char>(id >> 8), 0, 0};
      bin.write(le, 4);
    }
  }
  struct Case {
    std::string format, file;
    bool packing;
  };
  for (const Case& c :
       {Case{"alpaca", "alpaca.jsonl", false}, Case{"prompt_completion", "pc.jsonl", true},
        Case{"jsonl_text", "text.jsonl", true}, Case{"tokens", "tokens.bin", false}}) {
    JobSpec spec = ws.spec("out_" + c.format);
    spec.data.format = c.format;
    spec.data.chat_template.reset();
    spec.data.packing = c.packing;
    spec.data.train = {(ws.root / c.file).string()};
    spec.data.eval = {(ws.root / c.file).string()};
    spec.data.eval_format.reset();
    spec.data.token_dtype = "uint32";
    spec.data.max_length = 200;
    spec.training.steps.reset();
    spec.training.epochs = 2;
    double first_eval_loss = -1;
    TrainerHooks hooks;
    hooks.on_eval = [&](const EvalMetrics& m) {
      EXPECT_FALSE(m.accuracy.has_value());
      EXPECT_GT(m.tokens, 0);
      if (first_eval_loss < 0) first_eval_loss = m.loss;
    };
    const TrainResult r = train(spec, {}, hooks);
    EXPECT_GT(r.total_steps, 0) << c.format;
    EXPECT_TRUE(std::isfinite(first_eval_loss)) << c.format;
  }
}

}  // namespace
}  // namespace lomo
