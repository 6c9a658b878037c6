// splitmix64's finaliser: a counter-based hash. Random streams built from it depend only on their
// counters (seed, step, tensor, element), never on thread count or call order, so initialisation,
// shuffling and stochastic rounding repeat exactly in a resumed run.
#pragma once

#include <cstdint>

namespace lomo {

inline uint64_t mix_bits(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace lomo
