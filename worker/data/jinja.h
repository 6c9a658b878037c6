// A small Jinja engine for the chat templates of Hugging Face tokenizer_config.json files, with
// the environment transformers' apply_chat_template renders them in: trim_blocks and
// lstrip_blocks on, loop controls (break/continue), raise_exception(), namespace(), tojson as
// transformers defines it (json.dumps with ensure_ascii=False), {% generation %} blocks rendered
// as their content. strftime_now is not provided (templates then fall back to their default
// date, or take date_string from the context).
//
// The subset: text, {{ }}, {% %}, {# #} with "-"/"+" whitespace control; if/elif/else,
// for (loop.index/index0/first/last/length/revindex, else, "for a, b in ..."), set (names and
// namespace attributes; the block form {% set x %}...{% endset %}), macro (parameters with
// defaults, keyword arguments, recursion up to 64 calls deep; no varargs or caller), break,
// continue; expressions with literals, lists, dicts, attribute and
// item access, slices, calls, filters, tests, arithmetic, ~, comparisons, in, and/or/not, and
// conditional expressions; the filters, tests, string and dict methods that the templates of
// Llama 3.x, Mistral, Qwen2.5, ChatML, Gemma and Phi-3 use (listed in jinja.cc). Values print as
// Python prints them (None, True, 1.0, ['a']). Anything outside the subset is an error naming the
// template and its line and column, at parse time where the parser can tell.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>

namespace lomo::jinja {

// A parse or render error: "chat template <name>:<line>:<column>: <what>".
class TemplateError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Template {
 public:
  // Parses `source`; `name` (e.g. "model/tokenizer_config.json chat_template") names it in
  // errors. Throws TemplateError.
  Template(std::string_view source, std::string name);
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;

  // Renders with the variables of `context` (a JSON object: messages, bos_token,
  // add_generation_prompt, ...). Ordered JSON: objects keep their key order, as Python's dicts
  // do, which tojson and items() show. Throws TemplateError, raise_exception's included.
  std::string render(const nlohmann::ordered_json& context) const;

  const std::string& name() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace lomo::jinja
