// The CUDA RMSNorm against the CPU kernel. Runs where a GPU is present (label gpu); on machines
// without one every test skips and says so.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/rmsnorm.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rmsnorm.h"

namespace lomo {
namespace {

class DeviceBuffer {
 public:
  explicit DeviceBuffer(const std::vector<float>& host) : count_(host.size()) {
    LOMO_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), count_ * sizeof(float)));
    LOMO_CUDA_CHECK(cudaMemcpy(data_, host.data(), count_ * sizeof(float), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(data_); }
  float* get() { return data_; }
  std::vector<float> to_host() const {
    std::vector<float> host(count_);
    LOMO_CUDA_CHECK(cudaMemcpy(host.data(), data_, count_ * sizeof(float), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  float* data_ = nullptr;
  size_t count_;
};

std::vector<float> pseudo_random(size_t count, uint32_t seed) {
  std::vector<float> values(count);
  for (float& v : values) {
    seed = seed * 1664525u + 1013904223u;
    v = static_cast<float>(seed >> 8) / 16777216.0f * 2.0f - 1.0f;
  }
  return values;
}

TEST(RmsnormCuda, ForwardAndBackwardMatchTheCpuKernel) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine";
  const int64_t rows = 37, dim = 1000;
  const auto x = pseudo_random(rows * dim, 1), weight = pseudo_random(dim, 2),
             dout = pseudo_random(rows * dim, 3), dx_initial = pseudo_random(rows * dim, 4);
  std::vector<float> out(rows * dim), rstd(rows), dx = dx_initial, dweight(dim);
  cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), weight.data(), rows, dim, 1e-5f);
  cpu::rmsnorm_backward(dx.data(), dweight.data(), dout.data(), x.data(), weight.data(),
                        rstd.data(), rows, dim);

  DeviceBuffer d_x(x), d_w(weight), d_dout(dout), d_out(out), d_rstd(rstd), d_dx(dx_initial),
      d_dw(dweight);
  cuda::rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), rows, dim, 1e-5f, nullptr);
  cuda::rmsnorm_backward(d_dx.get(), d_dw.get(), d_dout.get(), d_x.get(), d_w.get(), d_rstd.get(),
                         rows, dim, nullptr);
  LOMO_CUDA_CHECK(cudaDeviceSynchronize());
  // Both fp32 with different summation orders: agreement to ~1e-6 relative; 1e-5 leaves margin.
  auto expect_close = [](const std::vector<float>& got, const std::vector<float>& want,
                         const char* what) {
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-5f * (1.0f + std::abs(want[i]))) << what << " " << i;
    }
  };
  expect_close(d_out.to_host(), out, "out");
  expect_close(d_rstd.to_host(), rstd, "rstd");
  expect_close(d_dx.to_host(), dx, "dx");
  expect_close(d_dw.to_host(), dweight, "dweight");
}

}  // namespace
}  // namespace lomo
