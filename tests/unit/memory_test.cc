#include "worker/engine/memory.h"

#include <gtest/gtest.h>

#include <stdexcept>

#include "kernels/backend.h"

namespace lomo {
namespace {

TEST(MemoryAccountant, TracksCurrentAndPeakPerKindAndTotal) {
  MemoryAccountant accountant;
  {
    Buffer params(accountant, MemoryKind::kParameters, 1000);
    {
      Buffer grad(accountant, MemoryKind::kGradients, 300);
      Buffer moved = std::move(grad);  // a move transfers ownership without counting twice
      EXPECT_EQ(accountant.report().current(MemoryKind::kGradients), 300u);
    }
    Buffer act(accountant, MemoryKind::kActivations, 200);
    const MemoryReport r = accountant.report();
    EXPECT_EQ(r.current(MemoryKind::kGradients), 0u);
    EXPECT_EQ(r.peak(MemoryKind::kGradients), 300u);
    EXPECT_EQ(r.current_total_bytes, 1200u);
    EXPECT_EQ(r.peak_total_bytes, 1300u);  // peak of the sum: params + grad, before act existed
  }
  EXPECT_EQ(accountant.report().current_total_bytes, 0u);
  accountant.reset_peaks();
  EXPECT_EQ(accountant.report().peak_total_bytes, 0u);
}

TEST(MemoryAccountant, ReportsAsJson) {
  MemoryAccountant accountant;
  Buffer b(accountant, MemoryKind::kWorkspace, 64);
  const std::string json = accountant.report().to_json();
  EXPECT_NE(json.find("\"workspace\":{\"current\":64,\"peak\":64}"), std::string::npos) << json;
}

TEST(MemoryAccountant, CountsOneDeviceWhoseBuffersLiveThere) {
  MemoryAccountant host;  // the CPU unless told otherwise, so existing callers count host memory
  EXPECT_EQ(host.device(), Device::cpu());
  Buffer b(host, MemoryKind::kWorkspace, 64);
  EXPECT_EQ(b.device(), Device::cpu());
  EXPECT_EQ(host.report().device, Device::cpu());
  // Per-device reports: a second device's accountant counts only its own buffers.
  MemoryAccountant gpu(Device::cuda(0));
  EXPECT_EQ(gpu.report().device, Device::cuda(0));
  EXPECT_EQ(gpu.report().current_total_bytes, 0u);
}

TEST(MemoryAccountant, ABufferOnADeviceWithoutABackendIsRefusedAndNotCounted) {
  bool has_cuda = false;
  for (Device d : available_backends()) has_cuda |= d.type == DeviceType::kCuda;
  if (has_cuda) GTEST_SKIP() << "this build has a CUDA backend";
  MemoryAccountant gpu(Device::cuda(0));
  EXPECT_THROW(Buffer(gpu, MemoryKind::kParameters, 64), std::invalid_argument);
  EXPECT_EQ(gpu.report().peak_total_bytes, 0u);
}

// An allocation the device cannot satisfy fails with a message a user can act on: the device, the
// request, and what the accountant holds by kind. It is still a std::bad_alloc. (The same path
// carries a CUDA out-of-memory: scripts/gpu_check.sh shows it on a GPU.)
TEST(MemoryAccountant, AnAllocationThatFailsNamesTheDeviceTheRequestAndWhatIsInUse) {
  MemoryAccountant accountant;
  Buffer params(accountant, MemoryKind::kParameters, 3u << 20);
  try {
    Buffer huge(accountant, MemoryKind::kActivations, size_t{1} << 62);
    ADD_FAILURE() << "a 4 EiB allocation succeeded";
  } catch (const std::bad_alloc& error) {
    EXPECT_STREQ(error.what(),
                 "out of memory on cpu allocating 4294967296.00 GiB of activations; in use "
                 "3.0 MiB: parameters 3.0 MiB");
  }
  EXPECT_EQ(accountant.report().current(MemoryKind::kActivations), 0u) << "nothing counted";
}

}  // namespace
}  // namespace lomo
