#include "client/spec_struct.h"

#include <google/protobuf/util/json_util.h>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdlib>
#include <regex>
#include <stdexcept>

namespace lomo::client {
namespace {

using google::protobuf::Value;

// YAML 1.2 core-schema numbers, as the spec parser accepts them; "007" stays a string (a number
// would lose its zeros).
bool looks_like_number(const std::string& text) {
  static const std::regex integer(R"(^-?(0|[1-9][0-9]*)$)");
  static const std::regex decimal(R"(^-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][-+]?[0-9]+)?$)");
  if (std::regex_match(text, integer)) return true;
  if (text.empty() || text == "-" || text == "." || text == "-.") return false;
  if (!std::regex_match(text, decimal)) return false;
  return text.find_first_of("0123456789") != std::string::npos &&
         text.find_first_of(".eE") != std::string::npos;
}

Value to_value(const YAML::Node& node) {
  Value value;
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      value.set_null_value(google::protobuf::NULL_VALUE);
      return value;
    case YAML::NodeType::Sequence: {
      auto* list = value.mutable_list_value();
      for (const auto& item : node) *list->add_values() = to_value(item);
      return value;
    }
    case YAML::NodeType::Map: {
      auto* fields = value.mutable_struct_value()->mutable_fields();
      for (auto it = node.begin(); it != node.end(); ++it) {
        (*fields)[it->first.Scalar()] = to_value(it->second);
      }
      return value;
    }
    case YAML::NodeType::Scalar:
      break;
  }
  const std::string& text = node.Scalar();
  if (node.Tag() != "!") {  // plain: typed by its text
    if (text == "null" || text == "~") {
      value.set_null_value(google::protobuf::NULL_VALUE);
      return value;
    }
    if (text == "true" || text == "false") {
      value.set_bool_value(text == "true");
      return value;
    }
    if (looks_like_number(text)) {
      const double number = std::strtod(text.c_str(), nullptr);
      if (std::isfinite(number)) {
        value.set_number_value(number);
        return value;
      }
    }
  }
  value.set_string_value(text);
  return value;
}

}  // namespace

google::protobuf::Struct job_spec_to_struct(const JobSpec& spec) {
  const YAML::Node root = YAML::Load(job_spec_to_yaml(spec));
  Value value = to_value(root);
  if (!value.has_struct_value()) throw std::logic_error("job_spec_to_yaml did not give a map");
  return value.struct_value();
}

std::string struct_to_json(const google::protobuf::Struct& value) {
  std::string json;
  google::protobuf::util::MessageToJsonString(value, &json);
  return json;
}

}  // namespace lomo::client
