// Forward and backward of a LLaMA model on one device's Backend (kernels/backend.h), with
// accountable activation memory and per-parameter gradient delivery to a GradientSink.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "kernels/kernel_types.h"
#include "kernels/rope_table.h"
#include "worker/engine/gradient_sink.h"
#include "worker/engine/llama_weights.h"
#include "worker/engine/memory.h"

namespace lomo {

// A batch of token rows. targets[i] is the token that should follow input_ids[i] (the caller
// shifts; kIgnoreIndex = −100 excludes a position from the loss). segment_ids (optional) packs
// several samples into one row: tokens with the same id form one contiguous sample, and attention
// never crosses samples. positions may be empty (0, 1, ... from the start of each row, or of each
// sample when packed) or hold one position per token.
struct TokenBatch {
  int64_t batch_size = 0;
  int64_t seq_len = 0;
  std::vector<int32_t> input_ids;
  std::vector<int32_t> targets;
  std::vector<int32_t> positions;
  std::vector<int32_t> segment_ids;
};

struct ModelOptions {
  // Keep only each decoder layer's input during forward and recompute the layer in backward.
  bool activation_checkpointing = false;
  // Rows of logits the LM head + cross-entropy hold at once (0: enough rows for about 32 MiB of
  // logits). The B·T·V logits never exist together.
  int64_t lm_head_chunk_rows = 0;
};

struct ForwardResult {
  double loss = 0.0;           // mean cross-entropy over counted tokens (0 when none)
  int64_t counted_tokens = 0;  // targets that are not kIgnoreIndex
  double loss_sum = 0.0;       // sum of the counted tokens' cross-entropies (loss·counted_tokens)
};

class LlamaModel {
 public:
  // `weights` and `accountant` must outlive the model. It computes on the backend of the
  // accountant's device (the CPU by default), where the weights must live.
  LlamaModel(LlamaWeights& weights, MemoryAccountant& accountant, ModelOptions options = {});
  // Computes on `backend`, whose device must be the accountant's and the weights'.
  LlamaModel(Backend& backend, LlamaWeights& weights, MemoryAccountant& accountant,
             ModelOptions options = {});
  ~LlamaModel();
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  // Runs forward and keeps what backward needs. Throws std::invalid_argument for a malformed batch
  // (sizes, token ids outside the vocabulary, positions beyond max_position_embeddings). The LM
  // head's chunks also compute their share of backward (the head's weight gradient and the final
  // norm's output gradient), which the next backward uses instead of recomputing the logits.
  ForwardResult forward(const TokenBatch& batch);
  // forward() for a batch that will not be backpropagated (evaluation): the loss only. A backward
  // after it still works (it recomputes the LM head).
  ForwardResult evaluate(const TokenBatch& batch);

  // Backward of the last forward's mean loss, multiplied by `loss_scale`. Each parameter's
  // gradient goes to `sink` once, in reverse order of use, the tied embedding/LM head after its
  // last use. Backward leaves the saved activations intact, so it may run twice over one forward
  // (two-pass clipping: a norm-only pass, then an updating pass).
  void backward(GradientSink& sink, float loss_scale = 1.0f);
  // Backward of (sum of the last forward's token losses) / `loss_tokens`, times `loss_scale`. A
  // data-parallel rank passes the count of counted tokens over all ranks' rows, so that the ranks'
  // gradients sum to the gradient of the global batch's mean loss whatever each rank's padding.
  // loss_tokens = last_forward().counted_tokens is the one-argument form, bit for bit.
  void backward(GradientSink& sink, float loss_scale, int64_t loss_tokens);

  // The result of the last forward (throws std::logic_error before the first).
  ForwardResult last_forward() const;

  // Logits [batch·seq_len, vocab] of the last forward, in the backend's memory (host memory for
  // the CPU); valid until backward runs. Forward keeps only one chunk of them: the first call after
  // a forward computes them all into a buffer (kActivations) that backward releases.
  const float* logits() const;

  const ModelOptions& options() const { return options_; }
  LlamaWeights& weights() { return weights_; }
  Backend& backend() { return backend_; }

 private:
  struct Activations;
  struct LayerActivations;
  struct Workspace;

