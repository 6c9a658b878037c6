#include "common/api_json.h"

#include <google/protobuf/util/json_util.h>

#include <stdexcept>

namespace lomo {

std::string api_json(const google::protobuf::Message& message, bool pretty) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = pretty;
  options.always_print_primitive_fields = true;  // dashboards see every field, zero or not
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok()) {
    throw std::runtime_error("cannot encode " + message.GetTypeName() +
                             " as JSON: " + std::string(status.message()));
  }
  if (!json.empty() && json.back() == '\n') json.pop_back();
  return json;
}

}  // namespace lomo
