#include "worker/engine/llama_model.h"

#include <algorithm>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>

namespace lomo {

// What one decoder layer's backward needs from its forward (all kActivations).
// h1, attn_out, h2 and act are only ever inputs of products: they are stored in the backend's
// product dtype (bf16 under bf16 products, half the bytes), see operand_output().
struct LlamaModel::LayerActivations {
  Buffer h1, rstd1;      // input RMSNorm output and its 1/rms
  Buffer q, k, v;        // projections, q and k after rotary embedding
  Buffer attention;      // what attention_forward saves for backward (backend-defined)
  Buffer attn_out;       // attention output before o_proj
  Buffer x_mid;          // residual stream between attention and MLP
  Buffer h2, rstd2;      // post-attention RMSNorm output and its 1/rms
  Buffer gate, up, act;  // MLP projections and silu(gate)∘up
};

struct LlamaModel::Activations {
  int64_t batch_size = 0, seq_len = 0;
  std::vector<int32_t> input_ids, targets, positions;
  std::vector<int32_t> first_key;  // packed batches: first attendable position of each token's row
  // The same index arrays in the backend's memory (what the kernels read): [B·T] int32 each.
  Buffer device_input_ids, device_targets, device_positions, device_first_key;
  Buffer residual;  // layer inputs: [layers + 1, B·T, hidden]; entry L feeds the final norm
  std::vector<LayerActivations> layers;  // one per layer, or a single reused set when checkpointing
  Buffer final_normed, final_rstd;
  Buffer logsumexp;
  Buffer logits_chunk;  // kWorkspace: one chunk of rows' logits, then their gradient
  // kWorkspace: attention's scratch, for forward (recomputed under checkpointing too) and backward.
  Buffer attention_scratch;
  // The dtype h1, attn_out, h2 and act are stored in (Backend::product_dtype() when allocated),
  // and, when narrower than fp32, the kWorkspace fp32 buffer their producers write into first.
  DType operand_dtype = DType::kF32;
  Buffer operand_staging;
  double loss_sum = 0.0;
  int64_t counted_tokens = 0;
};

// Backward temporaries (kWorkspace) and the gradient buffers (kGradients).
struct LlamaModel::Workspace {
  Buffer d_residual, d_normed, d_attn_out, dq, dk, dv, d_act, d_gate, d_up;
  Buffer gradient;                 // the one reusable gradient buffer: largest tensor's size
  Buffer tied_embedding_gradient;  // tied embeddings only: lives from LM head to embedding
};

namespace {

float* f32(Buffer& buffer) { return buffer.as<float>(); }

}  // namespace

LlamaModel::LlamaModel(LlamaWeights& weights, MemoryAccountant& accountant, ModelOptions options)
    : LlamaModel(backend_for(accountant.device()), weights, accountant, options) {}

LlamaModel::LlamaModel(Backend& backend, LlamaWeights& weights, MemoryAccountant& accountant,
                       ModelOptions options)
    : backend_(backend), weights_(weights), accountant_(accountant), options_(options) {
  if (backend.device() != accountant.device()) {
    throw std::invalid_argument("LlamaModel: backend on " + device_name(backend.device()) +
                                ", memory accountant on " + device_name(accountant.device()));
  }
  for (const Parameter& p : weights.parameters()) {
    if (!p.storage.empty() && p.storage.device() != backend.device()) {
      throw std::invalid_argument("LlamaModel: " + p.name + " lives on " +
                                  device_name(p.storage.device()) + ", the model computes on " +
                                  device_name(backend.device()));
    }
  }
}

LlamaModel::~LlamaModel() = default;

const float* LlamaModel::weight_f32(const Parameter& parameter) const {
  if (parameter.dtype == DType::kF32) return parameter.storage.as<float>();
  // With fp32 products every matrix passes through here, so the scratch is sized once for the
  // largest; with narrower products only norms and biases do, and it grows to the largest of those.
  const int64_t needed = backend_.product_dtype() == DType::kF32
                             ? weights_.largest_parameter_numel()
                             : parameter.numel();
  if (weight_scratch_.size_bytes() < static_cast<size_t>(needed) * sizeof(float)) {
    weight_scratch_ = Buffer();  // released first: the peak is the larger buffer alone
    weight_scratch_ =
        float_buffer(accountant_, MemoryKind::kWorkspace, static_cast<size_t>(needed));
  }
  backend_.convert_to_f32(f32(weight_scratch_), parameter.storage.data(), parameter.dtype,
                          parameter.numel());
  return f32(weight_scratch_);
}

TypedInput LlamaModel::weight_operand(const Parameter& parameter) const {
  const DType product = backend_.product_dtype();
  if (parameter.dtype == product) return TypedInput(parameter.storage.data(), product);
  return activation_operand(weight_f32(parameter), parameter.numel(), OperandSlot::kWeight);
}

TypedInput LlamaModel::activation_operand(const float* values, int64_t count,
                                          OperandSlot slot) const {
  const DType product = backend_.product_dtype();
  if (product == DType::kF32) return values;
  Buffer& scratch = operand_scratch_[static_cast<size_t>(slot)];
  const size_t bytes = static_cast<size_t>(count) * dtype_size(product);
  if (scratch.size_bytes() < bytes) {
    // Grown to the largest operand of its slot (within the first layer and the first head chunk).
    scratch = Buffer();
    scratch = float_buffer(accountant_, MemoryKind::kWorkspace, (bytes + 3) / 4);
  }
  backend_.convert_from_f32(scratch.data(), product, values, count);
  return TypedInput(scratch.data(), product);
}

float* LlamaModel::operand_output(Buffer& stored) {
  return activations_->operand_dtype == DType::kF32 ? f32(stored)
                                                    : f32(activations_->operand_staging);
}

void LlamaModel::store_operand(Buffer& stored, int64_t count) {
  const DType dtype = activations_->operand_dtype;
  if (dtype != DType::kF32) {
    backend_.convert_from_f32(stored.data(), dtype, f32(activations_->operand_staging), count);
  }
}

TypedInput LlamaModel::stored_operand(const Buffer& stored) const {
  return TypedInput(stored.data(), activations_->operand_dtype);
}

void LlamaModel::validate(const TokenBatch& batch) const {
  const LlamaConfig& config = weights_.config();
  if (batch.batch_size <= 0 || batch.seq_len <= 0) {
    throw std::invalid_argument("batch: batch_size and seq_len must be positive (got " +
                                std::to_string(batch.batch_size) + " x " +
                                std::to_string(batch.seq_len) + ")");
  }
  const size_t tokens = static_cast<size_t>(batch.batch_size * batch.seq_len);
  if (batch.input_ids.size() != tokens || batch.targets.size() != tokens ||
      (!batch.positions.empty() && batch.positions.size() != tokens) ||
      (!batch.segment_ids.empty() && batch.segment_ids.size() != tokens)) {
    throw std::invalid_argument(
        "batch: input_ids, targets, positions and segment_ids must each "
        "hold " +
        std::to_string(tokens) + " entries");
  }
  if (!batch.segment_ids.empty()) {
    for (int64_t r = 0; r < batch.batch_size; ++r) {
      const int32_t* row = batch.segment_ids.data() + r * batch.seq_len;
      for (int64_t t = 1; t < batch.seq_len; ++t) {
        if (row[t] == row[t - 1]) continue;
        for (int64_t u = 0; u < t; ++u) {
          if (row[u] == row[t]) {
            throw std::invalid_argument("batch: segment_ids[" +
                                        std::to_string(r * batch.seq_len + t) +
                                        "] = " + std::to_string(row[t]) +
                                        " resumes a sample after another one: samples must be "
                                        "contiguous");
          }
        }
      }
    }
  }
  for (size_t i = 0; i < tokens; ++i) {
    const int32_t id = batch.input_ids[i], target = batch.targets[i];
    if (id < 0 || id >= config.vocab_size) {
      throw std::invalid_argument("batch: input_ids[" + std::to_string(i) +
                                  "] = " + std::to_string(id) + " is outside the vocabulary of " +
                                  std::to_string(config.vocab_size));
    }
    if (target != kIgnoreIndex && (target < 0 || target >= config.vocab_size)) {
      throw std::invalid_argument("batch: targets[" + std::to_string(i) + "] = " +
                                  std::to_string(target) + " is neither a token id nor -100");
    }
    if (!batch.positions.empty() &&
        (batch.positions[i] < 0 || batch.positions[i] >= config.max_position_embeddings)) {
      throw std::invalid_argument("batch: positions[" + std::to_string(i) +
                                  "] = " + std::to_string(batch.positions[i]) +
                                  " is outside [0, max_position_embeddings)");
    }
  }
  if (batch.positions.empty() && batch.seq_len > config.max_position_embeddings) {
    throw std::invalid_argument("batch: seq_len " + std::to_string(batch.seq_len) +
                                " exceeds max_position_embeddings " +
                                std::to_string(config.max_position_embeddings));
  }
}

void LlamaModel::prepare_forward_buffers(int64_t batch_size, int64_t seq_len) {
  const DType operand_dtype = backend_.product_dtype();
  if (activations_ && activations_->batch_size == batch_size && activations_->seq_len == seq_len &&
      activations_->operand_dtype == operand_dtype) {
    return;
  }
  workspace_.reset();  // sized for the old shape
  activations_.reset();
  const LlamaConfig& c = weights_.config();
  const size_t rows = static_cast<size_t>(batch_size * seq_len);
  const size_t hidden = static_cast<size_t>(c.hidden_size);
  const size_t q_width = static_cast<size_t>(c.num_attention_heads * c.head_dim);
  const size_t kv_width = static_cast<size_t>(c.num_key_value_heads * c.head_dim);
  const size_t inter = static_cast<size_t>(c.intermediate_size);
  const AttentionShape attention = attention_shape(batch_size, seq_len);
  auto activation = [&](size_t floats) {
    return float_buffer(accountant_, MemoryKind::kActivations, floats);
  };

  auto operand_activation = [&](size_t count) {
    return Buffer(accountant_, MemoryKind::kActivations, count * dtype_size(operand_dtype));
  };

  auto acts = std::make_unique<Activations>();
  acts->batch_size = batch_size;
  acts->seq_len = seq_len;
  acts->operand_dtype = operand_dtype;
  acts->residual = activation((static_cast<size_t>(c.num_hidden_layers) + 1) * rows * hidden);
  const int64_t layer_sets = options_.activation_checkpointing ? 1 : c.num_hidden_layers;
  acts->layers.resize(static_cast<size_t>(layer_sets));
  for (LayerActivations& layer : acts->layers) {
    layer.h1 = operand_activation(rows * hidden);
    layer.rstd1 = activation(rows);
    layer.q = activation(rows * q_width);
    layer.k = activation(rows * kv_width);
    layer.v = activation(rows * kv_width);
    layer.attention = activation(static_cast<size_t>(backend_.attention_saved_floats(attention)));
    layer.attn_out = operand_activation(rows * q_width);
    layer.x_mid = activation(rows * hidden);
    layer.h2 = operand_activation(rows * hidden);
    layer.rstd2 = activation(rows);
    layer.gate = activation(rows * inter);
    layer.up = activation(rows * inter);
    layer.act = operand_activation(rows * inter);
  }
  if (operand_dtype != DType::kF32) {
    acts->operand_staging = float_buffer(accountant_, MemoryKind::kWorkspace,
                                         rows * std::max({hidden, q_width, inter}));
  }
  acts->final_normed = activation(rows * hidden);
  acts->final_rstd = activation(rows);
  acts->logits_chunk =
      float_buffer(accountant_, MemoryKind::kWorkspace,
                   static_cast<size_t>(lm_head_chunk_rows(static_cast<int64_t>(rows))) *
                       static_cast<size_t>(c.vocab_size));
  acts->attention_scratch =
      float_buffer(accountant_, MemoryKind::kWorkspace,
                   static_cast<size_t>(backend_.attention_scratch_floats(attention)));
  acts->logsumexp = activation(rows);
  auto indices = [&]() {
    return Buffer(accountant_, MemoryKind::kActivations, rows * sizeof(int32_t));
  };
  acts->device_input_ids = indices();
  acts->device_targets = indices();
  acts->device_positions = indices();
  acts->device_first_key = indices();
  activations_ = std::move(acts);
}

void LlamaModel::prepare_backward_buffers() {
  if (workspace_) return;
  const LlamaConfig& c = weights_.config();
  const size_t rows = static_cast<size_t>(activations_->batch_size * activations_->seq_len);
  const size_t hidden = static_cast<size_t>(c.hidden_size);
  const size_t q_width = static_cast<size_t>(c.num_attention_heads * c.head_dim);
  const size_t kv_width = static_cast<size_t>(c.num_key_value_heads * c.head_dim);
  const size_t inter = static_cast<size_t>(c.intermediate_size);
  auto scratch = [&](size_t floats) {
    return float_buffer(accountant_, MemoryKind::kWorkspace, floats);
  };
  auto ws = std::make_unique<Workspace>();
  ws->d_residual = scratch(rows * hidden);
  ws->d_normed = scratch(rows * hidden);
  ws->d_attn_out = scratch(rows * q_width);
  ws->dq = scratch(rows * q_width);
  ws->dk = scratch(rows * kv_width);
  ws->dv = scratch(rows * kv_width);
  ws->d_act = scratch(rows * inter);
  ws->d_gate = scratch(rows * inter);
  ws->d_up = scratch(rows * inter);
  ws->gradient = float_buffer(accountant_, MemoryKind::kGradients,
                              static_cast<size_t>(weights_.largest_parameter_numel()));
  if (c.tie_word_embeddings) {
    ws->tied_embedding_gradient = float_buffer(
        accountant_, MemoryKind::kGradients, static_cast<size_t>(weights_.embed_tokens().numel()));
  }
  workspace_ = std::move(ws);
}

AttentionShape LlamaModel::attention_shape(int64_t batch_size, int64_t seq_len) const {
  const LlamaConfig& c = weights_.config();
  return AttentionShape{batch_size, seq_len,         c.num_attention_heads, c.num_key_value_heads,
                        c.head_dim, c.sliding_window};
}

void LlamaModel::ensure_rope_table(int64_t max_position) {
  if (rope_table_.max_position >= max_position) return;
  const LlamaConfig& c = weights_.config();
  RopeFrequencyScaling scaling;
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    scaling.factor = c.rope_scaling.factor;
    scaling.low_freq_factor = c.rope_scaling.low_freq_factor;
    scaling.high_freq_factor = c.rope_scaling.high_freq_factor;
    scaling.original_max_position_embeddings =
        static_cast<double>(c.rope_scaling.original_max_position_embeddings);
  }
  const RopeTable table =
      rope_table(rope_inverse_frequencies(c.head_dim, c.rope_theta, scaling), max_position);
  // The kernels read the table from the backend's memory: upload it once per size.
  const size_t bytes = table.cos.size() * sizeof(float);
  rope_cos_ = Buffer(accountant_, MemoryKind::kWorkspace, bytes);
  rope_sin_ = Buffer(accountant_, MemoryKind::kWorkspace, bytes);
  backend_.copy_from_host(rope_cos_.data(), table.cos.data(), bytes);
  backend_.copy_from_host(rope_sin_.data(), table.sin.data(), bytes);
  rope_table_ = RopeTableView{table.half_dim, table.max_position, rope_cos_.as<float>(),
                              rope_sin_.as<float>()};
}

