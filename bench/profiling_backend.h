// A Backend that forwards every call to another and measures it: after each call it waits for
// the device (synchronize) and adds the wall time to the call's op family. The waits serialise the
// GPU, so a profiled step is slower than a plain one; the split is what it is for (gpu_bench
// --profile-ops). Benchmark-only: nothing in the product uses it.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kernels/backend.h"

namespace lomo {

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(Backend& inner) : inner_(inner) {}
  void reset() { seconds_.clear(); }
  // Prints each family's share of `step_seconds` (the timed steps' total wall time); the rest is
  // work outside the model's calls (the optimizer's own kernels, the host).
  void print(double step_seconds) const {
    std::vector<std::pair<double, std::string>> rows;
    double total = 0.0;
    for (const auto& [family, seconds] : seconds_) {
      rows.emplace_back(seconds, family);
      total += seconds;
    }
    std::sort(rows.rbegin(), rows.rend());
    std::printf("  time by op family (model calls; %% of the timed steps):\n");
    for (const auto& [seconds, family] : rows) {
      std::printf("    %-22s %9.1f ms %5.1f%%\n", family.c_str(), seconds * 1e3,
                  100.0 * seconds / step_seconds);
    }
    std::printf("    %-22s %9.1f ms %5.1f%%\n", "other (optimizer, host)",
                (step_seconds - total) * 1e3, 100.0 * (step_seconds - total) / step_seconds);
  }

  Device device() const override { return inner_.device(); }

  void* allocate(size_t bytes) override { return inner_.allocate(bytes); }

  void deallocate(void* data) override { return inner_.deallocate(data); }

  void copy(void* destination, const void* source, size_t bytes) override {
    const Timer timer(*this, "copies");
    inner_.copy(destination, source, bytes);
  }

  void copy_to_host(void* host_destination, const void* source, size_t bytes) override {
    const Timer timer(*this, "copies");
    inner_.copy_to_host(host_destination, source, bytes);
  }

  void copy_from_host(void* destination, const void* host_source, size_t bytes) override {
    const Timer timer(*this, "copies");
    inner_.copy_from_host(destination, host_source, bytes);
  }

  void fill_zero(void* data, size_t bytes) override {
    const Timer timer(*this, "copies");
    inner_.fill_zero(data, bytes);
  }

  void synchronize() override { return inner_.synchronize(); }

  void set_matmul_precision(MatmulPrecision precision) override {
    inner_.set_matmul_precision(precision);
  }

  void convert_to_f32(float* out, const void* in, DType dtype, int64_t count) override {
    const Timer timer(*this, "weight widening");
    inner_.convert_to_f32(out, in, dtype, count);
  }

  DType product_dtype() const override { return inner_.product_dtype(); }
  void convert_from_f32(void* out, DType dtype, const float* in, int64_t count) override {
    const Timer timer(*this, "activation narrowing");
    inner_.convert_from_f32(out, dtype, in, count);
  }

  void matmul_forward(float* y, TypedInput x, TypedInput weight, int64_t m, int64_t n, int64_t k,
                      bool accumulate) override {
    const Timer timer(*this, "matmul");
    inner_.matmul_forward(y, x, weight, m, n, k, accumulate);
  }

  void matmul_backward_input(float* dx, TypedInput dy, TypedInput weight, int64_t m, int64_t n,
                             int64_t k, bool accumulate) override {
    const Timer timer(*this, "matmul");
    inner_.matmul_backward_input(dx, dy, weight, m, n, k, accumulate);
  }

  void matmul_backward_weight(float* dweight, TypedInput dy, TypedInput x, int64_t m, int64_t n,
                              int64_t k, bool accumulate) override {
    const Timer timer(*this, "matmul");
    inner_.matmul_backward_weight(dweight, dy, x, m, n, k, accumulate);
  }

  void gemm(const GemmArgs& args) override {
    const Timer timer(*this, "matmul");
    inner_.gemm(args);
  }

