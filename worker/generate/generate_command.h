// `lomo-worker generate`: the command line around generation.h.
//
//   lomo-worker generate --model DIR (--prompt TEXT | --prompt-file FILE | --prompt-ids 1,2,3)
//       [--chat [--system TEXT] [--chat-template auto|llama-3|chatml|llama-2]]
//       [--tokenizer DIR|bytes]
//       [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//       [--stop STRING]... [--json]
//
// DIR is a Hugging Face model directory or a lomo checkpoint (the same layout). Greedy when the
// temperature is 0 (the default). Generation stops at the model's eos ids
// (generation_config.json, else config.json), at the end of the assistant's turn in chat mode,
// at a --stop string, or after --max-new-tokens. Prints the new text (the new ids, space
// separated, for a model without a tokenizer), or with --json one object:
// (Chat mode renders tokenizer_config.json's chat_template, as transformers' apply_chat_template
// does, unless a built-in template is named; without one it falls back to the built-in template
// that fits the tokenizer's tokens and says so on stderr.)
// {"promptTokens": [...], "tokens": [...], "text": "...", "stopReason": "stop_token"}.
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace lomo {

inline constexpr const char* kGenerateUsage =
    "  lomo-worker generate --model DIR (--prompt TEXT | --prompt-file FILE | --prompt-ids 1,2,3)\n"
    "                    [--chat [--system TEXT] [--chat-template auto|llama-3|chatml|llama-2]]\n"
    "                    [--tokenizer DIR|bytes] [--max-new-tokens N (128)] [--temperature T (0)]\n"
    "                    [--top-k K (0: off)] [--top-p P (1: off)] [--seed S (0)]\n"
    "                    [--stop STRING]... [--json]\n"
    "      text from a model directory or lomo checkpoint with a KV cache (CPU); greedy at\n"
    "      temperature 0; stops at the model's eos ids, a --stop string or the token budget;\n"
    "      --chat renders the model's own chat_template (auto) unless a built-in one is named\n";

// Runs the command on `args` (after "generate"). Returns the exit code: 0, 2 for a command line
// that cannot be used (the problem on `err`), 1 when generation fails (the error on `err`).
int generate_command(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace lomo
