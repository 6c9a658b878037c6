#include "worker/optim/optimizer.h"

#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <vector>

#include "kernels/cpu/parallel_sum.h"
#include "worker/engine/safetensors.h"
#include "worker/optim/parameter_update.h"

namespace lomo {
namespace {

using Kind = OptimizerOptions::Kind;

// Exact text for doubles in safetensors metadata (hex floats round-trip every bit).
std::string exact(double value) {
  char text[64];
  std::snprintf(text, sizeof(text), "%a", value);
  return text;
}

double parse_exact(const std::map<std::string, std::string>& metadata, const std::string& key,
                   const std::filesystem::path& file) {
  const auto it = metadata.find(key);
  if (it == metadata.end()) {
    throw CheckpointError(file.string() + ": optimizer state lacks metadata '" + key + "'");
  }
  char* end = nullptr;
  const double value = std::strtod(it->second.c_str(), &end);
  if (end == it->second.c_str() || *end != '\0') {
    throw CheckpointError(file.string() + ": metadata '" + key + "' is not a number: '" +
                          it->second + "'");
  }
  return value;
}

bool decays(const OptimizerOptions& options, const Parameter& parameter) {
  return options.weight_decay > 0.0 && (!parameter.is_norm_weight || options.weight_decay_on_norms);
}

int64_t index_of(const LlamaWeights& weights, const Parameter& parameter) {
  return &parameter - weights.parameters().data();
}

// fp32 optimizer state tensors, one set per parameter, saved under "<parameter>.<suffix>".
class StateTensors {
 public:
  StateTensors(MemoryAccountant& accountant) : accountant_(accountant) {}
  float* add(const Parameter& parameter, const std::string& suffix, std::vector<int64_t> shape) {
    int64_t count = 1;
    for (int64_t extent : shape) count *= extent;
    Entry entry{parameter.name + "." + suffix, std::move(shape),
                float_buffer(accountant_, MemoryKind::kOptimizerState, static_cast<size_t>(count))};
    std::memset(entry.buffer.data(), 0, entry.buffer.size_bytes());
    entries_.push_back(std::move(entry));
    return entries_.back().buffer.as<float>();
  }
  std::vector<SafetensorsTensorView> views() const {
    std::vector<SafetensorsTensorView> views;
    for (const Entry& e : entries_)
      views.push_back({e.name, DType::kF32, e.shape, e.buffer.data()});
    return views;
  }
  void load(const SafetensorsFile& file) {
    for (Entry& e : entries_) {
      const SafetensorsTensorInfo* info = file.find(e.name);
      if (info == nullptr) {
        throw CheckpointError(file.path().string() + ": optimizer state tensor '" + e.name +
                              "' is missing");
      }
      if (info->dtype != DType::kF32 || info->shape != e.shape) {
        throw CheckpointError(file.path().string() + ": optimizer state tensor '" + e.name +
                              "' has dtype " + std::string(dtype_name(info->dtype)) + " shape " +
                              info->shape_string() + ", expected F32 of the parameter's shape");
      }
      file.read_tensor(e.name, e.buffer.data());
    }
  }

 private:
  struct Entry {
    std::string name;
    std::vector<int64_t> shape;
    Buffer buffer;
  };
  MemoryAccountant& accountant_;
  std::vector<Entry> entries_;
};

// What every optimizer saves besides its tensors: identity, update count, loss scaler.
struct CommonState {
  int64_t updates = 0;  // applied (not skipped) updates: AdaLomo's and AdamW's t
  std::optional<DynamicLossScaler> scaler;
};

void save_common(const std::filesystem::path& file, const OptimizerOptions& options,
                 const CommonState& common, const StateTensors& tensors) {
  std::map<std::string, std::string> metadata{{"lomo_optimizer", optimizer_kind_name(options.kind)},
                                              {"updates", std::to_string(common.updates)}};
  if (common.scaler) {
    metadata["loss_scale"] = exact(common.scaler->state().scale);
    metadata["loss_scale_clean_steps"] = std::to_string(common.scaler->state().clean_steps);
    metadata["loss_scale_overflows"] = std::to_string(common.scaler->state().overflows);
  }
  write_safetensors(file, tensors.views(), metadata);
}

void load_common(const std::filesystem::path& path, const OptimizerOptions& options,
                 CommonState& common, StateTensors& tensors) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const auto& metadata = file.header().metadata;
  const auto name = metadata.find("lomo_optimizer");
  if (name == metadata.end() || name->second != optimizer_kind_name(options.kind)) {
    throw CheckpointError(path.string() + ": optimizer state is for '" +
                          (name == metadata.end() ? std::string("?") : name->second) +
                          "', the job uses '" + optimizer_kind_name(options.kind) + "'");
  }
  common.updates = static_cast<int64_t>(parse_exact(metadata, "updates", path));
  if (common.scaler) {
    LossScalerState state;
    state.scale = parse_exact(metadata, "loss_scale", path);
    state.clean_steps = static_cast<int64_t>(parse_exact(metadata, "loss_scale_clean_steps", path));
    state.overflows = static_cast<int64_t>(parse_exact(metadata, "loss_scale_overflows", path));
    common.scaler->restore(state);
  }
  tensors.load(file);
}

// Sums squares of prepared gradients and notes the first tensor with inf/NaN. Updates nothing.
class NormSink : public GradientSink {
 public:
  explicit NormSink(const GradientPreparation& preparation) : preparation_(preparation) {}
  void consume(Parameter& parameter, float* gradient) override {
    const double sum = prepare_gradient_for_norm(parameter, gradient, preparation_);
    if (!std::isfinite(sum) && first_non_finite.empty()) first_non_finite = parameter.name;
    sum_squares += sum;
  }
  double sum_squares = 0.0;
  std::string first_non_finite;

