#include "worker/engine/checkpoint_io.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/atomic_file.h"
#include "common/read_file.h"

namespace lomo {
namespace {

using nlohmann::json;

// Elements converted per chunk: 4 MiB of fp32, large enough to amortise the read calls.
constexpr uint64_t kConversionChunkElements = uint64_t{1} << 20;
// A weight index lists one line per tensor: kilobytes, or a few MB for the largest models.
constexpr uint64_t kMaxIndexBytes = 64u << 20;
constexpr int kMaxIndexNesting = 8;

// Where one tensor of the checkpoint lies: file `file` of the sources, entry `entry` of its header.
struct TensorLocation {
  size_t file = 0;
  size_t entry = 0;
};

// The opened weight files of a checkpoint and an index of every tensor in them.
struct CheckpointSources {
  std::string description;  // the file that names the tensors, for messages
  std::vector<SafetensorsFile> files;
  std::map<std::string, TensorLocation> tensors;

  const SafetensorsTensorInfo& info(const TensorLocation& location) const {
    return files[location.file].tensors()[location.entry];
  }
};

std::string quote_name(const std::string& name) { return "'" + name + "'"; }

void add_file_tensors(CheckpointSources& sources, SafetensorsFile file) {
  const size_t index = sources.files.size();
  for (size_t entry = 0; entry < file.tensors().size(); ++entry) {
    sources.tensors.emplace(file.tensors()[entry].name, TensorLocation{index, entry});
  }
  sources.files.push_back(std::move(file));
}

std::string read_small_file(const std::filesystem::path& path, uint64_t limit) {
  try {
    return read_file(path, limit);
  } catch (const FileReadError& error) {
    throw CheckpointError(error.what());
  }
}

json parse_index_json(const std::string& text, const std::string& source) {
  struct TooDeep {};
  const json::parser_callback_t limit_depth = [](int depth, json::parse_event_t event, json&) {
    const bool opens =
        event == json::parse_event_t::object_start || event == json::parse_event_t::array_start;
    if (opens && depth >= kMaxIndexNesting) throw TooDeep{};
    return true;
  };
  try {
    return json::parse(text, limit_depth);
  } catch (const json::exception& error) {  // parse_error, or out_of_range for 1e400
    throw CheckpointError(source + ": invalid JSON: " + error.what());
  } catch (const TooDeep&) {
    throw CheckpointError(source + ": invalid JSON: nested too deeply for a weight index");
  }
}

// A shard must be a file inside the model directory: an index is data, and data must not make the
// loader read /etc/passwd or a sibling model.
bool stays_inside(const std::filesystem::path& relative) {
  if (relative.empty() || relative.has_root_path()) return false;
  for (const std::filesystem::path& part : relative) {
    if (part == "..") return false;
  }
  return true;
}

// tensor name -> shard file name, validated.
std::map<std::string, std::string> read_weight_map(const std::filesystem::path& index_path) {
  const std::string source = index_path.string();
  const json root = parse_index_json(read_small_file(index_path, kMaxIndexBytes), source);
  if (!root.is_object()) throw CheckpointError(source + ": expected a JSON object");
  if (root.contains("metadata") && !root["metadata"].is_object()) {
    throw CheckpointError(source + ": 'metadata' must be an object");
  }
  const auto map_it = root.find("weight_map");
  if (map_it == root.end() || !map_it->is_object()) {
    throw CheckpointError(source + ": 'weight_map' must be an object of tensor name -> file");
  }
  std::map<std::string, std::string> weight_map;
  for (const auto& [tensor, shard] : map_it->items()) {
    if (!shard.is_string()) {
      throw CheckpointError(source + ": weight_map entry for tensor " + quote_name(tensor) +
                            " is not a file name");
    }
    const std::string file = shard.get<std::string>();
    if (!stays_inside(std::filesystem::path(file))) {
      throw CheckpointError(source + ": shard path " + quote_name(file) + " of tensor " +
                            quote_name(tensor) + " escapes the model directory");
    }
    weight_map.emplace(tensor, file);
  }
  return weight_map;
}

// The shards must agree with the index both ways: a listed tensor missing from its shard would
// fail later with a confusing message, and a shard tensor the index omits would be dropped.
void check_shards_match_index(const CheckpointSources& sources,
                              const std::map<std::string, std::string>& weight_map,
                              const std::map<std::string, size_t>& file_of_shard) {
  for (const auto& [tensor, shard] : weight_map) {
    const size_t file = file_of_shard.at(shard);
    if (sources.files[file].find(tensor) == nullptr) {
      throw CheckpointError(sources.description + ": tensor " + quote_name(tensor) +
                            " is mapped to " + sources.files[file].path().string() +
                            ", which does not contain it");
    }
  }
  for (size_t file = 0; file < sources.files.size(); ++file) {
    for (const SafetensorsTensorInfo& tensor : sources.files[file].tensors()) {
      const auto it = weight_map.find(tensor.name);
      if (it == weight_map.end() || file_of_shard.at(it->second) != file) {
        throw CheckpointError(sources.files[file].path().string() + ": tensor " +
                              quote_name(tensor.name) + " is not listed for this file in " +
                              sources.description);
      }
    }
  }
}

CheckpointSources open_sharded(const std::filesystem::path& model_dir,
                               const std::filesystem::path& index_path) {
  const std::map<std::string, std::string> weight_map = read_weight_map(index_path);
  CheckpointSources sources;
  sources.description = index_path.string();
  std::map<std::string, size_t> file_of_shard;
  for (const auto& [tensor, shard] : weight_map) file_of_shard.emplace(shard, 0);
  sources.files.reserve(file_of_shard.size());
  for (auto& [shard, file_index] : file_of_shard) {
    const std::filesystem::path shard_path = model_dir / shard;
    std::error_code error;
    if (!std::filesystem::is_regular_file(shard_path, error)) {
      throw CheckpointError(sources.description + ": shard " + quote_name(shard) + " (" +
                            shard_path.string() + ") does not exist");
    }
    file_index = sources.files.size();
    add_file_tensors(sources, SafetensorsFile::open(shard_path));
  }
  check_shards_match_index(sources, weight_map, file_of_shard);
  return sources;
}

CheckpointSources open_sources(const std::filesystem::path& model_dir) {
  const std::filesystem::path single = model_dir / kSingleWeightsFileName;
  const std::filesystem::path index = model_dir / kWeightsIndexFileName;
  std::error_code error;
  if (std::filesystem::exists(single, error)) {
    CheckpointSources sources;
    sources.description = single.string();
    add_file_tensors(sources, SafetensorsFile::open(single));
    return sources;
  }
  if (std::filesystem::exists(index, error)) return open_sharded(model_dir, index);
  std::string hint;
  if (std::filesystem::exists(model_dir / "pytorch_model.bin", error) ||
      std::filesystem::exists(model_dir / "pytorch_model.bin.index.json", error)) {
    hint = " (found pytorch_model.bin: lomo reads safetensors only; convert it first)";
  }
  throw CheckpointError(model_dir.string() + ": no " + kSingleWeightsFileName + " or " +
                        kWeightsIndexFileName + hint);
}

// Tensors that older exports saved but that are recomputed, not learned.
bool is_ignorable_buffer(const std::string& name) { return name.ends_with("rotary_emb.inv_freq"); }

// Every parameter present with its shape, and nothing unknown beside them; checked before any
// tensor data is read so that a wrong checkpoint fails in milliseconds, not after gigabytes.
void check_tensors_match(const LlamaWeights& weights, const CheckpointSources& sources,
                         const std::filesystem::path& config_path) {
  std::set<std::string> expected;
  for (const Parameter& parameter : weights.parameters()) {
    expected.insert(parameter.name);
    const auto it = sources.tensors.find(parameter.name);
    if (it == sources.tensors.end()) {
      std::string why;
      if (parameter.name == "lm_head.weight") {
        why = " (" + config_path.string() + " says tie_word_embeddings is false)";
      }
      throw CheckpointError(sources.description + ": missing tensor " + quote_name(parameter.name) +
                            why);
    }
    const SafetensorsTensorInfo& info = sources.info(it->second);
    if (info.shape != parameter.shape) {
      throw CheckpointError(sources.files[it->second.file].path().string() + ": tensor " +
                            quote_name(parameter.name) + " has shape " + info.shape_string() +
                            ", but " + config_path.string() + " implies " +
                            parameter.shape_string());
    }
  }
  std::vector<std::string> unknown;
  for (const auto& [name, location] : sources.tensors) {
    if (expected.contains(name) || is_ignorable_buffer(name)) continue;
    // transformers ties the head to the embeddings and ignores a stored copy; so does lomo.
    if (name == "lm_head.weight" && weights.config().tie_word_embeddings) continue;
    unknown.push_back(name);
  }
  if (!unknown.empty()) {
    std::string list;
    for (size_t i = 0; i < unknown.size() && i < 5; ++i)
      list += (i ? ", " : "") + quote_name(unknown[i]);
    if (unknown.size() > 5) list += ", ...";
    throw CheckpointError(sources.description + ": " + std::to_string(unknown.size()) +
                          " tensor(s) that a LLaMA model does not have: " + list);
  }
}

// Conversion scratch, allocated on first need and reused by every tensor.
struct ConversionBuffers {
  Buffer raw;     // file dtype
  Buffer floats;  // fp32
};

void read_converted(const SafetensorsFile& file, const SafetensorsTensorInfo& info,
                    Parameter& parameter, ConversionBuffers& buffers,
                    MemoryAccountant& accountant) {
  const uint64_t numel = info.numel();
  const uint64_t chunk = std::min(numel, kConversionChunkElements);
  const size_t in_size = dtype_size(info.dtype);
  const size_t out_size = dtype_size(parameter.dtype);
  if (buffers.raw.size_bytes() < chunk * in_size) {
    buffers.raw = Buffer(accountant, MemoryKind::kWorkspace, chunk * in_size);
  }
  if (info.dtype != DType::kF32 && buffers.floats.size_bytes() < chunk * sizeof(float)) {
    buffers.floats = Buffer(accountant, MemoryKind::kWorkspace, chunk * sizeof(float));
  }
  auto* destination = parameter.storage.as<char>();
  for (uint64_t first = 0; first < numel; first += chunk) {
    const uint64_t count = std::min(chunk, numel - first);
    file.read_tensor_range(info, first * in_size, count * in_size, buffers.raw.data());
    const float* values = buffers.raw.as<float>();
    if (info.dtype != DType::kF32) {
      convert_to_float(info.dtype, buffers.raw.data(), buffers.floats.as<float>(), count);
      values = buffers.floats.as<float>();
    }
    convert_from_float(parameter.dtype, values, destination + first * out_size, count);
  }
}

void read_parameters(LlamaWeights& weights, const CheckpointSources& sources,
                     MemoryAccountant& accountant) {
  // File by file, in data order: sequential reads for disks that care.
  std::vector<std::pair<TensorLocation, Parameter*>> order;
  for (Parameter& parameter : weights.parameters()) {
    order.emplace_back(sources.tensors.at(parameter.name), &parameter);
  }
  std::sort(order.begin(), order.end(), [&sources](const auto& a, const auto& b) {
    return std::pair(a.first.file, sources.info(a.first).begin) <
           std::pair(b.first.file, sources.info(b.first).begin);
  });
  ConversionBuffers buffers;
  for (const auto& [location, parameter] : order) {
    const SafetensorsFile& file = sources.files[location.file];
    const SafetensorsTensorInfo& info = sources.info(location);
    if (info.dtype == parameter->dtype) {
      file.read_tensor_range(info, 0, info.size_bytes(), parameter->storage.data());
    } else {
      read_converted(file, info, *parameter, buffers, accountant);
    }
  }
}

std::vector<SafetensorsTensorView> tensor_views(const std::vector<const Parameter*>& parameters) {
  std::vector<SafetensorsTensorView> views;
  views.reserve(parameters.size());
  for (const Parameter* parameter : parameters) {
    views.push_back(
        {parameter->name, parameter->dtype, parameter->shape, parameter->storage.data()});
  }
  return views;
}

// Greedy in parameter order, as transformers shards: a shard closes when the next tensor would
// overflow it.
std::vector<std::vector<const Parameter*>> plan_shards(const LlamaWeights& weights,
                                                       uint64_t max_shard_bytes) {
  std::vector<std::vector<const Parameter*>> shards(1);
  uint64_t shard_bytes = 0;
  for (const Parameter& parameter : weights.parameters()) {
    const uint64_t bytes = parameter.size_bytes();
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&parameter);
    shard_bytes += bytes;
  }
  return shards;
}

std::string shard_file_name(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

bool is_shard_file_name(const std::string& name) {
  // model-DDDDD-of-DDDDD.safetensors
  constexpr std::string_view kPattern = "model-#####-of-#####.safetensors";
  if (name.size() != kPattern.size()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const bool digit = name[i] >= '0' && name[i] <= '9';
    if (kPattern[i] == '#' ? !digit : name[i] != kPattern[i]) return false;
  }
  return true;
}

// Weight files of an earlier save that the new layout does not list: left in place, a stale
// model.safetensors would even take precedence over a new index.
void remove_stale_weight_files(const std::filesystem::path& dir,
                               const std::set<std::string>& written) {
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    const bool weight_file =
        name == kSingleWeightsFileName || name == kWeightsIndexFileName || is_shard_file_name(name);
    if (weight_file && !written.contains(name)) std::filesystem::remove(entry.path());
  }
}

void write_sharded(const std::vector<std::vector<const Parameter*>>& shards,
                   const std::filesystem::path& dir, std::set<std::string>& written) {
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  json weight_map = json::object();
  uint64_t total_size = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string name = shard_file_name(i, shards.size());
    write_safetensors(dir / name, tensor_views(shards[i]), metadata);
    written.insert(name);
    for (const Parameter* parameter : shards[i]) {
      weight_map[parameter->name] = name;
      total_size += parameter->size_bytes();
    }
  }
  const json index = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
  write_file_atomically(dir / kWeightsIndexFileName, index.dump(2) + "\n");
  written.insert(kWeightsIndexFileName);
}

}  // namespace

