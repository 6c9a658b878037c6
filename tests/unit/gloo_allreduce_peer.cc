// One rank of the cross-process Gloo test (communicator_contract_test runs two of these):
// rendezvous through a FileStore, all-reduce (sum) kCount floats whose element i is i − 3·rank,
// write the result's raw bytes to OUT_FILE. Exit status 0 on success, 1 with a message otherwise.
//
// With --crash-after-rendezvous it instead exits at once after connecting and one barrier, without
// closing its communicator: to its peers, a crashed rank.
//
// With --reduce-until-killed it all-reduces kLargeCount floats over and over until the test kills
// it: a rank that dies at an arbitrary point of a collective, mid-message included.
//
// Usage: gloo_allreduce_peer STORE_DIR PREFIX RANK WORLD_SIZE OUT_FILE
//                            [--crash-after-rendezvous | --reduce-until-killed]
#include <gloo/rendezvous/file_store.h>
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <fstream>
#include <string>
#include <vector>

#include "worker/comm/gloo_communicator.h"

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    std::fprintf(stderr, "usage: %s STORE_DIR PREFIX RANK WORLD_SIZE OUT_FILE\n", argv[0]);
    return 1;
  }
  try {
    constexpr int64_t kCount = (1 << 20) + 3;  // not a multiple of the world size
    gloo::rendezvous::FileStore store(argv[1]);
    lomo::GlooCommunicatorOptions options;
    options.prefix = argv[2];
    options.rank = std::stoi(argv[3]);
    options.world_size = std::stoi(argv[4]);
    options.timeout = std::chrono::seconds(30);
    lomo::GlooCommunicator comm(options, store);
    if (argc == 7 && std::string(argv[6]) == "--crash-after-rendezvous") {
      comm.barrier();  // so that its peers are connected too
      _exit(0);
    }
    if (argc == 7 && std::string(argv[6]) == "--reduce-until-killed") {
      // 32 MiB: each ring message (16 MiB) outgrows the loopback socket buffers.
      constexpr int64_t kLargeCount = int64_t{1} << 23;
      std::vector<float> values(kLargeCount, 1.0F);
      for (;;) comm.all_reduce(values.data(), kLargeCount, lomo::ReduceOp::kMean);
    }
    std::vector<float> values(kCount);
    for (int64_t i = 0; i < kCount; ++i) values[i] = static_cast<float>(i - 3 * options.rank);
    comm.all_reduce(values.data(), kCount, lomo::ReduceOp::kSum);
    comm.barrier();
    std::ofstream out(argv[5], std::ios::binary);
    out.write(reinterpret_cast<const char*>(values.data()),
              static_cast<std::streamsize>(values.size() * sizeof(float)));
    return out ? 0 : 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "rank %s: %s\n", argv[3], error.what());
    return 1;
  }
}