 private:
  GradientPreparation preparation_;
};

// ---- Fused optimizers -------------------------------------------------------------------------

class UpdateRule {
 public:
  virtual ~UpdateRule() = default;
  // `gradient` is prepared (unscaled, averaged, clipped) and may be overwritten.
  virtual void apply(Parameter& parameter, float* gradient, double lr, int64_t update,
                     const WriteBack& write_back) = 0;
};

// LOMO: p ← p·(1 − lr·wd) − lr·g.
class LomoRule : public UpdateRule {
 public:
  explicit LomoRule(const OptimizerOptions& options) : options_(options) {}
  void apply(Parameter& parameter, float* gradient, double lr, int64_t,
             const WriteBack& write_back) override {
    const float step = static_cast<float>(lr);
    const float keep =
        decays(options_, parameter) ? static_cast<float>(1.0 - lr * options_.weight_decay) : 1.0f;
    update_parameter(parameter, write_back,
                     [=](int64_t i, float value) { return value * keep - step * gradient[i]; });
  }

 private:
  const OptimizerOptions& options_;
};

// AdaLomo (Lv et al. 2023b): Adafactor-style factored second moment, per-tensor update
// normalisation, step relative to the parameter's RMS, decoupled weight decay.
class AdaLomoRule : public UpdateRule {
 public:
  AdaLomoRule(const OptimizerOptions& options, LlamaWeights& weights, StateTensors& state)
      : options_(options) {
    for (const Parameter& p : weights.parameters()) {
      Moments m;
      if (p.shape.size() == 2) {
        m.row = state.add(p, "exp_avg_sq_row", {p.shape[0]});
        m.col = state.add(p, "exp_avg_sq_col", {p.shape[1]});
      } else {
        m.full = state.add(p, "exp_avg_sq", {p.numel()});
      }
      moments_.push_back(m);
    }
    weights_ = &weights;
  }

