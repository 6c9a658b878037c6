// NCCL ranks meet through the rendezvous store of the Gloo path (a Gloo rendezvous store: the
// coordinator's key-value service in production, worker/rendezvous/coordinator_store.h; HashStore
// or FileStore in tests): rank 0 publishes the NCCL unique id, the others read it, and then all
// join the NCCL communicator. Built only with Gloo (target lomo_comm_nccl_rendezvous).
#pragma once

#include <memory>
#include <string>

#include "worker/comm/nccl_communicator.h"

namespace gloo::rendezvous {
class Store;
}  // namespace gloo::rendezvous

namespace lomo {

// Where rank 0 publishes the unique id: "<prefix>/nccl_id". One NCCL communicator per prefix
// (e.g. "job/<id>/attempt/<n>"): a second one under the same prefix could read the first's id.
std::string nccl_id_key(const std::string& prefix);

// Rank 0 makes a unique id and sets it under nccl_id_key(prefix); every other rank waits for that
// key (up to options.timeout) and reads it. Then each constructs its communicator, which blocks
// until all have joined. `store` is needed only during the call. Throws CommunicatorError (op
// "rendezvous") when the id does not come in time or is malformed, and whatever NcclCommunicator's
// constructor throws.
std::unique_ptr<NcclCommunicator> connect_nccl(const NcclCommunicatorOptions& options,
                                               gloo::rendezvous::Store& store,
                                               const std::string& prefix);

}  // namespace lomo
