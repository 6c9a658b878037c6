#include "worker/engine/kv_cache_model.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/kernel_types.h"

namespace lomo {

namespace {

// A score no key can have: its softmax weight is 0 (fast_exp gives ~1e-38 at most).
constexpr float kSentinelScore = -1e30f;

float* f32(Buffer& buffer) { return buffer.as<float>(); }

RopeFrequencyScaling frequency_scaling(const LlamaConfig& c) {
  RopeFrequencyScaling scaling;
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    scaling.factor = c.rope_scaling.factor;
    scaling.low_freq_factor = c.rope_scaling.low_freq_factor;
    scaling.high_freq_factor = c.rope_scaling.high_freq_factor;
    scaling.original_max_position_embeddings =
        static_cast<double>(c.rope_scaling.original_max_position_embeddings);
  }
  return scaling;
}

}  // namespace

// Per-call buffers for up to `rows` tokens at once, plus the single-token attention's scores.
struct KvCacheModel::Scratch {
  int64_t rows = 0;
  Buffer x, h, rstd, q, attn, gate, up, act, logits;  // [rows, width] each (kActivations)
  Buffer token_ids, positions;                        // [rows] int32
  // Prefill: what attention_forward saves (kActivations; nothing reads it back) and its scratch
  // (kWorkspace), sized for the largest prefill so far.
  Buffer attention_saved, attention_scratch;
  // Single-token attention: [heads, keys + 1] scores whose last column is the sentinel, their
  // softmax, each head's logsumexp, and per head the sentinel's column as the "target".
  Buffer scores, weights, logsumexp, sentinel_column;
  std::vector<float> host_sentinels;
};

KvCacheModel::KvCacheModel(LlamaWeights& weights, MemoryAccountant& accountant, int64_t capacity)
    : backend_(backend_for(accountant.device())),
      weights_(weights),
      accountant_(accountant),
      capacity_(capacity) {
  const LlamaConfig& c = weights.config();
  if (capacity < 1 || capacity > c.max_position_embeddings) {
    throw std::invalid_argument("KV cache: capacity " + std::to_string(capacity) +
                                " is outside [1, max_position_embeddings = " +
                                std::to_string(c.max_position_embeddings) + "]");
  }
  for (const Parameter& p : weights.parameters()) {
    if (!p.storage.empty() && p.storage.device() != accountant.device()) {
      throw std::invalid_argument("KV cache: " + p.name + " lives on " +
                                  device_name(p.storage.device()) + ", the model computes on " +
                                  device_name(accountant.device()));
    }
  }
  const size_t bytes =
      static_cast<size_t>(capacity * c.num_key_value_heads * c.head_dim) * sizeof(float);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    keys_.emplace_back(accountant, MemoryKind::kKvCache, bytes);
    values_.emplace_back(accountant, MemoryKind::kKvCache, bytes);
  }
  const RopeTable table = rope_table(
      rope_inverse_frequencies(c.head_dim, c.rope_theta, frequency_scaling(c)), capacity);
  const size_t table_bytes = table.cos.size() * sizeof(float);
  rope_cos_ = Buffer(accountant, MemoryKind::kWorkspace, table_bytes);
  rope_sin_ = Buffer(accountant, MemoryKind::kWorkspace, table_bytes);
  backend_.copy_from_host(rope_cos_.data(), table.cos.data(), table_bytes);
  backend_.copy_from_host(rope_sin_.data(), table.sin.data(), table_bytes);
  rope_table_ = RopeTableView{table.half_dim, table.max_position, rope_cos_.as<float>(),
                              rope_sin_.as<float>()};
}

KvCacheModel::~KvCacheModel() = default;

const float* KvCacheModel::weight_f32(const Parameter& parameter) {
  if (parameter.dtype == DType::kF32) return parameter.storage.as<float>();
  if (weight_scratch_.empty()) {
    weight_scratch_ = float_buffer(accountant_, MemoryKind::kWorkspace,
                                   static_cast<size_t>(weights_.largest_parameter_numel()));
  }
  backend_.convert_to_f32(f32(weight_scratch_), parameter.storage.data(), parameter.dtype,
                          parameter.numel());
  return f32(weight_scratch_);
}