void LlamaModel::upload_indices(Activations& acts) {
  const size_t bytes = acts.input_ids.size() * sizeof(int32_t);
  backend_.copy_from_host(acts.device_input_ids.data(), acts.input_ids.data(), bytes);
  backend_.copy_from_host(acts.device_targets.data(), acts.targets.data(), bytes);
  backend_.copy_from_host(acts.device_positions.data(), acts.positions.data(), bytes);
  if (!acts.first_key.empty()) {
    backend_.copy_from_host(acts.device_first_key.data(), acts.first_key.data(), bytes);
  }
}

ForwardResult LlamaModel::forward(const TokenBatch& batch) { return run_forward(batch, true); }

ForwardResult LlamaModel::evaluate(const TokenBatch& batch) { return run_forward(batch, false); }

int64_t LlamaModel::lm_head_chunk_rows(int64_t rows) const {
  if (options_.lm_head_chunk_rows > 0) return std::min(rows, options_.lm_head_chunk_rows);
  // ~32 MiB of logits per chunk, in multiples of 64 rows: large enough that the weight gradient's
  // accumulation over chunks costs little next to the products themselves.
  constexpr int64_t kChunkFloats = int64_t{8} << 20;
  const int64_t fit = kChunkFloats / std::max<int64_t>(1, weights_.config().vocab_size);
  return std::min(rows, std::max<int64_t>(64, fit / 64 * 64));
}

