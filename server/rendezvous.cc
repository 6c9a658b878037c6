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
  const auto it = space.values.find(key);
  if (it == space.values.end() && space.values.size() >= kMaxKeysPerAttempt) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "job " + job_id + " attempt " + std::to_string(attempt) + " already has " +
                            std::to_string(space.values.size()) +
                            " rendezvous keys, the limit per attempt");
  }
  // Overwriting costs only what the new value adds; a shorter one frees bytes.
  const size_t held = it == space.values.end() ? 0 : key.size() + it->second.size();
  const size_t wanted = key.size() + value.size();
  if (wanted > held) {
    if (grpc::Status status = check_budget(space, job_id, attempt, wanted - held); !status.ok()) {
      return status;
    }
  }
  space.bytes = space.bytes - held + wanted;
  total_bytes_ = total_bytes_ - held + wanted;
  if (it != space.values.end()) {
    it->second = std::move(value);
  } else {
    space.values.emplace(key, std::move(value));
  }
  return grpc::Status::OK;
}

grpc::Status Rendezvous::check_budget(const Namespace& space, const std::string& job_id,
                                      int64_t attempt, size_t added) const {
  const std::string what = "job " + job_id + " attempt " + std::to_string(attempt);
  if (space.bytes + added > kMaxBytesPerAttempt) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        what + ": rendezvous keys and values would take " +
                            std::to_string(space.bytes + added) + " bytes, over the limit of " +
                            std::to_string(kMaxBytesPerAttempt) + " bytes per attempt");
  }
  if (total_bytes_ + added > kMaxTotalBytes) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        what + ": the rendezvous of all attempts would take " +
                            std::to_string(total_bytes_ + added) + " bytes, over the limit of " +
                            std::to_string(kMaxTotalBytes) + " bytes on this coordinator");
  }
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
    const auto it = space->second.values.find(key);
    if (it == space->second.values.end()) return grpc::Status::OK;
    found.push_back(it->second);
  }
  *ready = true;
  *values = std::move(found);
  return grpc::Status::OK;
}

void Rendezvous::drop(const std::string& job_id, int64_t attempt) {
  const auto it = namespaces_.find({job_id, attempt});
  if (it != namespaces_.end()) erase(it);
}

void Rendezvous::drop_job(const std::string& job_id) {
  auto it = namespaces_.lower_bound({job_id, INT64_MIN});
  while (it != namespaces_.end() && it->first.first == job_id) erase(it++);
}

void Rendezvous::erase(std::map<std::pair<std::string, int64_t>, Namespace>::iterator it) {
  total_bytes_ -= it->second.bytes;
  namespaces_.erase(it);
}

}  // namespace lomo::server
