// The NCCL communicator (worker/comm/nccl_communicator.h) on real GPUs. NcclCommunicatorTest needs
// one GPU (label gpu): a world of one rank, its argument checks and failure paths, and the mean's
// division kernel. NcclMultiGpuTest needs two (label gpu-multi): one rank per GPU, each on its own
// thread. Without the GPUs a test needs it skips and says why.
#include "worker/comm/nccl_communicator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "tests/unit/rank_threads.h"
#include "worker/comm/device_aware_communicator.h"
#include "worker/comm/in_process_communicator.h"
#include "worker/comm/local_communicator.h"
#include "worker/comm/nccl_mean.h"

#ifdef LOMO_HAVE_NCCL_RENDEZVOUS
#include <gloo/rendezvous/hash_store.h>

#include "worker/comm/nccl_rendezvous.h"
#endif

namespace lomo {
namespace {

using comm_test::elapsed_since;

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using World = std::vector<std::unique_ptr<NcclCommunicator>>;

// No healthy collective comes near it; NCCL's first collective between two GPUs connects them,
// which takes well under a second.
constexpr milliseconds kHealthyTimeout = std::chrono::seconds(60);
// "At once": far below the healthy timeout, so a call that meets it waited for no timeout.
constexpr milliseconds kAtOnce = std::chrono::seconds(5);
// The failure tests' timeout, and how much later than it their error may come: an abort of the
// NCCL communicator stops its kernels within milliseconds; seconds leave scheduling room.
constexpr milliseconds kShortTimeout = std::chrono::seconds(2);
constexpr milliseconds kAbortSlack = std::chrono::seconds(10);
// A rank thread still running after this has hung (longer than every timeout above).
constexpr auto kRankBound = std::chrono::seconds(150);

// One thread per rank (tests/unit/rank_threads.h), aborting after kRankBound.
void run_ranks(int world_size, const std::function<void(int rank)>& body) {
  comm_test::run_rank_threads(world_size, kRankBound, body);
}

// `count` Ts in memory of `device` (plain cudaMalloc/cudaMemcpy).
template <typename T>
class DeviceArray {
 public:
  DeviceArray(int device, const std::vector<T>& host) : device_(device), count_(host.size()) {
    LOMO_CUDA_CHECK(cudaSetDevice(device_));
    LOMO_CUDA_CHECK(
        cudaMalloc(reinterpret_cast<void**>(&data_), std::max<size_t>(count_, 1) * sizeof(T)));
    if (count_ > 0) {
      LOMO_CUDA_CHECK(cudaMemcpy(data_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice));
    }
    // A copy from pageable memory may return before its data lands, and the communicator's
    // non-blocking stream does not wait for the default stream.
    LOMO_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~DeviceArray() {
    cudaSetDevice(device_);
    cudaFree(data_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() { return data_; }
  std::vector<T> to_host() const {
    LOMO_CUDA_CHECK(cudaSetDevice(device_));
    std::vector<T> host(count_);
    if (count_ > 0) {
      LOMO_CUDA_CHECK(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    }
    return host;
  }

 private:
  int device_;
  size_t count_;
  T* data_ = nullptr;
};

template <typename T>
std::vector<T> alternating(int64_t count, int64_t offset) {
  std::vector<T> values;
  for (int64_t i = 0; i < count; ++i)
    values.push_back(static_cast<T>(i * (i % 2 ? -1 : 1) + offset));
  return values;
}

// The bits of `values`: equal floats can differ in bits (0.0 and -0.0), and bits are what must
// not diverge between ranks.
template <typename T>
auto bits_of(const std::vector<T>& values) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  std::vector<Bits> bits;
  for (T value : values) bits.push_back(std::bit_cast<Bits>(value));
  return bits;
}

NcclCommunicatorOptions options_for(int rank, int world_size, milliseconds timeout) {
  NcclCommunicatorOptions options;
  options.rank = rank;
  options.world_size = world_size;
  options.device = rank;  // one GPU per rank
  options.timeout = timeout;
  return options;
}

// world_size communicators that share one unique id, built on threads (each constructor blocks
// until every rank has joined).
World make_world(int world_size, milliseconds timeout = kHealthyTimeout) {
  const std::string id = nccl_unique_id();
  World world(world_size);
  run_ranks(world_size, [&](int rank) {
    world[rank] = std::make_unique<NcclCommunicator>(options_for(rank, world_size, timeout), id);
  });
  return world;
}

// Expects `call` to throw CommunicatorError for `op` naming `peer`, with `fragment` in its text.
void expect_error(const std::function<void()>& call, const std::string& op, std::optional<int> peer,
                  const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << op << " returned; expected a CommunicatorError";
  } catch (const CommunicatorError& error) {
    EXPECT_EQ(error.op(), op) << error.what();
    EXPECT_EQ(error.peer(), peer) << error.what();
    EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
  }
}

class NcclCommunicatorTest : public testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: the NCCL communicator needs a GPU";
    }
  }
  static std::unique_ptr<NcclCommunicator> make_alone(milliseconds timeout = kHealthyTimeout) {
    return std::make_unique<NcclCommunicator>(options_for(0, 1, timeout), nccl_unique_id());
  }
};

template <typename T>
void expect_unchanged_by_one_rank(NcclCommunicator& comm, CommDType dtype, ReduceOp op) {
  constexpr int64_t kCount = 37;  // odd: no aligned-only path for free
  const std::vector<T> values = alternating<T>(kCount, -5);
  DeviceArray<T> data(0, values);
  comm.all_reduce(data.get(), kCount, dtype, op);
  EXPECT_EQ(data.to_host(), values)
      << comm_dtype_name(dtype) << (op == ReduceOp::kSum ? " sum" : " mean");
}

TEST_F(NcclCommunicatorTest, SumAndMeanOverOneRankLeaveEveryDtypeUnchanged) {
  auto comm = make_alone();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->world_size(), 1);
  EXPECT_EQ(comm->device(), 0);
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMean}) {
    expect_unchanged_by_one_rank<float>(*comm, CommDType::kF32, op);
    expect_unchanged_by_one_rank<double>(*comm, CommDType::kF64, op);
    expect_unchanged_by_one_rank<int64_t>(*comm, CommDType::kI64, op);
  }
}

