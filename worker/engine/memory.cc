#include "worker/engine/memory.h"

#include <sstream>
#include <utility>

#include "kernels/backend.h"

namespace lomo {

std::string_view memory_kind_name(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kParameters:
      return "parameters";
    case MemoryKind::kGradients:
      return "gradients";
    case MemoryKind::kOptimizerState:
      return "optimizer_state";
    case MemoryKind::kActivations:
      return "activations";
    case MemoryKind::kWorkspace:
      return "workspace";
    case MemoryKind::kCommunication:
      return "communication";
    case MemoryKind::kKvCache:
      return "kv_cache";
  }
  return "?";
}

std::string MemoryReport::to_string() const {
  std::ostringstream out;
  out.precision(1);
  out << std::fixed;
  for (size_t k = 0; k < kMemoryKindCount; ++k) {
    out << "  " << memory_kind_name(static_cast<MemoryKind>(k)) << ": peak "
        << peak_bytes[k] / 1048576.0 << " MiB, now " << current_bytes[k] / 1048576.0 << " MiB\n";
  }
  out << "  total: peak " << peak_total_bytes / 1048576.0 << " MiB, now "
      << current_total_bytes / 1048576.0 << " MiB\n";
  return out.str();
}

std::string MemoryReport::to_json() const {
  std::ostringstream out;
  out << "{";
  for (size_t k = 0; k < kMemoryKindCount; ++k) {
    out << "\"" << memory_kind_name(static_cast<MemoryKind>(k))
        << "\":{\"current\":" << current_bytes[k] << ",\"peak\":" << peak_bytes[k] << "},";
  }
  out << "\"total\":{\"current\":" << current_total_bytes << ",\"peak\":" << peak_total_bytes
      << "}}";
  return out.str();
}

void MemoryAccountant::raise_to(std::atomic<uint64_t>& peak, uint64_t value) {
  uint64_t seen = peak.load(std::memory_order_relaxed);
  while (value > seen && !peak.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

void MemoryAccountant::record_allocation(MemoryKind kind, uint64_t bytes) {
  const auto k = static_cast<size_t>(kind);
  raise_to(peak_[k], current_[k].fetch_add(bytes, std::memory_order_relaxed) + bytes);
  raise_to(peak_total_, current_total_.fetch_add(bytes, std::memory_order_relaxed) + bytes);
}

void MemoryAccountant::record_release(MemoryKind kind, uint64_t bytes) {
  current_[static_cast<size_t>(kind)].fetch_sub(bytes, std::memory_order_relaxed);
  current_total_.fetch_sub(bytes, std::memory_order_relaxed);
}

MemoryReport MemoryAccountant::report() const {
  MemoryReport report;
  report.device = device_;
  for (size_t k = 0; k < kMemoryKindCount; ++k) {
    report.current_bytes[k] = current_[k].load(std::memory_order_relaxed);
    report.peak_bytes[k] = peak_[k].load(std::memory_order_relaxed);
  }
  report.current_total_bytes = current_total_.load(std::memory_order_relaxed);
  report.peak_total_bytes = peak_total_.load(std::memory_order_relaxed);
  return report;
}

void MemoryAccountant::reset_peaks() {
  for (size_t k = 0; k < kMemoryKindCount; ++k) {
    peak_[k].store(current_[k].load(std::memory_order_relaxed), std::memory_order_relaxed);
  }
  peak_total_.store(current_total_.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

namespace {

// "12.55 GiB" from 1 GiB up, else "3.0 MiB".
std::string human_bytes(uint64_t bytes) {
  std::ostringstream out;
  out << std::fixed;
  if (bytes >= (uint64_t{1} << 30)) {
    out.precision(2);
    out << static_cast<double>(bytes) / 1073741824.0 << " GiB";
  } else {
    out.precision(1);
    out << static_cast<double>(bytes) / 1048576.0 << " MiB";
  }
  return out.str();
}

}  // namespace

OutOfMemoryError::OutOfMemoryError(const MemoryAccountant& accountant, MemoryKind kind,
                                   size_t bytes) {
  const MemoryReport report = accountant.report();
  message_ = "out of memory on " + device_name(accountant.device()) + " allocating " +
             human_bytes(bytes) + " of " + std::string(memory_kind_name(kind)) + "; in use " +
             human_bytes(report.current_total_bytes) + ":";
  for (size_t k = 0; k < kMemoryKindCount; ++k) {
    if (report.current_bytes[k] == 0) continue;
    message_ += " " + std::string(memory_kind_name(static_cast<MemoryKind>(k))) + " " +
                human_bytes(report.current_bytes[k]);
  }
}

Buffer::Buffer(MemoryAccountant& accountant, MemoryKind kind, size_t bytes)
    : accountant_(&accountant), kind_(kind), bytes_(bytes) {
  if (bytes == 0) return;
  try {
    data_ = backend_for(accountant.device()).allocate(bytes);
  } catch (const std::bad_alloc&) {
    throw OutOfMemoryError(accountant, kind, bytes);
  }
  accountant_->record_allocation(kind_, bytes_);
}

Buffer::~Buffer() { reset(); }

void Buffer::reset() {
  if (data_ != nullptr) {
    backend_for(accountant_->device()).deallocate(data_);
    accountant_->record_release(kind_, bytes_);
  }
  data_ = nullptr;
  bytes_ = 0;
}

Buffer::Buffer(Buffer&& other) noexcept
    : accountant_(other.accountant_),
      kind_(other.kind_),
      data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    reset();
    accountant_ = other.accountant_;
    kind_ = other.kind_;
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

}  // namespace lomo
