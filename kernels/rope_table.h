// Rotary position embedding tables in Hugging Face's rotate-half layout: within each head, element
// i is paired with element i + head_dim/2 and the pair is rotated by position · inv_freq[i].
// Host math shared by every backend; a device backend copies the table to its memory.
#pragma once

#include <cstdint>
#include <vector>

namespace lomo {

// Llama 3 frequency scaling ("rope_scaling": {"rope_type": "llama3", ...}); factor 0 disables it.
struct RopeFrequencyScaling {
  double factor = 0.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192.0;
};

// inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, then Llama 3 scaling if enabled.
std::vector<float> rope_inverse_frequencies(int64_t head_dim, double theta,
                                            const RopeFrequencyScaling& scaling);

// cos/sin of position·inv_freq for positions [0, max_position): [max_position, head_dim/2] each.
struct RopeTable {
  int64_t half_dim = 0;
  int64_t max_position = 0;
  std::vector<float> cos;
  std::vector<float> sin;
};
RopeTable rope_table(const std::vector<float>& inverse_frequencies, int64_t max_position);

// What the rope kernels read: a RopeTable's cos and sin [max_position, half_dim] in the computing
// backend's device memory (the engine uploads the host table once and keeps it with the model).
struct RopeTableView {
  int64_t half_dim = 0;
  int64_t max_position = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
};

}  // namespace lomo
