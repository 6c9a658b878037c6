// The loss of one data-parallel step, whatever the split of the global batch into ranks' rows.
//
// Scaling (why the gradient all-reduce is a sum, not a mean): the step's loss is the mean over ALL
// counted target tokens of the global batch, L = Σ_r S_r / N with S_r rank r's token-loss sum and
// N = Σ_r n_r the global count. Each rank runs backward of S_r / N (LlamaModel::backward with
// loss_tokens = N), so the gradient sink's kSum all-reduce yields ∇L on every rank, equal to the
// single-process gradient of the global batch up to fp32 summation order. A mean of per-rank means
// would give ranks with more padding more weight per token. With one rank (LocalCommunicator or
// none) N = n_0 and every reduction is the identity: single-process steps are unchanged bit for
// bit.
#pragma once

#include <cstdint>

#include "worker/comm/communicator.h"
#include "worker/engine/llama_model.h"

namespace lomo {

struct GlobalLoss {
  double loss_sum = 0.0;  // Σ over ranks of the token cross-entropies
  int64_t tokens = 0;     // Σ over ranks of the counted (not ignored) targets
  // The global mean, as LlamaModel::forward computes it for one rank (0 when no token counts).
  double mean() const { return tokens > 0 ? loss_sum / static_cast<double>(tokens) : 0.0; }
};

// All-reduces this rank's forward result (two collectives: the count as i64, then the loss sum as
// f64; every rank calls it at the same point of the step). `communicator` null: this rank alone.
GlobalLoss reduce_loss(const ForwardResult& local, Communicator* communicator);

}  // namespace lomo