void KvCacheModel::add_bias(float* y, const Parameter* bias, int64_t rows) {
  if (bias == nullptr) return;
  backend_.bias_forward(y, weight_f32(*bias), rows, bias->numel());
}

void KvCacheModel::validate(std::span<const int32_t> tokens) const {
  const int64_t vocab = weights_.config().vocab_size;
  if (tokens.empty()) throw std::invalid_argument("KV cache: no tokens to append");
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      throw std::invalid_argument("KV cache: token " + std::to_string(i) + " = " +
                                  std::to_string(tokens[i]) + " is outside the vocabulary of " +
                                  std::to_string(vocab));
    }
  }
  if (length_ + static_cast<int64_t>(tokens.size()) > capacity_) {
    throw std::invalid_argument("KV cache: " + std::to_string(length_) + " cached + " +
                                std::to_string(tokens.size()) + " new tokens exceed its capacity " +
                                std::to_string(capacity_));
  }
}

void KvCacheModel::ensure_scratch(int64_t n) {
  if (scratch_ && scratch_->rows >= n) return;
  const LlamaConfig& c = weights_.config();
  const size_t rows = static_cast<size_t>(n);
  auto activation = [&](size_t floats) {
    return float_buffer(accountant_, MemoryKind::kActivations, floats);
  };
  auto s = std::make_unique<Scratch>();
  s->rows = n;
  s->x = activation(rows * static_cast<size_t>(c.hidden_size));
  s->h = activation(rows * static_cast<size_t>(c.hidden_size));
  s->rstd = activation(rows);
  s->q = activation(rows * static_cast<size_t>(c.num_attention_heads * c.head_dim));
  s->attn = activation(rows * static_cast<size_t>(c.num_attention_heads * c.head_dim));
  s->gate = activation(rows * static_cast<size_t>(c.intermediate_size));
  s->up = activation(rows * static_cast<size_t>(c.intermediate_size));
  s->act = activation(rows * static_cast<size_t>(c.intermediate_size));
  s->logits = activation(rows * static_cast<size_t>(c.vocab_size));
  s->token_ids = Buffer(accountant_, MemoryKind::kActivations, rows * sizeof(int32_t));
  s->positions = Buffer(accountant_, MemoryKind::kActivations, rows * sizeof(int32_t));
  const size_t heads = static_cast<size_t>(c.num_attention_heads);
  const size_t score_floats = heads * static_cast<size_t>(capacity_ + 1);
  s->scores = float_buffer(accountant_, MemoryKind::kWorkspace, score_floats);
  s->weights = float_buffer(accountant_, MemoryKind::kWorkspace, score_floats);
  s->logsumexp = float_buffer(accountant_, MemoryKind::kWorkspace, heads);
  s->sentinel_column = Buffer(accountant_, MemoryKind::kWorkspace, heads * sizeof(int32_t));
  scratch_ = std::move(s);
}

std::vector<float> KvCacheModel::append(std::span<const int32_t> tokens) {
  validate(tokens);
  const int64_t vocab = weights_.config().vocab_size;
  std::vector<float> logits(tokens.size() * static_cast<size_t>(vocab));
  // Prefill runs all rows at once through the causal kernel, which starts at position 0; after
  // that each token is one row attending to the cache.
  const size_t step = length_ == 0 ? tokens.size() : 1;
  for (size_t i = 0; i < tokens.size(); i += step) {
    run(tokens.subspan(i, step));
    backend_.copy_to_host(logits.data() + i * static_cast<size_t>(vocab), scratch_->logits.data(),
                          step * static_cast<size_t>(vocab) * 4);
    length_ += static_cast<int64_t>(step);
  }
  return logits;
}