  void apply(Parameter& parameter, float* g, double lr, int64_t update,
             const WriteBack& write_back) override {
    const Moments& m = moments_[static_cast<size_t>(index_of(*weights_, parameter))];
    const double beta = 1.0 - std::pow(static_cast<double>(update), options_.adalomo_decay_rate);
    const double eps1 = options_.adalomo_eps1;
    const int64_t count = parameter.numel();
    if (m.full != nullptr) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < count; ++i) {
        const double v = beta * m.full[i] + (1.0 - beta) * (double(g[i]) * g[i] + eps1);
        m.full[i] = static_cast<float>(v);
        g[i] = static_cast<float>(g[i] / std::sqrt(static_cast<double>(m.full[i])));
      }
    } else {
      factored_update(parameter.shape[0], parameter.shape[1], m, g, beta, eps1);
    }
    // Update normalisation: U ← U / max(1, RMS(U)/d).
    const double rms_update =
        std::sqrt(cpu::parallel_sum(count, [&](int64_t i) { return double(g[i]) * g[i]; }) /
                  static_cast<double>(count));
    const double scale = 1.0 / std::max(1.0, rms_update / options_.adalomo_clip_threshold);
    // Relative step: α = lr·max(ε₂, RMS(θ)), RMS of the parameter before this update.
    const double alpha = lr * std::max(options_.adalomo_eps2, parameter_rms(parameter));
    const float step = static_cast<float>(alpha * scale);
    const float keep = decays(options_, parameter)
                           ? static_cast<float>(1.0 - alpha * options_.weight_decay)
                           : 1.0f;
    update_parameter(parameter, write_back,
                     [=](int64_t i, float value) { return value * keep - step * g[i]; });
  }

 private:
  struct Moments {
    float* row = nullptr;   // [rows]: running mean over columns of g² + ε₁
    float* col = nullptr;   // [cols]: running mean over rows of g² + ε₁
    float* full = nullptr;  // vectors: running g² + ε₁
  };

  // Row and column means of g²+ε₁ into the running averages, then
  // g ← g / sqrt(v̂), v̂[r][c] = row[r] / mean(row) · col[c].
  static void factored_update(int64_t rows, int64_t cols, const Moments& m, float* g, double beta,
                              double eps1) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0.0;
      for (int64_t c = 0; c < cols; ++c) sum += double(g[r * cols + c]) * g[r * cols + c] + eps1;
      m.row[r] = static_cast<float>(beta * m.row[r] + (1.0 - beta) * sum / cols);
    }
    // Column sums: per-thread partial rows, combined in thread order (deterministic).
    const int threads = omp_get_max_threads();
    std::vector<double> partial(static_cast<size_t>(threads * cols), 0.0);
#pragma omp parallel num_threads(threads)
    {
      double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * cols;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c)
          mine[c] += double(g[r * cols + c]) * g[r * cols + c] + eps1;
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      double sum = 0.0;
      for (int t = 0; t < threads; ++t) sum += partial[static_cast<size_t>(t * cols + c)];
      m.col[c] = static_cast<float>(beta * m.col[c] + (1.0 - beta) * sum / rows);
    }
    double row_mean = 0.0;
    for (int64_t r = 0; r < rows; ++r) row_mean += m.row[r];
    row_mean /= static_cast<double>(rows);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const double row_factor = 1.0 / std::sqrt(m.row[r] / row_mean);
      for (int64_t c = 0; c < cols; ++c) {
        g[r * cols + c] = static_cast<float>(g[r * cols + c] * row_factor /
                                             std::sqrt(static_cast<double>(m.col[c])));
      }
    }
  }

  const OptimizerOptions& options_;
  LlamaWeights* weights_ = nullptr;
  std::vector<Moments> moments_;
};

class FusedUpdateSink : public GradientSink {
 public:
  FusedUpdateSink(UpdateRule& rule, const LlamaWeights& weights, const GradientPreparation& prep,
                  double lr, int64_t update, WriteBack write_back)
      : rule_(rule),
        weights_(weights),
        prep_(prep),
        lr_(lr),
        update_(update),
        write_back_(write_back) {}
  void consume(Parameter& parameter, float* gradient) override {
    const double sum = prepare_gradient(parameter, gradient, prep_);
    if (!std::isfinite(sum)) {
      throw NonFiniteGradientError(
          "non-finite gradient in " + parameter.name +
          "; parameters after it in backward order were already updated, so training stops "
          "here (resume from the last checkpoint; a lower learning rate or clip_grad_norm, which "
          "checks every gradient before any update, avoids this)");
    }
    sum_squares += sum;
    WriteBack write_back = write_back_;
    write_back.tensor_index = index_of(weights_, parameter);
    rule_.apply(parameter, gradient, lr_, update_, write_back);
  }
  double sum_squares = 0.0;

 private:
  UpdateRule& rule_;
  const LlamaWeights& weights_;
  GradientPreparation prep_;
  double lr_;
  int64_t update_;
  WriteBack write_back_;
};

// Shared by both families: the first pass when the norm (or overflow) must be known first.
struct NormCheck {
  bool skip = false;
  double norm = 0.0;
  float coefficient = 1.0f;
};

NormCheck check_norm(double sum_squares, const std::string& first_non_finite,
                     const OptimizerOptions& options, CommonState& common, int64_t step) {
  NormCheck check;
  check.norm = std::sqrt(sum_squares);
  const bool overflow = !first_non_finite.empty() || !std::isfinite(check.norm);
  if (common.scaler) {
    check.skip = common.scaler->update(overflow);
    if (check.skip) return check;
  } else if (overflow) {
    throw NonFiniteGradientError("step " + std::to_string(step) + ": non-finite gradient in " +
                                 first_non_finite + "; no parameter was updated");
  }
  if (options.clip_grad_norm) {
    check.coefficient =
        static_cast<float>(std::min(1.0, *options.clip_grad_norm / (check.norm + 1e-6)));
  }
  return check;
}