  void validate(const TokenBatch& batch) const;
  ForwardResult run_forward(const TokenBatch& batch, bool with_head_gradient);
  int64_t lm_head_chunk_rows(int64_t rows) const;
  // The LM head and cross-entropy, chunk by chunk of rows. With `loss`, fills logsumexp and returns
  // the loss sum. With `gradient`, writes gradient_scale·d(loss sum)/d(final_normed) into the
  // workspace's d_normed and the same for the head's weight into head_gradient_buffer().
  double lm_head_chunks(bool loss, bool gradient, float gradient_scale);
  float* head_gradient_buffer();
  // Multiplies the head's input and weight gradients that forward left by `factor` (a backward
  // whose loss scale or token count differs from forward's assumption).
  void rescale_head_gradients(float factor);
  void prepare_forward_buffers(int64_t batch_size, int64_t seq_len);
  void prepare_backward_buffers();
  // x_out may be null when recomputing for backward, which needs everything but the output.
  void layer_forward(int64_t layer, const float* x_in, LayerActivations& acts, float* x_out);
  void layer_backward(int64_t layer, GradientSink& sink, const float* x_in, LayerActivations& acts,
                      float* d_residual);
  // fp32 view of a parameter: its storage when fp32, else a converted copy in workspace that is
  // valid until the next call.
  const float* weight_f32(const Parameter& parameter) const;
  // Where a product's operands come from when the backend multiplies narrower than fp32
  // (Backend::product_dtype()): one scratch each for the layer input x, the output gradient dy and
  // a weight that must be narrowed (an fp32 weight); each valid until the next use of its slot.
  enum class OperandSlot : uint8_t { kInput, kOutputGradient, kWeight };
  // A weight as the backend's products take it: as stored when it has product_dtype() already
  // (bf16 weights on a GPU in bf16 mode: no copy), else fp32 (weight_f32), narrowed in kWeight.
  TypedInput weight_operand(const Parameter& parameter) const;
  // `count` fp32 activations as a product operand: themselves, or narrowed into `slot`.
  TypedInput activation_operand(const float* values, int64_t count, OperandSlot slot) const;
  // A layer activation that is only a product input (h1, attn_out, h2, act) is stored in the
  // product dtype: its producer writes fp32 into operand_output(stored), store_operand narrows
  // that into `stored` (nothing to do for fp32 products), and stored_operand is the product's
  // operand, in forward and in backward alike (the same bf16 values: bit-identical results to
  // narrowing again, with half the memory and no narrowing in backward).
  float* operand_output(Buffer& stored);
  void store_operand(Buffer& stored, int64_t count);
  TypedInput stored_operand(const Buffer& stored) const;
  AttentionShape attention_shape(int64_t batch_size, int64_t seq_len) const;
  void ensure_rope_table(int64_t max_position);
  // Copies the batch's token ids, targets, positions (and first keys) to the backend's memory.
  void upload_indices(Activations& acts);
  // Hands `gradient` (the parameter's shape, fp32, on this device) to the sink.
  void deliver(GradientSink& sink, Parameter& parameter, float* gradient);
  // y [rows, bias width] += bias; nothing when the projection has no bias (null).
  void add_bias(float* y, const Parameter* bias, int64_t rows);
  // The bias's gradient, the column sums of its projection's output gradient dy [rows, width],
  // to the sink; nothing for a null bias. Uses the shared gradient buffer.
  void deliver_bias(GradientSink& sink, Parameter* bias, const float* dy, int64_t rows);

  Backend& backend_;
  LlamaWeights& weights_;
  MemoryAccountant& accountant_;
  ModelOptions options_;
  Buffer rope_cos_, rope_sin_;  // the RoPE table in the backend's memory (kWorkspace)
  RopeTableView rope_table_;
  std::unique_ptr<Activations> activations_;
  std::unique_ptr<Workspace> workspace_;
  mutable Buffer weight_scratch_;      // fp32 copy of one non-fp32 weight (kWorkspace)
  mutable Buffer operand_scratch_[3];  // by OperandSlot: narrowed operands (kWorkspace), grown
  bool has_forward_ = false;
  bool logits_valid_ = false;         // a forward since the last backward: logits() may compute
  bool head_gradient_ready_ = false;  // forward left the head's gradients (at head_scale_)
  float head_scale_ = 0.0f;
  mutable Buffer full_logits_;  // logits() only: a cache of the last forward's logits
  std::unique_ptr<DeviceValue<GradientStatistics>> rescale_statistics_;  // unread by-product
  mutable bool full_logits_current_ = false;
};

}  // namespace lomo
