#include "server/tls.h"

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <algorithm>
#include <stdexcept>
#include <utility>

#include "common/bearer_token.h"
#include "common/log.h"
#include "common/read_file.h"

namespace lomo::server {

struct TlsIdentity::Pair {
  X509* cert = nullptr;
  STACK_OF(X509) * chain = nullptr;  // intermediates after the certificate in the file
  EVP_PKEY* key = nullptr;
  ~Pair() {
    X509_free(cert);
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
  }
};

namespace {

constexpr size_t kMaxPemBytes = 1 << 20;

std::string openssl_error() {
  const unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "no PEM block found";
  char text[256];
  ERR_error_string_n(code, text, sizeof(text));
  return text;
}

// Never prompts on a terminal for an encrypted key (the coordinator is a service).
int no_password(char* /*buffer*/, int /*size*/, int /*rwflag*/, void* /*user*/) { return 0; }

std::string read_pem(const std::string& file, const std::string& what) {
  try {
    return read_file(file, kMaxPemBytes);
  } catch (const std::exception& error) {
    throw std::runtime_error("cannot read the " + what + " " + file + ": " + error.what());
  }
}

using Bio = std::unique_ptr<BIO, decltype(&BIO_free)>;

Bio memory_bio(const std::string& text) {
  return Bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), &BIO_free);
}

std::string serial_of(const X509* cert) {
  BIGNUM* number = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr);
  char* hex = number != nullptr ? BN_bn2hex(number) : nullptr;
  std::string serial = hex != nullptr ? hex : "?";
  OPENSSL_free(hex);
  BN_free(number);
  return serial;
}

// The files' text, checked: what the copies for gRPC hold, and what HTTPS presents.
struct Loaded {
  std::shared_ptr<const TlsIdentity::Pair> pair;
  std::string cert_pem, key_pem, ca_pem;
  ~Loaded() { OPENSSL_cleanse(key_pem.data(), key_pem.size()); }
};

// The first certificate of `pem` into pair->cert, the rest into pair->chain.
void parse_certificates(const std::string& pem, const std::string& file, const std::string& what,
                        TlsIdentity::Pair* pair) {
  Bio bio = memory_bio(pem);
  pair->cert = PEM_read_bio_X509(bio.get(), nullptr, no_password, nullptr);
  if (pair->cert == nullptr) {
    throw std::runtime_error("the " + what + " " + file +
                             " holds no PEM certificate: " + openssl_error());
  }
  pair->chain = sk_X509_new_null();
  while (X509* extra = PEM_read_bio_X509(bio.get(), nullptr, no_password, nullptr)) {
    sk_X509_push(pair->chain, extra);
  }
  ERR_clear_error();  // the end of the text reads as an error
}

void parse_key(const std::string& pem, const std::string& file, TlsIdentity::Pair* pair) {
  Bio bio = memory_bio(pem);
  pair->key = PEM_read_bio_PrivateKey(bio.get(), nullptr, no_password, nullptr);
  if (pair->key == nullptr) {
    throw std::runtime_error(
        "the TLS key file " + file +
        " holds no PEM private key (an encrypted key is not supported): " + openssl_error());
  }
}

std::unique_ptr<Loaded> load(const TlsFiles& files) {
  if (files.key_file.empty()) {
    throw std::runtime_error("a TLS certificate needs its key (--tls-key, tls.key_file)");
  }
  auto loaded = std::make_unique<Loaded>();
  auto pair = std::make_shared<TlsIdentity::Pair>();
  loaded->cert_pem = read_pem(files.cert_file, "TLS certificate file");
  parse_certificates(loaded->cert_pem, files.cert_file, "TLS certificate file", pair.get());
  loaded->key_pem = read_pem(files.key_file, "TLS key file");
  parse_key(loaded->key_pem, files.key_file, pair.get());
  if (X509_check_private_key(pair->cert, pair->key) != 1) {
    ERR_clear_error();
    throw std::runtime_error("the TLS key file " + files.key_file +
                             " does not belong to the certificate in " + files.cert_file);
  }
  if (!files.client_ca_file.empty()) {
    loaded->ca_pem = read_pem(files.client_ca_file, "TLS client CA file");
    TlsIdentity::Pair ca;
    parse_certificates(loaded->ca_pem, files.client_ca_file, "TLS client CA file", &ca);
  }
  loaded->pair = std::move(pair);
  return loaded;
}