// What both families share: options, weights, state tensors, update count and loss scaler, and
// the state file they go to.
class OptimizerBase : public Optimizer {
 public:
  OptimizerBase(const OptimizerOptions& options, LlamaWeights& weights,
                MemoryAccountant& accountant, Communicator* communicator)
      : options_(options), weights_(weights), communicator_(communicator), state_(accountant) {
    if (options.loss_scaling) common_.scaler.emplace(*options.loss_scaling);
  }
  void save_state(const std::filesystem::path& file) const override {
    save_common(file, options_, common_, state_);
  }
  void load_state(const std::filesystem::path& file) override {
    load_common(file, options_, common_, state_);
  }
  const OptimizerOptions& options() const override { return options_; }

 protected:
  // The preparation every gradient of this step gets; the clip coefficient is set later.
  GradientPreparation preparation(double scale) const {
    GradientPreparation prep;
    prep.communicator = communicator_;
    prep.inverse_loss_scale = static_cast<float>(1.0 / scale);
    if (options_.clip_grad_value) prep.clip_value = static_cast<float>(*options_.clip_grad_value);
    return prep;
  }
  double loss_scale() const { return common_.scaler ? common_.scaler->scale() : 1.0; }

  OptimizerOptions options_;
  LlamaWeights& weights_;
  Communicator* communicator_;
  StateTensors state_;
  CommonState common_;
};

class FusedOptimizer : public OptimizerBase {
 public:
  FusedOptimizer(const OptimizerOptions& options, LlamaWeights& weights,
                 MemoryAccountant& accountant, Communicator* communicator)
      : OptimizerBase(options, weights, accountant, communicator) {
    if (options.kind == Kind::kAdaLomo) {
      rule_ = std::make_unique<AdaLomoRule>(options_, weights, state_);
    } else {
      rule_ = std::make_unique<LomoRule>(options_);
    }
  }

  StepResult step(LlamaModel& model, int64_t step, double lr) override {
    StepResult result;
    const double scale = loss_scale();
    result.loss_scale = scale;
    GradientPreparation prep = preparation(scale);
    // The norm must be known before the first update when clipping by it, and overflow must be
    // known before the first update when loss scaling: both cost a second backward.
    const bool norm_pass = options_.clip_grad_norm.has_value() || common_.scaler.has_value();
    if (norm_pass) {
      NormSink norm_sink(prep);
      model.backward(norm_sink, static_cast<float>(scale));
      const NormCheck check =
          check_norm(norm_sink.sum_squares, norm_sink.first_non_finite, options_, common_, step);
      result.grad_norm = check.norm;
      if (check.skip) {
        result.skipped = true;
        return result;
      }
      prep.clip_coefficient = check.coefficient;
      result.backward_passes = 2;
    }
    ++common_.updates;
    WriteBack write_back{options_.stochastic_rounding, options_.seed, step, 0};
    FusedUpdateSink sink(*rule_, weights_, prep, lr, common_.updates, write_back);
    model.backward(sink, static_cast<float>(scale));
    if (!norm_pass) result.grad_norm = std::sqrt(sink.sum_squares);
    return result;
  }

 private:
  std::unique_ptr<UpdateRule> rule_;
};

// ---- Materialised baselines (SGD, AdamW) -----------------------------------------------------

class CopySink : public GradientSink {
 public:
  CopySink(const LlamaWeights& weights, std::vector<Buffer>& gradients)
      : weights_(weights), gradients_(gradients) {}
  void consume(Parameter& parameter, float* gradient) override {
    std::memcpy(gradients_[static_cast<size_t>(index_of(weights_, parameter))].data(), gradient,
                static_cast<size_t>(parameter.numel()) * sizeof(float));
  }

 private:
  const LlamaWeights& weights_;
  std::vector<Buffer>& gradients_;
};

class MaterializedOptimizer : public OptimizerBase {
 public:
  MaterializedOptimizer(const OptimizerOptions& options, LlamaWeights& weights,
                        MemoryAccountant& accountant, Communicator* communicator)
      : OptimizerBase(options, weights, accountant, communicator), accountant_(accountant) {
    if (options.kind == Kind::kAdamW) {
      for (const Parameter& p : weights.parameters()) {
        exp_avg_.push_back(state_.add(p, "exp_avg", p.shape));
        exp_avg_sq_.push_back(state_.add(p, "exp_avg_sq", p.shape));
      }
    }
  }

