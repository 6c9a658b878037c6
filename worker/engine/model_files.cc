#include "worker/engine/model_files.h"

#include <nlohmann/json.hpp>
#include <system_error>

#include "common/atomic_file.h"
#include "common/read_file.h"
#include "worker/engine/safetensors.h"

namespace lomo {
namespace fs = std::filesystem;
namespace {

// The largest tokenizer.json files (200k-token vocabularies) are tens of MB; a companion file far
// beyond that is not one.
constexpr uint64_t kMaxCompanionBytes = uint64_t{1} << 30;

// Copies `from` to `to` through memory and an atomic write: the checkpoint's manifest and rename
// come after, and a crash must not leave a truncated tokenizer under a committed name.
void copy_file_atomically(const fs::path& from, const fs::path& to) {
  std::string bytes;
  try {
    bytes = read_file(from, kMaxCompanionBytes);
  } catch (const FileReadError& error) {
    throw CheckpointError(error.what());
  }
  write_file_atomically(to, bytes);
}

bool is_file(const fs::path& path) {
  std::error_code error;
  return fs::is_regular_file(path, error);  // follows symlinks (the hub cache links to blobs)
}

}  // namespace

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {
      "tokenizer.json",
      "tokenizer_config.json",
      "special_tokens_map.json",
      "added_tokens.json",
      "tokenizer.model",
      "vocab.json",
      "merges.txt",
      "vocab.txt",
      "chat_template.jinja",
      "chat_template.json",
  };
  return names;
}

std::string derived_generation_config(const LlamaConfig& config) {
  nlohmann::json source = nlohmann::json::object();
  if (!config.source_json.empty()) source = nlohmann::json::parse(config.source_json);
  nlohmann::json out = {{"_from_model_config", true},
                        {"bos_token_id", config.bos_token_id},
                        {"eos_token_id", config.eos_token_id}};
  // A list of end-of-sequence ids (Llama 3 instruct) stops generation at any of them.
  if (const auto eos = source.find("eos_token_id"); eos != source.end() && eos->is_array()) {
    out["eos_token_id"] = *eos;
  }
  if (const auto pad = source.find("pad_token_id"); pad != source.end() && !pad->is_null()) {
    out["pad_token_id"] = *pad;
  }
  return out.dump(2) + "\n";
}

std::vector<std::string> write_model_companion_files(const fs::path& model_dir,
                                                     const fs::path& tokenizer_dir,
                                                     const fs::path& destination,
                                                     const LlamaConfig& config) {
  std::vector<std::string> written;
  for (const std::string& name : tokenizer_file_names()) {
    if (!is_file(tokenizer_dir / name)) continue;
    copy_file_atomically(tokenizer_dir / name, destination / name);
    written.push_back(name);
  }
  if (is_file(model_dir / kGenerationConfigFileName)) {
    copy_file_atomically(model_dir / kGenerationConfigFileName,
                         destination / kGenerationConfigFileName);
  } else {
    write_file_atomically(destination / kGenerationConfigFileName,
                          derived_generation_config(config));
  }
  written.push_back(kGenerationConfigFileName);
  return written;
}

}  // namespace lomo
