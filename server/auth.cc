#include "server/auth.h"

#include <fnmatch.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "common/read_file.h"
#include "common/sha256.h"

namespace lomo::server {
namespace {

using Code = grpc::StatusCode;

constexpr std::string_view kBearer = "Bearer ";

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.' || c == '@';
    if (!ok) return false;
  }
  return true;
}

Role parse_role(const std::string& text, const std::string& where) {
  if (text == "admin") return Role::kAdmin;
  if (text == "user") return Role::kUser;
  if (text == "viewer") return Role::kViewer;
  if (text == "worker") return Role::kWorker;
  throw TokensFileError(where + ".role: \"" + text + "\" is not admin, user, viewer or worker");
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

std::array<uint8_t, 32> parse_hash(const std::string& text, const std::string& where) {
  std::array<uint8_t, 32> bytes{};
  if (text.size() != 64) {
    throw TokensFileError(where + ".sha256: must be 64 lower-case hex digits (the SHA-256 of the " +
                          "token), got " + std::to_string(text.size()) + " characters");
  }
  for (size_t i = 0; i < 32; ++i) {
    const int high = hex_value(text[2 * i]);
    const int low = hex_value(text[2 * i + 1]);
    if (high < 0 || low < 0) {
      throw TokensFileError(where + ".sha256: must be 64 lower-case hex digits");
    }
    bytes[i] = static_cast<uint8_t>(high * 16 + low);
  }
  return bytes;
}

std::string scalar(const YAML::Node& node, const std::string& where) {
  if (!node || !node.IsScalar()) throw TokensFileError(where + ": missing or not a string");
  return node.as<std::string>();
}

TokenEntry parse_entry(const YAML::Node& node, const std::string& where) {
  if (!node.IsMap()) throw TokensFileError(where + ": must be a mapping");
  for (const auto& field : node) {
    const std::string key = field.first.as<std::string>();
    if (key != "name" && key != "role" && key != "sha256" && key != "worker_ids") {
      throw TokensFileError(where + ": unknown field \"" + key + "\"");
    }
  }
  TokenEntry entry;
  Principal& principal = entry.principal;
  principal.name = scalar(node["name"], where + ".name");
  if (!valid_name(principal.name)) {
    throw TokensFileError(where + ".name: \"" + principal.name.substr(0, 64) +
                          "\" must be 1-64 characters of letters, digits, '-', '_', '.', '@'");
  }
  const std::string named = where + " (\"" + principal.name + "\")";
  principal.role = parse_role(scalar(node["role"], named + ".role"), named);
  entry.sha256 = parse_hash(scalar(node["sha256"], named + ".sha256"), named);
  if (const YAML::Node ids = node["worker_ids"]) {
    if (principal.role != Role::kWorker) {
      throw TokensFileError(named + ".worker_ids: only a worker token has worker ids");
    }
    if (!ids.IsSequence() || ids.size() == 0) {
      throw TokensFileError(named + ".worker_ids: must be a non-empty list of worker id globs");
    }
    for (const auto& id : ids) principal.worker_ids.push_back(scalar(id, named + ".worker_ids"));
  } else if (principal.role == Role::kWorker) {
    principal.worker_ids = {principal.name};
  }
  return entry;
}

// Equal without an early exit, so that the time taken says nothing about where they differ.
bool constant_time_equal(const std::array<uint8_t, 32>& a, const std::array<uint8_t, 32>& b) {
  uint8_t difference = 0;
  for (size_t i = 0; i < a.size(); ++i) difference |= a[i] ^ b[i];
  return difference == 0;
}

bool role_allows(Role role, Access access) {
  switch (access) {
    case Access::kPublic:
      return true;
    case Access::kSubmit:
    case Access::kChangeJob:
    case Access::kDownload:
      return role == Role::kAdmin || role == Role::kUser;
    case Access::kListJobs:
    case Access::kReadJob:
      return role == Role::kAdmin || role == Role::kUser || role == Role::kViewer;
    case Access::kMetrics:
      return role == Role::kAdmin || role == Role::kViewer;
    case Access::kWorker:
      return role == Role::kWorker;
  }
  return false;
}

}  // namespace

const char* role_name(Role role) {
  switch (role) {
    case Role::kAdmin:
      return "admin";
    case Role::kUser:
      return "user";
    case Role::kViewer:
      return "viewer";
    case Role::kWorker:
      return "worker";
  }
  return "unknown";
}

