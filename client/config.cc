#include "client/config.h"

#include <yaml-cpp/yaml.h>

#include <cstdlib>

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
      throw ConfigError(source + ": expected a map of settings (coordinator, timeout_seconds)");
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
        } else {
          throw ConfigError(source + ": " + key +
                            ": unknown key (known: coordinator, timeout_seconds)");
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

}  // namespace lomo::client
