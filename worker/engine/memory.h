// Accountable memory: every large buffer is a Buffer drawn against a MemoryAccountant, which knows
// current and peak bytes per kind. This is how lomo proves its memory claims (DESIGN.md, "The LOMO
// step"). An accountant counts one device's memory: a process with several devices keeps one
// accountant per device, and each Buffer lives on its accountant's device.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <string_view>

#include "kernels/device.h"

namespace lomo {

enum class MemoryKind : uint8_t {
  kParameters,
  kGradients,
  kOptimizerState,
  kActivations,
  kWorkspace,
  // A communicator's own buffers (message staging of the collectives), counted through
  // Communicator::set_buffer_accountant: what data parallelism adds to a rank's memory.
  kCommunication,
  // Generation's key/value cache (worker/engine/kv_cache_model.h): keys and values of every layer
  // for every position generated so far.
  kKvCache,
};
inline constexpr size_t kMemoryKindCount = 7;
std::string_view memory_kind_name(MemoryKind kind);

struct MemoryReport {
  Device device;  // whose memory this is
  std::array<uint64_t, kMemoryKindCount> current_bytes{};
  std::array<uint64_t, kMemoryKindCount> peak_bytes{};  // peak of each kind on its own
  uint64_t current_total_bytes = 0;
  uint64_t peak_total_bytes = 0;  // peak of the sum, not the sum of the peaks

  uint64_t current(MemoryKind kind) const { return current_bytes[static_cast<size_t>(kind)]; }
  uint64_t peak(MemoryKind kind) const { return peak_bytes[static_cast<size_t>(kind)]; }
  // One line per kind, for logs and benchmarks.
  std::string to_string() const;
  // {"parameters": {"current": .., "peak": ..}, ..., "total": {...}} for metrics lines.
  std::string to_json() const;
};

// Thread-safe counters for one device; an accountant must outlive every Buffer drawn against it.
class MemoryAccountant {
 public:
  explicit MemoryAccountant(Device device = Device::cpu()) : device_(device) {}
  Device device() const { return device_; }
  void record_allocation(MemoryKind kind, uint64_t bytes);
  void record_release(MemoryKind kind, uint64_t bytes);
  MemoryReport report() const;
  // Starts a new measurement window: peaks restart from the current values.
  void reset_peaks();

 private:
  static void raise_to(std::atomic<uint64_t>& peak, uint64_t value);
  Device device_;
  std::array<std::atomic<uint64_t>, kMemoryKindCount> current_{};
  std::array<std::atomic<uint64_t>, kMemoryKindCount> peak_{};
  std::atomic<uint64_t> current_total_{0};
  std::atomic<uint64_t> peak_total_{0};
};

// A Buffer the device could not provide. A std::bad_alloc (so every handler of allocation failure
// still catches it) whose what() says which device, how much of which kind was asked for, and what
// the accountant holds by kind: "out of memory on cuda:0 allocating 1024.0 MiB of activations;
// in use 17.3 GiB: parameters 12.55 GiB, ...".
class OutOfMemoryError : public std::bad_alloc {
 public:
  OutOfMemoryError(const MemoryAccountant& accountant, MemoryKind kind, size_t bytes);
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

// An owned, 64-byte aligned, uninitialised allocation in the memory of the accountant's device
// (host memory for the CPU), made by that device's Backend and counted against the accountant.
class Buffer {
 public:
  Buffer() = default;
  Buffer(MemoryAccountant& accountant, MemoryKind kind, size_t bytes);
  ~Buffer();
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() { return data_; }
  const void* data() const { return data_; }
  template <typename T>
  T* as() {
    return static_cast<T*>(data_);
  }
  template <typename T>
  const T* as() const {
    return static_cast<const T*>(data_);
  }
  size_t size_bytes() const { return bytes_; }
  bool empty() const { return data_ == nullptr; }
  MemoryKind kind() const { return kind_; }
  // The device the data lives on (the CPU for an empty buffer).
  Device device() const { return accountant_ != nullptr ? accountant_->device() : Device::cpu(); }
  void reset();

 private:
  MemoryAccountant* accountant_ = nullptr;
  MemoryKind kind_ = MemoryKind::kWorkspace;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A Buffer of `count` fp32 values.
inline Buffer float_buffer(MemoryAccountant& accountant, MemoryKind kind, size_t count) {
  return Buffer(accountant, kind, count * sizeof(float));
}

}  // namespace lomo
