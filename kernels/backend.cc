#include "kernels/backend.h"

#include <stdexcept>

#include "kernels/cpu/cpu_backend.h"

namespace lomo {

Backend& backend_for(Device device) {
  if (device.is_cpu()) {
    // One per process: the host is one device and the backend holds no per-job state. Never
    // destroyed, so a Buffer released during static destruction still finds it.
    static Backend& cpu_backend = *new cpu::CpuBackend();
    return cpu_backend;
  }
  throw std::invalid_argument("no compute backend for device " + device_name(device) +
                              " in this build (the CUDA backend is not implemented yet)");
}

std::vector<Device> available_backends() { return {Device::cpu()}; }

}  // namespace lomo
