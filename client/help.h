// `lomoctl COMMAND --help`: each command's synopsis, flags and examples.
#pragma once

#include <optional>
#include <string>

namespace lomo::client {

// The help text of `command` ("submit", ...); nullopt for a name that is not a command.
std::optional<std::string> command_help(const std::string& command);

}  // namespace lomo::client
