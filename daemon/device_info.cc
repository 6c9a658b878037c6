#include "daemon/device_info.h"

#include <sstream>
#include <stdexcept>

#include "common/read_file.h"

#ifdef LOMO_DAEMON_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lomo::daemon {
namespace {

// A /proc file's text; "" when it cannot be read (the device is then described with less).
std::string read_text(const std::string& path) {
  try {
    return read_file(path);
  } catch (const FileReadError&) {
    return "";
  }
}

std::string trim(const std::string& s) {
  const size_t first = s.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t") - first + 1);
}

Device cpu_device() {
  Device device;
  device.info.set_kind(lomo::v1::DEVICE_KIND_CPU);
  const std::string name = cpu_model_name(read_text("/proc/cpuinfo"));
  device.info.set_name(name.empty() ? "cpu" : name);
  device.info.set_memory_bytes(meminfo_total_bytes(read_text("/proc/meminfo")));
  device.info.set_index(0);
  device.short_name = "cpu";
  return device;
}

Device cuda_device(int index) {
#ifdef LOMO_DAEMON_HAVE_CUDA
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    throw std::invalid_argument("--device " + std::to_string(index) +
                                ": the CUDA runtime finds no usable GPU (" +
                                cudaGetErrorString(status) + ")");
  }
  if (index >= count) {
    throw std::invalid_argument("--device " + std::to_string(index) + ": this machine has " +
                                std::to_string(count) + " CUDA device(s), numbered from 0");
  }
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, index) != cudaSuccess) {
    throw std::invalid_argument("--device " + std::to_string(index) +
                                ": cannot read the device's properties");
  }
  Device device;
  device.info.set_kind(lomo::v1::DEVICE_KIND_CUDA);
  device.info.set_name(properties.name);
  device.info.set_memory_bytes(static_cast<int64_t>(properties.totalGlobalMem));
  device.info.set_index(index);
  device.child_env.push_back("CUDA_VISIBLE_DEVICES=" + std::to_string(index));
  device.short_name = "cuda" + std::to_string(index);
  return device;
#else
  throw std::invalid_argument("--device " + std::to_string(index) +
                              ": this lomo-worker was built without CUDA (configure with nvcc "
                              "present and LOMO_CUDA=ON), so only --device cpu is available");
#endif
}

}  // namespace

std::string cpu_model_name(const std::string& cpuinfo_text) {
  std::istringstream lines(cpuinfo_text);
  std::string line;
  while (std::getline(lines, line)) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    if (trim(line.substr(0, colon)) == "model name") return trim(line.substr(colon + 1));
  }
  return "";
}

int64_t meminfo_total_bytes(const std::string& meminfo_text) {
  std::istringstream lines(meminfo_text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("MemTotal:", 0) != 0) continue;
    std::istringstream fields(line.substr(9));
    int64_t value = 0;
    std::string unit;
    fields >> value >> unit;
    return unit == "kB" ? value * 1024 : value;
  }
  return 0;
}

Device detect_device(const std::string& device_flag) {
  if (device_flag == "cpu") return cpu_device();
  if (!device_flag.empty() && device_flag.find_first_not_of("0123456789") == std::string::npos &&
      device_flag.size() < 4) {
    return cuda_device(std::stoi(device_flag));
  }
  std::string value = device_flag;
  if (value.rfind("cuda:", 0) == 0 || value.rfind("cuda", 0) == 0) {
    const std::string index = value.substr(value[4] == ':' ? 5 : 4);
    if (!index.empty() && index.find_first_not_of("0123456789") == std::string::npos &&
        index.size() < 4) {
      return cuda_device(std::stoi(index));
    }
  }
  throw std::invalid_argument("--device '" + device_flag +
                              "': expected cpu or a GPU index (0, 1, ...)");
}

}  // namespace lomo::daemon
