#include "common/flags.h"

#include <charconv>

namespace lomo {

ParsedFlags parse_flags(const std::vector<std::string>& args, const FlagRules& rules) {
  ParsedFlags parsed;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") {
      parsed.help = true;
      return parsed;
    }
    if (arg.rfind("--", 0) != 0) {
      if (!rules.allow_positional) throw FlagError("unexpected argument \"" + arg + "\"");
      parsed.positional.push_back(arg);
      continue;
    }
    const size_t equals = arg.find('=');
    if (equals != std::string::npos) {
      parsed.flags.emplace_back(arg.substr(0, equals), arg.substr(equals + 1));
    } else if (rules.switches.count(arg)) {
      parsed.flags.emplace_back(arg, "true");
    } else if (i + 1 < args.size()) {
      parsed.flags.emplace_back(arg, args[++i]);
    } else {
      throw FlagError(arg + ": needs a value");
    }
  }
  return parsed;
}

double flag_double(const std::string& flag, const std::string& value) {
  double number = 0;
  const auto result = std::from_chars(value.data(), value.data() + value.size(), number);
  if (result.ec != std::errc() || result.ptr != value.data() + value.size()) {
    throw FlagError(flag + ": expected a number, got \"" + value + "\"");
  }
  return number;
}

int64_t flag_int(const std::string& flag, const std::string& value) {
  int64_t number = 0;
  const auto result = std::from_chars(value.data(), value.data() + value.size(), number);
  if (result.ec != std::errc() || result.ptr != value.data() + value.size()) {
    throw FlagError(flag + ": expected an integer, got \"" + value + "\"");
  }
  return number;
}

std::chrono::milliseconds flag_seconds(const std::string& flag, const std::string& value) {
  double seconds = 0;
  const auto result = std::from_chars(value.data(), value.data() + value.size(), seconds);
  if (result.ec != std::errc() || result.ptr != value.data() + value.size() || !(seconds >= 0)) {
    throw FlagError(flag + ": expected seconds (a number >= 0), got \"" + value + "\"");
  }
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

}  // namespace lomo