LlamaWeights load_llama_checkpoint(const std::filesystem::path& model_dir, DType storage,
                                   MemoryAccountant& accountant) {
  std::error_code error;
  if (!std::filesystem::is_directory(model_dir, error)) {
    throw CheckpointError(model_dir.string() + ": not a model directory");
  }
  const std::filesystem::path config_path = model_dir / kConfigFileName;
  const LlamaConfig config = load_llama_config(config_path);
  const CheckpointSources sources = open_sources(model_dir);
  if (!accountant.device().is_cpu()) {
    // Files are read on the host: read into host weights, then copy them to the device. The host
    // copy is freed on return (a streamed per-tensor upload would need no host model).
    MemoryAccountant host_accountant;
    LlamaWeights host(config, storage, host_accountant);
    check_tensors_match(host, sources, config_path);
    read_parameters(host, sources, host_accountant);
    LlamaWeights weights(config, storage, accountant);
    weights.copy_values_from(host);
    return weights;
  }
  // Parameter buffers are only reserved here; their pages are touched when read into.
  LlamaWeights weights(config, storage, accountant);
  check_tensors_match(weights, sources, config_path);
  read_parameters(weights, sources, accountant);
  return weights;
}

void save_llama_checkpoint(const LlamaWeights& weights, const std::filesystem::path& dir,
                           const SaveOptions& options) {
  if (options.max_shard_bytes == 0) {
    throw std::invalid_argument("save_llama_checkpoint: max_shard_bytes must be positive");
  }
  if (!weights.parameters().empty() && !weights.parameters()[0].storage.device().is_cpu()) {
    // Files are written from the host: copy the device's weights back first.
    MemoryAccountant host_accountant;
    LlamaWeights host(weights.config(), weights.storage_dtype(), host_accountant);
    host.copy_values_from(weights);
    save_llama_checkpoint(host, dir, options);
    return;
  }
  std::filesystem::create_directories(dir);
  LlamaConfig config = weights.config();
  config.torch_dtype = weights.storage_dtype();
  write_file_atomically(dir / kConfigFileName, llama_config_to_json(config));

  const std::vector<std::vector<const Parameter*>> shards =
      plan_shards(weights, options.max_shard_bytes);
  std::set<std::string> written;
  if (shards.size() == 1) {
    write_safetensors(dir / kSingleWeightsFileName, tensor_views(shards[0]), {{"format", "pt"}});
    written.insert(kSingleWeightsFileName);
  } else {
    write_sharded(shards, dir, written);
  }
  remove_stale_weight_files(dir, written);
}

}  // namespace lomo
