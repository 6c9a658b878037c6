// What `--version` prints on every lomo binary: the program, LOMO_VERSION and the git revision the
// build was configured at, the same values lomo_build_info carries on /metrics.
#pragma once

#include <string>
#include <vector>

namespace lomo {

// "lomoctl 0.1.0 (revision 1a2b3c4d5e6f, Release, native)\n".
std::string version_text(const std::string& program);

// True when the command line asks for the version: its first argument is "--version" (or
// "version" for lomoctl-style command programs, which the caller decides to accept).
bool asks_for_version(const std::vector<std::string>& args);

}  // namespace lomo