// The mean's division, which a world of one skips: the same bits as the host's division, and
// truncation toward zero for integers. The count spans more than the kernel's grid, and is no
// multiple of its block.
TEST_F(NcclCommunicatorTest, MeanDivisionMatchesTheHostsDivision) {
  constexpr int64_t kCount = (int64_t{1} << 21) + 7;
  constexpr int kDivisor = 3;
  std::mt19937 random(7);
  std::uniform_real_distribution<double> uniform(-1e6, 1e6);
  std::vector<float> f32(kCount);
  std::vector<double> f64(kCount);
  std::vector<int64_t> i64(kCount);
  for (int64_t i = 0; i < kCount; ++i) {
    f64[i] = uniform(random);
    f32[i] = static_cast<float>(f64[i]);
    i64[i] = static_cast<int64_t>(f64[i]) * 1000003;  // negative ones too
  }
  i64[0] = -7;  // -7 / 3 is -2: toward zero, not -3
  DeviceArray<float> d32(0, f32);
  DeviceArray<double> d64(0, f64);
  DeviceArray<int64_t> di64(0, i64);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  using nccl_mean::Element;
  EXPECT_EQ(nccl_mean::divide_in_place(d32.get(), kCount, Element::kF32, kDivisor, stream),
            cudaSuccess);
  EXPECT_EQ(nccl_mean::divide_in_place(d64.get(), kCount, Element::kF64, kDivisor, stream),
            cudaSuccess);
  EXPECT_EQ(nccl_mean::divide_in_place(di64.get(), kCount, Element::kI64, kDivisor, stream),
            cudaSuccess);
  EXPECT_EQ(nccl_mean::divide_in_place(nullptr, 0, Element::kF32, kDivisor, stream), cudaSuccess)
      << "an empty division launches nothing";
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);
  const auto got32 = d32.to_host();
  const auto got64 = d64.to_host();
  const auto goti64 = di64.to_host();
  for (int64_t i = 0; i < kCount; ++i) {
    ASSERT_EQ(std::bit_cast<uint32_t>(got32[i]), std::bit_cast<uint32_t>(f32[i] / 3.0F)) << i;
    ASSERT_EQ(std::bit_cast<uint64_t>(got64[i]), std::bit_cast<uint64_t>(f64[i] / 3.0)) << i;
    ASSERT_EQ(goti64[i], i64[i] / 3) << i;
  }
  EXPECT_EQ(goti64[0], -2);
}