  StepResult step(LlamaModel& model, int64_t step, double lr) override {
    if (gradients_.empty()) {
      // Like PyTorch's .grad: allocated at the first backward and kept for the whole run.
      for (const Parameter& p : weights_.parameters()) {
        gradients_.push_back(
            float_buffer(accountant_, MemoryKind::kGradients, static_cast<size_t>(p.numel())));
      }
    }
    StepResult result;
    const double scale = loss_scale();
    result.loss_scale = scale;
    CopySink copy(weights_, gradients_);
    model.backward(copy, static_cast<float>(scale));

    GradientPreparation prep = preparation(scale);
    double sum_squares = 0.0;
    std::string first_non_finite;
    auto& parameters = weights_.parameters();
    for (size_t i = 0; i < parameters.size(); ++i) {
      const double sum = prepare_gradient_for_norm(parameters[i], gradients_[i].as<float>(), prep);
      if (!std::isfinite(sum) && first_non_finite.empty()) first_non_finite = parameters[i].name;
      sum_squares += sum;
    }
    const NormCheck check = check_norm(sum_squares, first_non_finite, options_, common_, step);
    result.grad_norm = check.norm;
    if (check.skip) {
      result.skipped = true;
      return result;
    }
    prep.clip_coefficient = check.coefficient;
    ++common_.updates;
    for (size_t i = 0; i < parameters.size(); ++i) {
      Parameter& p = parameters[i];
      float* g = gradients_[i].as<float>();
      clip_gradient(p, g, prep);
      WriteBack write_back{options_.stochastic_rounding, options_.seed, step,
                           static_cast<int64_t>(i)};
      const float keep =
          decays(options_, p) ? static_cast<float>(1.0 - lr * options_.weight_decay) : 1.0f;
      if (options_.kind == Kind::kSgd) {
        const float step_size = static_cast<float>(lr);
        update_parameter(p, write_back,
                         [=](int64_t j, float value) { return value * keep - step_size * g[j]; });
      } else {
        adamw_update(p, g, exp_avg_[i], exp_avg_sq_[i], lr, keep, write_back);
      }
    }
    return result;
  }

 private:
  void adamw_update(Parameter& p, const float* g, float* m, float* v, double lr, float keep,
                    const WriteBack& write_back) {
    const double t = static_cast<double>(common_.updates);
    const float b1 = static_cast<float>(options_.beta1), b2 = static_cast<float>(options_.beta2);
    const float correction1 = static_cast<float>(1.0 - std::pow(options_.beta1, t));
    const float correction2 = static_cast<float>(1.0 - std::pow(options_.beta2, t));
    const float step_size = static_cast<float>(lr), eps = static_cast<float>(options_.eps);
    update_parameter(p, write_back, [=](int64_t j, float value) {
      m[j] = b1 * m[j] + (1.0f - b1) * g[j];
      v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
      const float denominator = std::sqrt(v[j] / correction2) + eps;
      return value * keep - step_size * (m[j] / correction1) / denominator;
    });
  }

  MemoryAccountant& accountant_;
  std::vector<Buffer> gradients_;
  std::vector<float*> exp_avg_, exp_avg_sq_;
};

}  // namespace

OptimizerOptions::Kind optimizer_kind_from_name(const std::string& name) {
  if (name == "lomo") return Kind::kLomo;
  if (name == "adalomo") return Kind::kAdaLomo;
  if (name == "sgd") return Kind::kSgd;
  if (name == "adamw") return Kind::kAdamW;
  throw std::invalid_argument("unknown optimizer '" + name + "' (lomo, adalomo, sgd, adamw)");
}

std::string optimizer_kind_name(Kind kind) {
  switch (kind) {
    case Kind::kLomo:
      return "lomo";
    case Kind::kAdaLomo:
      return "adalomo";
    case Kind::kSgd:
      return "sgd";
    case Kind::kAdamW:
      return "adamw";
  }
  return "?";
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, LlamaWeights& weights,
                                          MemoryAccountant& accountant,
                                          Communicator* communicator) {
  if (options.stochastic_rounding && weights.storage_dtype() != DType::kBF16) {
    throw std::invalid_argument("stochastic rounding applies to bf16 storage only");
  }
  if (options.kind == Kind::kLomo || options.kind == Kind::kAdaLomo) {
    return std::make_unique<FusedOptimizer>(options, weights, accountant, communicator);
  }
  return std::make_unique<MaterializedOptimizer>(options, weights, accountant, communicator);
}

}  // namespace lomo
