#include "worker/engine/memory.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace lomo
