// Collectives between the data-parallel ranks of one job. Every gradient is averaged across ranks
// inside the sink before it is used, and the global norm is summed, so replicas never diverge
// (DESIGN.md, "The LOMO step", item 6). LocalCommunicator is the single-process case.
#pragma once

#include <cstdint>

namespace lomo {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int world_size() const = 0;
  virtual int rank() const = 0;
  // In place: every rank ends with the element-wise mean over ranks.
  virtual void all_reduce_mean(float* values, int64_t count) = 0;
  // In place: every rank ends with the element-wise sum over ranks.
  virtual void all_reduce_sum(double* values, int64_t count) = 0;
};

class LocalCommunicator final : public Communicator {
 public:
  int world_size() const override { return 1; }
  int rank() const override { return 0; }
  void all_reduce_mean(float*, int64_t) override {}
  void all_reduce_sum(double*, int64_t) override {}
};

}  // namespace lomo
