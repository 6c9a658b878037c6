// Where lomoctl finds the coordinator: --coordinator, else $LOMO_COORDINATOR, else the config
// file (~/.config/lomo/lomoctl.yaml, or $XDG_CONFIG_HOME/lomo/lomoctl.yaml), else 127.0.0.1:7070.
//
//   # ~/.config/lomo/lomoctl.yaml
//   coordinator: lomo.example.org:7070
//   timeout_seconds: 10          # deadline of each call (optional)
//   token_file: ~/.config/lomo/token   # bearer token (first line); else $LOMO_TOKEN(_FILE)
//   ca_file: /etc/lomo/ca.pem          # the coordinator's CA: TLS (else $LOMO_CA_FILE)
//   cert_file: ~/.config/lomo/client.crt   # mutual TLS (else $LOMO_CERT_FILE)
//   key_file: ~/.config/lomo/client.key    # its key (else $LOMO_KEY_FILE)
#pragma once

#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>

#include "common/grpc_channel.h"

namespace lomo::client {

inline constexpr const char* kDefaultCoordinator = "127.0.0.1:7070";

struct LomoctlConfig {
  std::string coordinator = kDefaultCoordinator;
  std::string coordinator_source = "default";  // where it came from, for messages
  double timeout_seconds = 10.0;
  std::string token_file;  // from the config file, before flags and environment
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  ChannelSecurity security;  // resolve_security fills it
  std::string token_source;  // "--token-file FILE", "LOMO_TOKEN", ...; "" when no token
};

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The config file's path from the environment ($XDG_CONFIG_HOME, else $HOME/.config); nullopt
// when neither is set.
std::optional<std::filesystem::path> default_config_path();

// Resolves the settings. `flag` is --coordinator when given; `env` is $LOMO_COORDINATOR (null or
// empty: unset); `config_file` is read if it exists (a missing file is not an error; a bad one
// throws ConfigError naming it and the key).
LomoctlConfig resolve_config(const std::optional<std::string>& flag, const char* env,
                             const std::optional<std::filesystem::path>& config_file);

// The credentials' flags, when given.
struct SecurityFlags {
  std::optional<std::string> token_file;  // --token-file
  std::optional<std::string> ca_file;     // --ca-file
  std::optional<std::string> cert_file;   // --cert-file (mutual TLS)
  std::optional<std::string> key_file;    // --key-file
};

// The token, CA bundle and client certificate: flags over the environment ($LOMO_TOKEN,
// $LOMO_TOKEN_FILE, $LOMO_CA_FILE, $LOMO_CERT_FILE, $LOMO_KEY_FILE) over the config file. Reads
// the token file; throws ConfigError naming it.
void resolve_security(const SecurityFlags& flags, LomoctlConfig* config);

}  // namespace lomo::client
