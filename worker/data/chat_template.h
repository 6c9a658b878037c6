// Prompt templates: how a conversation, an Alpaca record or a prompt/completion pair becomes one
// token sequence with a trainable mask.
//
// Rules shared by every template:
//   - A template's special tokens are placed by id (Tokenizer::token_to_id), never by encoding
//     their text; a tokenizer without one of them is refused when the template is set up.
//   - Every piece of text is encoded on its own (Tokenizer::encode), so the boundary between a
//     prompt and its response is always a token boundary. (Encoding the rendered text in one go,
//     as Hugging Face's apply_chat_template does, can differ where a merge would cross a piece
//     boundary.) Note that BPE tokenizers match their added tokens inside text: content that
//     spells "<|eot_id|>" becomes that token, as it does in Hugging Face's tokenizers.
//   - "Trainable" below means the token is a training target; with train_on_prompt every token
//     is (the first one is still never a target: nothing predicts it).
//
// Chat templates. Roles are system, user and assistant. Trainable: the assistant's content and
// the token that ends its turn; headers, role names, system and user turns are not.
//   llama-3 (Meta Llama 3 Instruct):
//       <|begin_of_text|> then per message
//       <|start_header_id|> "role" <|end_header_id|> "\n\n" "content"* <|eot_id|>
//     where "content"* is the content with surrounding whitespace removed (the template's trim).
//     Any order of roles. Trainable for assistant messages: content and <|eot_id|>.
//   chatml (Qwen, OpenAI ChatML):
//       per message  <|im_start|> "role\n" "content" <|im_end|> "\n"
//     No BOS. Any order of roles. Trainable for assistant messages: content and <|im_end|> (not
//     the "\n" after it).
//   llama-2 (Meta Llama 2 Chat, as Meta's reference chat_completion tokenizes it):
//       per user turn   <s> "[INST] " [sys] "user*" " [/INST]"
//       its answer      " assistant* " </s>
//     with [sys] = "<<SYS>>\n" system* "\n<</SYS>>\n\n" in the first turn when the conversation
//     starts with a system message, * meaning whitespace-stripped, and <s>, </s> the tokens of
//     those names. An optional leading system message, then user and assistant alternating,
//     starting with user. Trainable: the answer text and </s>. With a tokenizer that adds a dummy
//     prefix (SentencePiece, and SentencePiece-style tokenizer.json: Tokenizer::adds_dummy_prefix)
//     the answer's leading space is left to it (encoding "answer " gives "▁answer ▁", as Meta's
//     joint encoding does); other tokenizers encode " answer ".
//
// Alpaca (Stanford Alpaca's prompts; "input" absent or empty selects the second):
//     BOS? "Below is an instruction that describes a task, paired with an input that provides
//     further context. Write a response that appropriately completes the request.\n\n
//     ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n" "output" EOS?
//   or "Below is an instruction that describes a task. Write a response that appropriately
//     completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n" "output" EOS?
//   Trainable: output and EOS. BOS? / EOS? are the tokenizer's, when it has them.
// Prompt/completion: BOS? "prompt" "completion" EOS?; trainable: completion and EOS.
// Plain text: BOS? "text" EOS?; everything trainable.
// Multiple-choice candidate: BOS? "context" "candidate" EOS?; trainable (scored): the candidate
//   and EOS. Put any separating space in the context or the candidate yourself.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/data_format.h"
#include "worker/data/jinja.h"
#include "worker/data/token_sample.h"
#include "worker/data/tokenizer.h"

namespace lomo {

enum class ChatRole { kSystem, kUser, kAssistant };

struct ChatMessage {
  ChatRole role;
  std::string_view content;
};

// Appends encoded text and special tokens to one sample, each with its trainable flag.
class SampleBuilder {
 public:
  // `tokenizer` must outlive the builder. With train_on_prompt every token is trainable.
  SampleBuilder(const Tokenizer& tokenizer, bool train_on_prompt);

