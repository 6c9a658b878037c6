// Issue 12, transport security: a real lomo-coordinator with --tls-cert/--tls-key (and
// --tls-client-ca for mutual TLS), reached by real clients: lomoctl, curl on REST, lomo-worker
// serve, openssl s_client. The CA and the certificates are made with the openssl CLI at test time.
#include "server/tls.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/sha256.h"
#include "tests/integration/coordinator_harness.h"
#include "tests/integration/test_support.h"

namespace lomo::server::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;

const std::string kAdminToken = "lomo_tls_test_admin_token";
const std::string kWorkerToken = "lomo_tls_test_worker_token";

// Runs `argv` to its end; its output (stdout and stderr) in `*output`.
bool run(const std::vector<std::string>& argv, std::string* output) {
  return lomo::testing::run_program(argv, output, seconds(60)).success();
}

// Runs a shell command line in `dir`; fails the test naming it when it fails.
void shell(const fs::path& dir, const std::string& command) {
  std::string output;
  EXPECT_TRUE(run({"sh", "-c", "cd '" + dir.string() + "' && " + command}, &output))
      << command << ":\n"
      << output;
}

// A test CA under `dir`, and certificates it signs: a server's for 127.0.0.1 and localhost, a
// client's. Elliptic-curve keys: made in milliseconds.
class TestPki {
 public:
  explicit TestPki(fs::path dir) : dir_(std::move(dir)) {
    std::ofstream(dir_ / "server.ext") << "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
    std::ofstream(dir_ / "client.ext") << "extendedKeyUsage=clientAuth\n";
    shell(dir_,
          "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
          "-keyout ca.key -out ca.crt -days 2 -subj /CN=lomo-test-ca 2>&1");
    shell(dir_,
          "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
          "-keyout other-ca.key -out other-ca.crt -days 2 -subj /CN=another-ca 2>&1");
  }
  // Issues <name>.crt/<name>.key signed by the CA with `serial`, written under new names and
  // renamed into place (as an operator's rotation does).
  void issue(const std::string& name, int serial, const std::string& extensions) {
    const std::string tmp = name + ".new";
    shell(dir_, "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout " +
                    tmp + ".key -out " + tmp + ".csr -subj /CN=" + name + " 2>&1 && " +
                    "openssl x509 -req -in " + tmp + ".csr -CA ca.crt -CAkey ca.key -set_serial " +
                    std::to_string(serial) + " -days 2 -out " + tmp + ".crt -extfile " +
                    extensions + " 2>&1 && mv " + tmp + ".key " + name + ".key && mv " + tmp +
                    ".crt " + name + ".crt");
  }
  fs::path operator/(const std::string& file) const { return dir_ / file; }

 private:
  fs::path dir_;
};