std::filesystem::path generation_dir(const std::filesystem::path& active, uint64_t generation) {
  return active / ("gen-" + std::to_string(generation));
}

}  // namespace

void check_tls_files(const TlsFiles& files) { load(files); }

TlsIdentity::TlsIdentity(TlsFiles files, std::filesystem::path active_dir)
    : files_(std::move(files)), active_dir_(std::move(active_dir)) {
  std::filesystem::remove_all(active_dir_);
  std::filesystem::create_directories(active_dir_);
  std::filesystem::permissions(active_dir_, std::filesystem::perms::owner_all);
  reload();
  watcher_ = std::thread([this] { watch_files(); });
}

TlsIdentity::~TlsIdentity() {
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
}

std::filesystem::file_time_type TlsIdentity::newest_change() const {
  // min(), not {}: libstdc++'s file clock counts from 2174, so real times are negative.
  auto newest = std::filesystem::file_time_type::min();
  for (const std::string& file : {files_.cert_file, files_.key_file, files_.client_ca_file}) {
    std::error_code error;
    if (file.empty()) continue;
    const auto changed = std::filesystem::last_write_time(file, error);
    if (!error) newest = std::max(newest, changed);
  }
  return newest;
}

// gRPC reads <active>/current/{cert,key,ca}.pem; `current` is a symbolic link swapped in one
// rename, so a read never mixes two pairs (gRPC re-reads when the times change under it).
void TlsIdentity::publish(const std::string& cert_pem, const std::string& key_pem,
                          const std::string& ca_pem) {
  const std::filesystem::path dir = generation_dir(active_dir_, ++generation_);
  std::filesystem::create_directories(dir);
  write_private_file(dir / "cert.pem", cert_pem);
  write_private_file(dir / "key.pem", key_pem);
  if (!files_.client_ca_file.empty()) write_private_file(dir / "ca.pem", ca_pem);
  const std::filesystem::path link = active_dir_ / "current.new";
  std::filesystem::remove(link);
  std::filesystem::create_directory_symlink(dir.filename(), link);
  std::filesystem::rename(link, active_dir_ / "current");
  // The one before stays: gRPC may still be reading it.
  if (generation_ > 2) std::filesystem::remove_all(generation_dir(active_dir_, generation_ - 2));
}

void TlsIdentity::reload() {
  const auto change = newest_change();
  std::lock_guard lock(mu_);
  tried_change_ = change;  // a bad file is reported once, then again at its next change
  const std::unique_ptr<Loaded> loaded = load(files_);
  publish(loaded->cert_pem, loaded->key_pem, loaded->ca_pem);
  current_ = loaded->pair;
  log_line("TLS: certificate from " + files_.cert_file + " in use (serial " +
           serial_of(current_->cert) + ")");
}

void TlsIdentity::watch_files() {
  std::unique_lock stop_lock(stop_mu_);
  while (!stop_cv_.wait_for(stop_lock, std::chrono::seconds(1), [this] { return stopping_; })) {
    {
      std::lock_guard lock(mu_);
      if (newest_change() == tried_change_) continue;
    }
    try {
      reload();
    } catch (const std::exception& error) {
      log_line(std::string("TLS: the changed certificate files are not used, the previous "
                           "certificate stays: ") +
               error.what());
    }
  }
}

std::shared_ptr<grpc::ServerCredentials> TlsIdentity::grpc_credentials() const {
  namespace ex = grpc::experimental;
  const std::filesystem::path current = active_dir_ / "current";
  const bool mutual = !files_.client_ca_file.empty();
  auto provider = std::make_shared<ex::FileWatcherCertificateProvider>(
      (current / "key.pem").string(), (current / "cert.pem").string(),
      mutual ? (current / "ca.pem").string() : "", kGrpcRefreshSeconds);
  ex::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (mutual) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return ex::TlsServerCredentials(options);
}

int TlsIdentity::select_certificate(SSL* ssl, void* self) {
  auto* identity = static_cast<TlsIdentity*>(self);
  std::shared_ptr<const Pair> pair;
  {
    std::lock_guard lock(identity->mu_);
    pair = identity->current_;
  }
  return SSL_use_cert_and_key(ssl, pair->cert, pair->key, pair->chain, /*override=*/1);
}

bool TlsIdentity::configure(SSL_CTX& ctx) {
  SSL_CTX_set_min_proto_version(&ctx, TLS1_2_VERSION);
  SSL_CTX_set_cert_cb(&ctx, &TlsIdentity::select_certificate, this);
  return true;
}

}  // namespace lomo::server
