// Fuzzes the Jinja subset's parser and renderer with arbitrary template text. Parsing and
// rendering may fail only with TemplateError; a template that parses renders a fixed
// conversation or fails with TemplateError. Anything else (a crash, a sanitizer report, another
// exception, unbounded recursion) is a finding.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string_view>

#include "worker/data/jinja.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Deeply nested expressions recurse in the parser; real templates are a few KB.
  if (size > 4096) return -1;
  const std::string_view source(reinterpret_cast<const char*>(data), size);
  static const nlohmann::ordered_json context = nlohmann::ordered_json::parse(R"({
    "messages": [{"role": "user", "content": " Hi "},
                 {"role": "assistant", "content": "Hello", "tool_calls": [{"function":
                 {"name": "f", "arguments": {"a": 1}}}]}],
    "bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": true,
    "tools": [{"type": "function", "function": {"name": "f"}}]})");
  try {
    const lomo::jinja::Template tmpl(source, "fuzz");
    (void)tmpl.render(context);
  } catch (const lomo::jinja::TemplateError&) {
    return -1;
  }
  return 0;
}