TEST_F(NcclCommunicatorTest, BroadcastAndAllGatherOfOneRankKeepTheBytes) {
  auto comm = make_alone();
  std::vector<uint8_t> bytes(101);
  for (int i = 0; i < 101; ++i) bytes[i] = static_cast<uint8_t>(31 * i + 7);
  DeviceArray<uint8_t> broadcast(0, bytes);
  comm->broadcast(broadcast.get(), 101, 0);
  EXPECT_EQ(broadcast.to_host(), bytes);

  DeviceArray<uint8_t> send(0, bytes);
  DeviceArray<uint8_t> recv(0, std::vector<uint8_t>(101, 0));
  comm->all_gather(send.get(), recv.get(), 101);
  EXPECT_EQ(recv.to_host(), bytes);
  // In place: this rank's part of recv is the send buffer.
  DeviceArray<uint8_t> in_place(0, bytes);
  comm->all_gather(in_place.get(), in_place.get(), 101);
  EXPECT_EQ(in_place.to_host(), bytes);
}

TEST_F(NcclCommunicatorTest, EmptyCollectivesAndBarriersComplete) {
  auto comm = make_alone();
  comm->all_reduce(static_cast<float*>(nullptr), 0, ReduceOp::kSum);
  comm->broadcast(nullptr, 0, 0);
  comm->all_gather(nullptr, nullptr, 0);
  for (int i = 0; i < 3; ++i) comm->barrier();
  DeviceArray<float> data(0, {2.5F});
  comm->all_reduce(data.get(), 1, ReduceOp::kSum);
  EXPECT_EQ(data.to_host()[0], 2.5F) << "the communicator still works after them";
}

TEST_F(NcclCommunicatorTest, AsyncWorksCompleteInIssueOrder) {
  constexpr int kWorks = 8;
  constexpr int64_t kCount = 1000;
  auto comm = make_alone();
  std::vector<std::unique_ptr<DeviceArray<double>>> buffers;
  std::vector<std::unique_ptr<CollectiveWork>> works;
  for (int w = 0; w < kWorks; ++w) {
    buffers.push_back(
        std::make_unique<DeviceArray<double>>(0, std::vector<double>(kCount, w + 1.0)));
    works.push_back(
        comm->all_reduce_async(buffers.back()->get(), kCount, CommDType::kF64, ReduceOp::kMean));
  }
  works.back()->wait();
  for (int w = 0; w < kWorks; ++w) EXPECT_TRUE(works[w]->is_done()) << "work " << w;
  for (int w = kWorks - 1; w >= 0; --w) works[w]->wait();  // waiting again, in any order
  for (int w = 0; w < kWorks; ++w) {
    EXPECT_EQ(buffers[w]->to_host(), std::vector<double>(kCount, w + 1.0)) << "work " << w;
  }
}

TEST_F(NcclCommunicatorTest, AbortMakesEveryLaterCallThrowNamingThisRank) {
  auto comm = make_alone();
  DeviceArray<float> data(0, {1.0F});
  comm->all_reduce(data.get(), 1, ReduceOp::kSum);  // healthy first
  comm->abort("simulated failure");
  comm->abort("a second abort changes nothing");
  const auto start = Clock::now();
  const std::string reason = "rank 0 aborted: simulated failure";
  expect_error([&] { comm->all_reduce(data.get(), 1, ReduceOp::kSum); }, "all_reduce", 0, reason);
  expect_error([&] { comm->broadcast(data.get(), 4, 0); }, "broadcast", 0, reason);
  expect_error([&] { comm->all_gather(data.get(), data.get(), 4); }, "all_gather", 0, reason);
  expect_error([&] { comm->barrier(); }, "barrier", 0, reason);
  EXPECT_LT(elapsed_since(start), kAtOnce);
}

