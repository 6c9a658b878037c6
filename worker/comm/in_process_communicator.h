// N ranks of one job inside one process, one thread per rank: the communicator that lets tests run
// multi-rank code (gradient averaging, a dead peer, a timeout) without processes or sockets.
//
// It keeps the whole Communicator contract and adds checks a real backend would not afford: every
// collective verifies that all ranks issued the same operation with the same dtype, count, bytes
// and root, and fails with CommunicatorError naming the first rank that disagrees, so a test finds
// call sequences that differ between ranks instead of reading corrupted buffers.
//
// How it works: the ranks share one group. A collective is a numbered slot (the n-th collective of
// every rank is slot n); the rank that arrives last at a slot performs it at once, on its own
// thread, reducing in rank order (so every rank gets the same bits), and writes every rank's
// buffer. Works therefore complete in issue order. A failure (timeout, abort, a closed rank,
// disagreeing arguments) poisons the whole group, as in NCCL and Gloo: every pending and later
// call on every rank throws CommunicatorError naming the rank at fault.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "worker/comm/communicator.h"

namespace lomo {

// world_size communicators of one group; element r is rank r. Each may be moved to its own thread
// and used there only (abort() excepted: any thread may call it). Destroying one closes that rank:
// its peers' pending and later collectives fail naming it.
std::vector<std::unique_ptr<Communicator>> make_in_process_world(int world_size,
                                                                 std::chrono::milliseconds timeout);

}  // namespace lomo