float* LlamaModel::head_gradient_buffer() {
  return f32(weights_.config().tie_word_embeddings ? workspace_->tied_embedding_gradient
                                                   : workspace_->gradient);
}

double LlamaModel::lm_head_chunks(bool loss, bool gradient, float gradient_scale) {
  const LlamaConfig& c = weights_.config();
  Activations& acts = *activations_;
  const int64_t rows = acts.batch_size * acts.seq_len;
  const int64_t hidden = c.hidden_size, vocab = c.vocab_size;
  const int64_t chunk = lm_head_chunk_rows(rows);
  const TypedInput head = weight_operand(weights_.lm_head());  // no other weight use in the loop
  float* logits = f32(acts.logits_chunk);
  double loss_sum = 0.0;
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t n = std::min(chunk, rows - first);
    const float* x = f32(acts.final_normed) + first * hidden;
    float* logsumexp = f32(acts.logsumexp) + first;
    const int32_t* targets = acts.device_targets.as<int32_t>() + first;
    const TypedInput x_operand = activation_operand(x, n * hidden, OperandSlot::kInput);
    backend_.matmul_forward(logits, x_operand, head, n, vocab, hidden, /*accumulate=*/false);
    if (loss) loss_sum += backend_.cross_entropy_forward(logsumexp, logits, targets, n, vocab);
    if (!gradient) continue;
    // The chunk's logits become their gradient in place; then the head's input gradient (with the
    // weight as it is) and its weight gradient, summed over chunks.
    backend_.cross_entropy_backward(logits, logits, logsumexp, targets, n, vocab, gradient_scale);
    const TypedInput dlogits = activation_operand(logits, n * vocab, OperandSlot::kOutputGradient);
    backend_.matmul_backward_input(f32(workspace_->d_normed) + first * hidden, dlogits, head, n,
                                   vocab, hidden, /*accumulate=*/false);
    backend_.matmul_backward_weight(head_gradient_buffer(), dlogits, x_operand, n, vocab, hidden,
                                    /*accumulate=*/first > 0);
  }
  return loss_sum;
}