void KvCacheModel::run(std::span<const int32_t> tokens) {
  const LlamaConfig& c = weights_.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  ensure_scratch(n);
  Scratch& s = *scratch_;
  std::vector<int32_t> positions(tokens.size());
  for (int64_t i = 0; i < n; ++i) positions[i] = static_cast<int32_t>(length_ + i);
  backend_.copy_from_host(s.token_ids.data(), tokens.data(), tokens.size() * sizeof(int32_t));
  backend_.copy_from_host(s.positions.data(), positions.data(), positions.size() * sizeof(int32_t));
  const Parameter& table = weights_.embed_tokens();
  backend_.embedding_forward(f32(s.x), s.token_ids.as<int32_t>(),
                             TypedInput(table.storage.data(), table.dtype), n, c.hidden_size);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) layer(l, n);
  backend_.rmsnorm_forward(f32(s.h), f32(s.rstd), f32(s.x), weight_f32(weights_.final_norm()), n,
                           c.hidden_size, static_cast<float>(c.rms_norm_eps));
  backend_.matmul_forward(f32(s.logits), f32(s.h), weight_f32(weights_.lm_head()), n, c.vocab_size,
                          c.hidden_size, /*accumulate=*/false);
}

void KvCacheModel::layer(int64_t l, int64_t n) {
  const LlamaConfig& c = weights_.config();
  const LlamaLayerWeights w = weights_.layer(l);
  Scratch& s = *scratch_;
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = c.num_key_value_heads * c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  // This call's keys and values go straight into their rows of the cache.
  float* k = f32(keys_[l]) + length_ * kv_width;
  float* v = f32(values_[l]) + length_ * kv_width;
  const int32_t* positions = s.positions.as<int32_t>();

  backend_.rmsnorm_forward(f32(s.h), f32(s.rstd), f32(s.x), weight_f32(*w.input_norm), n, hidden,
                           eps);
  backend_.matmul_forward(f32(s.q), f32(s.h), weight_f32(*w.q_proj), n, q_width, hidden, false);
  backend_.matmul_forward(k, f32(s.h), weight_f32(*w.k_proj), n, kv_width, hidden, false);
  backend_.matmul_forward(v, f32(s.h), weight_f32(*w.v_proj), n, kv_width, hidden, false);
  add_bias(f32(s.q), w.q_bias, n);
  add_bias(k, w.k_bias, n);
  add_bias(v, w.v_bias, n);
  backend_.rope_forward(f32(s.q), positions, rope_table_, n, c.num_attention_heads);
  backend_.rope_forward(k, positions, rope_table_, n, c.num_key_value_heads);
  attention(l, n);
  // The residual stream is updated in place: x += attn·W_oᵀ (+ bias), then x += mlp(x).
  backend_.matmul_forward(f32(s.x), f32(s.attn), weight_f32(*w.o_proj), n, hidden, q_width, true);
  add_bias(f32(s.x), w.o_bias, n);
  backend_.rmsnorm_forward(f32(s.h), f32(s.rstd), f32(s.x), weight_f32(*w.post_attention_norm), n,
                           hidden, eps);
  backend_.matmul_forward(f32(s.gate), f32(s.h), weight_f32(*w.gate_proj), n, inter, hidden, false);
  backend_.matmul_forward(f32(s.up), f32(s.h), weight_f32(*w.up_proj), n, inter, hidden, false);
  add_bias(f32(s.gate), w.gate_bias, n);
  add_bias(f32(s.up), w.up_bias, n);
  backend_.swiglu_forward(f32(s.act), f32(s.gate), f32(s.up), n * inter);
  backend_.matmul_forward(f32(s.x), f32(s.act), weight_f32(*w.down_proj), n, hidden, inter, true);
  add_bias(f32(s.x), w.down_bias, n);
}

