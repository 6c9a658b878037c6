#include "worker/optim/data_parallel.h"

namespace lomo {

GlobalLoss reduce_loss(const ForwardResult& local, Communicator* communicator) {
  GlobalLoss global{local.loss_sum, local.counted_tokens};
  if (communicator != nullptr) {
    // The count first: it is what backward needs; integers so that it is exact at any size.
    communicator->all_reduce(&global.tokens, 1, ReduceOp::kSum);
    communicator->all_reduce(&global.loss_sum, 1, ReduceOp::kSum);
  }
  return global;
}

}  // namespace lomo
