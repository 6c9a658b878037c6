// Every op of the Backend interface against straightforward float64 loops written here, run on
// every backend this build has (available_backends(): the CPU now, CUDA when it lands). Data moves
// to and from the device only through the interface, so the suite runs unchanged on a GPU.
//
// Tolerances: fp32 kernels against float64 references are compared relative to the largest
// reference magnitude of the tensor (|got − want| ≤ tol·max|want|). 1e-5 is the fp32 budget for the
// short sums here (≤ 64 terms, each rounding by 2^-24 ≈ 6e-8, plus fast_exp's 2 ulp); exact
// conversions and copies are compared bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/counter_hash.h"
#include "worker/engine/memory.h"

namespace lomo {
namespace {

constexpr double kFp32Tolerance = 1e-5;

std::vector<float> random_values(size_t count, uint64_t seed, float scale = 1.0f) {
  SplitMix64 random(seed);
  std::vector<float> values(count);
  for (float& v : values) {
    v = scale * (static_cast<float>(random.next() >> 40) / static_cast<float>(1 << 24) * 2 - 1);
  }
  return values;
}

std::vector<double> widen(const std::vector<float>& values) {
  return std::vector<double>(values.begin(), values.end());
}

// |got − want| ≤ tolerance·max(max|want|, tiny), element by element.
void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tolerance,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 1e-30;
  for (double w : want) scale = std::max(scale, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_LE(std::abs(got[i] - want[i]), tolerance * scale)
        << what << "[" << i << "]: " << got[i] << " vs " << want[i];
  }
}

class BackendKernels : public ::testing::TestWithParam<Device> {
 protected:
  Backend& backend() { return backend_for(GetParam()); }

  // A device copy of host values, drawn against this device's accountant.
  template <typename T>
  Buffer upload(const std::vector<T>& values) {
    Buffer buffer(accountant_, MemoryKind::kWorkspace, values.size() * sizeof(T));
    backend().copy_from_host(buffer.data(), values.data(), values.size() * sizeof(T));
    return buffer;
  }
  Buffer zeros(size_t floats) {
    Buffer buffer = float_buffer(accountant_, MemoryKind::kWorkspace, floats);
    backend().fill_zero(buffer.data(), floats * sizeof(float));
    return buffer;
  }
  // Scratch whose old contents must not matter.
  Buffer nans(size_t floats) { return upload(std::vector<float>(floats, NAN)); }
  template <typename T = float>
  std::vector<T> download(const Buffer& buffer) {
    std::vector<T> values(buffer.size_bytes() / sizeof(T));
    backend().copy_to_host(values.data(), buffer.data(), buffer.size_bytes());
    return values;
  }

  MemoryAccountant accountant_{GetParam()};
};

std::string device_test_name(const ::testing::TestParamInfo<Device>& info) {
  std::string name = device_name(info.param);
  std::replace(name.begin(), name.end(), ':', '_');
  return name;
}

INSTANTIATE_TEST_SUITE_P(AvailableBackends, BackendKernels,
                         ::testing::ValuesIn(available_backends()), device_test_name);

TEST_P(BackendKernels, BuffersLiveOnTheBackendsDeviceAndRoundTripThroughHostCopies) {
  const std::vector<float> values = random_values(37, 1);
  Buffer a = upload(values);
  EXPECT_EQ(a.device(), GetParam());
  EXPECT_EQ(accountant_.report().device, GetParam());
  Buffer b = zeros(values.size());
  EXPECT_EQ(download(b), std::vector<float>(values.size(), 0.0f));
  backend().copy(b.data(), a.data(), a.size_bytes());
  EXPECT_EQ(download(b), values);
}

TEST_P(BackendKernels, ConvertToF32WidensBf16AndFp16Exactly) {
  const std::vector<float> values = random_values(50, 2, 3.0f);
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<uint8_t> stored(values.size() * dtype_size(dtype));
    convert_from_float(dtype, values.data(), stored.data(), values.size());
    std::vector<float> want(values.size());
    convert_to_float(dtype, stored.data(), want.data(), values.size());
    Buffer in = upload(stored), out = zeros(values.size());
    backend().convert_to_f32(out.as<float>(), in.data(), dtype,
                             static_cast<int64_t>(values.size()));
    EXPECT_EQ(download(out), want) << dtype_name(dtype);
  }
}

TEST_P(BackendKernels, ConvertFromF32RoundsToNearestEvenAsTheHostDoes) {
  // Ties and values beyond fp16's range included: the host's conversion is the reference.
  std::vector<float> values = random_values(50, 22, 3.0f);
  values.insert(values.end(), {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1e6f, -7e4f, 0.0f, -0.0f});
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<uint8_t> want(values.size() * dtype_size(dtype));
    convert_from_float(dtype, values.data(), want.data(), values.size());
    Buffer in = upload(values);
    Buffer out(accountant_, MemoryKind::kWorkspace, want.size());
    backend().convert_from_f32(out.data(), dtype, in.as<float>(),
                               static_cast<int64_t>(values.size()));
    EXPECT_EQ(download<uint8_t>(out), want) << dtype_name(dtype);
  }
}

// ---- Matrix products ---------------------------------------------------------------------------

TEST_P(BackendKernels, MatmulForwardAndBothBackwardsMatchLoops) {
  const int64_t m = 5, n = 7, k = 9;
  const auto x = random_values(m * k, 3), w = random_values(n * k, 4), dy = random_values(m * n, 5);
  const auto initial = random_values(std::max({m * n, m * k, n * k}), 6);
  Buffer dx_buf = upload(x), dw_buf = upload(w), ddy = upload(dy);
  for (bool accumulate : {false, true}) {
    std::vector<double> y(m * n), dx(m * k), dweight(n * k);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t o = 0; o < n; ++o) {
        double sum = accumulate ? initial[r * n + o] : 0.0;
        for (int64_t i = 0; i < k; ++i) sum += double(x[r * k + i]) * w[o * k + i];
        y[r * n + o] = sum;
      }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i) {
        double sum = accumulate ? initial[r * k + i] : 0.0;
        for (int64_t o = 0; o < n; ++o) sum += double(dy[r * n + o]) * w[o * k + i];
        dx[r * k + i] = sum;
      }
    for (int64_t o = 0; o < n; ++o)
      for (int64_t i = 0; i < k; ++i) {
        double sum = accumulate ? initial[o * k + i] : 0.0;
        for (int64_t r = 0; r < m; ++r) sum += double(dy[r * n + o]) * x[r * k + i];
        dweight[o * k + i] = sum;
      }
    Buffer out_y = upload(std::vector<float>(initial.begin(), initial.begin() + m * n));
    Buffer out_dx = upload(std::vector<float>(initial.begin(), initial.begin() + m * k));
    Buffer out_dw = upload(std::vector<float>(initial.begin(), initial.begin() + n * k));
    backend().matmul_forward(out_y.as<float>(), dx_buf.as<float>(), dw_buf.as<float>(), m, n, k,
                             accumulate);
    backend().matmul_backward_input(out_dx.as<float>(), ddy.as<float>(), dw_buf.as<float>(), m, n,
                                    k, accumulate);
    backend().matmul_backward_weight(out_dw.as<float>(), ddy.as<float>(), dx_buf.as<float>(), m, n,
                                     k, accumulate);
    const std::string mode = accumulate ? " (accumulate)" : "";
    expect_close(download(out_y), y, kFp32Tolerance, "y" + mode);
    expect_close(download(out_dx), dx, kFp32Tolerance, "dx" + mode);
    expect_close(download(out_dw), dweight, kFp32Tolerance, "dW" + mode);
  }
}

