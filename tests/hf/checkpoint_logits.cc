// Prints lomo's logits for one row of token ids on a checkpoint directory, as JSON on stdout, for
// tests/hf/hf_roundtrip.py to compare with what transformers computes on the same directory:
//
//   checkpoint_logits MODEL_DIR 5,17,3,...
//   {"vocab_size": V, "logits": [T·V floats, row-major]}
//
// Exit status 1 with the reason on stderr when the directory does not load or an id is invalid.
#include <cstdio>
#include <exception>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "worker/engine/checkpoint_io.h"
#include "worker/engine/llama_model.h"

namespace {

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) ids.push_back(static_cast<int32_t>(std::stol(item)));
  if (ids.empty()) throw std::invalid_argument("no token ids given");
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: checkpoint_logits MODEL_DIR ID,ID,...\n";
    return 2;
  }
  try {
    lomo::MemoryAccountant accountant;
    lomo::LlamaWeights weights =
        lomo::load_llama_checkpoint(argv[1], lomo::DType::kF32, accountant);
    lomo::LlamaModel model(weights, accountant);
    lomo::TokenBatch batch;
    batch.input_ids = parse_ids(argv[2]);
    batch.batch_size = 1;
    batch.seq_len = static_cast<int64_t>(batch.input_ids.size());
    batch.targets.assign(batch.input_ids.size(), lomo::kIgnoreIndex);
    model.forward(batch);
    const int64_t vocab = weights.config().vocab_size;
    const float* logits = model.logits();
    const nlohmann::json out = {
        {"vocab_size", vocab},
        {"logits", std::vector<float>(logits, logits + batch.seq_len * vocab)},
    };
    std::cout << out.dump() << "\n";
    return 0;
  } catch (const std::exception& error) {
    std::cerr << "checkpoint_logits: " << error.what() << "\n";
    return 1;
  }
}
