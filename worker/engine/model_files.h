// The files of a Hugging Face model directory beside config.json and the weights: the tokenizer
// and generation_config.json. A checkpoint carries them so that transformers' AutoTokenizer and
// generate() work on it exactly as on the model it was fine-tuned from.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "worker/engine/llama_config.h"

namespace lomo {

inline constexpr const char* kGenerationConfigFileName = "generation_config.json";

// The tokenizer files transformers reads (fast and slow tokenizers, chat templates), by name.
const std::vector<std::string>& tokenizer_file_names();

// Writes into `destination` (which must exist): every file of tokenizer_file_names() that
// `tokenizer_dir` holds, and generation_config.json copied from `model_dir` or, when the model
// has none, derived from `config` as transformers derives it (bos/eos/pad token ids of config.json,
// an eos list kept as a list). Each file is written atomically. Returns the names written, in that
// order. Throws CheckpointError naming the file when a source cannot be read, std::system_error
// when a write fails.
std::vector<std::string> write_model_companion_files(const std::filesystem::path& model_dir,
                                                     const std::filesystem::path& tokenizer_dir,
                                                     const std::filesystem::path& destination,
                                                     const LlamaConfig& config);

// generation_config.json for a model without one: transformers' GenerationConfig.from_model_config
// fields (_from_model_config, bos_token_id, eos_token_id, pad_token_id when set).
std::string derived_generation_config(const LlamaConfig& config);

}  // namespace lomo