// Under MatmulPrecision::kBf16 a backend that multiplies stored bf16 (product_dtype() kBF16: the
// CUDA backend) takes bf16 operands as they are. The reference multiplies the same bf16 values in
// float64, so only the fp32 accumulation separates them (kFp32Tolerance). A backend that keeps
// fp32 operands (the CPU) refuses a bf16 one with an error naming its dtype.
TEST_P(BackendKernels, StoredBf16OperandsMultiplyWhereTheBackendAsksForThem) {
  const int64_t m = 5, n = 24, k = 40;
  const auto bf16_values = [](size_t count, uint64_t seed) {
    std::vector<float> values = random_values(count, seed);
    for (float& v : values) v = bf16_to_float(float_to_bf16(v));
    return values;
  };
  const auto x = bf16_values(m * k, 31), w = bf16_values(n * k, 32), dy = bf16_values(m * n, 33);
  const auto stored = [&](const std::vector<float>& values) {
    std::vector<uint16_t> bits(values.size());
    convert_from_float(DType::kBF16, values.data(), bits.data(), values.size());
    return upload(bits);
  };
  Buffer bx = stored(x), bw = stored(w), bdy = stored(dy);
  const TypedInput tx(bx.data(), DType::kBF16), tw(bw.data(), DType::kBF16),
      tdy(bdy.data(), DType::kBF16);
  Buffer y = zeros(m * n), dx = zeros(m * k), dweight = zeros(n * k);
  if (GetParam().is_cpu()) {
    EXPECT_EQ(backend().product_dtype(), DType::kF32);
    try {
      backend().matmul_forward(y.as<float>(), tx, tw, m, n, k, false);
      FAIL() << "the CPU backend multiplied a bf16 operand";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("BF16"), std::string::npos) << e.what();
    }
    return;
  }
  struct RestoreFp32 {
    Backend& backend;
    ~RestoreFp32() { backend.set_matmul_precision(Backend::MatmulPrecision::kFp32); }
  } restore{backend()};
  backend().set_matmul_precision(Backend::MatmulPrecision::kBf16);
  ASSERT_EQ(backend().product_dtype(), DType::kBF16);
  backend().matmul_forward(y.as<float>(), tx, tw, m, n, k, false);
  backend().matmul_backward_input(dx.as<float>(), tdy, tw, m, n, k, false);
  backend().matmul_backward_weight(dweight.as<float>(), tdy, tx, m, n, k, false);
  std::vector<double> want_y(m * n), want_dx(m * k), want_dw(n * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t o = 0; o < n; ++o)
      for (int64_t i = 0; i < k; ++i) {
        want_y[r * n + o] += double(x[r * k + i]) * w[o * k + i];
        want_dx[r * k + i] += double(dy[r * n + o]) * w[o * k + i];
        want_dw[o * k + i] += double(dy[r * n + o]) * x[r * k + i];
      }
  expect_close(download(y), want_y, kFp32Tolerance, "bf16 y");
  expect_close(download(dx), want_dx, kFp32Tolerance, "bf16 dx");
  expect_close(download(dweight), want_dw, kFp32Tolerance, "bf16 dW");
  // Mixed dtypes are a caller's mistake, named.
  try {
    backend().matmul_forward(y.as<float>(), dx.as<float>(), tw, m, n, k, false);
    ADD_FAILURE() << "an fp32 and a bf16 operand were multiplied";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("both must have one dtype"), std::string::npos)
        << e.what();
  }
}

TEST_P(BackendKernels, StridedBatchedGemmMatchesLoopsForEveryTranspose) {
  const int64_t m = 3, n = 4, k = 5, batch = 3;
  // Padded leading dimensions and strides, as attention's per-head views have.
  const int64_t pad = 2, size = (std::max({m, n, k}) + pad) * (std::max({m, n, k}) + pad);
  const auto a = random_values(batch * size, 7), b = random_values(batch * size, 8);
  const auto c0 = random_values(batch * size, 9);
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      GemmArgs g;
      g.transpose_a = ta;
      g.transpose_b = tb;
      g.m = m, g.n = n, g.k = k;
      g.alpha = 0.5f, g.beta = 2.0f;
      g.lda = (ta ? m : k) + pad, g.ldb = (tb ? k : n) + pad, g.ldc = n + pad;
      g.stride_a = g.stride_b = g.stride_c = size;
      g.batch = batch;
      Buffer da = upload(a), db = upload(b), dc = upload(c0);
      g.a = da.as<float>(), g.b = db.as<float>(), g.c = dc.as<float>();
      backend().gemm(g);
      std::vector<double> want = widen(c0);
      for (int64_t p = 0; p < batch; ++p)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double sum = 0.0;
            for (int64_t l = 0; l < k; ++l) {
              const double av = ta ? a[p * size + l * g.lda + i] : a[p * size + i * g.lda + l];
              const double bv = tb ? b[p * size + j * g.ldb + l] : b[p * size + l * g.ldb + j];
              sum += av * bv;
            }
            double& cv = want[p * size + i * g.ldc + j];
            cv = 0.5 * sum + 2.0 * cv;
          }
      expect_close(download(dc), want, kFp32Tolerance,
                   std::string("C, transpose ") + (ta ? "A" : "-") + (tb ? "B" : "-"));
    }
  }
}

// ---- RMSNorm, RoPE, SwiGLU, embedding -----------------------------------------------------------

TEST_P(BackendKernels, RmsnormForwardAndBackwardMatchLoops) {
  const int64_t rows = 4, dim = 16;
  const double eps = 1e-5;
  const auto x = random_values(rows * dim, 10), w = random_values(dim, 11, 2.0f);
  const auto dout = random_values(rows * dim, 12), dx0 = random_values(rows * dim, 13);
  std::vector<double> out(rows * dim), rstd(rows), dx = widen(dx0), dw(dim, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double ms = 0.0;
    for (int64_t i = 0; i < dim; ++i) ms += double(x[r * dim + i]) * x[r * dim + i];
    rstd[r] = 1.0 / std::sqrt(ms / dim + eps);
    double dot = 0.0;  // Σ dout·w·x
    for (int64_t i = 0; i < dim; ++i) {
      out[r * dim + i] = w[i] * x[r * dim + i] * rstd[r];
      dw[i] += double(dout[r * dim + i]) * x[r * dim + i] * rstd[r];
      dot += double(dout[r * dim + i]) * w[i] * x[r * dim + i];
    }
    // d/dx of w∘x·rstd: w·dout·rstd − x·rstd³·dot/dim, added to the residual gradient.
    for (int64_t i = 0; i < dim; ++i) {
      dx[r * dim + i] +=
          w[i] * dout[r * dim + i] * rstd[r] - x[r * dim + i] * std::pow(rstd[r], 3) * dot / dim;
    }
  }
  Buffer bx = upload(x), bw = upload(w), bout = zeros(rows * dim), brstd = zeros(rows);
  backend().rmsnorm_forward(bout.as<float>(), brstd.as<float>(), bx.as<float>(), bw.as<float>(),
                            rows, dim, static_cast<float>(eps));
  expect_close(download(bout), out, kFp32Tolerance, "rmsnorm out");
  expect_close(download(brstd), rstd, kFp32Tolerance, "rmsnorm rstd");
  Buffer bdout = upload(dout), bdx = upload(dx0), bdw = upload(random_values(dim, 14));
  backend().rmsnorm_backward(bdx.as<float>(), bdw.as<float>(), bdout.as<float>(), bx.as<float>(),
                             bw.as<float>(), brstd.as<float>(), rows, dim);
  expect_close(download(bdx), dx, kFp32Tolerance, "rmsnorm dx (added)");
  expect_close(download(bdw), dw, kFp32Tolerance, "rmsnorm dweight (overwritten)");
}

