#include "kernels/backend.h"

#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels/cpu/cpu_backend.h"

#ifdef LOMO_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_check.h"
#endif

namespace lomo {

namespace {

#ifdef LOMO_HAVE_CUDA
// One CudaBackend per GPU for the whole process, created on first use (its stream, cuBLAS handle
// and memory pool are set up then) and never destroyed, like the CPU one: a Buffer released
// during static destruction still finds it.
Backend& cuda_backend(Device device) {
  static std::mutex mutex;
  static const int count = cuda::device_count();
  if (device.index < 0 || device.index >= count) {
    throw std::invalid_argument("no compute backend for device " + device_name(device) + ": " +
                                std::to_string(count) + " CUDA device(s) on this machine");
  }
  static Backend** const backends = new Backend*[count]();  // never freed, as said above
  std::lock_guard<std::mutex> lock(mutex);
  Backend*& backend = backends[device.index];
  if (backend == nullptr) backend = new cuda::CudaBackend(device.index);
  return *backend;
}
#endif

}  // namespace

Backend& backend_for(Device device) {
  if (device.is_cpu()) {
    // One per process: the host is one device and the backend holds no per-job state. Never
    // destroyed, so a Buffer released during static destruction still finds it.
    static Backend& cpu_backend = *new cpu::CpuBackend();
    return cpu_backend;
  }
#ifdef LOMO_HAVE_CUDA
  return cuda_backend(device);
#else
  throw std::invalid_argument("no compute backend for device " + device_name(device) +
                              ": this build has no CUDA backend");
#endif
}

std::vector<Device> available_backends() {
  std::vector<Device> devices = {Device::cpu()};
#ifdef LOMO_HAVE_CUDA
  for (int i = 0, count = cuda::device_count(); i < count; ++i) devices.push_back(Device::cuda(i));
#endif
  return devices;
}

}  // namespace lomo
