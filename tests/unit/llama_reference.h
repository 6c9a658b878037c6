// A straightforward float64 LLaMA forward written from the Hugging Face definition, independent of
// the engine's kernels: loops, no BLAS, no shared helpers. Tests compare the engine against it.
// Projection biases (Llama attention_bias/mlp_bias, Qwen2) are added when the parameters hold
// them; Mistral's sliding window masks keys as transformers does.
#pragma once

#include <cmath>
#include <map>
#include <numbers>
#include <string>
#include <vector>

#include "worker/engine/llama_model.h"
#include "worker/engine/llama_weights.h"

namespace lomo::testing {

using Tensor64 = std::vector<double>;

// The engine's parameters, widened to double.
inline std::map<std::string, Tensor64> widen_parameters(const LlamaWeights& weights) {
  std::map<std::string, Tensor64> result;
  for (const Parameter& p : weights.parameters()) {
    std::vector<float> values(static_cast<size_t>(p.numel()));
    convert_to_float(p.dtype, p.storage.data(), values.data(), values.size());
    result[p.name] = Tensor64(values.begin(), values.end());
  }
  return result;
}

// y[r][o] = Σ_i x[r][i]·W[o][i]
inline Tensor64 reference_linear(const Tensor64& x, const Tensor64& w, size_t rows, size_t in,
                                 size_t out) {
  Tensor64 y(rows * out, 0.0);
  for (size_t r = 0; r < rows; ++r)
    for (size_t o = 0; o < out; ++o) {
      double sum = 0.0;
      for (size_t i = 0; i < in; ++i) sum += x[r * in + i] * w[o * in + i];
      y[r * out + o] = sum;
    }
  return y;
}

// reference_linear plus the projection's bias `name` + ".bias" when the parameters hold one (the
// weight is `name` + ".weight").
inline Tensor64 reference_projection(const Tensor64& x, const std::map<std::string, Tensor64>& p,
                                     const std::string& name, size_t rows, size_t in, size_t out) {
  Tensor64 y = reference_linear(x, p.at(name + ".weight"), rows, in, out);
  const auto bias = p.find(name + ".bias");
  if (bias != p.end()) {
    for (size_t r = 0; r < rows; ++r)
      for (size_t o = 0; o < out; ++o) y[r * out + o] += bias->second[o];
  }
  return y;
}

inline Tensor64 reference_rmsnorm(const Tensor64& x, const Tensor64& w, size_t rows, size_t dim,
                                  double eps) {
  Tensor64 y(x.size());
  for (size_t r = 0; r < rows; ++r) {
    double mean_square = 0.0;
    for (size_t i = 0; i < dim; ++i) mean_square += x[r * dim + i] * x[r * dim + i];
    mean_square /= static_cast<double>(dim);
    for (size_t i = 0; i < dim; ++i)
      y[r * dim + i] = w[i] * x[r * dim + i] / std::sqrt(mean_square + eps);
  }
  return y;
}

inline std::vector<double> reference_inverse_frequencies(const LlamaConfig& c) {
  const size_t half = static_cast<size_t>(c.head_dim / 2);
  std::vector<double> inv(half);
  for (size_t i = 0; i < half; ++i) {
    inv[i] =
        std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(c.head_dim));
    if (c.rope_scaling.type != RopeScaling::Type::kLlama3) continue;
    const RopeScaling& s = c.rope_scaling;
    const double wavelength = 2 * std::numbers::pi / inv[i];
    const double old = static_cast<double>(s.original_max_position_embeddings);
    if (wavelength < old / s.high_freq_factor) continue;  // high frequency: unchanged
    if (wavelength > old / s.low_freq_factor) {
      inv[i] /= s.factor;  // low frequency: slowed
    } else {
      const double smooth =
          (old / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      inv[i] = (1 - smooth) * inv[i] / s.factor + smooth * inv[i];
    }
  }
  return inv;
}

// Rotates each head of x [rows, heads·head_dim] by rotate-half: q·cos + rotate_half(q)·sin.
inline void reference_rope(Tensor64& x, const std::vector<int32_t>& positions, size_t heads,
                           const LlamaConfig& c) {
  const std::vector<double> inv = reference_inverse_frequencies(c);
  const size_t d = static_cast<size_t>(c.head_dim), half = d / 2;
  for (size_t r = 0; r < positions.size(); ++r)
    for (size_t h = 0; h < heads; ++h) {
      double* v = &x[(r * heads + h) * d];
      Tensor64 rotated(d);
      for (size_t i = 0; i < d; ++i) {
        const double angle = positions[r] * inv[i % half];
        const double partner = i < half ? -v[i + half] : v[i - half];
        rotated[i] = v[i] * std::cos(angle) + partner * std::sin(angle);
      }
      for (size_t i = 0; i < d; ++i) v[i] = rotated[i];
    }
}

// Mean cross-entropy over non-ignored targets; logits [B·T, vocab] written to *logits_out if given.
inline double reference_loss(const LlamaConfig& c, const std::map<std::string, Tensor64>& p,
                             const TokenBatch& batch, Tensor64* logits_out = nullptr) {
  const size_t B = static_cast<size_t>(batch.batch_size), T = static_cast<size_t>(batch.seq_len);
  const size_t rows = B * T, H = static_cast<size_t>(c.hidden_size);
  const size_t nh = static_cast<size_t>(c.num_attention_heads);
  const size_t nkv = static_cast<size_t>(c.num_key_value_heads);
  const size_t d = static_cast<size_t>(c.head_dim), I = static_cast<size_t>(c.intermediate_size);
  const size_t V = static_cast<size_t>(c.vocab_size);
  // Packed samples: a token attends to keys of its own sample only, and positions count from the
  // sample's first token.
  auto same_sample = [&](size_t a, size_t b) {
    return batch.segment_ids.empty() || batch.segment_ids[a] == batch.segment_ids[b];
  };
  std::vector<int32_t> positions = batch.positions;
  if (positions.empty()) {
    for (size_t r = 0; r < rows; ++r) {
      size_t start = r - r % T;
      for (size_t u = r - r % T; u < r; ++u)
        if (!same_sample(u, r)) start = u + 1;
      positions.push_back(static_cast<int32_t>(r - start));
    }
  }

  Tensor64 x(rows * H);
  const Tensor64& embed = p.at("model.embed_tokens.weight");
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < H; ++i)
      x[r * H + i] = embed[static_cast<size_t>(batch.input_ids[r]) * H + i];

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    Tensor64 h =
        reference_rmsnorm(x, p.at(pre + "input_layernorm.weight"), rows, H, c.rms_norm_eps);
    Tensor64 q = reference_projection(h, p, pre + "self_attn.q_proj", rows, H, nh * d);
    Tensor64 k = reference_projection(h, p, pre + "self_attn.k_proj", rows, H, nkv * d);
    Tensor64 v = reference_projection(h, p, pre + "self_attn.v_proj", rows, H, nkv * d);
    reference_rope(q, positions, nh, c);
    reference_rope(k, positions, nkv, c);
    Tensor64 attn(rows * nh * d, 0.0);
    for (size_t b = 0; b < B; ++b)
      for (size_t head = 0; head < nh; ++head) {
        const size_t kv_head = head / (nh / nkv);
        for (size_t i = 0; i < T; ++i) {
          std::vector<double> score(i + 1);
          double max_score = -1e300;
          for (size_t j = 0; j <= i; ++j) {
            // Mistral's window: keys j with j > i − sliding_window only.
            const bool outside_window =
                c.sliding_window > 0 &&
                static_cast<int64_t>(i) - static_cast<int64_t>(j) >= c.sliding_window;
            if (!same_sample(b * T + j, b * T + i) || outside_window) {
              score[j] = -1e300;  // exp underflows to exactly 0
              continue;
            }
            double dot = 0.0;
            for (size_t e = 0; e < d; ++e)
              dot +=
                  q[((b * T + i) * nh + head) * d + e] * k[((b * T + j) * nkv + kv_head) * d + e];
            score[j] = dot / std::sqrt(static_cast<double>(d));
            max_score = std::max(max_score, score[j]);
          }
          double sum = 0.0;
          for (double& s : score) sum += (s = std::exp(s - max_score));
          for (size_t j = 0; j <= i; ++j)
            for (size_t e = 0; e < d; ++e)
              attn[((b * T + i) * nh + head) * d + e] +=
                  score[j] / sum * v[((b * T + j) * nkv + kv_head) * d + e];
        }
      }
    Tensor64 o = reference_projection(attn, p, pre + "self_attn.o_proj", rows, nh * d, H);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = reference_rmsnorm(x, p.at(pre + "post_attention_layernorm.weight"), rows, H,
                          c.rms_norm_eps);
    Tensor64 gate = reference_projection(h, p, pre + "mlp.gate_proj", rows, H, I);
    Tensor64 up = reference_projection(h, p, pre + "mlp.up_proj", rows, H, I);
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
    Tensor64 down = reference_projection(gate, p, pre + "mlp.down_proj", rows, I, H);
    for (size_t i = 0; i < x.size(); ++i) x[i] += down[i];
  }
  Tensor64 h = reference_rmsnorm(x, p.at("model.norm.weight"), rows, H, c.rms_norm_eps);
  const Tensor64& head = c.tie_word_embeddings ? embed : p.at("lm_head.weight");
  Tensor64 logits = reference_linear(h, head, rows, H, V);
  double total = 0.0;
  int counted = 0;
  for (size_t r = 0; r < rows; ++r) {
    if (batch.targets[r] == -100) continue;
    double max_logit = -1e300, sum = 0.0;
    for (size_t j = 0; j < V; ++j) max_logit = std::max(max_logit, logits[r * V + j]);
    for (size_t j = 0; j < V; ++j) sum += std::exp(logits[r * V + j] - max_logit);
    total += max_logit + std::log(sum) - logits[r * V + static_cast<size_t>(batch.targets[r])];
    ++counted;
  }
  if (logits_out) *logits_out = std::move(logits);
  return counted ? total / counted : 0.0;
}

}  // namespace lomo::testing