TEST_P(BackendKernels, RopeRotatesByTheTableAndBackwardAppliesTheTranspose) {
  const int64_t rows = 5, heads = 3, head_dim = 8, half = head_dim / 2;
  RopeFrequencyScaling llama3;
  llama3.factor = 8.0;
  llama3.original_max_position_embeddings = 4;  // puts the four frequencies in every band
  const RopeTable table = rope_table(rope_inverse_frequencies(head_dim, 500.0, llama3), 16);
  const std::vector<int32_t> positions = {0, 3, 15, 7, 1};
  const auto x = random_values(rows * heads * head_dim, 15);
  // Forward: (a, b) → (a·cos − b·sin, b·cos + a·sin); backward uses −sin (the transpose).
  for (double direction : {1.0, -1.0}) {
    std::vector<double> want(x.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const size_t at = static_cast<size_t>((r * heads + h) * head_dim + i);
          const double c = table.cos[positions[r] * half + i];
          const double s = direction * table.sin[positions[r] * half + i];
          want[at] = x[at] * c - x[at + half] * s;
          want[at + half] = x[at + half] * c + x[at] * s;
        }
    Buffer bx = upload(x), bpos = upload(positions), bcos = upload(table.cos),
           bsin = upload(table.sin);
    const RopeTableView view{table.half_dim, table.max_position, bcos.as<float>(),
                             bsin.as<float>()};
    if (direction > 0) {
      backend().rope_forward(bx.as<float>(), bpos.as<int32_t>(), view, rows, heads);
    } else {
      backend().rope_backward(bx.as<float>(), bpos.as<int32_t>(), view, rows, heads);
    }
    expect_close(download(bx), want, kFp32Tolerance, direction > 0 ? "rope" : "rope backward");
  }
}

TEST_P(BackendKernels, SwigluForwardAndBackwardMatchLoops) {
  const int64_t count = 64;
  const auto gate = random_values(count, 16, 6.0f), up = random_values(count, 17, 2.0f);
  const auto dout = random_values(count, 18);
  std::vector<double> out(count), dgate(count), dup(count);
  for (int64_t i = 0; i < count; ++i) {
    const double g = gate[i], sigmoid = 1.0 / (1.0 + std::exp(-g));
    out[i] = g * sigmoid * up[i];
    dup[i] = dout[i] * g * sigmoid;
    dgate[i] = dout[i] * up[i] * sigmoid * (1.0 + g * (1.0 - sigmoid));
  }
  Buffer bg = upload(gate), bu = upload(up), bd = upload(dout), bo = zeros(count);
  Buffer bdg = zeros(count), bdu = zeros(count);
  backend().swiglu_forward(bo.as<float>(), bg.as<float>(), bu.as<float>(), count);
  backend().swiglu_backward(bdg.as<float>(), bdu.as<float>(), bd.as<float>(), bg.as<float>(),
                            bu.as<float>(), count);
  expect_close(download(bo), out, kFp32Tolerance, "swiglu out");
  expect_close(download(bdg), dgate, kFp32Tolerance, "swiglu dgate");
  expect_close(download(bdu), dup, kFp32Tolerance, "swiglu dup");
}

// A linear layer's bias: added to every row; its gradient the column sums, over more columns than
// a CPU block or a GPU thread block and more rows than a block, in the same bits every time.
TEST_P(BackendKernels, BiasForwardAddsToEveryRowAndBackwardSumsTheColumns) {
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{1, 1},
                                   {7, 3},
                                   {300, 70},
                                   std::pair<int64_t, int64_t>{65, 513}}) {
    const auto y0 = random_values(rows * cols, 80 + cols), bias = random_values(cols, 81 + cols);
    const auto dy = random_values(rows * cols, 82 + cols);
    std::vector<double> y = widen(y0), dbias(cols, 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        y[r * cols + c] += bias[c];
        dbias[c] += dy[r * cols + c];
      }
    const std::string what = std::to_string(rows) + "x" + std::to_string(cols);
    Buffer by = upload(y0), bb = upload(bias), bdy = upload(dy);
    backend().bias_forward(by.as<float>(), bb.as<float>(), rows, cols);
    EXPECT_EQ(download(by), std::vector<float>(y.begin(), y.end()))
        << "one fp32 addition: " << what;
    std::vector<float> first;
    for (int repeat = 0; repeat < 2; ++repeat) {
      Buffer bdb = upload(random_values(cols, 83));  // overwritten, not added to
      backend().bias_backward(bdb.as<float>(), bdy.as<float>(), rows, cols);
      // Sums of up to 300 terms of |x| <= 1: fp32 rounding stays far below 1e-5 of their scale.
      expect_close(download(bdb), dbias, kFp32Tolerance, "bias dbias " + what);
      if (repeat == 0)
        first = download(bdb);
      else
        EXPECT_EQ(download(bdb), first) << "bias backward is deterministic: " << what;
    }
  }
}

TEST_P(BackendKernels, EmbeddingGathersRowsAndBackwardAddsIntoThem) {
  const int64_t vocab = 6, dim = 5;
  const std::vector<int32_t> tokens = {3, 0, 3, 5, 3, 1};  // repeats must add up
  const auto table = random_values(vocab * dim, 19), dout = random_values(tokens.size() * dim, 20);
  const auto dtable0 = random_values(vocab * dim, 21);
  std::vector<double> out(tokens.size() * dim), dtable = widen(dtable0);
  for (size_t t = 0; t < tokens.size(); ++t)
    for (int64_t i = 0; i < dim; ++i) {
      out[t * dim + i] = table[tokens[t] * dim + i];
      dtable[tokens[t] * dim + i] += dout[t * dim + i];
    }
  Buffer bt = upload(tokens), btable = upload(table), bo = zeros(out.size());
  const int64_t count = static_cast<int64_t>(tokens.size());
  backend().embedding_forward(bo.as<float>(), bt.as<int32_t>(), btable.as<float>(), count, dim);
  EXPECT_EQ(download(bo), std::vector<float>(out.begin(), out.end())) << "a gather is exact";
  // A table stored as bf16/fp16 is widened row by row as it is read: the host's widening of the
  // same bits, exactly.
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    std::vector<uint8_t> bits(table.size() * dtype_size(dtype));
    convert_from_float(dtype, table.data(), bits.data(), table.size());
    std::vector<float> widened(table.size());
    convert_to_float(dtype, bits.data(), widened.data(), table.size());
    std::vector<float> want(tokens.size() * dim);
    for (size_t t = 0; t < tokens.size(); ++t)
      for (int64_t i = 0; i < dim; ++i) want[t * dim + i] = widened[tokens[t] * dim + i];
    Buffer stored = upload(bits), narrow_out = zeros(want.size());
    backend().embedding_forward(narrow_out.as<float>(), bt.as<int32_t>(),
                                TypedInput(stored.data(), dtype), count, dim);
    EXPECT_EQ(download(narrow_out), want) << dtype_name(dtype);
  }
  Buffer bdt = upload(dtable0), bd = upload(dout);
  backend().embedding_backward(bdt.as<float>(), bd.as<float>(), bt.as<int32_t>(), count, dim);
  expect_close(download(bdt), dtable, kFp32Tolerance, "embedding dtable");
}

