// LLaMA weights in the Hugging Face layout, so that transformers and lomo read each other's
// checkpoints: config.json plus either model.safetensors or shards
// model-0000i-of-0000N.safetensors listed by model.safetensors.index.json.
#pragma once

#include <cstdint>
#include <filesystem>

#include "kernels/dtype.h"
#include "worker/engine/llama_weights.h"
#include "worker/engine/memory.h"
#include "worker/engine/safetensors.h"

namespace lomo {

inline constexpr const char* kConfigFileName = "config.json";
inline constexpr const char* kSingleWeightsFileName = "model.safetensors";
inline constexpr const char* kWeightsIndexFileName = "model.safetensors.index.json";

// Reads the model in `model_dir` into parameters of dtype `storage`, allocated against
// `accountant`. The files may hold F32, F16 or BF16 tensors; values are converted through fp32 with
// round-to-nearest-even, in chunks of a few MB (workspace memory), never as a full fp32 copy.
// A tensor already in `storage` dtype is read bit-exact. model.safetensors is preferred over an
// index when both exist, as transformers does.
// Every parameter must be present with the shape config.json implies. lm_head.weight may be absent
// when the embeddings are tied (and is ignored if present, as transformers ignores it); tensors
// named "*rotary_emb.inv_freq" (a buffer older exports saved) are ignored; any other tensor lomo
// does not know is an error rather than silently dropped.
// Throws std::invalid_argument for an unusable config.json, CheckpointError for everything else,
// naming the file and tensor.
LlamaWeights load_llama_checkpoint(const std::filesystem::path& model_dir, DType storage,
                                   MemoryAccountant& accountant);

struct SaveOptions {
  // A checkpoint whose tensors total more bytes than this is split into shards of at most this
  // size; a single tensor larger than the limit gets a shard of its own.
  uint64_t max_shard_bytes = 5ull << 30;
};

// Writes config.json (torch_dtype = the storage dtype) and the tensors, bit-exact in the storage
// dtype, into `dir` (created if needed). Each file is written to a temporary name and renamed.
// Weight files of an earlier save in `dir` that the new layout does not use (a single file after a
// sharded save, or shards of another count) are removed afterwards so that no loader can pick
// them up. The directory as a whole is not replaced atomically: a crash midway can leave a mix, so
// a checkpoint is committed only once this returns (see DESIGN.md, Checkpoints).
// Throws std::system_error for I/O failures.
void save_llama_checkpoint(const LlamaWeights& weights, const std::filesystem::path& dir,
                           const SaveOptions& options = {});

}  // namespace lomo