TEST_F(NcclCommunicatorTest, ArgumentErrorsThrowAndBreakTheCommunicator) {
  DeviceArray<float> data(0, {1.0F, 2.0F});
  {
    auto comm = make_alone();
    expect_error([&] { comm->broadcast(data.get(), 4, 1); }, "broadcast", 0,
                 "root rank 1 outside a world of 1");
    const auto start = Clock::now();
    expect_error([&] { comm->all_reduce(data.get(), 2, ReduceOp::kSum); }, "all_reduce", 0,
                 "root rank 1");
    EXPECT_LT(elapsed_since(start), kAtOnce);
  }
  {
    auto comm = make_alone();
    expect_error([&] { comm->all_reduce(data.get(), -1, CommDType::kF32, ReduceOp::kSum); },
                 "all_reduce", 0, "negative count -1");
  }
  {
    auto comm = make_alone();
    std::vector<float> host(2, 1.0F);
    expect_error([&] { comm->all_reduce(host.data(), 2, ReduceOp::kSum); }, "all_reduce", 0,
                 "host memory");
  }
  {
    auto comm = make_alone();
    auto* bytes = reinterpret_cast<uint8_t*>(data.get());
    expect_error([&] { comm->all_gather(bytes + 1, bytes, 4); }, "all_gather", 0,
                 "send overlaps recv");
  }
}

TEST_F(NcclCommunicatorTest, ConstructorRejectsOptionsWrongOnTheirOwn) {
  const std::string id = nccl_unique_id();
  const NcclCommunicatorOptions alone = options_for(0, 1, kHealthyTimeout);
  EXPECT_THROW({ NcclCommunicator comm(alone, id.substr(1)); }, std::invalid_argument);
  NcclCommunicatorOptions rank_outside = options_for(0, 1, kHealthyTimeout);
  rank_outside.rank = 1;
  EXPECT_THROW({ NcclCommunicator comm(rank_outside, id); }, std::invalid_argument);
  NcclCommunicatorOptions missing_device = options_for(0, 1, kHealthyTimeout);
  missing_device.device = cuda::device_count();
  EXPECT_THROW({ NcclCommunicator comm(missing_device, id); }, std::invalid_argument);
}

// A world of two in which rank 1 never comes: rank 0's construction must end at the timeout with
// an error, not hang (the joining is aborted).
TEST_F(NcclCommunicatorTest, ARankThatNeverJoinsFailsTheRendezvousAtTheTimeout) {
  const std::string id = nccl_unique_id();
  run_ranks(1, [&](int) {
    const auto start = Clock::now();
    try {
      NcclCommunicator comm(options_for(0, 2, kShortTimeout), id);
      ADD_FAILURE() << "a world of two was built without its rank 1";
    } catch (const CommunicatorError& error) {
      EXPECT_EQ(error.op(), "rendezvous") << error.what();
      EXPECT_NE(std::string(error.what()).find("did not all join"), std::string::npos)
          << error.what();
    }
    EXPECT_GE(elapsed_since(start), kShortTimeout);
    EXPECT_LT(elapsed_since(start), kShortTimeout + kAbortSlack);
  });
}

#ifdef LOMO_HAVE_NCCL_RENDEZVOUS
TEST_F(NcclCommunicatorTest, RankZeroPublishesTheIdUnderThePrefix) {
  gloo::rendezvous::HashStore store;
  auto comm = connect_nccl(options_for(0, 1, kHealthyTimeout), store, "job/3/attempt/1");
  EXPECT_EQ(store.get("job/3/attempt/1/nccl_id").size(), kNcclUniqueIdBytes);
  DeviceArray<int64_t> data(0, {-3, 4});
  comm->all_reduce(data.get(), 2, ReduceOp::kMean);
  EXPECT_EQ(data.to_host(), (std::vector<int64_t>{-3, 4}));
}