// ---- Attention ----------------------------------------------------------------------------------

struct AttentionReference {
  std::vector<double> out, dq, dk, dv;
};

// Causal grouped-query attention in float64, straight from the definition, with optional packing
// and shape.sliding_window (query i sees keys j > i − window).
AttentionReference reference_attention(const AttentionShape& s, const std::vector<float>& q,
                                       const std::vector<float>& k, const std::vector<float>& v,
                                       const std::vector<float>& dout,
                                       const std::vector<int32_t>& first_key) {
  const int64_t T = s.seq_len, D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t qw = s.num_heads * D, kw = s.num_kv_heads * D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  AttentionReference r{std::vector<double>(q.size(), 0.0), std::vector<double>(q.size(), 0.0),
                       std::vector<double>(k.size(), 0.0), std::vector<double>(v.size(), 0.0)};
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.num_heads; ++h) {
      const int64_t kh = h / group;
      auto Q = [&](int64_t t, int64_t d) { return double(q[(b * T + t) * qw + h * D + d]); };
      auto K = [&](int64_t t, int64_t d) { return double(k[(b * T + t) * kw + kh * D + d]); };
      auto V = [&](int64_t t, int64_t d) { return double(v[(b * T + t) * kw + kh * D + d]); };
      auto dO = [&](int64_t t, int64_t d) { return double(dout[(b * T + t) * qw + h * D + d]); };
      for (int64_t i = 0; i < T; ++i) {
        int64_t start = first_key.empty() ? 0 : first_key[b * T + i];
        if (s.sliding_window > 0) start = std::max(start, i - s.sliding_window + 1);
        std::vector<double> p(T, 0.0), dp(T, 0.0);
        double max_score = -1e300, sum = 0.0;
        for (int64_t j = start; j <= i; ++j) {
          for (int64_t d = 0; d < D; ++d) p[j] += Q(i, d) * K(j, d) * scale;
          max_score = std::max(max_score, p[j]);
        }
        for (int64_t j = start; j <= i; ++j) sum += p[j] = std::exp(p[j] - max_score);
        for (int64_t j = start; j <= i; ++j) p[j] /= sum;
        double dot = 0.0;  // Σ_j p·dp
        for (int64_t j = start; j <= i; ++j) {
          for (int64_t d = 0; d < D; ++d) {
            r.out[(b * T + i) * qw + h * D + d] += p[j] * V(j, d);
            r.dv[(b * T + j) * kw + kh * D + d] += p[j] * dO(i, d);
            dp[j] += dO(i, d) * V(j, d);
          }
          dot += p[j] * dp[j];
        }
        for (int64_t j = start; j <= i; ++j) {
          const double ds = p[j] * (dp[j] - dot) * scale;
          for (int64_t d = 0; d < D; ++d) {
            r.dq[(b * T + i) * qw + h * D + d] += ds * K(j, d);
            r.dk[(b * T + j) * kw + kh * D + d] += ds * Q(i, d);
          }
        }
      }
    }
  return r;
}

TEST_P(BackendKernels, AttentionForwardAndBackwardMatchLoopsWithGroupedHeadsAndPacking) {
  const AttentionShape s{2, 6, 4, 2, 4};
  const int64_t rows = s.batch * s.seq_len;
  const auto q = random_values(rows * s.num_heads * s.head_dim, 22, 2.0f);
  const auto k = random_values(rows * s.num_kv_heads * s.head_dim, 23, 2.0f);
  const auto v = random_values(rows * s.num_kv_heads * s.head_dim, 24);
  const auto dout = random_values(q.size(), 25);
  // Row 0 plain causal; row 1 packs samples [0, 2) and [2, 6).
  for (const std::vector<int32_t>& first_key :
       {std::vector<int32_t>{}, std::vector<int32_t>{0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2}}) {
    const AttentionReference want = reference_attention(s, q, k, v, dout, first_key);
    Buffer bq = upload(q), bk = upload(k), bv = upload(v), bdout = upload(dout);
    Buffer bout = zeros(q.size()), saved = zeros(backend().attention_saved_floats(s));
    Buffer scratch = nans(static_cast<size_t>(backend().attention_scratch_floats(s)));
    Buffer bfirst = first_key.empty() ? Buffer() : upload(first_key);
    backend().attention_forward(bout.as<float>(), saved.as<float>(), scratch.as<float>(),
                                bq.as<float>(), bk.as<float>(), bv.as<float>(),
                                first_key.empty() ? nullptr : bfirst.as<int32_t>(), s);
    const std::string mode = first_key.empty() ? " (causal)" : " (packed)";
    expect_close(download(bout), want.out, kFp32Tolerance, "attention out" + mode);
    Buffer dq = zeros(q.size()), dk = zeros(k.size()), dv = zeros(v.size());
    backend().attention_backward(dq.as<float>(), dk.as<float>(), dv.as<float>(),
                                 scratch.as<float>(), bdout.as<float>(), saved.as<float>(),
                                 bq.as<float>(), bk.as<float>(), bv.as<float>(), s);
    expect_close(download(dq), want.dq, kFp32Tolerance, "attention dq" + mode);
    expect_close(download(dk), want.dk, kFp32Tolerance, "attention dk" + mode);
    expect_close(download(dv), want.dv, kFp32Tolerance, "attention dv" + mode);
  }
}

// Mistral's sliding window, alone and together with packing: windows of 1 (each token sees only
// itself), 2, 3 and one longer than the row (no effect), over a row longer than a warp; and a
// window of 100 over T = 300, where the CUDA backend's second query chunk starts its keys at 157.
TEST_P(BackendKernels, AttentionWithASlidingWindowMatchesLoops) {
  for (const AttentionShape& s :
       {AttentionShape{2, 37, 4, 2, 8, 1}, AttentionShape{2, 37, 4, 2, 8, 2},
        AttentionShape{2, 37, 4, 2, 8, 3}, AttentionShape{2, 37, 4, 2, 8, 64},
        AttentionShape{1, 300, 4, 2, 8, 100}}) {
    const int64_t window = s.sliding_window;
    const int64_t rows = s.batch * s.seq_len;
    const auto q = random_values(rows * s.num_heads * s.head_dim, 40 + window, 2.0f);
    const auto k = random_values(rows * s.num_kv_heads * s.head_dim, 50 + window, 2.0f);
    const auto v = random_values(rows * s.num_kv_heads * s.head_dim, 60 + window);
    const auto dout = random_values(q.size(), 70 + window);
    std::vector<int32_t> packed(static_cast<size_t>(rows));  // samples of 5 tokens
    for (int64_t i = 0; i < rows; ++i) packed[i] = static_cast<int32_t>((i % s.seq_len) / 5 * 5);
    for (const std::vector<int32_t>& first_key : {std::vector<int32_t>{}, packed}) {
      const std::string what = "T " + std::to_string(s.seq_len) + " window " +
                               std::to_string(window) + (first_key.empty() ? "" : " packed");
      const AttentionReference want = reference_attention(s, q, k, v, dout, first_key);
      Buffer bq = upload(q), bk = upload(k), bv = upload(v), bdout = upload(dout);
      Buffer bfirst = first_key.empty() ? Buffer() : upload(first_key);
      Buffer bout = zeros(q.size()), saved = zeros(backend().attention_saved_floats(s));
      Buffer scratch = nans(static_cast<size_t>(backend().attention_scratch_floats(s)));
      backend().attention_forward(bout.as<float>(), saved.as<float>(), scratch.as<float>(),
                                  bq.as<float>(), bk.as<float>(), bv.as<float>(),
                                  first_key.empty() ? nullptr : bfirst.as<int32_t>(), s);
      expect_close(download(bout), want.out, 2e-5, what + " out");
      Buffer dq = zeros(q.size()), dk = zeros(k.size()), dv = zeros(v.size());
      backend().attention_backward(dq.as<float>(), dk.as<float>(), dv.as<float>(),
                                   scratch.as<float>(), bdout.as<float>(), saved.as<float>(),
                                   bq.as<float>(), bk.as<float>(), bv.as<float>(), s);
      expect_close(download(dq), want.dq, 2e-5, what + " dq");
      expect_close(download(dk), want.dk, 2e-5, what + " dk");
      expect_close(download(dv), want.dv, 2e-5, what + " dv");
    }
  }
}

