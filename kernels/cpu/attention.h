// Causal multi-head attention with grouped-query heads (query head h reads key/value head
// h / (num_heads / num_kv_heads)), softmax(q·kᵀ/sqrt(head_dim))·v within each sequence.
//
// Neither pass holds the T×T matrix: queries run in blocks of at most attention_block_rows rows
// whose scores against the keys they can see live in a per-thread scratch tile. Forward saves each
// row's log-sum-exp, from which backward recomputes the probabilities block by block (as the CUDA
// backend does, kernels/cuda/attention_plan.h; the saved layout is the same).
#pragma once

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cpu {

// Query rows per block: the largest tile a thread holds is attention_block_rows × seq_len.
int64_t attention_block_rows(const AttentionShape& shape);

// Size in floats of what forward saves for backward: the log-sum-exp of every row
// [batch, num_heads, seq_len], then each query's first key [batch·seq_len] as int32 (first_key, or
// 0 without packing), so that backward masks exactly as forward did.
int64_t attention_saved_floats(const AttentionShape& shape);

// Size in floats of the scratch either pass needs: two block tiles per OpenMP thread
// (omp_get_max_threads() when sized and when called must agree). Holds nothing between calls.
int64_t attention_scratch_floats(const AttentionShape& shape);

// q, out: [batch·seq_len, num_heads·head_dim]; k, v: [batch·seq_len, num_kv_heads·head_dim].
// saved: attention_saved_floats(shape) floats, overwritten.
// first_key: null for plain causal attention, or [batch·seq_len] giving for each query position
// the first key position (within its row) it may attend to: packed samples attend only inside
// their own sample. Must satisfy first_key[i] <= i. shape.sliding_window > 0 further limits query i
// to the keys after i − sliding_window (both limits apply).
void attention_forward(float* out, float* saved, float* scratch, const float* q, const float* k,
                       const float* v, const int32_t* first_key, const AttentionShape& shape);

// Overwrites dq, dk, dv (shapes of q, k, v) with the gradients; saved and the inputs are kept
// intact so that backward can run twice over one forward. The attended ranges come from saved.
void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                        const float* saved, const float* q, const float* k, const float* v,
                        const AttentionShape& shape);

}  // namespace lomo::cpu