TEST_F(NcclCommunicatorTest, ARankWithoutAPublishedIdFailsTheRendezvous) {
  gloo::rendezvous::HashStore store;
  NcclCommunicatorOptions options = options_for(0, 2, milliseconds(300));
  options.rank = 1;
  options.device = 0;
  expect_error([&] { connect_nccl(options, store, "job/4/attempt/1"); }, "rendezvous", std::nullopt,
               "job/4/attempt/1/nccl_id");
}
#endif

// --- Two GPUs, one rank on each. ---

// A GPU rank's communicator (device_aware_communicator.h): device buffers to NCCL, host values to
// the host communicator. Observed through abort(): once one side is aborted, only the calls that
// went to it fail.
TEST_F(NcclCommunicatorTest,
       DeviceAwareCommunicatorSendsDeviceBuffersToNcclAndHostValuesToTheHost) {
  std::unique_ptr<NcclCommunicator> nccl = make_alone();
  NcclCommunicator& device_side = *nccl;
  DeviceAwareCommunicator both(std::make_unique<LocalCommunicator>(), std::move(nccl));
  const std::vector<float> values = alternating<float>(9, 3);
  DeviceArray<float> on_gpu(0, values);
  double on_host = 2.5;
  EXPECT_TRUE(DeviceAwareCommunicator::is_device_memory(on_gpu.get()));
  EXPECT_FALSE(DeviceAwareCommunicator::is_device_memory(&on_host));
  both.all_reduce(on_gpu.get(), 9, ReduceOp::kSum);
  both.all_reduce(&on_host, 1, ReduceOp::kSum);
  EXPECT_EQ(on_gpu.to_host(), values);
  EXPECT_EQ(on_host, 2.5);
  // A host buffer and a device one in one all_gather is a caller's mistake.
  expect_error([&] { both.all_gather(&on_host, on_gpu.get(), sizeof(float)); }, "all_gather",
               std::nullopt, "must both be host memory or both device memory");
  device_side.abort("test abort of the NCCL side");
  EXPECT_THROW(both.all_reduce(on_gpu.get(), 9, ReduceOp::kSum), CommunicatorError);
  EXPECT_NO_THROW(both.all_reduce(&on_host, 1, ReduceOp::kSum)) << "the host side is unaffected";
  both.abort("test abort of both");
  EXPECT_THROW(both.all_reduce(&on_host, 1, ReduceOp::kSum), CommunicatorError);
}

// No GPU needed: the two sides must be the same rank of the same world.
TEST(DeviceAwareCommunicatorTest, RefusesSidesOfDifferentWorldsOrRanks) {
  auto two = make_in_process_world(2, kHealthyTimeout);
  try {
    DeviceAwareCommunicator mixed(std::make_unique<LocalCommunicator>(), std::move(two[1]));
    ADD_FAILURE() << "accepted rank 0 of 1 with rank 1 of 2";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("rank 0 of 1, the device one rank 1 of 2"),
              std::string::npos)
        << error.what();
  }
}

class NcclMultiGpuTest : public testing::Test {
 protected:
  static constexpr int kRanks = 2;
  void SetUp() override {
    const int devices = cuda::device_count();
    if (devices < kRanks) {
      GTEST_SKIP() << "needs " << kRanks << " CUDA devices, found " << devices;
    }
  }
};

