// Causal multi-head attention with grouped-query heads (query head h reads key/value head
// h / (num_heads / num_kv_heads)), softmax(q·kᵀ/sqrt(head_dim))·v within each sequence.
#pragma once

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cpu {

// q, out: [batch·seq_len, num_heads·head_dim]; k, v: [batch·seq_len, num_kv_heads·head_dim].
// probs: [batch, num_heads, seq_len, seq_len] receives the attention probabilities (zeros outside
// the attended range), which the backward pass needs.
// first_key: null for plain causal attention, or [batch·seq_len] giving for each query position
// the first key position (within its row) it may attend to: packed samples attend only inside
// their own sample. Must satisfy first_key[i] <= i. shape.sliding_window > 0 further limits query i
// to the keys after i − sliding_window (both limits apply).
void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v,
                       const int32_t* first_key, const AttentionShape& shape);

// Size in floats of the scratch attention_backward needs: one seq_len² tile per thread.
int64_t attention_backward_scratch_floats(const AttentionShape& shape);

// Overwrites dq, dk, dv (shapes of q, k, v) with the gradients; probs and the inputs are kept
// intact so that backward can run twice over one forward. The attended ranges are read from the
// zeros in probs, so neither first_key nor the sliding window is needed.
void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                        const float* probs, const float* q, const float* k, const float* v,
                        const AttentionShape& shape);

}  // namespace lomo::cpu
