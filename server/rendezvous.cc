#include "server/rendezvous.h"

namespace lomo::server {

namespace {

grpc::Status check_key(const std::string& key, const std::string& field) {
  if (key.empty()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, field + ": required");
  if (key.size() > Rendezvous::kMaxKeyBytes) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        field + ": " + std::to_string(key.size()) + " bytes, over the limit of " +
                            std::to_string(Rendezvous::kMaxKeyBytes) + " bytes per key");
  }
  return grpc::Status::OK;
}

}  // namespace

grpc::Status Rendezvous::set(const std::string& job_id, int64_t attempt, const std::string& key,
                             std::string value) {
  if (grpc::Status status = check_key(key, "key"); !status.ok()) return status;
  if (value.size() > kMaxValueBytes) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "value: " + std::to_string(value.size()) + " bytes, over the limit of " +
                            std::to_string(kMaxValueBytes) + " bytes per value");
  }
  Namespace& space = namespaces_[{job_id, attempt}];
  const auto it = space.find(key);
  if (it != space.end()) {
    it->second = std::move(value);
    return grpc::Status::OK;
  }
  if (space.size() >= kMaxKeysPerAttempt) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "job " + job_id + " attempt " + std::to_string(attempt) + " already has " +
                            std::to_string(space.size()) +
                            " rendezvous keys, the limit per attempt");
  }
  space.emplace(key, std::move(value));
  return grpc::Status::OK;
}

grpc::Status Rendezvous::get(const std::string& job_id, int64_t attempt,
                             const std::vector<std::string>& keys, bool* ready,
                             std::vector<std::string>* values) const {
  *ready = false;
  values->clear();
  for (size_t i = 0; i < keys.size(); ++i) {
    if (grpc::Status status = check_key(keys[i], "keys[" + std::to_string(i) + "]"); !status.ok()) {
      return status;
    }
  }
  const auto space = namespaces_.find({job_id, attempt});
  std::vector<std::string> found;
  found.reserve(keys.size());
  for (const std::string& key : keys) {
    if (space == namespaces_.end()) return grpc::Status::OK;
    const auto it = space->second.find(key);
    if (it == space->second.end()) return grpc::Status::OK;
    found.push_back(it->second);
  }
  *ready = true;
  *values = std::move(found);
  return grpc::Status::OK;
}

void Rendezvous::drop(const std::string& job_id, int64_t attempt) {
  namespaces_.erase({job_id, attempt});
}

void Rendezvous::drop_job(const std::string& job_id) {
  auto it = namespaces_.lower_bound({job_id, INT64_MIN});
  while (it != namespaces_.end() && it->first.first == job_id) it = namespaces_.erase(it);
}

}  // namespace lomo::server
