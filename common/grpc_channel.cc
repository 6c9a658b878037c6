#include "common/grpc_channel.h"

#include <grpcpp/support/client_interceptor.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "common/read_file.h"

namespace lomo {
namespace {

class BearerInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BearerInterceptor(const std::string& header) : header_(header) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", header_});
    }
    methods->Proceed();
  }

 private:
  const std::string& header_;  // owned by the factory, which the channel keeps
};

class BearerInterceptorFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerInterceptorFactory(const std::string& token) : header_("Bearer " + token) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new BearerInterceptor(header_);
  }

 private:
  const std::string header_;
};

std::mutex process_mu;
bool process_security_set = false;
ChannelSecurity process_security;

// A program that was not told (the training child of lomo-worker serve, which inherits the
// variables the daemon sets) takes its credentials from the environment.
ChannelSecurity security_from_environment() {
  ChannelSecurity security;
  const char* token_file = std::getenv("LOMO_TOKEN_FILE");
  if (token_file != nullptr && *token_file != '\0') security.token = read_token_file(token_file);
  for (auto [field, name] : {std::pair{&security.ca_file, "LOMO_CA_FILE"},
                             std::pair{&security.cert_file, "LOMO_CERT_FILE"},
                             std::pair{&security.key_file, "LOMO_KEY_FILE"}}) {
    const char* value = std::getenv(name);
    if (value != nullptr) *field = value;
  }
  return security;
}

std::string trimmed(const std::string& text) {
  const size_t begin = text.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  const size_t end = text.find_last_not_of(" \t\r\n");
  return text.substr(begin, end - begin + 1);
}

std::string read_pem(const std::string& file, const std::string& what) {
  try {
    return read_file(file, 16 << 20);
  } catch (const std::exception& error) {
    throw std::runtime_error("cannot read the " + what + " " + file + ": " + error.what());
  }
}

// TLS when a CA bundle or a client certificate is given (no CA bundle: the system roots).
std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const ChannelSecurity& security) {
  if (security.ca_file.empty() && security.cert_file.empty() && security.key_file.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  if (security.cert_file.empty() != security.key_file.empty()) {
    throw std::runtime_error(
        "a client certificate needs its key and the other way round (--cert-file and "
        "--key-file; $LOMO_CERT_FILE and $LOMO_KEY_FILE), got only " +
        (security.cert_file.empty() ? "the key " + security.key_file
                                    : "the certificate " + security.cert_file));
  }
  grpc::SslCredentialsOptions tls;
  if (!security.ca_file.empty()) tls.pem_root_certs = read_pem(security.ca_file, "CA bundle");
  if (!security.cert_file.empty()) {
    tls.pem_cert_chain = read_pem(security.cert_file, "client certificate");
    tls.pem_private_key = read_pem(security.key_file, "client key");
  }
  return grpc::SslCredentials(tls);
}

}  // namespace

std::string read_token_file(const std::filesystem::path& file) {
  std::string text;
  try {
    text = read_file(file, 64 * 1024);
  } catch (const std::exception& error) {
    throw std::runtime_error("cannot read the token file " + file.string() + ": " + error.what());
  }
  const std::string token = trimmed(text.substr(0, text.find('\n')));
  if (token.empty()) {
    throw std::runtime_error("the token file " + file.string() +
                             " holds no token on its first line");
  }
  return token;
}

void set_process_channel_security(ChannelSecurity security) {
  std::lock_guard lock(process_mu);
  process_security = std::move(security);
  process_security_set = true;
}

const ChannelSecurity& process_channel_security() {
  std::lock_guard lock(process_mu);
  if (!process_security_set) {
    process_security = security_from_environment();
    process_security_set = true;
  }
  return process_security;
}

std::shared_ptr<grpc::Channel> make_channel(const std::string& target,
                                            const grpc::ChannelArguments& args,
                                            const ChannelSecurity* security) {
  const ChannelSecurity& use = security != nullptr ? *security : process_channel_security();
  const std::shared_ptr<grpc::ChannelCredentials> credentials = channel_credentials(use);
  if (use.token.empty()) return grpc::CreateCustomChannel(target, credentials, args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<BearerInterceptorFactory>(use.token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, credentials, args,
                                                                 std::move(factories));
}

}  // namespace lomo