// Odd shapes (T = 1, head_dim not a multiple of 32, GQA ratios 1/2/4/8, batch > 1, and T = 300,
// which the CUDA backend runs as two query chunks of 256 and 44 rows), causal and packed; forward
// and backward twice give the same bits (determinism: resume is bit-identical) and backward
// leaves what forward saved and its inputs intact. Scratch starts as NaN: its contents must not
// matter. Tolerance 2e-5: the sums here run over up to 128 head_dim terms and 300 keys, longer
// than the 1e-5 budget's 64 terms.
TEST_P(BackendKernels, AttentionOverOddShapesIsRightDeterministicAndLeavesItsInputs) {
  constexpr double kTolerance = 2e-5;
  const AttentionShape shapes[] = {{1, 1, 2, 1, 8},   {3, 1, 4, 4, 12},  {2, 9, 8, 1, 12},
                                   {1, 7, 8, 2, 80},  {2, 5, 4, 1, 128}, {1, 37, 8, 8, 33},
                                   {2, 300, 4, 2, 20}};
  uint64_t seed = 100;
  for (const AttentionShape& s : shapes) {
    const int64_t rows = s.batch * s.seq_len;
    const auto q = random_values(rows * s.num_heads * s.head_dim, seed++, 2.0f);
    const auto k = random_values(rows * s.num_kv_heads * s.head_dim, seed++, 2.0f);
    const auto v = random_values(rows * s.num_kv_heads * s.head_dim, seed++);
    const auto dout = random_values(q.size(), seed++);
    std::vector<int32_t> packed(static_cast<size_t>(rows));  // samples of 3 tokens in each row
    for (int64_t i = 0; i < rows; ++i) packed[i] = static_cast<int32_t>((i % s.seq_len) / 3 * 3);
    for (const std::vector<int32_t>& first_key : {std::vector<int32_t>{}, packed}) {
      const std::string what = "attention B" + std::to_string(s.batch) + " T" +
                               std::to_string(s.seq_len) + " H" + std::to_string(s.num_heads) +
                               "/" + std::to_string(s.num_kv_heads) + " D" +
                               std::to_string(s.head_dim) + (first_key.empty() ? "" : " packed");
      const AttentionReference want = reference_attention(s, q, k, v, dout, first_key);
      Buffer bq = upload(q), bk = upload(k), bv = upload(v), bdout = upload(dout);
      Buffer bfirst = first_key.empty() ? Buffer() : upload(first_key);
      const size_t saved_floats = static_cast<size_t>(backend().attention_saved_floats(s));
      const size_t scratch_floats = static_cast<size_t>(backend().attention_scratch_floats(s));
      std::vector<float> out_first, saved_first;
      for (int repeat = 0; repeat < 2; ++repeat) {
        Buffer bout = zeros(q.size()), saved = zeros(saved_floats), scratch = nans(scratch_floats);
        backend().attention_forward(bout.as<float>(), saved.as<float>(), scratch.as<float>(),
                                    bq.as<float>(), bk.as<float>(), bv.as<float>(),
                                    first_key.empty() ? nullptr : bfirst.as<int32_t>(), s);
        if (repeat == 0) {
          out_first = download(bout);
          saved_first = download(saved);
          expect_close(out_first, want.out, kTolerance, what + " out");
          continue;
        }
        ASSERT_EQ(download(bout), out_first) << what << ": forward not deterministic";
        ASSERT_EQ(download(saved), saved_first) << what << ": saved not deterministic";
        std::vector<float> dq_first, dk_first, dv_first;
        for (int pass = 0; pass < 2; ++pass) {
          Buffer dq = zeros(q.size()), dk = zeros(k.size()), dv = zeros(v.size());
          backend().attention_backward(dq.as<float>(), dk.as<float>(), dv.as<float>(),
                                       scratch.as<float>(), bdout.as<float>(), saved.as<float>(),
                                       bq.as<float>(), bk.as<float>(), bv.as<float>(), s);
          if (pass == 0) {
            dq_first = download(dq), dk_first = download(dk), dv_first = download(dv);
            expect_close(dq_first, want.dq, kTolerance, what + " dq");
            expect_close(dk_first, want.dk, kTolerance, what + " dk");
            expect_close(dv_first, want.dv, kTolerance, what + " dv");
          } else {
            ASSERT_EQ(download(dq), dq_first) << what << ": dq not deterministic";
            ASSERT_EQ(download(dk), dk_first) << what << ": dk not deterministic";
            ASSERT_EQ(download(dv), dv_first) << what << ": dv not deterministic";
          }
        }
        ASSERT_EQ(download(saved), saved_first) << what << ": backward changed saved";
        ASSERT_EQ(download(bq), q) << what << ": backward changed q";
        ASSERT_EQ(download(bk), k) << what << ": backward changed k";
        ASSERT_EQ(download(bv), v) << what << ": backward changed v";
      }
    }
  }
}

// ---- Cross-entropy ------------------------------------------------------------------------------

TEST_P(BackendKernels, CrossEntropyMatchesLoopsAndSkipsIgnoredTargets) {
  const int64_t rows = 4, vocab = 11;
  const auto logits = random_values(rows * vocab, 26, 8.0f);
  const std::vector<int32_t> targets = {3, kIgnoreIndex, 0, 10};
  const float scale = 0.25f;
  std::vector<double> lse(rows), dlogits(rows * vocab, 0.0);
  double loss = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double max_logit = -1e300, sum = 0.0;
    for (int64_t c = 0; c < vocab; ++c)
      max_logit = std::max(max_logit, double(logits[r * vocab + c]));
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(logits[r * vocab + c] - max_logit);
    lse[r] = max_logit + std::log(sum);
    if (targets[r] == kIgnoreIndex) continue;
    loss += lse[r] - logits[r * vocab + targets[r]];
    for (int64_t c = 0; c < vocab; ++c) {
      dlogits[r * vocab + c] =
          scale * (std::exp(logits[r * vocab + c] - lse[r]) - (c == targets[r] ? 1.0 : 0.0));
    }
  }
  Buffer bl = upload(logits), bt = upload(targets), blse = zeros(rows);
  const double got = backend().cross_entropy_forward(blse.as<float>(), bl.as<float>(),
                                                     bt.as<int32_t>(), rows, vocab);
  EXPECT_NEAR(got, loss, kFp32Tolerance * std::abs(loss)) << "loss sum, relative 1e-5";
  const auto got_lse = download(blse);
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == kIgnoreIndex) continue;  // only rows with a target feed the backward pass
    EXPECT_NEAR(got_lse[r], lse[r], kFp32Tolerance * std::abs(lse[r])) << "logsumexp row " << r;
  }
  // In place, as the model runs it.
  backend().cross_entropy_backward(bl.as<float>(), bl.as<float>(), blse.as<float>(),
                                   bt.as<int32_t>(), rows, vocab, scale);
  expect_close(download(bl), dlogits, kFp32Tolerance, "dlogits");
}

