// Inference-only forward of a LLaMA-family model (Llama, Mistral, Qwen2) with a key/value cache:
// the prompt is run once (prefill), then each new token costs one row through every layer and
// an attention over the cached keys, instead of a forward over the whole sequence.
//
// Everything runs on the Backend seam, so it computes wherever the weights live. Prefill uses the
// training forward's causal attention kernel; a single new token's attention is built from the
// seam's strided-batched products and the softmax inside cross_entropy_backward (kv_cache_model.cc
// says how), so no backend needs a kernel of its own for it. The cache is counted under
// MemoryKind::kKvCache, the per-call buffers under kActivations and kWorkspace.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kernels/backend.h"
#include "kernels/rope_table.h"
#include "worker/engine/llama_weights.h"
#include "worker/engine/memory.h"

namespace lomo {

class KvCacheModel {
 public:
  // Holds keys and values for up to `capacity` positions (at most max_position_embeddings).
  // `weights` and `accountant` must outlive the model; the weights must live on the accountant's
  // device. Throws std::invalid_argument for a capacity outside [1, max_position_embeddings].
  KvCacheModel(LlamaWeights& weights, MemoryAccountant& accountant, int64_t capacity);
  ~KvCacheModel();
  KvCacheModel(const KvCacheModel&) = delete;
  KvCacheModel& operator=(const KvCacheModel&) = delete;

  // Runs `tokens` at positions length() .. length()+n−1 and caches their keys and values.
  // Returns the logits of these n positions, [n, vocab] fp32, copied to the host. The first call
  // on an empty cache runs all n at once (prefill); later calls run token by token. Throws
  // std::invalid_argument for an empty span, a token outside the vocabulary, or more tokens than
  // the cache has room for.
  std::vector<float> append(std::span<const int32_t> tokens);

  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  // Forgets every cached position (the memory stays).
  void clear() { length_ = 0; }

 private:
  struct Scratch;

  void validate(std::span<const int32_t> tokens) const;
  // Runs n tokens at positions length_.. through every layer; logits of all n rows on the device.
  void run(std::span<const int32_t> tokens);
  void layer(int64_t index, int64_t n);
  // Attention of the n query rows in scratch q against the cache (keys of this call included).
  void attention(int64_t layer_index, int64_t n);
  void decode_attention(int64_t layer_index);
  void ensure_scratch(int64_t n);
  const float* weight_f32(const Parameter& parameter);
  void add_bias(float* y, const Parameter* bias, int64_t rows);

  Backend& backend_;
  LlamaWeights& weights_;
  MemoryAccountant& accountant_;
  int64_t capacity_;
  int64_t length_ = 0;
  std::vector<Buffer> keys_, values_;  // per layer [capacity, kv_heads·head_dim], kKvCache
  Buffer rope_cos_, rope_sin_;
  RopeTableView rope_table_;
  Buffer weight_scratch_;  // fp32 copy of one bf16/fp16 weight
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace lomo
