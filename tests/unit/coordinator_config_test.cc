// The coordinator's YAML config and command-line overrides.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "server/config.h"

namespace lomo::server {
namespace {

using ::testing::HasSubstr;

std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const ConfigError& error) {
    return error.what();
  }
  return "(no error)";
}

TEST(CoordinatorConfig, ReadsEveryKey) {
  const CoordinatorConfig config = parse_config(R"(
listen:
  grpc: 0.0.0.0:9000
  http: 127.0.0.1:9001
data_dir: /var/lib/lomo
heartbeat_interval_ms: 500
heartbeat_timeout_seconds: 4.5
threads: 8
http_threads: 32
shutdown_grace_seconds: 2
)",
                                                "c.yaml");
  EXPECT_EQ(config.grpc_listen, "0.0.0.0:9000");
  EXPECT_EQ(config.http_listen, "127.0.0.1:9001");
  EXPECT_EQ(config.data_dir, "/var/lib/lomo");
  EXPECT_EQ(config.heartbeat_interval_ms, 500);
  EXPECT_DOUBLE_EQ(config.heartbeat_timeout_seconds, 4.5);
  EXPECT_EQ(config.threads, 8);
  EXPECT_EQ(config.http_threads, 32);
  EXPECT_DOUBLE_EQ(config.shutdown_grace_seconds, 2);
}

TEST(CoordinatorConfig, EmptyFileMeansDefaults) {
  const CoordinatorConfig config = parse_config("", "c.yaml");
  EXPECT_EQ(config.grpc_listen, "127.0.0.1:7070");
  EXPECT_EQ(config.http_listen, "127.0.0.1:7080");
}

TEST(CoordinatorConfig, ProblemsNameTheSourceAndKey) {
  EXPECT_THAT(error_of([] { parse_config("heartbeat_timeout: 3", "c.yaml"); }),
              HasSubstr("c.yaml: heartbeat_timeout: unknown key"));
  EXPECT_THAT(error_of([] { parse_config("listen: {grpc: a:1, https: b:2}", "c.yaml"); }),
              HasSubstr("c.yaml: listen.https: unknown key"));
  EXPECT_THAT(error_of([] { parse_config("heartbeat_timeout_seconds: -1", "c.yaml"); }),
              HasSubstr("c.yaml: heartbeat_timeout_seconds: must be in (0, 86400]"));
  EXPECT_THAT(error_of([] { parse_config("threads: many", "c.yaml"); }),
              HasSubstr("c.yaml: threads: cannot read \"many\" as an integer"));
  EXPECT_THAT(error_of([] { parse_config("listen: {grpc: nowhere}", "c.yaml"); }),
              HasSubstr("expected HOST:PORT"));
  EXPECT_THAT(error_of([] {
                parse_config("heartbeat_timeout_seconds: 1\nheartbeat_interval_ms: 800", "c.yaml");
              }),
              HasSubstr("heartbeat_interval_ms: must be at most half"));
}

TEST(CoordinatorConfig, KeepCheckpointsDefaultsToThreeAndZeroKeepsAll) {
  EXPECT_EQ(parse_config("", "c.yaml").keep_checkpoints, 3);
  EXPECT_EQ(parse_config("keep_checkpoints: 0", "c.yaml").keep_checkpoints, 0);
  EXPECT_THAT(error_of([] { parse_config("keep_checkpoints: -1", "c.yaml"); }),
              HasSubstr("c.yaml: keep_checkpoints: must be >= 0 (0 keeps all), got -1"));
  bool help = false;
  EXPECT_EQ(config_from_command_line({"--keep-checkpoints", "5"}, &help).keep_checkpoints, 5);
}

TEST(CoordinatorConfig, KeepBestCheckpointIsOffUnlessTheFileOrTheSwitchTurnsItOn) {
  EXPECT_FALSE(parse_config("", "c.yaml").keep_best_checkpoint);
  EXPECT_TRUE(parse_config("keep_best_checkpoint: true", "c.yaml").keep_best_checkpoint);
  bool help = false;
  EXPECT_TRUE(config_from_command_line({"--keep-best-checkpoint"}, &help).keep_best_checkpoint);
  EXPECT_FALSE(config_from_command_line({}, &help).keep_best_checkpoint);
}

