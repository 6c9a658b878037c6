// `lomoctl local`: a coordinator and one CPU worker started as child processes with their state in
// a local directory, one job submitted and watched to its end, its final checkpoint downloaded, and
// both processes stopped. The README's main command.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace lomo::client {

// The program to run for `name`: `flag` when given, else $`env_var`, else the first of
// `candidates` that is an executable file, else `name` looked up in PATH. Throws
// std::runtime_error saying where it looked.
std::filesystem::path find_program(const std::string& name, const std::optional<std::string>& flag,
                                   const char* env_var,
                                   const std::vector<std::filesystem::path>& candidates);

// The coordinator's gRPC address from its --ready-file JSON ({"grpc": "host:port", ...}), or
// nullopt while the file is absent or incomplete.
std::optional<std::string> read_ready_address(const std::filesystem::path& ready_file);

}  // namespace lomo::client
