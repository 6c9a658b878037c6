// Client channels to the coordinator, with the caller's credentials: a bearer token sent as
// `authorization: Bearer <token>` on every call (server/auth.h), and TLS when a CA bundle is
// given. The token travels through a client interceptor rather than gRPC's call credentials,
// which gRPC refuses to send over a plaintext channel (local mode, loopback).
#pragma once

#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <memory>
#include <string>

namespace lomo {

struct ChannelSecurity {
  std::string token;    // "" sends none
  std::string ca_file;  // PEM CA bundle; "" is a plaintext channel
  // Mutual TLS (a coordinator with --tls-client-ca): this client's certificate and key, PEM.
  std::string cert_file;
  std::string key_file;
};

// The token on the first line of `file` (surrounding whitespace dropped). Throws
// std::runtime_error naming the file when it cannot be read or holds no token.
std::string read_token_file(const std::filesystem::path& file);

// What a program's channels use when make_channel is given none: what was set (lomo-worker serve
// sets it once from --token-file / --ca-file / --cert-file / --key-file, before any channel
// exists), else $LOMO_TOKEN_FILE, $LOMO_CA_FILE, $LOMO_CERT_FILE and $LOMO_KEY_FILE (read at the
// first use; a bad token file throws std::runtime_error).
void set_process_channel_security(ChannelSecurity security);
const ChannelSecurity& process_channel_security();

// A channel to `target` with `security` (nullptr: the process's). Throws std::runtime_error
// naming the CA, certificate or key file when it cannot be read, or when only one of the
// certificate and key is given.
std::shared_ptr<grpc::Channel> make_channel(const std::string& target,
                                            const grpc::ChannelArguments& args = {},
                                            const ChannelSecurity* security = nullptr);

}  // namespace lomo
