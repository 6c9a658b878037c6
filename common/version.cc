#include "common/version.h"

namespace lomo {

std::string version_text(const std::string& program) {
  return program + " " + LOMO_BUILD_VERSION + " (revision " + LOMO_BUILD_REVISION + ", " +
         LOMO_BUILD_TYPE + ", " + LOMO_BUILD_ISA + ")\n";
}

bool asks_for_version(const std::vector<std::string>& args) {
  return !args.empty() && args.front() == "--version";
}

}  // namespace lomo