  void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t rows,
                       int64_t dim, float eps) override {
    const Timer timer(*this, "rmsnorm");
    inner_.rmsnorm_forward(out, rstd, x, weight, rows, dim, eps);
  }

  void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                        const float* weight, const float* rstd, int64_t rows,
                        int64_t dim) override {
    const Timer timer(*this, "rmsnorm");
    inner_.rmsnorm_backward(dx, dweight, dout, x, weight, rstd, rows, dim);
  }

  void rope_forward(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
                    int64_t num_heads) override {
    const Timer timer(*this, "rope");
    inner_.rope_forward(x, positions, table, rows, num_heads);
  }

  void rope_backward(float* dx, const int32_t* positions, const RopeTableView& table, int64_t rows,
                     int64_t num_heads) override {
    const Timer timer(*this, "rope");
    inner_.rope_backward(dx, positions, table, rows, num_heads);
  }

  int64_t attention_saved_floats(const AttentionShape& shape) override {
    return inner_.attention_saved_floats(shape);
  }

  int64_t attention_scratch_floats(const AttentionShape& shape) override {
    return inner_.attention_scratch_floats(shape);
  }

  void attention_forward(float* out, float* saved, float* scratch, const float* q, const float* k,
                         const float* v, const int32_t* first_key,
                         const AttentionShape& shape) override {
    const Timer timer(*this, "attention");
    inner_.attention_forward(out, saved, scratch, q, k, v, first_key, shape);
  }

  void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                          const float* saved, const float* q, const float* k, const float* v,
                          const AttentionShape& shape) override {
    const Timer timer(*this, "attention");
    inner_.attention_backward(dq, dk, dv, scratch, dout, saved, q, k, v, shape);
  }

  void bias_forward(float* y, const float* bias, int64_t rows, int64_t cols) override {
    const Timer timer(*this, "bias");
    inner_.bias_forward(y, bias, rows, cols);
  }

  void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols) override {
    const Timer timer(*this, "bias");
    inner_.bias_backward(dbias, dy, rows, cols);
  }

  void swiglu_forward(float* out, const float* gate, const float* up, int64_t count) override {
    const Timer timer(*this, "swiglu");
    inner_.swiglu_forward(out, gate, up, count);
  }

  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                       const float* up, int64_t count) override {
    const Timer timer(*this, "swiglu");
    inner_.swiglu_backward(dgate, dup, dout, gate, up, count);
  }

  void embedding_forward(float* out, const int32_t* tokens, TypedInput table, int64_t count,
                         int64_t dim) override {
    const Timer timer(*this, "embedding");
    inner_.embedding_forward(out, tokens, table, count, dim);
  }

  void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t count,
                          int64_t dim) override {
    const Timer timer(*this, "embedding");
    inner_.embedding_backward(dtable, dout, tokens, count, dim);
  }

  double cross_entropy_forward(float* logsumexp, const float* logits, const int32_t* targets,
                               int64_t rows, int64_t vocab) override {
    const Timer timer(*this, "cross entropy");
    return inner_.cross_entropy_forward(logsumexp, logits, targets, rows, vocab);
  }

  void cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                              const int32_t* targets, int64_t rows, int64_t vocab,
                              float scale) override {
    const Timer timer(*this, "cross entropy");
    inner_.cross_entropy_backward(dlogits, logits, logsumexp, targets, rows, vocab, scale);
  }

  void round_gradient_to_dtype(float* gradient, int64_t count, DType dtype) override {
    const Timer timer(*this, "gradient preparation");
    inner_.round_gradient_to_dtype(gradient, count, dtype);
  }

  void unscale_gradient(float* gradient, int64_t count, float unscale, int64_t tensor_index,
                        GradientStatistics* statistics) override {
    const Timer timer(*this, "gradient preparation");
    inner_.unscale_gradient(gradient, count, unscale, tensor_index, statistics);
  }

  void clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                     float coefficient) override {
    const Timer timer(*this, "gradient preparation");
    inner_.clip_gradient(gradient, count, clip_by_value, clip_value, coefficient);
  }

  double sum_squares(const void* x, DType dtype, int64_t count) override {
    const Timer timer(*this, "norms");
    return inner_.sum_squares(x, dtype, count);
  }

  void lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                   const SgdUpdate& update, const WriteBack& write_back,
                   const GradientStatistics* skip) override {
    const Timer timer(*this, "updates");
    inner_.lomo_update(parameter, dtype, count, gradient, update, write_back, skip);
  }

  void adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols, float* gradient,
                      float* exp_avg_sq_row, float* exp_avg_sq_col, float* exp_avg_sq,
                      const AdaLomoUpdate& update, const WriteBack& write_back,
                      const GradientStatistics* skip) override {
    const Timer timer(*this, "updates");
    inner_.adalomo_update(parameter, dtype, rows, cols, gradient, exp_avg_sq_row, exp_avg_sq_col,
                          exp_avg_sq, update, write_back, skip);
  }

  void adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                    float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                    const WriteBack& write_back, const GradientStatistics* skip) override {
    const Timer timer(*this, "updates");
    inner_.adamw_update(parameter, dtype, count, gradient, exp_avg, exp_avg_sq, update, write_back,
                        skip);
  }

 private:
  class Timer {
   public:
    Timer(ProfilingBackend& owner, const char* family)
        : owner_(owner), family_(family), start_(std::chrono::steady_clock::now()) {}
    ~Timer() {
      owner_.inner_.synchronize();
      owner_.seconds_[family_] +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    }
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;

   private:
    ProfilingBackend& owner_;
    const char* family_;
    std::chrono::steady_clock::time_point start_;
  };

  Backend& inner_;
  std::map<std::string, double> seconds_;
};

}  // namespace lomo