TEST(CoordinatorConfig, CommandLineOverridesTheFile) {
  char pattern[] = "/tmp/lomo-config-test-XXXXXX";
  ASSERT_NE(mkdtemp(pattern), nullptr);
  const std::filesystem::path file = std::filesystem::path(pattern) / "c.yaml";
  std::ofstream(file) << "data_dir: from-file\nheartbeat_timeout_seconds: 30\n";
  bool help = false;
  // The override comes first on the line and still wins.
  const CoordinatorConfig config =
      config_from_command_line({"--heartbeat-timeout=3", "--config", file.string(), "--grpc-listen",
                                "127.0.0.1:0", "--ready-file", "/tmp/ready"},
                               &help);
  EXPECT_FALSE(help);
  EXPECT_EQ(config.data_dir, "from-file");
  EXPECT_DOUBLE_EQ(config.heartbeat_timeout_seconds, 3);
  EXPECT_EQ(config.grpc_listen, "127.0.0.1:0");
  EXPECT_EQ(config.ready_file, "/tmp/ready");
  std::filesystem::remove_all(pattern);

  EXPECT_THAT(error_of([&] {
                config_from_command_line({"--bogus", "1"}, &help);
              }),
              HasSubstr("unknown flag --bogus"));
  EXPECT_THAT(error_of([&] { config_from_command_line({"--data-dir"}, &help); }),
              HasSubstr("--data-dir: needs a value"));
  EXPECT_THAT(error_of([&] {
                config_from_command_line({"--heartbeat-timeout", "soon"}, &help);
              }),
              HasSubstr("expected a number"));
  config_from_command_line({"--help"}, &help);
  EXPECT_TRUE(help);
}

// The tls section and its flags (server/tls.h); a certificate needs its key.
TEST(CoordinatorConfig, ReadsTheTlsSectionAndFlags) {
  const CoordinatorConfig config =
      parse_config("tls: {cert_file: /c.crt, key_file: /c.key, client_ca_file: /ca.pem}", "c.yaml");
  EXPECT_EQ(config.tls_cert_file, "/c.crt");
  EXPECT_EQ(config.tls_key_file, "/c.key");
  EXPECT_EQ(config.tls_client_ca_file, "/ca.pem");
  bool help = false;
  const CoordinatorConfig flags = config_from_command_line(
      {"--tls-cert", "s.crt", "--tls-key=s.key", "--tls-client-ca", "ca.pem"}, &help);
  EXPECT_EQ(flags.tls_cert_file, "s.crt");
  EXPECT_EQ(flags.tls_key_file, "s.key");
  EXPECT_EQ(flags.tls_client_ca_file, "ca.pem");
  EXPECT_THAT(error_of([] { parse_config("tls: {cert_file: /c.crt}", "c.yaml"); }),
              HasSubstr("c.yaml: tls.key_file: TLS needs both a certificate and its key"));
  EXPECT_THAT(error_of([] { parse_config("tls: {client_ca_file: /ca.pem}", "c.yaml"); }),
              HasSubstr("c.yaml: tls.client_ca_file: needs tls.cert_file"));
  EXPECT_THAT(error_of([] { parse_config("tls: {certificate: /c.crt}", "c.yaml"); }),
              HasSubstr("c.yaml: tls.certificate: unknown key"));
  EXPECT_THAT(error_of([] { parse_config("tls: /c.crt", "c.yaml"); }),
              HasSubstr("c.yaml: tls: expected {cert_file:, key_file:, client_ca_file:}"));
}

TEST(CoordinatorConfig, SplitsHostAndPort) {
  EXPECT_EQ(split_host_port("127.0.0.1:80", "x").port, 80);
  EXPECT_EQ(split_host_port("[::1]:0", "x").host, "::1");
  EXPECT_EQ(split_host_port(":7080", "x").host, "0.0.0.0");
  EXPECT_THAT(error_of([] { split_host_port("h:99999", "x"); }), HasSubstr("invalid port"));
}

}  // namespace
}  // namespace lomo::server