// ---- Gradient preparation and reductions --------------------------------------------------------

TEST_P(BackendKernels, GradientRoundingMatchesTheStorageDtypeRoundTrip) {
  auto values = random_values(40, 27, 1e5f);  // beyond fp16's range: some become inf
  values[0] = 1e-9f;                          // below fp16's subnormals: flushes to zero
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<uint8_t> stored(values.size() * dtype_size(dtype));
    convert_from_float(dtype, values.data(), stored.data(), values.size());
    std::vector<float> want(values.size());
    convert_to_float(dtype, stored.data(), want.data(), values.size());
    Buffer g = upload(values);
    backend().round_gradient_to_dtype(g.as<float>(), static_cast<int64_t>(values.size()), dtype);
    EXPECT_EQ(download(g), want) << dtype_name(dtype);
  }
}

TEST_P(BackendKernels, UnscaleAccumulatesSumsOfSquaresAndFlagsTheFirstNonFiniteTensor) {
  DeviceValue<GradientStatistics> statistics(backend(), GradientStatistics{});
  const float unscale = 0.125f;  // a power of two: the scaled values are exact
  double want_sum = 0.0;
  for (int64_t tensor = 0; tensor < 3; ++tensor) {
    const auto g = random_values(100, 28 + tensor);
    Buffer bg = upload(g);
    backend().unscale_gradient(bg.as<float>(), 100, unscale, tensor, statistics.get());
    const auto got = download(bg);
    for (size_t i = 0; i < g.size(); ++i) {
      ASSERT_EQ(got[i], g[i] * unscale);
      want_sum += double(g[i] * unscale) * (g[i] * unscale);
    }
  }
  GradientStatistics read = statistics.read();
  // Double sums of 300 terms: only reassociation separates kernel and loop (relative 1e-12).
  EXPECT_NEAR(read.sum_squares, want_sum, 1e-12 * want_sum);
  EXPECT_EQ(read.first_non_finite, -1);
  // Tensors 7 and 9 overflow; the flag keeps the first one checked.
  for (int64_t tensor : {7, 8, 9}) {
    std::vector<float> g(10, 1.0f);
    if (tensor != 8) g[4] = tensor == 7 ? INFINITY : NAN;
    Buffer bg = upload(g);
    backend().unscale_gradient(bg.as<float>(), 10, 1.0f, tensor, statistics.get());
  }
  read = statistics.read();
  EXPECT_EQ(read.first_non_finite, 7);
  EXPECT_FALSE(std::isfinite(read.sum_squares));
}

TEST_P(BackendKernels, ClipGradientClampsByValueThenScalesByTheCoefficient) {
  const auto g = random_values(64, 31, 4.0f);
  for (bool by_value : {false, true}) {
    std::vector<double> want(g.size());
    for (size_t i = 0; i < g.size(); ++i) {
      const double clamped = by_value ? std::clamp(double(g[i]), -1.5, 1.5) : g[i];
      want[i] = clamped * 0.75;
    }
    Buffer bg = upload(g);
    backend().clip_gradient(bg.as<float>(), 64, by_value, 1.5f, 0.75f);
    expect_close(download(bg), want, kFp32Tolerance, by_value ? "clip by value" : "coefficient");
  }
}

TEST_P(BackendKernels, SumOfSquaresOfEveryStorageDtypeMatchesADoubleLoop) {
  const auto values = random_values(1000, 32, 3.0f);
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<uint8_t> stored(values.size() * dtype_size(dtype));
    convert_from_float(dtype, values.data(), stored.data(), values.size());
    std::vector<float> exact(values.size());
    convert_to_float(dtype, stored.data(), exact.data(), values.size());
    double want = 0.0;
    for (float v : exact) want += double(v) * v;
    Buffer b = upload(stored);
    // Double accumulation of 1000 terms: relative 1e-12.
    EXPECT_NEAR(backend().sum_squares(b.data(), dtype, 1000), want, 1e-12 * want)
        << dtype_name(dtype);
  }
}

// ---- Update rules -------------------------------------------------------------------------------

TEST_P(BackendKernels, LomoUpdateMatchesADoubleReferenceAndSkipsAfterANonFiniteGradient) {
  const int64_t count = 200;
  const auto p0 = random_values(count, 33), g = random_values(count, 34);
  const SgdUpdate u{1.0f - 0.01f * 0.1f, 0.01f};
  std::vector<double> want(count);
  for (int64_t i = 0; i < count; ++i) want[i] = double(p0[i]) * u.keep - double(u.step) * g[i];
  Buffer p = upload(p0), bg = upload(g);
  DeviceValue<GradientStatistics> clean(backend(), GradientStatistics{});
  backend().lomo_update(p.data(), DType::kF32, count, bg.as<float>(), u, WriteBack{}, clean.get());
  expect_close(download(p), want, kFp32Tolerance, "lomo update");
  // bf16 storage, round to nearest: within half a bf16 ulp (2^-9 relative) of the double result.
  std::vector<uint16_t> p16(count);
  convert_from_float(DType::kBF16, p0.data(), p16.data(), count);
  Buffer pb = upload(p16);
  backend().lomo_update(pb.data(), DType::kBF16, count, bg.as<float>(), u, WriteBack{}, nullptr);
  const auto got16 = download<uint16_t>(pb);
  for (int64_t i = 0; i < count; ++i) {
    const double ref = double(bf16_to_float(p16[i])) * u.keep - double(u.step) * g[i];
    ASSERT_LE(std::abs(bf16_to_float(got16[i]) - ref), std::abs(ref) * 0x1p-8) << i;
  }
  DeviceValue<GradientStatistics> flagged(backend(), GradientStatistics{0.0, 5});
  Buffer untouched = upload(p0);
  backend().lomo_update(untouched.data(), DType::kF32, count, bg.as<float>(), u, WriteBack{},
                        flagged.get());
  EXPECT_EQ(download(untouched), p0) << "an update after a non-finite gradient must do nothing";
}

TEST_P(BackendKernels, AdamWUpdateMatchesADoubleReferenceOverThreeSteps) {
  const int64_t count = 300;
  const double lr = 1e-2, wd = 0.1;
  const auto p0 = random_values(count, 35);
  std::vector<double> p = widen(p0), m(count, 0.0), v(count, 0.0);
  Buffer bp = upload(p0), bm = zeros(count), bv = zeros(count);
  for (int t = 1; t <= 3; ++t) {
    AdamWUpdate u;
    u.beta1 = 0.9f, u.beta2 = 0.999f, u.eps = 1e-8f;
    u.correction1 = static_cast<float>(1 - std::pow(0.9, t));
    u.correction2 = static_cast<float>(1 - std::pow(0.999, t));
    u.step = static_cast<float>(lr);
    u.keep = static_cast<float>(1 - lr * wd);
    // The reference takes the kernel's scalars as given (fp32 β₂ = 0.999f makes 1 − β₂ differ
    // from 0.001 by 1.3e-5 relative: a property of the inputs, not of the kernel).
    const double b1 = u.beta1, b2 = u.beta2;
    const auto g = random_values(count, 36 + t);
    for (int64_t i = 0; i < count; ++i) {
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * double(g[i]) * g[i];
      const double m_hat = m[i] / u.correction1, v_hat = v[i] / u.correction2;
      p[i] = p[i] * u.keep - u.step * m_hat / (std::sqrt(v_hat) + u.eps);
    }
    Buffer bg = upload(g);
    backend().adamw_update(bp.data(), DType::kF32, count, bg.as<float>(), bm.as<float>(),
                           bv.as<float>(), u, WriteBack{}, nullptr);
    const std::string step = " after step " + std::to_string(t);
    expect_close(download(bp), p, kFp32Tolerance, "adamw p" + step);
    expect_close(download(bm), m, kFp32Tolerance, "adamw exp_avg" + step);
    expect_close(download(bv), v, kFp32Tolerance, "adamw exp_avg_sq" + step);
  }
}

