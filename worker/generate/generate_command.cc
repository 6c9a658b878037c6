#include "worker/generate/generate_command.h"

#include <charconv>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "common/flags.h"
#include "worker/data/byte_tokenizer.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/engine/memory.h"
#include "worker/generate/generation.h"

namespace lomo {

namespace {

namespace fs = std::filesystem;

struct GenerateArgs {
  fs::path model_dir, tokenizer_dir;
  std::optional<std::string> prompt_text;          // --prompt or the contents of --prompt-file
  std::optional<std::vector<int32_t>> prompt_ids;  // --prompt-ids
  bool chat = false, json = false;
  std::string system;
  bool chat_template_given = false;
  std::optional<ChatTemplate> chat_template;  // a built-in one; none: the model's own (auto)
  GenerationOptions options;
};

// A command line that cannot be used: exit code 2.
class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

std::vector<int32_t> parse_ids(const std::string& value) {
  std::vector<int32_t> ids;
  const char* at = value.data();
  const char* end = value.data() + value.size();
  while (at < end) {
    int32_t id = 0;
    const auto [next, error] = std::from_chars(at, end, id);
    if (error != std::errc() || id < 0 || (next != end && *next != ',')) {
      throw UsageError("--prompt-ids: expected token ids separated by commas (\"1,2,3\"), got \"" +
                       value + "\"");
    }
    ids.push_back(id);
    at = next == end ? end : next + 1;
  }
  if (ids.empty()) throw UsageError("--prompt-ids: no token ids");
  return ids;
}

std::string read_prompt_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("--prompt-file: cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

void apply_flag(GenerateArgs& a, const std::string& flag, const std::string& value,
                int* prompt_sources) {
  if (flag == "--model") {
    a.model_dir = value;
  } else if (flag == "--tokenizer") {
    a.tokenizer_dir = value;
  } else if (flag == "--prompt" || flag == "--prompt-file") {
    ++*prompt_sources;
    a.prompt_text = flag == "--prompt" ? value : read_prompt_file(value);
  } else if (flag == "--prompt-ids") {
    ++*prompt_sources;
    a.prompt_ids = parse_ids(value);
  } else if (flag == "--chat") {
    a.chat = true;
  } else if (flag == "--json") {
    a.json = true;
  } else if (flag == "--system") {
    a.system = value;
  } else if (flag == "--chat-template") {
    a.chat_template_given = true;
    if (value != "auto") {
      a.chat_template = chat_template_from_name(value);
      if (!a.chat_template) {
        throw UsageError("--chat-template: expected auto, llama-3, chatml or llama-2, got \"" +
                         value + "\"");
      }
    }
  } else if (flag == "--max-new-tokens") {
    a.options.max_new_tokens = flag_int(flag, value);
    if (a.options.max_new_tokens < 1) throw UsageError("--max-new-tokens: must be >= 1");
  } else if (flag == "--temperature") {
    a.options.sampling.temperature = flag_double(flag, value);
  } else if (flag == "--top-k") {
    a.options.sampling.top_k = flag_int(flag, value);
  } else if (flag == "--top-p") {
    a.options.sampling.top_p = flag_double(flag, value);
  } else if (flag == "--seed") {
    const int64_t seed = flag_int(flag, value);
    if (seed < 0) throw UsageError("--seed: must be >= 0");
    a.options.sampling.seed = static_cast<uint64_t>(seed);
  } else if (flag == "--stop") {
    if (value.empty()) throw UsageError("--stop: the stop string is empty");
    a.options.stop_strings.push_back(value);
  }
}

// Throws UsageError or FlagError; nullopt for --help.
std::optional<GenerateArgs> parse_args(const std::vector<std::string>& args) {
  const ParsedFlags parsed = parse_flags(
      args, {.switches = {"--chat", "--json"},
             .with_value = {"--model", "--tokenizer", "--prompt", "--prompt-file", "--prompt-ids",
                            "--system", "--chat-template", "--max-new-tokens", "--temperature",
                            "--top-k", "--top-p", "--seed", "--stop"},
             .unknown = UnknownFlags::kRefuse});
  if (parsed.help) return std::nullopt;
  GenerateArgs a;
  int prompt_sources = 0;
  for (const auto& [flag, value] : parsed.flags) apply_flag(a, flag, value, &prompt_sources);
  if (a.model_dir.empty()) throw UsageError("--model DIR is required");
  if (prompt_sources != 1) {
    throw UsageError("give exactly one of --prompt, --prompt-file and --prompt-ids");
  }
  if (a.chat && a.prompt_ids) throw UsageError("--chat needs a text prompt, not --prompt-ids");
  if (!a.chat && (!a.system.empty() || a.chat_template_given)) {
    throw UsageError("--system and --chat-template need --chat");
  }
  try {
    a.options.sampling.validate();
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--") + e.what());
  }
  if (a.tokenizer_dir.empty()) a.tokenizer_dir = a.model_dir;
  return a;
}

bool has_tokenizer(const fs::path& dir) {
  return fs::exists(dir / "tokenizer.json") || fs::exists(dir / "tokenizer.model");
}

// The chat prompt: with the model's own template (tokenizer_config.json's chat_template) unless
// a built-in one is named; a tokenizer without a template gets the built-in one that fits its
// tokens, said on `err` so that a wrong guess is visible.
std::vector<int32_t> chat_prompt_tokens(GenerateArgs& a, const Tokenizer& tokenizer,
                                        std::ostream& err) {
  if (!a.chat_template && tokenizer.chat_template()) {
    return model_chat_prompt(*tokenizer.chat_template(), tokenizer, a.system, *a.prompt_text,
                             &a.options.stop_token_ids);
  }
  ChatTemplate t = ChatTemplate::kLlama2;
  if (a.chat_template) {
    t = *a.chat_template;
  } else {
    t = detect_chat_template(tokenizer);
    err << "lomo-worker generate: " << (a.tokenizer_dir / "tokenizer_config.json").string()
        << " has no chat_template; using the built-in " << chat_template_name(t)
        << " template (--chat-template NAME chooses another)\n";
  }
  return chat_prompt(t, tokenizer, a.system, *a.prompt_text, &a.options.stop_token_ids);
}

// The prompt's token ids; adds the chat template's end of turn to the stop ids.
std::vector<int32_t> prompt_tokens(GenerateArgs& a, const Tokenizer* tokenizer, std::ostream& err) {
  if (a.prompt_ids) return *a.prompt_ids;
  if (a.chat) return chat_prompt_tokens(a, *tokenizer, err);
  // As transformers' tokenizer(text) does for models that have a BOS token.
  std::vector<int32_t> ids;
  if (tokenizer->bos_id()) ids.push_back(*tokenizer->bos_id());
  const std::vector<int32_t> text = tokenizer->encode(*a.prompt_text);
  ids.insert(ids.end(), text.begin(), text.end());
  return ids;
}

void print_result(const GenerateArgs& a, const std::vector<int32_t>& prompt,
                  const GenerationResult& result, const Tokenizer* tokenizer, std::ostream& out) {
  if (a.json) {
    nlohmann::json json = {{"promptTokens", prompt},
                           {"tokens", result.tokens},
                           {"stopReason", stop_reason_name(result.stop_reason)}};
    if (tokenizer != nullptr) json["text"] = result.text;
    out << json.dump() << "\n";
  } else if (tokenizer != nullptr) {
    out << result.text << "\n";
  } else {
    for (size_t i = 0; i < result.tokens.size(); ++i) out << (i ? " " : "") << result.tokens[i];
    out << "\n";
  }
}

int run(GenerateArgs& a, std::ostream& out, std::ostream& err) {
  MemoryAccountant accountant;
  LlamaWeights weights = load_llama_checkpoint(a.model_dir, DType::kF32, accountant);
  const bool needs_tokenizer = a.prompt_text || !a.options.stop_strings.empty();
  std::unique_ptr<Tokenizer> tokenizer;
  if (a.tokenizer_dir == "bytes") {
    // The job spec's tokenizer kind `bytes` (the tiny demo models): no files to load.
    tokenizer = std::make_unique<ByteTokenizer>();
  } else if (needs_tokenizer || has_tokenizer(a.tokenizer_dir)) {
    if (!has_tokenizer(a.tokenizer_dir)) {
      throw UsageError(a.tokenizer_dir.string() +
                       " has no tokenizer.json or tokenizer.model: give --prompt-ids, "
                       "--tokenizer DIR, or --tokenizer bytes for a model trained with "
                       "tokenizer.kind bytes");
    }
    tokenizer = load_tokenizer(a.tokenizer_dir);
  }
  a.options.stop_token_ids = model_stop_token_ids(a.model_dir);
  const std::vector<int32_t> prompt = prompt_tokens(a, tokenizer.get(), err);
  const LlamaConfig& config = weights.config();
  const int64_t needed = static_cast<int64_t>(prompt.size()) + a.options.max_new_tokens - 1;
  if (needed > config.max_position_embeddings) {
    throw UsageError("the prompt (" + std::to_string(prompt.size()) + " tokens) and " +
                     "--max-new-tokens " + std::to_string(a.options.max_new_tokens) +
                     " exceed the model's max_position_embeddings " +
                     std::to_string(config.max_position_embeddings));
  }
  KvCacheModel model(weights, accountant, needed);
  const GenerationResult result = generate(model, prompt, a.options, tokenizer.get());
  print_result(a, prompt, result, tokenizer.get(), out);
  return 0;
}

}  // namespace

int generate_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::optional<GenerateArgs> parsed;
  try {
    parsed = parse_args(args);
    if (!parsed) {
      out << "usage:\n" << kGenerateUsage;
      return 0;
    }
    return run(*parsed, out, err);
  } catch (const UsageError& e) {
    err << "lomo-worker generate: " << e.what() << "\nusage:\n" << kGenerateUsage;
    return 2;
  } catch (const FlagError& e) {
    err << "lomo-worker generate: " << e.what() << "\nusage:\n" << kGenerateUsage;
    return 2;
  } catch (const std::exception& e) {
    err << "lomo-worker generate: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace lomo
