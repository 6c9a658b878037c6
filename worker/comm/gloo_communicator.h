// The Communicator contract (communicator.h) between processes, over Gloo's TCP transport.
//
// Ranks meet through a Gloo rendezvous store (the coordinator's key-value service in production;
// HashStore or FileStore in tests) under a prefix such as "job/<id>/attempt/<n>": every key is
// namespaced by it, so a rank of an old attempt can never connect to a rank of a new one.
//
// Gloo supplies the connections and point-to-point messages; the collectives are our own, because
// the contract asks for three things Gloo's collectives do not give:
// - Bit-identical results: all_reduce is a ring reduce-scatter followed by a ring all-gather.
//   Each chunk is summed once, along one fixed chain of ranks, by the rank that ends up owning it,
//   and then only copied, so every rank holds the same bits (the mean is divided by its owner
//   before the copy). No rank ever re-sums in another order.
// - Naming the peer: each collective starts with a handshake in which every rank sends a small
//   header (sequence, op, count, dtype, root) to every other. A timeout in it names the first rank
//   whose header did not come; a header that disagrees names the rank that sent it. The handshake
//   is also the barrier.
// - Failures reaching every rank at once: Gloo's own timeout closes every connection of the
//   context, which peers could not tell from a crash. Here waits are ended by us instead (a
//   watchdog at the deadline, abort(), or a peer's notice), and the rank that detected a failure
//   sends a notice naming the rank at fault to every peer on a control slot; a listener thread on
//   each rank receives it and wakes that rank's pending collective.
// - Dead peers found in bounded time: Gloo does not wake a send or receive that is mid-message when
//   its connection breaks, so each peer's connection carries a sentinel receive that Gloo does
//   fail, checked by the watchdog every 100 ms. A peer whose connection broke without its close
//   notice fails this rank's running and later collectives, naming it ("connection to rank P
//   failed"), within 0.7 s of the connection breaking (two checks plus a 500 ms grace for the
//   close notice; plus scheduling delays), whatever the timeout.
// Asynchronous works run on one executor thread per communicator, in issue order; wait() blocks on
// the work's result. Messages are sent from and received into the communicator's own scratch
// buffers, so a collective that failed halfway can never write into the caller's memory later.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"

namespace gloo::rendezvous {
class Store;
}  // namespace gloo::rendezvous

namespace lomo {

struct GlooCommunicatorOptions {
  int rank = 0;
  int world_size = 1;
  // Namespace of every rendezvous key, e.g. "job/<id>/attempt/<n>".
  std::string prefix;
  // Address this rank binds and advertises to its peers for the data path.
  std::string hostname = "127.0.0.1";
  // Bounds every collective, and the rendezvous too unless rendezvous_timeout is set (> 0).
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  std::chrono::milliseconds rendezvous_timeout{0};
};

class GlooCommunicator final : public Communicator {
 public:
  // Connects to every peer through `store` (needed only during construction); blocks until all
  // world_size ranks have arrived. Throws CommunicatorError (op "rendezvous") on failure.
  GlooCommunicator(const GlooCommunicatorOptions& options, gloo::rendezvous::Store& store);
  // Closes this rank: peers' collectives beyond the ones this rank issued fail naming it.
  ~GlooCommunicator() override;
  GlooCommunicator(const GlooCommunicator&) = delete;
  GlooCommunicator& operator=(const GlooCommunicator&) = delete;

  int world_size() const override;
  int rank() const override;
  std::chrono::milliseconds timeout() const override;

  std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count, CommDType dtype,
                                                   ReduceOp op) override;
  std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) override;
  std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                   int64_t bytes_per_rank) override;
  void barrier() override;
  void abort(const std::string& reason) override;
  // The ring all-reduce stages one chunk out and one in (2·⌈count/N⌉ elements of the largest
  // all-reduce so far), broadcast and all_gather their payload; kept for reuse, grown as needed.
  void set_buffer_accountant(MemoryAccountant* accountant) override;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace lomo
