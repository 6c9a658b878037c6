#include "worker/comm/nccl_rendezvous.h"

#include <gloo/rendezvous/store.h>

#include <exception>
#include <optional>
#include <vector>

namespace lomo {

std::string nccl_id_key(const std::string& prefix) { return prefix + "/nccl_id"; }

std::unique_ptr<NcclCommunicator> connect_nccl(const NcclCommunicatorOptions& options,
                                               gloo::rendezvous::Store& store,
                                               const std::string& prefix) {
  const std::string key = nccl_id_key(prefix);
  const std::string who = "rank " + std::to_string(options.rank) + " of " +
                          std::to_string(options.world_size) + " under '" + prefix + "'";
  std::string id;
  try {
    if (options.rank == 0) {
      id = nccl_unique_id();
      store.set(key, std::vector<char>(id.begin(), id.end()));
    } else {
      store.wait({key}, options.timeout);
      const std::vector<char> value = store.get(key);
      id.assign(value.begin(), value.end());
    }
  } catch (const CommunicatorError&) {
    throw;
  } catch (const std::exception& error) {
    throw CommunicatorError(
        "rendezvous", std::nullopt,
        who + ": exchanging the NCCL unique id under '" + key + "' failed: " + error.what());
  }
  if (id.size() != kNcclUniqueIdBytes) {
    throw CommunicatorError("rendezvous", 0,
                            who + ": the NCCL unique id under '" + key + "' has " +
                                std::to_string(id.size()) + " bytes, not " +
                                std::to_string(kNcclUniqueIdBytes));
  }
  return std::make_unique<NcclCommunicator>(options, id);
}

}  // namespace lomo