const char* access_name(Access access) {
  switch (access) {
    case Access::kPublic:
      return "public";
    case Access::kSubmit:
      return "submit";
    case Access::kListJobs:
      return "list jobs";
    case Access::kReadJob:
      return "read job";
    case Access::kChangeJob:
      return "change job";
    case Access::kDownload:
      return "download";
    case Access::kMetrics:
      return "metrics";
    case Access::kWorker:
      return "worker";
  }
  return "unknown";
}

bool Principal::may_use_worker_id(const std::string& worker_id) const {
  if (role != Role::kWorker) return false;
  for (const std::string& glob : worker_ids) {
    if (::fnmatch(glob.c_str(), worker_id.c_str(), 0) == 0) return true;
  }
  return false;
}

std::string Principal::describe() const {
  if (name.empty()) return "the caller";
  return "token \"" + name + "\" (role " + role_name(role) + ")";
}

const std::map<std::string, Access>& grpc_method_access() {
  static const std::map<std::string, Access> table = {
      {"/lomo.v1.JobService/SubmitJob", Access::kSubmit},
      {"/lomo.v1.JobService/GetJob", Access::kReadJob},
      {"/lomo.v1.JobService/ListJobs", Access::kListJobs},
      {"/lomo.v1.JobService/CancelJob", Access::kChangeJob},
      {"/lomo.v1.JobService/WatchJob", Access::kReadJob},
      {"/lomo.v1.JobService/ListCheckpoints", Access::kReadJob},
      {"/lomo.v1.JobService/DownloadCheckpoint", Access::kDownload},
      {"/lomo.v1.WorkerService/Connect", Access::kWorker},
      {"/lomo.v1.WorkerService/FetchCheckpoint", Access::kWorker},
      {"/lomo.v1.WorkerService/RendezvousSet", Access::kWorker},
      {"/lomo.v1.WorkerService/RendezvousGet", Access::kWorker},
      // Served by gRPC itself. Probes (kubelet, grpc_health_probe) carry no token, and the
      // reflected schema is the one published in proto/.
      {"/grpc.health.v1.Health/Check", Access::kPublic},
      {"/grpc.health.v1.Health/Watch", Access::kPublic},
      {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Access::kPublic},
  };
  return table;
}

std::vector<TokenEntry> parse_tokens(const std::string& yaml_text, const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& error) {
    throw TokensFileError(source + ": not valid YAML: " + error.what());
  }
  if (!root.IsMap() || !root["tokens"] || !root["tokens"].IsSequence()) {
    throw TokensFileError(source + ": must be a mapping with a list \"tokens\"");
  }
  for (const auto& field : root) {
    if (field.first.as<std::string>() != "tokens") {
      throw TokensFileError(source + ": unknown key \"" + field.first.as<std::string>() + "\"");
    }
  }
  std::vector<TokenEntry> entries;
  std::set<std::string> names;
  std::set<std::array<uint8_t, 32>> hashes;
  const YAML::Node tokens = root["tokens"];
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string where = source + ": tokens[" + std::to_string(i) + "]";
    TokenEntry entry = parse_entry(tokens[i], where);
    if (!names.insert(entry.principal.name).second) {
      throw TokensFileError(where + ".name: \"" + entry.principal.name + "\" is used twice");
    }
    if (!hashes.insert(entry.sha256).second) {
      throw TokensFileError(where + ".sha256: the same token is given to two names");
    }
    entries.push_back(std::move(entry));
  }
  return entries;
}

