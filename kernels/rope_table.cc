#include "kernels/rope_table.h"

#include <cmath>
#include <numbers>

namespace lomo {

std::vector<float> rope_inverse_frequencies(int64_t head_dim, double theta,
                                            const RopeFrequencyScaling& scaling) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // Hugging Face evaluates this in fp32: base ** (arange(0, dim, 2).float() / dim).
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[static_cast<size_t>(i)] = 1.0f / std::pow(static_cast<float>(theta), exponent);
  }
  if (scaling.factor <= 0.0) return inv_freq;
  // Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
  const double low_freq_wavelen =
      scaling.original_max_position_embeddings / scaling.low_freq_factor;
  const double high_freq_wavelen =
      scaling.original_max_position_embeddings / scaling.high_freq_factor;
  for (float& f : inv_freq) {
    const double wavelen = 2.0 * std::numbers::pi / f;
    if (wavelen > low_freq_wavelen) {
      f = static_cast<float>(f / scaling.factor);
    } else if (wavelen >= high_freq_wavelen) {
      const double smooth =
          (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) /
          (scaling.high_freq_factor - scaling.low_freq_factor);
      f = static_cast<float>((1.0 - smooth) * f / scaling.factor + smooth * f);
    }
  }
  return inv_freq;
}

RopeTable rope_table(const std::vector<float>& inverse_frequencies, int64_t max_position) {
  RopeTable table;
  table.half_dim = static_cast<int64_t>(inverse_frequencies.size());
  table.max_position = max_position;
  table.cos.resize(static_cast<size_t>(max_position * table.half_dim));
  table.sin.resize(table.cos.size());
  for (int64_t p = 0; p < max_position; ++p) {
    for (int64_t i = 0; i < table.half_dim; ++i) {
      // The angle is rounded to fp32 as Hugging Face does; cos/sin of it are then exact-ish.
      const float angle = static_cast<float>(p) * inverse_frequencies[static_cast<size_t>(i)];
      table.cos[static_cast<size_t>(p * table.half_dim + i)] = static_cast<float>(std::cos(angle));
      table.sin[static_cast<size_t>(p * table.half_dim + i)] = static_cast<float>(std::sin(angle));
    }
  }
  return table;
}

}  // namespace lomo
