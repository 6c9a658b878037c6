// Tokenizers loaded from a model directory: text to token ids and back.
//
// Two implementations sit behind one interface: BPE from a Hugging Face tokenizer.json
// (byte-level: LLaMA-3, Qwen2, GPT-2 style; SentencePiece-style conversions: Llama 2, Mistral,
// TinyLlama; bpe_tokenizer.h) and SentencePiece from tokenizer.model (LLaMA-1/2, Mistral;
// sentencepiece_tokenizer.h).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lomo {

// Ids of the tokens a training pipeline places itself; absent when the model has none.
struct SpecialTokenIds {
  std::optional<int32_t> bos;
  std::optional<int32_t> eos;
  std::optional<int32_t> pad;
};

// The model's own chat template: tokenizer_config.json's "chat_template" (the string, or the
// entry named "default" of a list of {name, template}), with the texts of the BOS and EOS tokens
// the template renders as bos_token and eos_token ("" when the model has none).
struct ModelChatTemplate {
  std::string source;
  std::string bos_token;
  std::string eos_token;
  std::string file;  // tokenizer_config.json's path, for messages
};

// Immutable after loading: every const method may be called from several threads at once.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text`, without BOS or EOS (callers add them). Deterministic. Text that is not
  // valid UTF-8 is accepted; see the implementation for how its bytes are treated.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;

  // encode() for text that continues a text whose last token was `previous_id`, as when a
  // template renders one text and its pieces are encoded one by one: the pieces then give the ids
  // the whole would (as far as no merge crosses from one piece into the next). What matters is
  // the dummy prefix (adds_dummy_prefix): none before the first added token of `text` when
  // `previous_id` is not an added token (the text goes on inside a section of the whole), and
  // none from a scheme that prefixes only where the whole text starts. By default encode(): right
  // for tokenizers without a dummy prefix. SentencePiece (tokenizer.model) and its tokenizer.json
  // conversion implement it.
  virtual std::vector<int32_t> encode_continuation(std::string_view text,
                                                   int32_t /*previous_id*/) const {
    return encode(text);
  }

  // The text of `ids`, special tokens included (for logs and samples). Ids with no token
  // (negative, >= vocab_size(), or unused) contribute nothing; byte sequences that do not form
  // UTF-8 become U+FFFD, so the result is always valid UTF-8.
  virtual std::string decode(std::span<const int32_t> ids) const = 0;

  // One more than the largest token id: the embedding rows the model needs at least.
  virtual int64_t vocab_size() const = 0;

  // The id of a token given by its text, e.g. "<|eot_id|>" or "</s>"; nullopt if there is none.
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;

  // Whether encode() marks the start of every text as the start of a word, as SentencePiece's
  // dummy prefix does: "answer" then encodes like " answer" would, so a caller that needs a
  // space before a piece it encodes on its own (the llama-2 chat template) leaves it out.
  virtual bool adds_dummy_prefix() const { return false; }

  std::optional<int32_t> bos_id() const { return special_ids_.bos; }
  std::optional<int32_t> eos_id() const { return special_ids_.eos; }
  std::optional<int32_t> pad_id() const { return special_ids_.pad; }
  const SpecialTokenIds& special_token_ids() const { return special_ids_; }

  // Replaces the special token ids. Throws std::invalid_argument if an id is outside
  // [0, vocab_size()).
  void set_special_token_ids(const SpecialTokenIds& ids);

  const std::optional<ModelChatTemplate>& chat_template() const { return chat_template_; }
  void set_chat_template(std::optional<ModelChatTemplate> chat_template) {
    chat_template_ = std::move(chat_template);
  }

 private:
  SpecialTokenIds special_ids_;
  std::optional<ModelChatTemplate> chat_template_;
};

// Loads the tokenizer of a Hugging Face model directory: tokenizer.json when present (as
// transformers does), else tokenizer.model (SentencePiece). Where both are present and lomo
// refuses a tokenizer.json that is not byte-level BPE (a SentencePiece-style conversion with a
// feature lomo lacks), tokenizer.model. Special token ids come, in this order of
// precedence, from tokenizer_config.json (bos_token / eos_token / pad_token: a token string or an
// object with "content"; null means none), config.json (bos_token_id / eos_token_id /
// pad_token_id: an integer or a list of integers, of which the first counts; negative means none,
// null means unspecified), and the tokenizer itself (SentencePiece's own BOS/EOS/pad ids).
//
// Throws std::runtime_error when no tokenizer file exists or a file cannot be read, and
// std::invalid_argument for a malformed or unsupported file; both name the file and, where there
// is one, the field.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& model_dir);

// The special token ids that tokenizer_config.json and config.json in `model_dir` give for
// `tokenizer` (either file may be absent), falling back to `tokenizer`'s current ids. Errors as
// load_tokenizer.
SpecialTokenIds read_special_token_ids(const std::filesystem::path& model_dir,
                                       const Tokenizer& tokenizer);

// tokenizer_config.json's chat template in `model_dir`, if the file has one. Throws
// std::invalid_argument (naming the file and field) for a chat_template of the wrong shape.
std::optional<ModelChatTemplate> read_chat_template(const std::filesystem::path& model_dir);

}  // namespace lomo