std::string tokens_to_yaml(const std::vector<TokenEntry>& entries) {
  YAML::Emitter out;
  out << YAML::BeginMap << YAML::Key << "tokens" << YAML::Value << YAML::BeginSeq;
  for (const TokenEntry& entry : entries) {
    const Principal& principal = entry.principal;
    out << YAML::BeginMap << YAML::Key << "name" << YAML::Value << principal.name;
    out << YAML::Key << "role" << YAML::Value << role_name(principal.role);
    out << YAML::Key << "sha256" << YAML::Value << hex(entry.sha256);
    if (principal.role == Role::kWorker) {
      out << YAML::Key << "worker_ids" << YAML::Value << YAML::Flow << principal.worker_ids;
    }
    out << YAML::EndMap;
  }
  out << YAML::EndSeq << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::array<uint8_t, 32> token_hash(std::string_view token) {
  return parse_hash(sha256_hex(token), "token hash");
}

std::string hex(const std::array<uint8_t, 32>& bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text;
  for (const uint8_t byte : bytes) {
    text.push_back(kDigits[byte >> 4]);
    text.push_back(kDigits[byte & 15]);
  }
  return text;
}

Authenticator::Authenticator(std::filesystem::path tokens_file)
    : tokens_file_(std::move(tokens_file)) {
  reload();
}

void Authenticator::reload() {
  if (!enabled()) return;
  std::string text;
  try {
    text = read_file(tokens_file_);
  } catch (const std::exception& error) {
    throw TokensFileError("cannot read the tokens file " + tokens_file_.string() + ": " +
                          error.what());
  }
  auto entries =
      std::make_shared<const std::vector<TokenEntry>>(parse_tokens(text, tokens_file_.string()));
  if (entries->empty()) {
    throw TokensFileError(tokens_file_.string() +
                          ": holds no tokens (nobody could call the coordinator)");
  }
  std::lock_guard lock(mu_);
  entries_ = std::move(entries);
}

grpc::Status Authenticator::authenticate(std::string_view authorization,
                                         Principal* principal) const {
  if (!enabled()) {
    *principal = Principal{};
    return grpc::Status::OK;
  }
  if (authorization.empty()) {
    return grpc::Status(Code::UNAUTHENTICATED,
                        "no token: send \"authorization: Bearer <token>\" (lomoctl: "
                        "--token-file or $LOMO_TOKEN)");
  }
  if (authorization.substr(0, kBearer.size()) != kBearer) {
    return grpc::Status(Code::UNAUTHENTICATED,
                        "the authorization value must be \"Bearer <token>\"");
  }
  const std::array<uint8_t, 32> presented = token_hash(authorization.substr(kBearer.size()));
  std::shared_ptr<const std::vector<TokenEntry>> entries;
  {
    std::lock_guard lock(mu_);
    entries = entries_;
  }
  const TokenEntry* found = nullptr;
  for (const TokenEntry& entry : *entries) {  // every entry, found or not
    if (constant_time_equal(entry.sha256, presented)) found = &entry;
  }
  if (found == nullptr) {
    return grpc::Status(Code::UNAUTHENTICATED, "the token is not valid (unknown or revoked)");
  }
  *principal = found->principal;
  return grpc::Status::OK;
}

grpc::Status Authenticator::authorize(std::string_view authorization, Access access,
                                      std::string_view what, Principal* principal) const {
  // Authentication off: everyone is an admin and may do everything, the worker protocol
  // included (the listeners are then on loopback, or --insecure said so).
  if (!enabled()) {
    *principal = Principal{};
    return grpc::Status::OK;
  }
  // A public call is anonymous even when it carries a token: nothing it does depends on who.
  if (access == Access::kPublic) {
    *principal = Principal{};
    principal->role = Role::kViewer;
    return grpc::Status::OK;
  }
  grpc::Status status = authenticate(authorization, principal);
  if (!status.ok()) return status;
  return check_role(*principal, access, what);
}

grpc::Status Authenticator::authorize_call(const grpc::ServerContextBase& context,
                                           const std::string& method, Principal* principal) const {
  const auto& table = grpc_method_access();
  const auto rule = table.find(method);
  if (rule == table.end()) {
    // Fails closed: a method without a rule is a programming error, never open.
    return grpc::Status(Code::INTERNAL, "no authorization rule for " + method);
  }
  std::string_view authorization;
  const auto& metadata = context.client_metadata();
  if (const auto found = metadata.find("authorization"); found != metadata.end()) {
    authorization = std::string_view(found->second.data(), found->second.size());
  }
  const std::string_view name = std::string_view(method).substr(method.rfind('/') + 1);
  return authorize(authorization, rule->second, name, principal);
}

grpc::Status check_role(const Principal& principal, Access access, std::string_view what) {
  if (role_allows(principal.role, access)) return grpc::Status::OK;
  return grpc::Status(Code::PERMISSION_DENIED, principal.describe() + " may not call " +
                                                   std::string(what) + " (it needs " +
                                                   access_name(access) + " access)");
}

grpc::Status check_job_owner(const Principal& principal, Access access, const std::string& owner,
                             const std::string& job_id) {
  if (principal.role == Role::kAdmin) return grpc::Status::OK;
  if (principal.role == Role::kViewer && access == Access::kReadJob) return grpc::Status::OK;
  if (principal.role == Role::kUser && !owner.empty() && owner == principal.name) {
    return grpc::Status::OK;
  }
  return grpc::Status(Code::PERMISSION_DENIED, "job " + job_id + " belongs to another user; " +
                                                   principal.describe() +
                                                   " may reach only its own jobs");
}

}  // namespace lomo::server