void LlamaModel::rescale_head_gradients(float factor) {
  if (factor == 1.0f) return;
  // unscale_gradient is the backend's in-place multiply; the sum of squares it also collects is not
  // needed here.
  if (!rescale_statistics_) {
    rescale_statistics_ =
        std::make_unique<DeviceValue<GradientStatistics>>(backend_, GradientStatistics{});
  }
  const LlamaConfig& c = weights_.config();
  const int64_t rows = activations_->batch_size * activations_->seq_len;
  backend_.unscale_gradient(f32(workspace_->d_normed), rows * c.hidden_size, factor, 0,
                            rescale_statistics_->get());
  backend_.unscale_gradient(head_gradient_buffer(), weights_.lm_head().numel(), factor, 0,
                            rescale_statistics_->get());
}

ForwardResult LlamaModel::run_forward(const TokenBatch& batch, bool with_head_gradient) {
  validate(batch);
  prepare_forward_buffers(batch.batch_size, batch.seq_len);
  const LlamaConfig& c = weights_.config();
  Activations& acts = *activations_;
  const int64_t rows = batch.batch_size * batch.seq_len;
  const int64_t hidden = c.hidden_size;

  acts.input_ids = batch.input_ids;
  acts.targets = batch.targets;
  acts.positions = batch.positions;
  acts.first_key.clear();
  if (!batch.segment_ids.empty()) {
    acts.first_key.resize(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = i % batch.seq_len;
      const bool starts_sample = t == 0 || batch.segment_ids[i] != batch.segment_ids[i - 1];
      acts.first_key[i] = starts_sample ? static_cast<int32_t>(t) : acts.first_key[i - 1];
    }
  }
  if (acts.positions.empty()) {
    acts.positions.resize(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = i % batch.seq_len;
      const int64_t start = acts.first_key.empty() ? 0 : acts.first_key[i];
      acts.positions[static_cast<size_t>(i)] = static_cast<int32_t>(t - start);
    }
  }
  ensure_rope_table(*std::max_element(acts.positions.begin(), acts.positions.end()) + 1);
  upload_indices(acts);

  float* residual = f32(acts.residual);
  const Parameter& table = weights_.embed_tokens();
  backend_.embedding_forward(residual, acts.device_input_ids.as<int32_t>(),
                             TypedInput(table.storage.data(), table.dtype), rows, hidden);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerActivations& layer = acts.layers[options_.activation_checkpointing ? 0 : l];
    layer_forward(l, residual + l * rows * hidden, layer, residual + (l + 1) * rows * hidden);
  }
  backend_.rmsnorm_forward(
      f32(acts.final_normed), f32(acts.final_rstd), residual + c.num_hidden_layers * rows * hidden,
      weight_f32(weights_.final_norm()), rows, hidden, static_cast<float>(c.rms_norm_eps));
  acts.counted_tokens = std::count_if(acts.targets.begin(), acts.targets.end(),
                                      [](int32_t t) { return t != kIgnoreIndex; });
  // The head's gradient is computed for the usual backward (the mean loss, scale 1); backward
  // rescales it for another loss scale or token count.
  if (with_head_gradient) prepare_backward_buffers();
  head_scale_ = acts.counted_tokens > 0 ? 1.0f / static_cast<float>(acts.counted_tokens) : 1.0f;
  acts.loss_sum = lm_head_chunks(/*loss=*/true, with_head_gradient, head_scale_);
  head_gradient_ready_ = with_head_gradient;
  logits_valid_ = true;
  full_logits_current_ = false;
  has_forward_ = true;
  return last_forward();
}