  void token(int32_t id, bool response);
  void text(std::string_view text, bool response);
  // Text that continues the text of the sample's tokens so far in one rendered string
  // (Tokenizer::encode_continuation): no dummy prefix where the whole string has none.
  void continuation(std::string_view text, bool response);
  void bos();  // the tokenizer's BOS, if any (never trainable unless train_on_prompt)
  void eos();  // the tokenizer's EOS, if any (trainable: it ends a response)
  TokenSample take() { return std::move(sample_); }

 private:
  void append(const std::vector<int32_t>& ids, bool response);

  const Tokenizer& tokenizer_;
  bool train_on_prompt_;
  TokenSample sample_;
};

// The model's own chat template (tokenizer_config.json's Jinja chat_template, jinja.h), rendered
// as transformers' apply_chat_template renders it, with messages [{role, content}], bos_token,
// eos_token and add_generation_prompt. Trainable spans are found by rendering prefixes: for the
// assistant message i, the text after rendering messages [0, i) with add_generation_prompt and
// up to rendering messages [0, i] without it, i.e. its content and whatever the template closes
// its turn with (Llama 3's <|eot_id|>, ChatML's <|im_end|> and newline, Mistral's </s>). A
// template whose renderings are not prefixes of each other there (one that moves content
// between turns) is refused for that record rather than guessed at. The rendered text is
// encoded span by span, as the built-in templates encode their pieces, so a template's special
// tokens become their ids by the tokenizer's added-token matching (BPE tokenizers, including
// SentencePiece-style tokenizer.json; a SentencePiece tokenizer.model encodes "<s>" as text).
// Spans after the first are encoded as continuations (Tokenizer::encode_continuation), so a
// SentencePiece-style tokenizer.json puts no "▁" at their start that the whole text lacks.
class JinjaChatFormatter {
 public:
  // Throws std::invalid_argument naming the file and the position of a template error.
  JinjaChatFormatter(const ModelChatTemplate& chat_template, const Tokenizer& tokenizer);

  // Throws RecordError: "messages" when the template raises (raise_exception) or fails on the
  // conversation, "messages[i]" when prefixes do not line up at assistant message i.
  TokenSample format(std::span<const ChatMessage> messages, bool train_on_prompt) const;

  // The prompt for the model's reply to `messages`: the conversation rendered with
  // add_generation_prompt and encoded in one piece, as transformers' apply_chat_template(...,
  // add_generation_prompt=True, tokenize=True) does. Throws std::invalid_argument naming the
  // file when the template raises or fails.
  std::vector<int32_t> generation_prompt(std::span<const ChatMessage> messages) const;

  const ModelChatTemplate& source() const { return source_; }

 private:
  std::string render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  std::shared_ptr<const jinja::Template> template_;
  ModelChatTemplate source_;
  const Tokenizer& tokenizer_;
};

// A chat template with its special token ids resolved for one tokenizer.
class ChatFormatter {
 public:
  // Throws std::invalid_argument ("chat template llama-3 needs the token <|eot_id|>, which the
  // tokenizer does not have") when the tokenizer lacks one of the template's tokens.
  ChatFormatter(ChatTemplate chat_template, const Tokenizer& tokenizer);

  // The conversation as a sample (see the file comment). Throws RecordError (field
  // "messages[i].role") when the roles' order does not fit the template, or "messages" when
  // the conversation is empty.
  TokenSample format(std::span<const ChatMessage> messages, bool train_on_prompt) const;

  ChatTemplate chat_template() const { return template_; }

 private:
  ChatTemplate template_;
  const Tokenizer& tokenizer_;
  std::vector<int32_t> special_;  // the template's tokens, in the order the .cc lists them
  bool dummy_prefix_ = false;     // Tokenizer::adds_dummy_prefix
};

// The Stanford Alpaca prompt for an instruction and an optional input ("" for none).
std::string alpaca_prompt(std::string_view instruction, std::string_view input);

}  // namespace lomo