TEST_F(NcclMultiGpuTest, SumAndMeanAreBitIdenticalOnEveryRank) {
  // Magnitudes from 1e-6 to 1e6 make a rounded sum depend on the order of additions.
  constexpr int64_t kCount = 4099;
  World world = make_world(kRanks);
  std::vector<std::vector<float>> inputs(kRanks), sums(kRanks), means(kRanks);
  std::vector<std::vector<int64_t>> integer_means(kRanks);
  run_ranks(kRanks, [&](int rank) {
    std::mt19937 random(1234 + rank);
    std::uniform_real_distribution<float> exponent(-6.0F, 6.0F);
    std::uniform_int_distribution<int> sign(0, 1);
    for (int64_t i = 0; i < kCount; ++i) {
      inputs[rank].push_back((sign(random) ? 1.0F : -1.0F) * std::pow(10.0F, exponent(random)));
    }
    DeviceArray<float> sum(rank, inputs[rank]);
    DeviceArray<float> mean(rank, inputs[rank]);
    DeviceArray<int64_t> integers(rank, {rank + 1, -(rank + 1)});
    NcclCommunicator& comm = *world[rank];
    comm.all_reduce(sum.get(), kCount, ReduceOp::kSum);
    comm.all_reduce(mean.get(), kCount, ReduceOp::kMean);
    comm.all_reduce(integers.get(), 2, ReduceOp::kMean);
    sums[rank] = sum.to_host();
    means[rank] = mean.to_host();
    integer_means[rank] = integers.to_host();
  });
  for (int r = 1; r < kRanks; ++r) {
    EXPECT_EQ(bits_of(sums[r]), bits_of(sums[0])) << "rank " << r;
    EXPECT_EQ(bits_of(means[r]), bits_of(means[0])) << "rank " << r;
  }
  for (int64_t i = 0; i < kCount; ++i) {
    double exact = 0, magnitude = 0;
    for (int r = 0; r < kRanks; ++r) {
      exact += inputs[r][i];
      magnitude += std::abs(inputs[r][i]);
    }
    // Within one f32 rounding per addition of the magnitudes added (f32 epsilon 1.2e-7 each).
    ASSERT_NEAR(sums[0][i], exact, kRanks * 1.2e-7 * magnitude) << "element " << i;
    // The mean is the sum divided by the world size, rounded once: the host's division.
    ASSERT_EQ(std::bit_cast<uint32_t>(means[0][i]),
              std::bit_cast<uint32_t>(sums[0][i] / static_cast<float>(kRanks)))
        << "element " << i;
  }
  // Sum of 1..n is n(n+1)/2 = 3; the integer mean truncates toward zero, for negatives too.
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(integer_means[r], (std::vector<int64_t>{1, -1})) << "rank " << r;
  }
}

// A GPU gang as the trainer has it: each rank's DeviceAwareCommunicator reduces its device
// gradient over NCCL and its host loss sum over the host communicator.
TEST_F(NcclMultiGpuTest, DeviceAwareCommunicatorsReduceDeviceAndHostBuffersAcrossRanks) {
  World world = make_world(kRanks);
  auto hosts = make_in_process_world(kRanks, kHealthyTimeout);
  std::vector<std::unique_ptr<DeviceAwareCommunicator>> gang(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    gang[r] = std::make_unique<DeviceAwareCommunicator>(std::move(hosts[r]), std::move(world[r]));
  }
  std::vector<std::vector<float>> gradients(kRanks);
  std::vector<double> losses(kRanks);
  run_ranks(kRanks, [&](int rank) {
    DeviceArray<float> gradient(rank, {1.0F + rank, -2.0F * rank});
    double loss = 0.5 + rank;
    gang[rank]->all_reduce(gradient.get(), 2, ReduceOp::kSum);
    gang[rank]->all_reduce(&loss, 1, ReduceOp::kSum);
    gradients[rank] = gradient.to_host();
    losses[rank] = loss;
  });
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(gradients[r], (std::vector<float>{3.0F, -2.0F})) << "rank " << r;
    EXPECT_EQ(losses[r], 2.0) << "rank " << r;
  }
}