ForwardResult LlamaModel::last_forward() const {
  if (!has_forward_) throw std::logic_error("LlamaModel::last_forward called before forward");
  const Activations& acts = *activations_;
  ForwardResult result;
  result.counted_tokens = acts.counted_tokens;
  result.loss_sum = acts.loss_sum;
  result.loss = acts.counted_tokens > 0 ? acts.loss_sum / acts.counted_tokens : 0.0;
  return result;
}

void LlamaModel::layer_forward(int64_t l, const float* x_in, LayerActivations& a, float* x_out) {
  const LlamaConfig& c = weights_.config();
  const LlamaLayerWeights w = weights_.layer(l);
  const int64_t rows = activations_->batch_size * activations_->seq_len;
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = c.num_key_value_heads * c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int32_t* positions = activations_->device_positions.as<int32_t>();

  backend_.rmsnorm_forward(operand_output(a.h1), f32(a.rstd1), x_in, weight_f32(*w.input_norm),
                           rows, hidden, eps);
  store_operand(a.h1, rows * hidden);
  const TypedInput h1 = stored_operand(a.h1);
  backend_.matmul_forward(f32(a.q), h1, weight_operand(*w.q_proj), rows, q_width, hidden,
                          /*accumulate=*/false);
  backend_.matmul_forward(f32(a.k), h1, weight_operand(*w.k_proj), rows, kv_width, hidden,
                          /*accumulate=*/false);
  backend_.matmul_forward(f32(a.v), h1, weight_operand(*w.v_proj), rows, kv_width, hidden,
                          /*accumulate=*/false);
  add_bias(f32(a.q), w.q_bias, rows);
  add_bias(f32(a.k), w.k_bias, rows);
  add_bias(f32(a.v), w.v_bias, rows);
  backend_.rope_forward(f32(a.q), positions, rope_table_, rows, c.num_attention_heads);
  backend_.rope_forward(f32(a.k), positions, rope_table_, rows, c.num_key_value_heads);
  backend_.attention_forward(
      operand_output(a.attn_out), f32(a.attention), f32(activations_->attention_scratch), f32(a.q),
      f32(a.k), f32(a.v),
      activations_->first_key.empty() ? nullptr : activations_->device_first_key.as<int32_t>(),
      attention_shape(activations_->batch_size, activations_->seq_len));
  store_operand(a.attn_out, rows * q_width);
  backend_.copy(f32(a.x_mid), x_in, static_cast<size_t>(rows * hidden) * sizeof(float));
  backend_.matmul_forward(f32(a.x_mid), stored_operand(a.attn_out), weight_operand(*w.o_proj), rows,
                          hidden, q_width, /*accumulate=*/true);
  add_bias(f32(a.x_mid), w.o_bias, rows);

  backend_.rmsnorm_forward(operand_output(a.h2), f32(a.rstd2), f32(a.x_mid),
                           weight_f32(*w.post_attention_norm), rows, hidden, eps);
  store_operand(a.h2, rows * hidden);
  const TypedInput h2 = stored_operand(a.h2);
  backend_.matmul_forward(f32(a.gate), h2, weight_operand(*w.gate_proj), rows, inter, hidden,
                          /*accumulate=*/false);
  backend_.matmul_forward(f32(a.up), h2, weight_operand(*w.up_proj), rows, inter, hidden,
                          /*accumulate=*/false);
  add_bias(f32(a.gate), w.gate_bias, rows);
  add_bias(f32(a.up), w.up_bias, rows);
  backend_.swiglu_forward(operand_output(a.act), f32(a.gate), f32(a.up), rows * inter);
  store_operand(a.act, rows * inter);
  if (x_out == nullptr) return;
  backend_.copy(x_out, f32(a.x_mid), static_cast<size_t>(rows * hidden) * sizeof(float));
  backend_.matmul_forward(x_out, stored_operand(a.act), weight_operand(*w.down_proj), rows, hidden,
                          inter, /*accumulate=*/true);
  add_bias(x_out, w.down_bias, rows);
}