// The serial number (hex, as openssl prints it) of the certificate a new TLS connection to
// 127.0.0.1:`port` is shown; "" when the handshake fails.
std::string served_serial(const TestPki& pki, int port) {
  std::string output;
  run({"sh", "-c",
       "openssl s_client -connect 127.0.0.1:" + std::to_string(port) + " -CAfile " +
           (pki / "ca.crt").string() + " -cert " + (pki / "w-1.crt").string() + " -key " +
           (pki / "w-1.key").string() +
           " </dev/null 2>/dev/null | openssl x509 -noout -serial 2>/dev/null"},
      &output);
  const size_t at = output.find("serial=");
  return at == std::string::npos ? "" : output.substr(at + 7, output.find('\n', at) - at - 7);
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = std::make_unique<TestPki>(dir_.path());
    pki_->issue("localhost", 1, "server.ext");
    pki_->issue("w-1", 7, "client.ext");
    std::ofstream(dir_.path() / "tokens.yaml")
        << "tokens:\n  - name: root\n    role: admin\n    sha256: " << sha256_hex(kAdminToken)
        << "\n  - name: w-1\n    role: worker\n    sha256: " << sha256_hex(kWorkerToken) << "\n";
    std::ofstream(dir_.path() / "admin.token") << kAdminToken << "\n";
    std::ofstream(dir_.path() / "worker.token") << kWorkerToken << "\n";
  }

  // A coordinator serving TLS; `mutual`: it requires client certificates signed by the CA.
  void start(bool mutual) {
    ProcessOptions options(dir_.path() / "data");
    options.extra_args = {"--tokens-file", (dir_.path() / "tokens.yaml").string(),
                          "--tls-cert",    (*pki_ / "localhost.crt").string(),
                          "--tls-key",     (*pki_ / "localhost.key").string()};
    if (mutual) {
      options.extra_args.insert(options.extra_args.end(),
                                {"--tls-client-ca", (*pki_ / "ca.crt").string()});
    }
    coordinator_ = std::make_unique<CoordinatorProcess>(options);
  }

  int grpc_port() const {
    const std::string& address = coordinator_->grpc_address();
    return std::stoi(address.substr(address.rfind(':') + 1));
  }

  // lomoctl against the coordinator with `extra` flags; returns its exit code.
  int lomoctl(std::vector<std::string> extra, std::string* output) {
    std::vector<std::string> argv = {LOMO_LOMOCTL_BIN, "--coordinator",
                                     coordinator_->grpc_address()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return lomo::testing::run_program(argv, output, seconds(60)).code;
  }

  std::vector<std::string> admin_flags() const {
    return {"--ca-file", (*pki_ / "ca.crt").string(), "--token-file",
            (dir_.path() / "admin.token").string()};
  }
  std::vector<std::string> client_cert_flags() const {
    return {"--cert-file", (*pki_ / "w-1.crt").string(), "--key-file",
            (*pki_ / "w-1.key").string()};
  }

  // curl over HTTPS to `path`; its exit code, the body in `*output`.
  int curl(const std::string& path, const std::vector<std::string>& extra, std::string* output) {
    std::vector<std::string> argv = {"curl", "-sS", "--max-time", "30"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back("https://127.0.0.1:" + std::to_string(coordinator_->http_port()) + path);
    return lomo::testing::run_program(argv, output, seconds(60)).code;
  }

  // lomo-worker serve as w-1 with `extra` credentials flags; waits until the coordinator logs
  // its registration.
  void expect_worker_registers(const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {LOMO_WORKER_BIN, "serve",
                                     "--coordinator", coordinator_->grpc_address(),
                                     "--device",      "cpu",
                                     "--worker-id",   "w-1",
                                     "--work-dir",    (dir_.path() / "worker").string(),
                                     "--token-file",  (dir_.path() / "worker.token").string(),
                                     "--ca-file",     (*pki_ / "ca.crt").string()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    const fs::path log = dir_.path() / "worker.log";
    auto worker = lomo::testing::start_program(argv, log);
    EXPECT_TRUE(wait_until(
        [&] { return coordinator_->log().find("worker w-1 registered") != std::string::npos; },
        std::chrono::seconds(60)))
        << "worker log:\n"
        << read_file(log) << "\ncoordinator log:\n"
        << coordinator_->log();
    worker->send_signal(SIGTERM);
    EXPECT_TRUE(worker->wait_for(std::chrono::seconds(60)).has_value());
  }

  TempDir dir_;
  std::unique_ptr<TestPki> pki_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
};

TEST_F(TlsTest, LomoctlSubmitsAndListsOverTls) {
  start(/*mutual=*/false);
  std::ofstream(dir_.path() / "job.yaml")
      << "name: over-tls\nmodel:\n  path: " << (dir_.path() / "model").string()
      << "\ndata:\n  train: " << (dir_.path() / "train.jsonl").string()
      << "\ntraining:\n  steps: 1\n";
  std::vector<std::string> submit = admin_flags();
  submit.insert(submit.end(), {"submit", (dir_.path() / "job.yaml").string()});
  std::string output;
  ASSERT_EQ(lomoctl(submit, &output), 0) << output;
  std::vector<std::string> list = admin_flags();
  list.push_back("list");
  ASSERT_EQ(lomoctl(list, &output), 0) << output;
  EXPECT_NE(output.find("over-tls"), std::string::npos) << output;
}

TEST_F(TlsTest, AClientWithoutTheCaIsRefusedWithAClearMessage) {
  start(/*mutual=*/false);
  std::string output;
  // Plaintext to a TLS listener.
  EXPECT_EQ(lomoctl({"--token-file", (dir_.path() / "admin.token").string(), "list"}, &output), 3)
      << output;
  EXPECT_NE(output.find("if it serves TLS, give its CA bundle (--ca-file"), std::string::npos)
      << output;
  // TLS, but trusting another CA: the server's certificate does not verify.
  EXPECT_EQ(lomoctl({"--ca-file", (*pki_ / "other-ca.crt").string(), "--token-file",
                     (dir_.path() / "admin.token").string(), "list"},
                    &output),
            3)
      << output;
  EXPECT_NE(output.find("TLS with the coordinator at " + coordinator_->grpc_address() + " failed"),
            std::string::npos)
      << output;
  EXPECT_NE(output.find("certificate verify failed"), std::string::npos) << output;
}

TEST_F(TlsTest, CurlReachesRestOverHttpsWithTheCa) {
  start(/*mutual=*/false);
  const std::string ca = (*pki_ / "ca.crt").string();
  std::string output;
  ASSERT_EQ(curl("/healthz", {"--cacert", ca}, &output), 0) << output;
  EXPECT_NE(output.find("SERVING"), std::string::npos) << output;
  ASSERT_EQ(
      curl("/v1/jobs", {"--cacert", ca, "-H", "Authorization: Bearer " + kAdminToken}, &output), 0)
      << output;
  EXPECT_NE(output.find("{"), std::string::npos) << output;
  EXPECT_EQ(output.find("\"code\""), std::string::npos) << "an error came back: " << output;
  // Without the token the route refuses (TLS alone does not authenticate).
  ASSERT_EQ(curl("/v1/jobs", {"--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}"}, &output),
            0);
  EXPECT_EQ(output.substr(0, output.find_last_not_of(" \n") + 1), "401");
  // Without the CA curl cannot verify the certificate (exit 60); plaintext HTTP gets no answer.
  EXPECT_EQ(curl("/healthz", {}, &output), 60) << output;
  EXPECT_FALSE(lomo::testing::http_get(coordinator_->http_port(), "/healthz").has_value());
}

TEST_F(TlsTest, WorkerRegistersOverTls) {
  start(/*mutual=*/false);
  expect_worker_registers({});
}

TEST_F(TlsTest, MutualTlsAdmitsOnlyClientsWithACertificateFromTheClientCa) {
  start(/*mutual=*/true);
  expect_worker_registers(client_cert_flags());
  std::string output;
  std::vector<std::string> list = admin_flags();
  list.push_back("list");
  EXPECT_EQ(lomoctl(list, &output), 3) << "no client certificate: " << output;
  EXPECT_NE(output.find("--cert-file and --key-file"), std::string::npos) << output;
  pki_->issue("w-1", 8, "client.ext");  // the CA's: accepted
  std::vector<std::string> with_cert = client_cert_flags();
  with_cert.insert(with_cert.end(), list.begin(), list.end());
  EXPECT_EQ(lomoctl(with_cert, &output), 0) << output;
  // A certificate from another CA is refused.
  shell(dir_.path(), "cp other-ca.crt w-1.crt && cp other-ca.key w-1.key");
  EXPECT_EQ(lomoctl(with_cert, &output), 3) << output;
}

TEST_F(TlsTest, ARotatedCertificateIsServedWithoutARestartAndABadOneIsNot) {
  start(/*mutual=*/false);
  const int https = coordinator_->http_port();
  ASSERT_EQ(served_serial(*pki_, https), "01");
  ASSERT_EQ(served_serial(*pki_, grpc_port()), "01");
  pki_->issue("localhost", 2, "server.ext");
  ASSERT_EQ(::kill(coordinator_->pid(), SIGHUP), 0);
  // New connections see the new certificate; gRPC re-reads its copy within a few seconds.
  EXPECT_TRUE(wait_until([&] { return served_serial(*pki_, https) == "02"; }, seconds(30)));
  EXPECT_TRUE(wait_until([&] { return served_serial(*pki_, grpc_port()) == "02"; }, seconds(30)));
  // Without SIGHUP: the change of the files alone.
  pki_->issue("localhost", 3, "server.ext");
  EXPECT_TRUE(wait_until([&] { return served_serial(*pki_, https) == "03"; }, seconds(30)));
  EXPECT_TRUE(wait_until([&] { return served_serial(*pki_, grpc_port()) == "03"; }, seconds(30)));
  // A broken certificate file keeps the one in use, and says why.
  std::ofstream(*pki_ / "localhost.crt") << "not a certificate\n";
  ASSERT_EQ(::kill(coordinator_->pid(), SIGHUP), 0);
  EXPECT_TRUE(wait_until(
      [&] {
        return coordinator_->log().find("TLS certificate not reloaded, the previous one stays") !=
               std::string::npos;
      },
      seconds(30)))
      << coordinator_->log();
  EXPECT_NE(
      coordinator_->log().find((*pki_ / "localhost.crt").string() + " holds no PEM certificate"),
      std::string::npos);
  std::this_thread::sleep_for(seconds(kGrpcRefreshSeconds + 1));  // a re-read would be done
  EXPECT_EQ(served_serial(*pki_, https), "03");
  EXPECT_EQ(served_serial(*pki_, grpc_port()), "03");
  std::string output;
  std::vector<std::string> list = admin_flags();
  list.push_back("list");
  EXPECT_EQ(lomoctl(list, &output), 0) << output;
}

TEST_F(TlsTest, BadCertificateFilesStopTheStartNamingTheFile) {
  const fs::path data = dir_.path() / "data";
  auto start_with = [&](const std::string& cert, const std::string& key) {
    std::string output;
    const bool ok =
        run({LOMO_COORDINATOR_BIN, "--init", "--data-dir", data.string(), "--grpc-listen",
             "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key},
            &output);
    EXPECT_FALSE(ok) << output;
    return output;
  };
  const std::string cert = (*pki_ / "localhost.crt").string();
  const std::string key = (*pki_ / "localhost.key").string();
  const std::string missing = (dir_.path() / "missing.key").string();
  EXPECT_NE(start_with(cert, missing).find("cannot read the TLS key file " + missing),
            std::string::npos);
  // The client's key with the server's certificate.
  const std::string other_key = (*pki_ / "w-1.key").string();
  EXPECT_NE(
      start_with(cert, other_key)
          .find("the TLS key file " + other_key + " does not belong to the certificate in " + cert),
      std::string::npos);
  EXPECT_NE(
      start_with(key, key).find("the TLS certificate file " + key + " holds no PEM certificate"),
      std::string::npos);
  std::string output;
  EXPECT_FALSE(run(
      {LOMO_COORDINATOR_BIN, "--init", "--data-dir", data.string(), "--tls-cert", cert}, &output));
  EXPECT_NE(output.find("TLS needs both a certificate and its key"), std::string::npos) << output;
}

}  // namespace
}  // namespace lomo::server::testing
