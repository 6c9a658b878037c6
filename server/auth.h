// Who may call what. Callers present a bearer token (gRPC metadata or the HTTP header
// `authorization: Bearer <token>`); the coordinator knows only the SHA-256 of each token, from a
// tokens file (docs/SECURITY.md):
//
//   tokens:
//     - name: alice            # the principal; owner of the jobs it submits
//       role: user             # admin | user | viewer | worker
//       sha256: 3f7a…          # 64 hex digits: SHA-256 of the token string
//     - name: node-a
//       role: worker
//       sha256: 9c01…
//       worker_ids: ["node-a", "node-a-gpu*"]   # worker ids it may use; default [name]
//
// Without a tokens file authentication is off and every caller is an admin with no name (the
// coordinator then listens on loopback only, unless told --insecure).
//
// The rules live in one table (kGrpcMethodAccess, and the REST server's route table): every
// handler asks for its method's rule by name, an unknown name is refused, and
// authorization_table_test enumerates every method and route with every kind of caller.
#pragma once

#include <grpcpp/grpcpp.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace lomo::server {

enum class Role { kAdmin, kUser, kViewer, kWorker };
const char* role_name(Role role);

struct Principal {
  std::string name;  // the token's name; "" when authentication is off
  Role role = Role::kAdmin;
  std::vector<std::string> worker_ids;  // worker role: globs of the worker ids it may use

  bool may_use_worker_id(const std::string& worker_id) const;
  // "token \"alice\" (role user)", or "the caller" when authentication is off.
  std::string describe() const;
};

// What a call needs. Owner-scoped kinds also need the job's owner (check_job_owner).
enum class Access {
  kPublic,     // anyone, no token: health checks, reflection (the schema is public)
  kSubmit,     // admin, user
  kListJobs,   // admin, viewer, user (a user's list holds only its own jobs)
  kReadJob,    // admin, viewer; a user: its own jobs
  kChangeJob,  // admin; a user: its own jobs (cancel)
  kDownload,   // admin; a user: its own jobs' checkpoints
  kMetrics,    // admin, viewer
  kWorker,     // worker: the worker protocol, only for the worker ids it may use
};
const char* access_name(Access access);

// Every gRPC method the coordinator serves, by full name ("/lomo.v1.JobService/SubmitJob"),
// with its rule.
const std::map<std::string, Access>& grpc_method_access();

class TokensFileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TokenEntry {
  Principal principal;
  std::array<uint8_t, 32> sha256{};
};

// Parses a tokens file's text. Throws TokensFileError naming `source`, the entry and the field.
std::vector<TokenEntry> parse_tokens(const std::string& yaml_text, const std::string& source);
// The YAML text of `entries` (what `lomo-coordinator token create` writes).
std::string tokens_to_yaml(const std::vector<TokenEntry>& entries);
std::array<uint8_t, 32> token_hash(std::string_view token);
std::string hex(const std::array<uint8_t, 32>& bytes);

class Authenticator {
 public:
  Authenticator() = default;  // authentication off
  // Reads the tokens file. Throws TokensFileError naming it.
  explicit Authenticator(std::filesystem::path tokens_file);

  bool enabled() const { return !tokens_file_.empty(); }
  // Reads the tokens file again (SIGHUP): a bad file keeps the current tokens and throws.
  void reload();

  // The principal of an `authorization` value ("Bearer <token>"), or UNAUTHENTICATED.
  grpc::Status authenticate(std::string_view authorization, Principal* principal) const;
  // authenticate() and the role part of `access`.
  grpc::Status authorize(std::string_view authorization, Access access, std::string_view what,
                         Principal* principal) const;
  // The same for a gRPC call: its metadata and its method's rule in grpc_method_access().
  grpc::Status authorize_call(const grpc::ServerContextBase& context, const std::string& method,
                              Principal* principal) const;

 private:
  std::filesystem::path tokens_file_;
  mutable std::mutex mu_;
  std::shared_ptr<const std::vector<TokenEntry>> entries_;
};

// The role part of `access` for an authenticated principal: PERMISSION_DENIED naming what was
// asked (`what`, e.g. "CancelJob") and the principal.
grpc::Status check_role(const Principal& principal, Access access, std::string_view what);
// The owner part: admins reach every job, viewers read every job, users only their own.
grpc::Status check_job_owner(const Principal& principal, Access access, const std::string& owner,
                             const std::string& job_id);

}  // namespace lomo::server