void LlamaModel::add_bias(float* y, const Parameter* bias, int64_t rows) {
  if (bias == nullptr) return;
  backend_.bias_forward(y, weight_f32(*bias), rows, bias->numel());
}

void LlamaModel::deliver_bias(GradientSink& sink, Parameter* bias, const float* dy, int64_t rows) {
  if (bias == nullptr) return;
  float* gradient = f32(workspace_->gradient);
  backend_.bias_backward(gradient, dy, rows, bias->numel());
  deliver(sink, *bias, gradient);
}

void LlamaModel::deliver(GradientSink& sink, Parameter& parameter, float* gradient) {
  sink.consume(parameter, TensorView{gradient, DType::kF32,
                                     std::span<const int64_t>(parameter.shape), backend_.device()});
}

const float* LlamaModel::logits() const {
  if (!has_forward_ || !logits_valid_) {
    throw std::logic_error("LlamaModel::logits: no forward since the last backward");
  }
  if (!full_logits_current_) {
    const LlamaConfig& c = weights_.config();
    const int64_t rows = activations_->batch_size * activations_->seq_len;
    const size_t floats = static_cast<size_t>(rows) * static_cast<size_t>(c.vocab_size);
    if (full_logits_.size_bytes() != floats * sizeof(float)) {
      full_logits_ = float_buffer(accountant_, MemoryKind::kActivations, floats);
    }
    const TypedInput head = weight_operand(weights_.lm_head());
    backend_.matmul_forward(f32(full_logits_),
                            activation_operand(f32(activations_->final_normed),
                                               rows * c.hidden_size, OperandSlot::kInput),
                            head, rows, c.vocab_size, c.hidden_size, /*accumulate=*/false);
    full_logits_current_ = true;
  }
  return f32(full_logits_);
}