TEST_F(NcclMultiGpuTest, BroadcastFromEveryRootAndAllGatherReachEveryRank) {
  World world = make_world(kRanks);
  for (int root = 0; root < kRanks; ++root) {
    std::vector<std::vector<uint8_t>> got(kRanks);
    run_ranks(kRanks, [&](int rank) {
      std::vector<uint8_t> mine(101);
      for (int i = 0; i < 101; ++i) mine[i] = static_cast<uint8_t>(rank * 31 + i);
      DeviceArray<uint8_t> data(rank, mine);
      world[rank]->broadcast(data.get(), 101, root);
      got[rank] = data.to_host();
    });
    for (int r = 0; r < kRanks; ++r) {
      for (int i = 0; i < 101; ++i) {
        ASSERT_EQ(got[r][i], static_cast<uint8_t>(root * 31 + i)) << "root " << root;
      }
    }
  }
  std::vector<std::vector<int32_t>> gathered(kRanks);
  run_ranks(kRanks, [&](int rank) {
    DeviceArray<int32_t> send(rank, {rank, 10 * rank + 1, 100 * rank + 2});
    DeviceArray<int32_t> recv(rank, std::vector<int32_t>(3 * kRanks, -1));
    world[rank]->all_gather(send.get(), recv.get(), 3 * sizeof(int32_t));
    gathered[rank] = recv.to_host();
  });
  for (int r = 0; r < kRanks; ++r) {
    for (int source = 0; source < kRanks; ++source) {
      EXPECT_EQ(gathered[r][3 * source], source) << "on rank " << r;
      EXPECT_EQ(gathered[r][3 * source + 1], 10 * source + 1) << "on rank " << r;
      EXPECT_EQ(gathered[r][3 * source + 2], 100 * source + 2) << "on rank " << r;
    }
  }
}

// NCCL cannot tell a peer that a rank aborted: the peer's pending collective must still end, at
// its timeout (the NCCL communicator aborted, its kernel stopped), not hang.
TEST_F(NcclMultiGpuTest, AbortOnOneRankEndsThePeersCollectiveWithinTheTimeout) {
  World world = make_world(kRanks, kShortTimeout);
  std::latch issued(1);
  run_ranks(kRanks, [&](int rank) {
    NcclCommunicator& comm = *world[rank];
    DeviceArray<float> data(rank, {1.0F});
    comm.all_reduce(data.get(), 1, ReduceOp::kSum);  // both ranks: connected and healthy
    if (rank == 1) {
      issued.wait();
      comm.abort("simulated crash");
      expect_error([&] { comm.barrier(); }, "barrier", 1, "rank 1 aborted: simulated crash");
      return;
    }
    const auto start = Clock::now();
    std::optional<CommunicatorError> error;
    std::unique_ptr<CollectiveWork> work;
    try {
      work = comm.all_reduce_async(data.get(), 1, CommDType::kF32, ReduceOp::kSum);
    } catch (const CommunicatorError& caught) {
      error = caught;
    }
    issued.count_down();
    if (!error) {
      try {
        work->wait();
      } catch (const CommunicatorError& caught) {
        error = caught;
      }
    }
    ASSERT_TRUE(error.has_value()) << "all_reduce with an aborted peer returned";
    EXPECT_EQ(error->op(), "all_reduce") << error->what();
    EXPECT_LT(elapsed_since(start), kShortTimeout + kAbortSlack) << error->what();
    expect_error([&] { comm.barrier(); }, "barrier", std::nullopt, "rank 0");
  });
}

TEST_F(NcclMultiGpuTest, TimeoutNamesTheCollectiveAPeerNeverJoined) {
  World world = make_world(kRanks, kShortTimeout);
  std::latch rank0_failed(1);
  run_ranks(kRanks, [&](int rank) {
    NcclCommunicator& comm = *world[rank];
    DeviceArray<float> data(rank, {1.0F});
    comm.all_reduce(data.get(), 1, ReduceOp::kSum);  // both ranks: connected and healthy
    if (rank == 1) {
      // Joins only after rank 0 gave up: with rank 0's communicator aborted, this one must end
      // at its own timeout too.
      rank0_failed.wait();
      EXPECT_THROW(comm.all_reduce(data.get(), 1, ReduceOp::kSum), CommunicatorError);
      return;
    }
    const auto start = Clock::now();
    expect_error([&] { comm.all_reduce(data.get(), 1, ReduceOp::kSum); }, "all_reduce",
                 std::nullopt,
                 "did not complete within " + std::to_string(kShortTimeout.count()) + " ms");
    EXPECT_GE(elapsed_since(start), kShortTimeout);
    EXPECT_LT(elapsed_since(start), kShortTimeout + kAbortSlack);
    rank0_failed.count_down();
  });
}

}  // namespace
}  // namespace lomo
