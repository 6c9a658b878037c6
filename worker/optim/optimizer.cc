#include "worker/optim/optimizer.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <vector>

#include "kernels/backend.h"
#include "worker/engine/safetensors.h"
#include "worker/optim/data_parallel.h"
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
  return options.weight_decay > 0.0 &&
         (!parameter.skips_weight_decay() || options.weight_decay_on_norms);
}

// p ← p·(1 − lr·wd) − lr·g: LOMO's rule and SGD's.
SgdUpdate sgd_update(const OptimizerOptions& options, const Parameter& parameter, double lr) {
  SgdUpdate update;
  update.step = static_cast<float>(lr);
  update.keep =
      decays(options, parameter) ? static_cast<float>(1.0 - lr * options.weight_decay) : 1.0f;
  return update;
}

int64_t index_of(const LlamaWeights& weights, const Parameter& parameter) {
  return &parameter - weights.parameters().data();
}

// fp32 optimizer state tensors, one set per parameter, saved under "<parameter>.<suffix>".
class StateTensors {
 public:
  explicit StateTensors(MemoryAccountant& accountant) : accountant_(accountant) {}
  float* add(const Parameter& parameter, const std::string& suffix, std::vector<int64_t> shape) {
    int64_t count = 1;
    for (int64_t extent : shape) count *= extent;
    Entry entry{parameter.name + "." + suffix, std::move(shape),
                float_buffer(accountant_, MemoryKind::kOptimizerState, static_cast<size_t>(count))};
    backend_for(accountant_.device()).fill_zero(entry.buffer.data(), entry.buffer.size_bytes());
    entries_.push_back(std::move(entry));
    return entries_.back().buffer.as<float>();
  }
  // Views of the tensors in host memory: the buffers themselves on the CPU, else copies made in
  // `host_copies` (which must outlive the views).
  std::vector<SafetensorsTensorView> host_views(std::vector<std::vector<char>>& host_copies) const {
    std::vector<SafetensorsTensorView> views;
    const bool on_host = accountant_.device().is_cpu();
    for (const Entry& e : entries_) {
      const void* data = e.buffer.data();
      if (!on_host) {
        host_copies.emplace_back(e.buffer.size_bytes());
        backend_for(accountant_.device())
            .copy_to_host(host_copies.back().data(), data, e.buffer.size_bytes());
        data = host_copies.back().data();
      }
      views.push_back({e.name, DType::kF32, e.shape, data});
    }
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
      if (accountant_.device().is_cpu()) {
        file.read_tensor(e.name, e.buffer.data());
      } else {
        std::vector<char> host(e.buffer.size_bytes());
        file.read_tensor(e.name, host.data());
        backend_for(accountant_.device()).copy_from_host(e.buffer.data(), host.data(), host.size());
      }
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
  std::vector<std::vector<char>> host_copies;
  write_safetensors(file, tensors.host_views(host_copies), metadata);
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

// Adds the squares of prepared gradients to the pass's statistics, which also note the first
// tensor with inf/NaN. Updates nothing.
class NormSink : public GradientSink {
 public:
  NormSink(Backend& backend, const LlamaWeights& weights, const GradientPreparation& preparation,
           GradientStatistics* statistics)
      : backend_(backend), weights_(weights), preparation_(preparation), statistics_(statistics) {}
  void consume(Parameter& parameter, const TensorView& gradient) override {
    prepare_gradient_for_norm(backend_, parameter, gradient.f32(), index_of(weights_, parameter),
                              preparation_, statistics_);
  }

 private:
  Backend& backend_;
  const LlamaWeights& weights_;
  GradientPreparation preparation_;
  GradientStatistics* statistics_;
};

// ---- Fused optimizers -------------------------------------------------------------------------

class UpdateRule {
 public:
  virtual ~UpdateRule() = default;
  // `gradient` is prepared (rank-summed, unscaled, clipped) and may be overwritten. Nothing changes
  // when `skip` records a non-finite gradient earlier in this pass.
  virtual void apply(Parameter& parameter, float* gradient, double lr, int64_t update,
                     const WriteBack& write_back, const GradientStatistics* skip) = 0;
};

// LOMO: p ← p·(1 − lr·wd) − lr·g.
class LomoRule : public UpdateRule {
 public:
  LomoRule(Backend& backend, const OptimizerOptions& options)
      : backend_(backend), options_(options) {}
  void apply(Parameter& parameter, float* gradient, double lr, int64_t, const WriteBack& write_back,
             const GradientStatistics* skip) override {
    backend_.lomo_update(parameter.storage.data(), parameter.dtype, parameter.numel(), gradient,
                         sgd_update(options_, parameter, lr), write_back, skip);
  }

 private:
  Backend& backend_;
  const OptimizerOptions& options_;
};

// AdaLomo (Lv et al. 2023b): Adafactor-style factored second moment, per-tensor update
// normalisation, step relative to the parameter's RMS, decoupled weight decay.
class AdaLomoRule : public UpdateRule {
 public:
  AdaLomoRule(Backend& backend, const OptimizerOptions& options, LlamaWeights& weights,
              StateTensors& state)
      : backend_(backend), options_(options), weights_(&weights) {
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
  }

  void apply(Parameter& parameter, float* g, double lr, int64_t update, const WriteBack& write_back,
             const GradientStatistics* skip) override {
    const Moments& m = moments_[static_cast<size_t>(index_of(*weights_, parameter))];
    AdaLomoUpdate u;
    u.lr = lr;
    u.beta = 1.0 - std::pow(static_cast<double>(update), options_.adalomo_decay_rate);
    u.eps1 = options_.adalomo_eps1;
    u.eps2 = options_.adalomo_eps2;
    u.clip_threshold = options_.adalomo_clip_threshold;
    u.weight_decay = decays(options_, parameter) ? options_.weight_decay : 0.0;
    const bool factored = m.full == nullptr;
    backend_.adalomo_update(parameter.storage.data(), parameter.dtype,
                            factored ? parameter.shape[0] : parameter.numel(),
                            factored ? parameter.shape[1] : 0, g, m.row, m.col, m.full, u,
                            write_back, skip);
  }

 private:
  struct Moments {
    float* row = nullptr;   // [rows]: running mean over columns of g² + ε₁
    float* col = nullptr;   // [cols]: running mean over rows of g² + ε₁
    float* full = nullptr;  // vectors: running g² + ε₁
  };

  Backend& backend_;
  const OptimizerOptions& options_;
  LlamaWeights* weights_ = nullptr;
  std::vector<Moments> moments_;
};

class FusedUpdateSink : public GradientSink {
 public:
  FusedUpdateSink(Backend& backend, UpdateRule& rule, const LlamaWeights& weights,
                  const GradientPreparation& prep, double lr, int64_t update, WriteBack write_back,
                  GradientStatistics* statistics)
      : backend_(backend),
        rule_(rule),
        weights_(weights),
        prep_(prep),
        lr_(lr),
        update_(update),
        write_back_(write_back),
        statistics_(statistics) {}
  void consume(Parameter& parameter, const TensorView& gradient) override {
    const int64_t index = index_of(weights_, parameter);
    prepare_gradient(backend_, parameter, gradient.f32(), index, prep_, statistics_);
    WriteBack write_back = write_back_;
    write_back.tensor_index = index;
    // The update kernel reads the non-finite flag on the device: no host read per tensor.
    rule_.apply(parameter, gradient.f32(), lr_, update_, write_back, statistics_);
  }

 private:
  Backend& backend_;
  UpdateRule& rule_;
  const LlamaWeights& weights_;
  GradientPreparation prep_;
  double lr_;
  int64_t update_;
  WriteBack write_back_;
  GradientStatistics* statistics_;
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
      : options_(options),
        weights_(weights),
        communicator_(communicator),
        backend_(backend_for(accountant.device())),
        statistics_(backend_, GradientStatistics{}),
        state_(accountant) {
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
  // The step's global loss (every rank's tokens), reported and used by every backward below.
  StepResult begin_step(LlamaModel& model) {
    const GlobalLoss global = reduce_loss(model.last_forward(), communicator_);
    loss_tokens_ = global.tokens;
    StepResult result;
    result.loss = global.mean();
    result.tokens = global.tokens;
    result.loss_scale = loss_scale();
    return result;
  }
  // This rank's share of the gradient of the global mean loss, times the loss scale.
  void backward(LlamaModel& model, GradientSink& sink, double scale) const {
    model.backward(sink, static_cast<float>(scale), loss_tokens_);
  }
  // Zeroes the device-side statistics before a pass over every gradient.
  GradientStatistics* fresh_statistics() {
    statistics_.write(GradientStatistics{});
    return statistics_.get();
  }
  // The pass's statistics: the one host read of the pass. The tensor's name, or "" when finite.
  std::pair<GradientStatistics, std::string> read_statistics() const {
    const GradientStatistics statistics = statistics_.read();
    return {statistics,
            statistics.first_non_finite >= 0
                ? weights_.parameters()[static_cast<size_t>(statistics.first_non_finite)].name
                : std::string()};
  }

  OptimizerOptions options_;
  LlamaWeights& weights_;
  Communicator* communicator_;
  Backend& backend_;
  DeviceValue<GradientStatistics> statistics_;  // allocated once: no allocation per step
  int64_t loss_tokens_ = 0;                     // this step's global count of counted tokens
  StateTensors state_;
  CommonState common_;
};

class FusedOptimizer : public OptimizerBase {
 public:
  FusedOptimizer(const OptimizerOptions& options, LlamaWeights& weights,
                 MemoryAccountant& accountant, Communicator* communicator)
      : OptimizerBase(options, weights, accountant, communicator) {
    if (options.kind == Kind::kAdaLomo) {
      rule_ = std::make_unique<AdaLomoRule>(backend_, options_, weights, state_);
    } else {
      rule_ = std::make_unique<LomoRule>(backend_, options_);
    }
  }

  StepResult step(LlamaModel& model, int64_t step, double lr) override {
    StepResult result = begin_step(model);
    const double scale = result.loss_scale;
    GradientPreparation prep = preparation(scale);
    // The norm must be known before the first update when clipping by it, and overflow must be
    // known before the first update when loss scaling: both cost a second backward.
    const bool norm_pass = options_.clip_grad_norm.has_value() || common_.scaler.has_value();
    if (norm_pass) {
      // The sink reduces each gradient before squaring it, so the norm is the global one on
      // every rank with no further reduction, and an inf/NaN on any rank reaches every rank
      // through the sum (Communicator contract: identical bits everywhere): every rank skips or
      // stops together. The updating pass reduces every gradient a second time.
      NormSink norm_sink(backend_, weights_, prep, fresh_statistics());
      backward(model, norm_sink, scale);
      const auto [statistics, first_non_finite] = read_statistics();
      const NormCheck check =
          check_norm(statistics.sum_squares, first_non_finite, options_, common_, step);
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
    FusedUpdateSink sink(backend_, *rule_, weights_, prep, lr, common_.updates, write_back,
                         fresh_statistics());
    backward(model, sink, scale);
    const auto [statistics, first_non_finite] = read_statistics();
    if (!first_non_finite.empty()) {
      throw NonFiniteGradientError(
          "non-finite gradient in " + first_non_finite +
          "; parameters after it in backward order were already updated, so training stops "
          "here (resume from the last checkpoint; a lower learning rate or clip_grad_norm, which "
          "checks every gradient before any update, avoids this)");
    }
    if (!norm_pass) result.grad_norm = std::sqrt(statistics.sum_squares);
    return result;
  }

 private:
  std::unique_ptr<UpdateRule> rule_;
};

// ---- Materialised baselines (SGD, AdamW) -----------------------------------------------------

class CopySink : public GradientSink {
 public:
  CopySink(Backend& backend, const LlamaWeights& weights, std::vector<Buffer>& gradients)
      : backend_(backend), weights_(weights), gradients_(gradients) {}
  void consume(Parameter& parameter, const TensorView& gradient) override {
    backend_.copy(gradients_[static_cast<size_t>(index_of(weights_, parameter))].data(),
                  gradient.f32(), static_cast<size_t>(parameter.numel()) * sizeof(float));
  }

 private:
  Backend& backend_;
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
    StepResult result = begin_step(model);
    const double scale = result.loss_scale;
    CopySink copy(backend_, weights_, gradients_);
    backward(model, copy, scale);

    GradientPreparation prep = preparation(scale);
    // Reduced before the squares are summed: the global norm and overflow on every rank.
    GradientStatistics* statistics = fresh_statistics();
    auto& parameters = weights_.parameters();
    for (size_t i = 0; i < parameters.size(); ++i) {
      prepare_gradient_for_norm(backend_, parameters[i], gradients_[i].as<float>(),
                                static_cast<int64_t>(i), prep, statistics);
    }
    const auto [sums, first_non_finite] = read_statistics();
    const NormCheck check = check_norm(sums.sum_squares, first_non_finite, options_, common_, step);
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
      clip_gradient(backend_, p, g, prep);
      WriteBack write_back{options_.stochastic_rounding, options_.seed, step,
                           static_cast<int64_t>(i)};
      // The norm check above already stopped a non-finite step: nothing left to skip.
      const SgdUpdate sgd = sgd_update(options_, p, lr);
      if (options_.kind == Kind::kSgd) {
        backend_.lomo_update(p.storage.data(), p.dtype, p.numel(), g, sgd, write_back, nullptr);
      } else {
        backend_.adamw_update(p.storage.data(), p.dtype, p.numel(), g, exp_avg_[i], exp_avg_sq_[i],
                              adamw(lr, sgd.keep), write_back, nullptr);
      }
    }
    return result;
  }

 private:
  AdamWUpdate adamw(double lr, float keep) const {
    const double t = static_cast<double>(common_.updates);
    AdamWUpdate u;
    u.beta1 = static_cast<float>(options_.beta1);
    u.beta2 = static_cast<float>(options_.beta2);
    u.correction1 = static_cast<float>(1.0 - std::pow(options_.beta1, t));
    u.correction2 = static_cast<float>(1.0 - std::pow(options_.beta2, t));
    u.step = static_cast<float>(lr);
    u.eps = static_cast<float>(options_.eps);
    u.keep = keep;
    return u;
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