void LlamaModel::backward(GradientSink& sink, float loss_scale) {
  if (!has_forward_) throw std::logic_error("LlamaModel::backward called before forward");
  backward(sink, loss_scale, activations_->counted_tokens);
}

void LlamaModel::backward(GradientSink& sink, float loss_scale, int64_t loss_tokens) {
  if (!has_forward_) throw std::logic_error("LlamaModel::backward called before forward");
  if (loss_tokens < 0) {
    throw std::invalid_argument("LlamaModel::backward: negative loss_tokens " +
                                std::to_string(loss_tokens));
  }
  prepare_backward_buffers();
  const LlamaConfig& c = weights_.config();
  Activations& acts = *activations_;
  Workspace& ws = *workspace_;
  const int64_t rows = acts.batch_size * acts.seq_len;
  const int64_t hidden = c.hidden_size;
  float* residual = f32(acts.residual);
  float* gradient = f32(ws.gradient);

  // LM head: forward left its input and weight gradients for scale head_scale_; after an
  // evaluate() or an earlier backward (whose sink owned those buffers), recompute them chunk by
  // chunk. Either way the weight is read before the sink may update it.
  const float scale = loss_tokens > 0 ? loss_scale / static_cast<float>(loss_tokens) : 0.0f;
  if (head_gradient_ready_) {
    rescale_head_gradients(scale / head_scale_);
  } else {
    lm_head_chunks(/*loss=*/false, /*gradient=*/true, scale);
  }
  head_gradient_ready_ = false;
  logits_valid_ = false;
  full_logits_ = Buffer();
  full_logits_current_ = false;
  if (!c.tie_word_embeddings) deliver(sink, weights_.lm_head(), gradient);

  float* d_residual = f32(ws.d_residual);
  backend_.fill_zero(d_residual, static_cast<size_t>(rows * hidden) * sizeof(float));
  backend_.rmsnorm_backward(d_residual, gradient, f32(ws.d_normed),
                            residual + c.num_hidden_layers * rows * hidden,
                            weight_f32(weights_.final_norm()), f32(acts.final_rstd), rows, hidden);
  deliver(sink, weights_.final_norm(), gradient);

  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    const float* x_in = residual + l * rows * hidden;
    LayerActivations& layer = acts.layers[options_.activation_checkpointing ? 0 : l];
    if (options_.activation_checkpointing) layer_forward(l, x_in, layer, nullptr);
    layer_backward(l, sink, x_in, layer, d_residual);
  }

  // Embedding: the tied gradient already holds the LM head's share; this is its last use.
  Parameter& embedding = weights_.embed_tokens();
  float* embedding_gradient = c.tie_word_embeddings ? f32(ws.tied_embedding_gradient) : gradient;
  if (!c.tie_word_embeddings) {
    backend_.fill_zero(embedding_gradient, static_cast<size_t>(embedding.numel()) * sizeof(float));
  }
  backend_.embedding_backward(embedding_gradient, d_residual, acts.device_input_ids.as<int32_t>(),
                              rows, hidden);
  deliver(sink, embedding, embedding_gradient);
}