void KvCacheModel::attention(int64_t l, int64_t n) {
  if (length_ > 0) return decode_attention(l);  // append() gives one row at a time then
  const LlamaConfig& c = weights_.config();
  const AttentionShape shape{
      1, n, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window};
  Scratch& s = *scratch_;
  // Sizes need not grow with n (a chunked scratch can shrink), so each is checked on its own.
  auto ensure = [&](Buffer& buffer, MemoryKind kind, int64_t floats) {
    if (buffer.size_bytes() < static_cast<size_t>(floats) * sizeof(float)) {
      buffer = Buffer();  // before the new one: the peak holds one of them
      buffer = float_buffer(accountant_, kind, static_cast<size_t>(floats));
    }
  };
  ensure(s.attention_saved, MemoryKind::kActivations, backend_.attention_saved_floats(shape));
  ensure(s.attention_scratch, MemoryKind::kWorkspace, backend_.attention_scratch_floats(shape));
  backend_.attention_forward(f32(s.attn), f32(s.attention_saved), f32(s.attention_scratch),
                             f32(s.q), f32(keys_[l]), f32(values_[l]), nullptr, shape);
}

// One query row at position p = length_ against cached keys lo..p (lo > 0 only inside a sliding
// window), per KV head g for its group of query heads:
//   scores = q_g·K_gᵀ/sqrt(head_dim)      one strided-batched product over the KV heads
//   weights = softmax(scores)             cross_entropy_backward with scale 1 computes
//                                         softmax − onehot(target); each row carries one extra
//                                         column holding kSentinelScore as the target, so the
//                                         real columns get exactly the softmax
//   attn_g = weights·V_g                  a second product, reading only the real columns
void KvCacheModel::decode_attention(int64_t l) {
  const LlamaConfig& c = weights_.config();
  Scratch& s = *scratch_;
  const int64_t p = length_;
  const int64_t lo = c.sliding_window > 0 ? std::max<int64_t>(0, p - c.sliding_window + 1) : 0;
  const int64_t keys = p - lo + 1, columns = keys + 1;
  const int64_t heads = c.num_attention_heads, kv_heads = c.num_key_value_heads;
  const int64_t group = heads / kv_heads, head_dim = c.head_dim, kv_width = kv_heads * head_dim;
  if (l == 0) {  // the sentinel column and targets are the same for every layer of this token
    s.host_sentinels.assign(static_cast<size_t>(heads * columns), kSentinelScore);
    backend_.copy_from_host(s.scores.data(), s.host_sentinels.data(),
                            s.host_sentinels.size() * sizeof(float));
    const std::vector<int32_t> targets(static_cast<size_t>(heads), static_cast<int32_t>(keys));
    backend_.copy_from_host(s.sentinel_column.data(), targets.data(),
                            targets.size() * sizeof(int32_t));
  }
  GemmArgs scores;
  scores.transpose_b = true;
  scores.m = group, scores.n = keys, scores.k = head_dim;
  scores.alpha = 1.0f / std::sqrt(static_cast<float>(head_dim));
  scores.a = f32(s.q), scores.lda = head_dim, scores.stride_a = group * head_dim;
  scores.b = f32(keys_[l]) + lo * kv_width, scores.ldb = kv_width, scores.stride_b = head_dim;
  scores.c = f32(s.scores), scores.ldc = columns, scores.stride_c = group * columns;
  scores.batch = kv_heads;
  backend_.gemm(scores);
  backend_.cross_entropy_forward(f32(s.logsumexp), f32(s.scores), s.sentinel_column.as<int32_t>(),
                                 heads, columns);
  backend_.cross_entropy_backward(f32(s.weights), f32(s.scores), f32(s.logsumexp),
                                  s.sentinel_column.as<int32_t>(), heads, columns, 1.0f);
  GemmArgs mix;
  mix.m = group, mix.n = head_dim, mix.k = keys;
  mix.a = f32(s.weights), mix.lda = columns, mix.stride_a = group * columns;
  mix.b = f32(values_[l]) + lo * kv_width, mix.ldb = kv_width, mix.stride_b = head_dim;
  mix.c = f32(s.attn), mix.ldc = head_dim, mix.stride_c = group * head_dim;
  mix.batch = kv_heads;
  backend_.gemm(mix);
}

}  // namespace lomo
