// Command-line flags the way every lomo program takes them: "--name value" or "--name=value",
// "--help" or "-h", and positional arguments only where a program allows them. The parser only
// splits; each program maps names to settings and applies them in its own order (lomo-coordinator
// reads --config first, whatever its position).
#pragma once

#include <chrono>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lomo {

// A command line that cannot be used; what() names the flag ("--threads: needs a value").
class FlagError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// What a flag not named in `switches` or `with_value` is.
enum class UnknownFlags {
  kTakeValue,  // a flag that takes a value; the program checks the names (lomo-coordinator)
  kRefuse,     // an error, "--x: unknown flag"; so is any unnamed "-x"
  kPassOn,     // kept as a positional argument, in place, for a later parse (lomoctl's command)
};

struct FlagRules {
  std::set<std::string> switches{};  // flags that take no value ("--follow"): their value is "true"
  bool allow_positional = false;     // otherwise an argument that is not a flag is an error
  std::set<std::string> with_value{};  // flags that take one; a short "-o" is a flag only if named
  UnknownFlags unknown = UnknownFlags::kTakeValue;
};

struct ParsedFlags {
  std::vector<std::pair<std::string, std::string>> flags;  // (name with "--", value), in order
  std::vector<std::string> positional;
  bool help = false;  // --help or -h was given (parsing stops there)
};

// Throws FlagError for a flag without its value, a switch given one, an unknown flag (kRefuse) or
// an unexpected positional argument. A flag may repeat; every occurrence is kept.
ParsedFlags parse_flags(const std::vector<std::string>& args, const FlagRules& rules = {});

// Values, with errors that name the flag. Throw FlagError.
double flag_double(const std::string& flag, const std::string& value);
int64_t flag_int(const std::string& flag, const std::string& value);
// A duration in seconds ("2.5"), >= 0, to the millisecond.
std::chrono::milliseconds flag_seconds(const std::string& flag, const std::string& value);

}  // namespace lomo
