// Optimizers as the trainer sees them: after forward, step() runs backward (once, or twice when
// the global norm must be known before any update) and updates every parameter.
//
// Fused (LOMO, AdaLomo): each gradient updates its parameter inside backward; peak gradient memory
// is one tensor. Materialised (SGD, AdamW): every gradient is kept until backward ends, as PyTorch
// does — the paper's baselines, here so that memory and speed compare in one engine.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "worker/comm/communicator.h"
#include "worker/engine/llama_model.h"
#include "worker/optim/loss_scaler.h"

namespace lomo {

struct OptimizerOptions {
  enum class Kind { kLomo, kAdaLomo, kSgd, kAdamW };
  Kind kind = Kind::kLomo;
  std::optional<double> clip_grad_norm;
  std::optional<double> clip_grad_value;
  double weight_decay = 0.0;
  bool weight_decay_on_norms = false;
  bool stochastic_rounding = false;               // bf16 storage only
  uint64_t seed = 0;                              // stochastic rounding stream
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // AdamW
  double adalomo_eps1 = 1e-30, adalomo_eps2 = 1e-3, adalomo_clip_threshold = 1.0,
         adalomo_decay_rate = -0.8;
  std::optional<LossScalerOptions> loss_scaling;  // dynamic loss scaling (fp16)
};

OptimizerOptions::Kind optimizer_kind_from_name(const std::string& name);
std::string optimizer_kind_name(OptimizerOptions::Kind kind);

struct StepResult {
  bool skipped = false;     // fp16 overflow: no parameter changed (on every rank)
  double grad_norm = 0.0;   // global L2 norm of the unscaled, unclipped, rank-reduced gradient
  double loss_scale = 1.0;  // the scale this step's backward used
  int backward_passes = 1;
  double loss = 0.0;   // mean loss over every rank's counted tokens (data_parallel.h)
  int64_t tokens = 0;  // counted tokens over every rank
};

// A gradient with inf/NaN where no loss scaler can skip the step. Parameters earlier in backward
// order may already be updated: the run must not continue.
class NonFiniteGradientError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Backward of the batch `model` last forwarded, then the update with learning rate `lr`.
  // `step` is 1-based and counts every call (skipped steps included). With a communicator, each
  // rank forwards its own rows and every rank calls step(): the loss, its gradient and the update
  // are those of the global batch (data_parallel.h), identical on every rank.
  virtual StepResult step(LlamaModel& model, int64_t step, double lr) = 0;
  // Optimizer state (moments, update count, loss scaler) to and from one safetensors file;
  // stateless optimizers still write the loss scaler and counters.
  virtual void save_state(const std::filesystem::path& file) const = 0;
  virtual void load_state(const std::filesystem::path& file) = 0;
  virtual const OptimizerOptions& options() const = 0;
};

// `weights`, `accountant` and `communicator` (may be null) must outlive the optimizer.
std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, LlamaWeights& weights,
                                          MemoryAccountant& accountant, Communicator* communicator);

}  // namespace lomo