// AdaLomo for one tensor in float64, as adalomo_update.h states it.
void reference_adalomo(std::vector<double>& p, std::vector<double>& row, std::vector<double>& col,
                       std::vector<double>& full, std::vector<double> g, int64_t rows, int64_t cols,
                       const AdaLomoUpdate& u) {
  const int64_t count = static_cast<int64_t>(p.size());
  if (cols > 0) {
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0.0;
      for (int64_t c = 0; c < cols; ++c) sum += g[r * cols + c] * g[r * cols + c] + u.eps1;
      row[r] = u.beta * row[r] + (1 - u.beta) * sum / cols;
    }
    for (int64_t c = 0; c < cols; ++c) {
      double sum = 0.0;
      for (int64_t r = 0; r < rows; ++r) sum += g[r * cols + c] * g[r * cols + c] + u.eps1;
      col[c] = u.beta * col[c] + (1 - u.beta) * sum / rows;
    }
    double row_mean = 0.0;
    for (double x : row) row_mean += x / rows;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) g[r * cols + c] /= std::sqrt(row[r] / row_mean * col[c]);
  } else {
    for (int64_t i = 0; i < count; ++i) {
      full[i] = u.beta * full[i] + (1 - u.beta) * (g[i] * g[i] + u.eps1);
      g[i] /= std::sqrt(full[i]);
    }
  }
  double update_ss = 0.0, parameter_ss = 0.0;
  for (int64_t i = 0; i < count; ++i) update_ss += g[i] * g[i], parameter_ss += p[i] * p[i];
  const double scale = 1.0 / std::max(1.0, std::sqrt(update_ss / count) / u.clip_threshold);
  const double alpha = u.lr * std::max(u.eps2, std::sqrt(parameter_ss / count));
  for (int64_t i = 0; i < count; ++i) {
    p[i] = p[i] * (1 - alpha * u.weight_decay) - alpha * scale * g[i];
  }
}

TEST_P(BackendKernels, AdaLomoUpdateMatchesADoubleReferenceForMatricesAndVectors) {
  // 400×700 and 200000 values: more than one grid-stride sweep of the device reductions.
  for (const auto& [rows, cols] :
       {std::pair<int64_t, int64_t>{6, 10}, {24, 0}, {1, 1}, {700, 3}, {400, 700}, {200000, 0}}) {
    const int64_t count = cols > 0 ? rows * cols : rows;
    const auto p0 = random_values(count, 40);
    std::vector<double> p = widen(p0), row(rows, 0.0), col(std::max<int64_t>(cols, 1), 0.0),
                        full(count, 0.0);
    Buffer bp = upload(p0), brow = zeros(rows), bcol = zeros(std::max<int64_t>(cols, 1)),
           bfull = zeros(count);
    for (int t = 1; t <= 3; ++t) {
      AdaLomoUpdate u;
      u.lr = 1e-2;
      u.beta = 1.0 - std::pow(t, -0.8);
      u.clip_threshold = 1.0;
      u.weight_decay = 0.1;
      // Larger gradients in late steps, so that update normalisation engages.
      const auto g = random_values(count, 41 + t, static_cast<float>(t * t));
      reference_adalomo(p, row, col, full, widen(g), rows, cols, u);
      Buffer bg = upload(g);
      backend().adalomo_update(bp.data(), DType::kF32, rows, cols, bg.as<float>(), brow.as<float>(),
                               bcol.as<float>(), bfull.as<float>(), u, WriteBack{}, nullptr);
      const std::string what =
          (cols > 0 ? "matrix" : "vector") + std::string(" step ") + std::to_string(t);
      expect_close(download(bp), p, kFp32Tolerance, "adalomo p, " + what);
      if (cols > 0) {
        expect_close(download(brow), row, kFp32Tolerance, "adalomo row moment, " + what);
        expect_close(download(bcol), std::vector<double>(col.begin(), col.begin() + cols),
                     kFp32Tolerance, "adalomo column moment, " + what);
      } else {
        expect_close(download(bfull), full, kFp32Tolerance, "adalomo moment, " + what);
      }
    }
  }
}

TEST_P(BackendKernels, UpdatesLeaveParameterStateAndGradientUntouchedWhenTheSkipFlagIsSet) {
  const int64_t rows = 37, cols = 30, count = rows * cols;
  const auto p0 = random_values(count, 50), g0 = random_values(count, 51),
             m0 = random_values(count, 52), r0 = random_values(rows, 53),
             c0 = random_values(cols, 54);
  GradientStatistics flagged;
  flagged.first_non_finite = 2;
  Buffer skip = upload(std::vector<GradientStatistics>{flagged});
  const auto* flag = skip.as<GradientStatistics>();
  Buffer p = upload(p0), g = upload(g0), m = upload(m0), v = upload(m0), row = upload(r0),
         col = upload(c0);
  backend().lomo_update(p.data(), DType::kF32, count, g.as<float>(), SgdUpdate{0.9f, 0.1f},
                        WriteBack{}, flag);
  backend().adamw_update(p.data(), DType::kF32, count, g.as<float>(), m.as<float>(), v.as<float>(),
                         AdamWUpdate{}, WriteBack{}, flag);
  AdaLomoUpdate adalomo;
  adalomo.lr = 1e-2;
  adalomo.beta = 0.5;
  backend().adalomo_update(p.data(), DType::kF32, rows, cols, g.as<float>(), row.as<float>(),
                           col.as<float>(), nullptr, adalomo, WriteBack{}, flag);
  EXPECT_EQ(download(p), p0) << "parameter";
  EXPECT_EQ(download(g), g0) << "gradient";
  EXPECT_EQ(download(m), m0) << "AdamW first moment";
  EXPECT_EQ(download(v), m0) << "AdamW second moment";
  EXPECT_EQ(download(row), r0) << "AdaLomo row moment";
  EXPECT_EQ(download(col), c0) << "AdaLomo column moment";
}

// ---- Shapes beyond one CUDA block: the grid-stride and multi-block paths of device kernels --

