// lomoctl's commands. Each returns the process exit status: 0 done (watch: the job SUCCEEDED),
// 1 the job FAILED, 2 it was CANCELLED (watch, submit --watch, local), 3 lomoctl could not do what
// was asked (bad usage, coordinator unreachable, request rejected). Errors are thrown
// (ClientError, JobSpecError, UsageError) and printed by main.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "apiclient/lomo_client.h"
#include "client/config.h"

namespace lomo::client {

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The user stopped lomoctl (Ctrl-C): exit status 130.
class Interrupted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CommandContext {
  LomoctlConfig config;
  bool json = false;              // --output json
  std::vector<std::string> args;  // after the command name
  bool stdout_is_tty = false;
  int terminal_width = 80;

  Client& client();

 private:
  std::unique_ptr<Client> client_;
};

int submit_command(CommandContext& context);
int list_command(CommandContext& context);
int get_command(CommandContext& context);
int watch_command(CommandContext& context);
int logs_command(CommandContext& context);
int cancel_command(CommandContext& context);
int checkpoints_command(CommandContext& context);
int download_command(CommandContext& context);
int local_command(CommandContext& context);     // local_mode.cc
int generate_command(CommandContext& context);  // generate.cc: lomo-worker generate, here

// A command's arguments: positionals, "--flag value" / "--flag=value" for the flags in
// `with_value` (repeatable), and the switches. Anything else starting with '-' is a UsageError.
struct ParsedArgs {
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> values;
  std::set<std::string> switches;

  bool has(const std::string& name) const { return switches.count(name) > 0; }
  std::optional<std::string> value(const std::string& name) const;
  std::vector<std::string> all(const std::string& name) const;
};
ParsedArgs parse_args(const std::vector<std::string>& args, const std::string& command,
                      const std::set<std::string>& with_value,
                      const std::set<std::string>& switches);

// The SubmitJobRequest for JOB.yaml and its --set overrides: the file's text exactly as written
// (spec_text) and the overrides, which the coordinator applies and validates once, as the entry
// point. They are validated here first, so that a bad spec fails at once with the file's line.
// Throws JobSpecError naming the file (or the override) and every field with a problem.
// `world_size`, when given, receives the spec's resources.world_size after the overrides.
lomo::v1::SubmitJobRequest load_submit_request(const std::string& file,
                                               const std::vector<std::string>& overrides,
                                               std::string* job_name,
                                               int64_t* world_size = nullptr);

// The progress display `watch` uses, as the context asks for it (TTY bar, plain lines, JSON).
struct WatchOptions;
WatchOptions watch_options_for(const CommandContext& context);

}  // namespace lomo::client
