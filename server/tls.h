// Transport security of the coordinator's listeners (docs/SECURITY.md, "Transport (TLS)"): one
// server certificate for gRPC and HTTPS (REST, /metrics), and an optional client CA that makes
// the gRPC listener require and verify client certificates (mutual TLS with workers).
//
// Rotation without a restart: the files are re-read on SIGHUP (TlsIdentity::reload) and when
// their modification time changes (checked every second). A bad file at start is an error naming
// it; a bad file later keeps the certificate in use and logs why, once per change.
#pragma once

#include <grpcpp/security/server_credentials.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace lomo::server {

struct TlsFiles {
  std::string cert_file;       // PEM: the server certificate, then its chain
  std::string key_file;        // PEM: its private key
  std::string client_ca_file;  // PEM CA bundle; "" accepts any client (gRPC only)
  bool enabled() const { return !cert_file.empty(); }
};

inline constexpr unsigned kGrpcRefreshSeconds = 1;

// Reads and checks the files: the certificate, the key, that they belong together, the client CA.
// Throws std::runtime_error naming the file and what is wrong.
void check_tls_files(const TlsFiles& files);

// The coordinator's certificate, swapped in place on reload: each new connection gets the
// newest pair, connections already open keep theirs. gRPC's file watcher reads only checked copies
// of the files, under `active_dir` (made private): a bad file never reaches it.
class TlsIdentity {
 public:
  // Loads and checks the files and writes the first copies; throws std::runtime_error naming the
  // file. A thread re-reads the files within about a second of a change (modification time).
  TlsIdentity(TlsFiles files, std::filesystem::path active_dir);
  ~TlsIdentity();  // stops the thread
  TlsIdentity(const TlsIdentity&) = delete;
  TlsIdentity& operator=(const TlsIdentity&) = delete;

  // Re-reads the files (SIGHUP). On an error, keeps the pair in use and throws
  // std::runtime_error saying why (naming the file).
  void reload();
  // The gRPC listener's credentials: the copies under active_dir, polled by gRPC every
  // kGrpcRefreshSeconds; client certificates required and verified with a client CA.
  std::shared_ptr<grpc::ServerCredentials> grpc_credentials() const;
  // Sets up `ctx` to present the current pair (httplib::SSLServer's setup callback).
  bool configure(SSL_CTX& ctx);

  struct Pair;  // OpenSSL's certificate, chain and key (tls.cc)

 private:
  static int select_certificate(SSL* ssl, void* self);
  void watch_files();
  void publish(const std::string& cert_pem, const std::string& key_pem, const std::string& ca_pem);
  std::filesystem::file_time_type newest_change() const;

  const TlsFiles files_;
  const std::filesystem::path active_dir_;
  std::mutex mu_;
  std::shared_ptr<const Pair> current_;
  std::filesystem::file_time_type tried_change_;  // the files' newest mtime at the last read
  uint64_t generation_ = 0;                       // of the copies under active_dir_
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread watcher_;
};

}  // namespace lomo::server
