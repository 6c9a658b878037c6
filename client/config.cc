#include "client/config.h"

#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <tuple>

namespace lomo::client {

std::optional<std::filesystem::path> default_config_path() {
  if (const char* xdg = std::getenv("XDG_CONFIG_HOME"); xdg != nullptr && *xdg != '\0') {
    return std::filesystem::path(xdg) / "lomo" / "lomoctl.yaml";
  }
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    return std::filesystem::path(home) / ".config" / "lomo" / "lomoctl.yaml";
  }
  return std::nullopt;
}

LomoctlConfig resolve_config(const std::optional<std::string>& flag, const char* env,
                             const std::optional<std::filesystem::path>& config_file) {
  LomoctlConfig config;
  if (config_file && std::filesystem::exists(*config_file)) {
    const std::string source = config_file->string();
    YAML::Node root;
    try {
      root = YAML::LoadFile(source);
    } catch (const YAML::Exception& e) {
      throw ConfigError(source + ": invalid YAML: " + e.what());
    }
    if (root.IsDefined() && !root.IsNull() && !root.IsMap()) {
      throw ConfigError(
          source +
          ": expected a map of settings (coordinator, timeout_seconds, token_file, ca_file)");
    }
    if (root.IsMap()) {
      for (auto it = root.begin(); it != root.end(); ++it) {
        const std::string key = it->first.Scalar();
        const YAML::Node value = it->second;
        if (key == "coordinator") {
          if (!value.IsScalar() || value.Scalar().empty()) {
            throw ConfigError(source + ": coordinator: expected host:port");
          }
          config.coordinator = value.Scalar();
          config.coordinator_source = source;
        } else if (key == "timeout_seconds") {
          double seconds = 0;
          try {
            seconds = value.as<double>();
          } catch (const YAML::Exception&) {
            throw ConfigError(source + ": timeout_seconds: expected a number of seconds");
          }
          if (!(seconds > 0)) throw ConfigError(source + ": timeout_seconds: must be > 0");
          config.timeout_seconds = seconds;
        } else if (key == "token_file" || key == "ca_file" || key == "cert_file" ||
                   key == "key_file") {
          if (!value.IsScalar() || value.Scalar().empty()) {
            throw ConfigError(source + ": " + key + ": expected a file path");
          }
          std::string path = value.Scalar();
          const char* home = std::getenv("HOME");
          if (path.rfind("~/", 0) == 0 && home != nullptr) path = home + path.substr(1);
          (key == "token_file"  ? config.token_file
           : key == "ca_file"   ? config.ca_file
           : key == "cert_file" ? config.cert_file
                                : config.key_file) = path;
        } else {
          throw ConfigError(source + ": " + key +
                            ": unknown key (known: coordinator, timeout_seconds, token_file, "
                            "ca_file, cert_file, key_file)");
        }
      }
    }
  }
  if (env != nullptr && *env != '\0') {
    config.coordinator = env;
    config.coordinator_source = "LOMO_COORDINATOR";
  }
  if (flag) {
    config.coordinator = *flag;
    config.coordinator_source = "--coordinator";
  }
  return config;
}

namespace {

const char* env_value(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : nullptr;
}

}  // namespace

void resolve_security(const SecurityFlags& flags, LomoctlConfig* config) {
  const std::optional<std::string>& token_file_flag = flags.token_file;
  std::string token_file = config->token_file;
  std::string source = token_file.empty() ? "" : "token_file " + token_file + " (config file)";
  if (const char* file = env_value("LOMO_TOKEN_FILE")) {
    token_file = file;
    source = "$LOMO_TOKEN_FILE " + token_file;
  }
  ChannelSecurity& security = config->security;
  security.token.clear();
  if (const char* token = env_value("LOMO_TOKEN"); token != nullptr && !token_file_flag) {
    security.token = token;
    source = "$LOMO_TOKEN";
    token_file.clear();
  }
  if (token_file_flag) {
    token_file = *token_file_flag;
    source = "--token-file " + token_file;
  }
  if (!token_file.empty()) {
    try {
      security.token = read_token_file(token_file);
    } catch (const std::runtime_error& error) {
      throw ConfigError(error.what());
    }
  }
  config->token_source = security.token.empty() ? "" : source;
  for (auto [field, from_config, env, flag] :
       {std::tuple{&security.ca_file, &config->ca_file, "LOMO_CA_FILE", &flags.ca_file},
        std::tuple{&security.cert_file, &config->cert_file, "LOMO_CERT_FILE", &flags.cert_file},
        std::tuple{&security.key_file, &config->key_file, "LOMO_KEY_FILE", &flags.key_file}}) {
    *field = *from_config;
    if (const char* value = env_value(env)) *field = value;
    if (*flag) *field = **flag;
  }
}

}  // namespace lomo::client