TEST_P(BackendKernels, RmsnormRowsWiderThanABlockAndNoRowsStillOverwritesDweight) {
  const int64_t rows = 40, dim = 1000;  // dim > 256 and not a multiple of 32; rows > 16 slices
  const auto x = random_values(rows * dim, 40), w = random_values(dim, 41);
  const auto dout = random_values(rows * dim, 42);
  std::vector<double> out(rows * dim), dw(dim, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double ms = 0.0;
    for (int64_t i = 0; i < dim; ++i) ms += double(x[r * dim + i]) * x[r * dim + i];
    const double rstd = 1.0 / std::sqrt(ms / dim + 1e-5);
    for (int64_t i = 0; i < dim; ++i) {
      out[r * dim + i] = w[i] * x[r * dim + i] * rstd;
      dw[i] += double(dout[r * dim + i]) * x[r * dim + i] * rstd;
    }
  }
  Buffer bx = upload(x), bw = upload(w), bout = zeros(rows * dim), brstd = zeros(rows);
  backend().rmsnorm_forward(bout.as<float>(), brstd.as<float>(), bx.as<float>(), bw.as<float>(),
                            rows, dim, 1e-5f);
  expect_close(download(bout), out, kFp32Tolerance, "rmsnorm out");
  Buffer bdout = upload(dout), bdx = zeros(rows * dim), bdw = upload(random_values(dim, 43));
  backend().rmsnorm_backward(bdx.as<float>(), bdw.as<float>(), bdout.as<float>(), bx.as<float>(),
                             bw.as<float>(), brstd.as<float>(), rows, dim);
  expect_close(download(bdw), dw, kFp32Tolerance, "rmsnorm dweight");
  backend().rmsnorm_backward(bdx.as<float>(), bdw.as<float>(), bdout.as<float>(), bx.as<float>(),
                             bw.as<float>(), brstd.as<float>(), 0, dim);
  EXPECT_EQ(download(bdw), std::vector<float>(dim, 0.0f)) << "no rows: dweight overwritten by 0";
}

TEST_P(BackendKernels, RopeReadsLargePositionsOfALongTable) {
  const int64_t rows = 37, heads = 3, head_dim = 128, half = head_dim / 2, max_position = 4096;
  const RopeTable table =
      rope_table(rope_inverse_frequencies(head_dim, 500000.0, {}), max_position);
  std::vector<int32_t> positions(rows);
  for (int64_t r = 0; r < rows; ++r) positions[r] = static_cast<int32_t>((r * 977 + 4095) % 4096);
  const auto x = random_values(rows * heads * head_dim, 44);
  for (double direction : {1.0, -1.0}) {
    std::vector<double> want(x.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const size_t at = static_cast<size_t>((r * heads + h) * head_dim + i);
          const double c = table.cos[positions[r] * half + i];
          const double s = direction * table.sin[positions[r] * half + i];
          want[at] = x[at] * c - x[at + half] * s;
          want[at + half] = x[at + half] * c + x[at] * s;
        }
    Buffer bx = upload(x), bpos = upload(positions), bcos = upload(table.cos),
           bsin = upload(table.sin);
    const RopeTableView view{half, max_position, bcos.as<float>(), bsin.as<float>()};
    if (direction > 0) {
      backend().rope_forward(bx.as<float>(), bpos.as<int32_t>(), view, rows, heads);
    } else {
      backend().rope_backward(bx.as<float>(), bpos.as<int32_t>(), view, rows, heads);
    }
    expect_close(download(bx), want, kFp32Tolerance, direction > 0 ? "rope" : "rope backward");
  }
}

TEST_P(BackendKernels, SwigluOverManyBlocksSaturatesWithoutNaN) {
  const int64_t count = 1000;
  auto gate = random_values(count, 45, 6.0f);
  gate[0] = -90.0f, gate[1] = 90.0f;  // exp(90) overflows fp32: σ must still be 0 and 1
  const auto up = random_values(count, 46), dout = random_values(count, 47);
  std::vector<double> out(count), dgate(count), dup(count);
  for (int64_t i = 0; i < count; ++i) {
    const double g = gate[i], sigmoid = 1.0 / (1.0 + std::exp(-g));
    out[i] = g * sigmoid * up[i];
    dup[i] = dout[i] * g * sigmoid;
    dgate[i] = dout[i] * up[i] * sigmoid * (1.0 + g * (1.0 - sigmoid));
  }
  Buffer bg = upload(gate), bu = upload(up), bd = upload(dout), bo = zeros(count);
  Buffer bdg = zeros(count), bdu = zeros(count);
  backend().swiglu_forward(bo.as<float>(), bg.as<float>(), bu.as<float>(), count);
  backend().swiglu_backward(bdg.as<float>(), bdu.as<float>(), bd.as<float>(), bg.as<float>(),
                            bu.as<float>(), count);
  expect_close(download(bo), out, kFp32Tolerance, "swiglu out");
  expect_close(download(bdg), dgate, kFp32Tolerance, "swiglu dgate");
  expect_close(download(bdu), dup, kFp32Tolerance, "swiglu dup");
}

TEST_P(BackendKernels, EmbeddingBackwardAddsRepeatsAcrossWideRows) {
  const int64_t vocab = 40, dim = 300, count = 100;  // dim > 256, not a multiple of 32
  std::vector<int32_t> tokens(count);
  for (int64_t i = 0; i < count; ++i) tokens[i] = static_cast<int32_t>(i * 7 % vocab);
  const auto dout = random_values(count * dim, 48), dtable0 = random_values(vocab * dim, 49);
  std::vector<double> dtable = widen(dtable0);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t i = 0; i < dim; ++i) dtable[tokens[t] * dim + i] += dout[t * dim + i];
  Buffer bt = upload(tokens), bdt = upload(dtable0), bd = upload(dout);
  backend().embedding_backward(bdt.as<float>(), bd.as<float>(), bt.as<int32_t>(), count, dim);
  expect_close(download(bdt), dtable, kFp32Tolerance, "embedding dtable");
}

TEST_P(BackendKernels, CrossEntropyOverAVocabularyWiderThanABlockAndAllIgnoredRows) {
  const int64_t rows = 5, vocab = 1000;  // > 256 and not a multiple of it
  const auto logits = random_values(rows * vocab, 50, 8.0f);
  const std::vector<int32_t> targets = {999, kIgnoreIndex, 0, 500, kIgnoreIndex};
  const float scale = 0.5f;
  std::vector<double> dlogits(rows * vocab, 0.0);
  double loss = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == kIgnoreIndex) continue;
    double max_logit = -1e300, sum = 0.0;
    for (int64_t c = 0; c < vocab; ++c)
      max_logit = std::max(max_logit, double(logits[r * vocab + c]));
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(logits[r * vocab + c] - max_logit);
    const double lse = max_logit + std::log(sum);
    loss += lse - logits[r * vocab + targets[r]];
    for (int64_t c = 0; c < vocab; ++c) {
      dlogits[r * vocab + c] =
          scale * (std::exp(logits[r * vocab + c] - lse) - (c == targets[r] ? 1.0 : 0.0));
    }
  }
  Buffer bl = upload(logits), bt = upload(targets), blse = zeros(rows);
  const double got = backend().cross_entropy_forward(blse.as<float>(), bl.as<float>(),
                                                     bt.as<int32_t>(), rows, vocab);
  EXPECT_NEAR(got, loss, kFp32Tolerance * std::abs(loss)) << "loss sum, relative 1e-5";
  backend().cross_entropy_backward(bl.as<float>(), bl.as<float>(), blse.as<float>(),
                                   bt.as<int32_t>(), rows, vocab, scale);
  expect_close(download(bl), dlogits, kFp32Tolerance, "dlogits");
  // Only ignored rows (the last one), and no rows: the loss sum is written as 0.
  const double ignored = backend().cross_entropy_forward(
      blse.as<float>(), bl.as<float>() + 4 * vocab, bt.as<int32_t>() + 4, 1, vocab);
  EXPECT_EQ(ignored, 0.0);
  EXPECT_EQ(
      backend().cross_entropy_forward(blse.as<float>(), bl.as<float>(), bt.as<int32_t>(), 0, vocab),
      0.0);
}

}  // namespace
}  // namespace lomo
