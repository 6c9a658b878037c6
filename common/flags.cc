#include "common/flags.h"

#include <charconv>

namespace lomo {

namespace {

bool named(const FlagRules& rules, const std::string& name) {
  return rules.switches.count(name) > 0 || rules.with_value.count(name) > 0;
}

// "--x" always; "-x" only when named, or when unknown flags are refused (so that "-f" is not taken
// for a positional argument by a program that does not know it).
bool is_flag(const std::string& arg, const FlagRules& rules) {
  if (arg.rfind("--", 0) == 0 || named(rules, arg)) return true;
  return rules.unknown == UnknownFlags::kRefuse && arg.size() >= 2 && arg[0] == '-';
}

}  // namespace

ParsedFlags parse_flags(const std::vector<std::string>& args, const FlagRules& rules) {
  ParsedFlags parsed;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") {
      parsed.help = true;
      return parsed;
    }
    if (!is_flag(arg, rules)) {
      if (!rules.allow_positional) throw FlagError("unexpected argument \"" + arg + "\"");
      parsed.positional.push_back(arg);
      continue;
    }
    // Only a long flag carries its value after '=': "-o=json" is not "-o json".
    const size_t equals = arg.rfind("--", 0) == 0 ? arg.find('=') : std::string::npos;
    const std::string name = arg.substr(0, equals);
    if (!named(rules, name) && rules.unknown == UnknownFlags::kRefuse) {
      throw FlagError(name + ": unknown flag");
    }
    if (!named(rules, name) && rules.unknown == UnknownFlags::kPassOn) {
      parsed.positional.push_back(arg);
    } else if (rules.switches.count(name)) {
      if (equals != std::string::npos) throw FlagError(name + ": takes no value");
      parsed.flags.emplace_back(name, "true");
    } else if (equals != std::string::npos) {
      parsed.flags.emplace_back(name, arg.substr(equals + 1));
    } else if (i + 1 < args.size()) {
      parsed.flags.emplace_back(name, args[++i]);
    } else {
      throw FlagError(name + ": needs a value");
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
