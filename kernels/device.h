// Which device a buffer lives on and a backend computes on.
#pragma once

#include <cstdint>
#include <string>

namespace lomo {

enum class DeviceType : uint8_t { kCpu, kCuda };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;  // which GPU; 0 for the CPU

  static constexpr Device cpu() { return Device{}; }
  static constexpr Device cuda(int index) { return Device{DeviceType::kCuda, index}; }
  bool is_cpu() const { return type == DeviceType::kCpu; }
  friend bool operator==(const Device&, const Device&) = default;
};

// "cpu", "cuda:0".
inline std::string device_name(Device device) {
  return device.is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(device.index);
}

}  // namespace lomo