void LlamaModel::layer_backward(int64_t l, GradientSink& sink, const float* x_in,
                                LayerActivations& a, float* d_residual) {
  const LlamaConfig& c = weights_.config();
  const LlamaLayerWeights w = weights_.layer(l);
  Workspace& ws = *workspace_;
  const int64_t rows = activations_->batch_size * activations_->seq_len;
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = c.num_key_value_heads * c.head_dim;
  const int32_t* positions = activations_->device_positions.as<int32_t>();
  float* gradient = f32(ws.gradient);
  float* d_normed = f32(ws.d_normed);

  // For every projection: the input gradient with the old weight, then the weight's gradient,
  // then the sink (which may update the weight). Projections that share an input (q/k/v,
  // gate/up) add their input gradients into d_normed in a fixed order; each finishes before the
  // next starts, so one narrowed output gradient is alive at a time (activation_operand).
  const auto output_gradient = [&](const float* dy, int64_t width) {
    return activation_operand(dy, rows * width, OperandSlot::kOutputGradient);
  };

  // MLP.
  const TypedInput d_down = output_gradient(d_residual, hidden);
  backend_.matmul_backward_input(f32(ws.d_act), d_down, weight_operand(*w.down_proj), rows, hidden,
                                 inter, /*accumulate=*/false);
  backend_.matmul_backward_weight(gradient, d_down, stored_operand(a.act), rows, hidden, inter,
                                  /*accumulate=*/false);
  deliver(sink, *w.down_proj, gradient);
  deliver_bias(sink, w.down_bias, d_residual, rows);
  backend_.swiglu_backward(f32(ws.d_gate), f32(ws.d_up), f32(ws.d_act), f32(a.gate), f32(a.up),
                           rows * inter);
  const TypedInput h2 = stored_operand(a.h2);
  const TypedInput d_gate = output_gradient(f32(ws.d_gate), inter);
  backend_.matmul_backward_input(d_normed, d_gate, weight_operand(*w.gate_proj), rows, inter,
                                 hidden, /*accumulate=*/false);
  backend_.matmul_backward_weight(gradient, d_gate, h2, rows, inter, hidden,
                                  /*accumulate=*/false);
  deliver(sink, *w.gate_proj, gradient);
  deliver_bias(sink, w.gate_bias, f32(ws.d_gate), rows);
  const TypedInput d_up = output_gradient(f32(ws.d_up), inter);
  backend_.matmul_backward_input(d_normed, d_up, weight_operand(*w.up_proj), rows, inter, hidden,
                                 /*accumulate=*/true);
  backend_.matmul_backward_weight(gradient, d_up, h2, rows, inter, hidden, /*accumulate=*/false);
  deliver(sink, *w.up_proj, gradient);
  deliver_bias(sink, w.up_bias, f32(ws.d_up), rows);
  backend_.rmsnorm_backward(d_residual, gradient, d_normed, f32(a.x_mid),
                            weight_f32(*w.post_attention_norm), f32(a.rstd2), rows, hidden);
  deliver(sink, *w.post_attention_norm, gradient);

  // Attention.
  const TypedInput d_o = output_gradient(d_residual, hidden);
  backend_.matmul_backward_input(f32(ws.d_attn_out), d_o, weight_operand(*w.o_proj), rows, hidden,
                                 q_width, /*accumulate=*/false);
  backend_.matmul_backward_weight(gradient, d_o, stored_operand(a.attn_out), rows, hidden, q_width,
                                  /*accumulate=*/false);
  deliver(sink, *w.o_proj, gradient);
  deliver_bias(sink, w.o_bias, d_residual, rows);
  backend_.attention_backward(f32(ws.dq), f32(ws.dk), f32(ws.dv),
                              f32(activations_->attention_scratch), f32(ws.d_attn_out),
                              f32(a.attention), f32(a.q), f32(a.k), f32(a.v),
                              attention_shape(activations_->batch_size, activations_->seq_len));
  backend_.rope_backward(f32(ws.dq), positions, rope_table_, rows, c.num_attention_heads);
  backend_.rope_backward(f32(ws.dk), positions, rope_table_, rows, c.num_key_value_heads);
  const TypedInput h1 = stored_operand(a.h1);
  const TypedInput dq = output_gradient(f32(ws.dq), q_width);
  backend_.matmul_backward_input(d_normed, dq, weight_operand(*w.q_proj), rows, q_width, hidden,
                                 /*accumulate=*/false);
  backend_.matmul_backward_weight(gradient, dq, h1, rows, q_width, hidden, /*accumulate=*/false);
  deliver(sink, *w.q_proj, gradient);
  deliver_bias(sink, w.q_bias, f32(ws.dq), rows);
  const TypedInput dk = output_gradient(f32(ws.dk), kv_width);
  backend_.matmul_backward_input(d_normed, dk, weight_operand(*w.k_proj), rows, kv_width, hidden,
                                 /*accumulate=*/true);
  backend_.matmul_backward_weight(gradient, dk, h1, rows, kv_width, hidden, /*accumulate=*/false);
  deliver(sink, *w.k_proj, gradient);
  deliver_bias(sink, w.k_bias, f32(ws.dk), rows);
  const TypedInput dv = output_gradient(f32(ws.dv), kv_width);
  backend_.matmul_backward_input(d_normed, dv, weight_operand(*w.v_proj), rows, kv_width, hidden,
                                 /*accumulate=*/true);
  backend_.matmul_backward_weight(gradient, dv, h1, rows, kv_width, hidden, /*accumulate=*/false);
  deliver(sink, *w.v_proj, gradient);
  deliver_bias(sink, w.v_bias, f32(ws.dv), rows);
  backend_.rmsnorm_backward(d_residual, gradient, d_normed, x_in, weight_f32(*w.input_norm),
                            f32(a.rstd1), rows, hidden);
  deliver(sink, *w.input_norm, gradient);
}

}  // namespace lomo
