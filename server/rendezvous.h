// The rendezvous of a gang's ranks: one small key-value namespace per job attempt, through which
// the ranks of a data-parallel job find each other (Gloo's rendezvous store; later the NCCL unique
// id). Who may use a namespace is the coordinator's question (WorkerRegistry: a connected worker
// that owns a rank of exactly that attempt); this class keeps the values and the limits. A
// namespace is dropped when its attempt ends, so a rank of an old attempt finds nothing and is
// refused, never meets the ranks of a new one.
//
// Setting a key that exists overwrites it: Gloo writes each key once per attempt, except when a
// rank retries a set whose answer it lost (the value is then the same), so the last write wins and
// nothing is refused. Get never waits: it answers whether every key is set (clients poll).
//
// Memory: an attempt holds at most kMaxBytesPerAttempt (keys and values together; Gloo writes
// one small key per rank, NCCL's unique id is 128 bytes) and all attempts together at most
// kMaxTotalBytes, so a misbehaving rank cannot grow the coordinator without bound; the limits on
// single keys and values stay.
//
// Not thread-safe: the coordinator calls it under its lock.
#pragma once

#include <grpcpp/support/status.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lomo::server {

class Rendezvous {
 public:
  static constexpr size_t kMaxKeyBytes = 256;
  static constexpr size_t kMaxValueBytes = 64 * 1024;
  static constexpr size_t kMaxKeysPerAttempt = 4096;
  static constexpr size_t kMaxBytesPerAttempt = 1024 * 1024;
  static constexpr size_t kMaxTotalBytes = 64 * 1024 * 1024;

  // INVALID_ARGUMENT for a key or value over its limit (or an empty key), RESOURCE_EXHAUSTED when
  // a new key would exceed the attempt's key limit, or the write (a new key and value, or a
  // longer value) its byte budget or the total; each message names the limit.
  grpc::Status set(const std::string& job_id, int64_t attempt, const std::string& key,
                   std::string value);
  // Every key's value in order, or false (and `values` empty) while one is missing.
  // INVALID_ARGUMENT for a key over the limit.
  grpc::Status get(const std::string& job_id, int64_t attempt, const std::vector<std::string>& keys,
                   bool* ready, std::vector<std::string>* values) const;
  // The attempt ended: its namespace goes (no-op when it has none).
  void drop(const std::string& job_id, int64_t attempt);
  // Every attempt of the job (the job ended).
  void drop_job(const std::string& job_id);

  size_t namespaces() const { return namespaces_.size(); }
  // Key and value bytes held, over every attempt.
  size_t total_bytes() const { return total_bytes_; }

 private:
  struct Namespace {
    std::map<std::string, std::string> values;
    size_t bytes = 0;  // keys and values
  };
  // RESOURCE_EXHAUSTED when `space` (of job_id, attempt) cannot grow by `added` bytes.
  grpc::Status check_budget(const Namespace& space, const std::string& job_id, int64_t attempt,
                            size_t added) const;
  void erase(std::map<std::pair<std::string, int64_t>, Namespace>::iterator it);

  std::map<std::pair<std::string, int64_t>, Namespace> namespaces_;
  size_t total_bytes_ = 0;
};

}  // namespace lomo::server
