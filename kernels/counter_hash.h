// splitmix64's finaliser: a counter-based hash. Random streams built from it depend only on their
// counters (seed, step, tensor, element), never on thread count or call order, so initialisation,
// shuffling and stochastic rounding repeat exactly in a resumed run.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/host_device.h"

namespace lomo {

LOMO_HOST_DEVICE inline uint64_t mix_bits(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A sequential generator over the same hash (splitmix64): for tests, fuzz drivers and benchmarks
// that need a cheap, seedable, platform-independent stream.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    const uint64_t counter = state_;
    state_ += 0x9e3779b97f4a7c15ull;
    return mix_bits(counter);
  }
  // Uniform enough in [0, bound) for test data and mutation choices; bound must be positive.
  size_t below(size_t bound) { return static_cast<size_t>(next() % bound); }

 private:
  uint64_t state_;
};

}  // namespace lomo
