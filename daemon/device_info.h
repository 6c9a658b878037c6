// The one device a worker registers: `--device cpu` or `--device N` (a CUDA device index).
#pragma once

#include <string>
#include <vector>

#include "lomo/v1/workers.pb.h"

namespace lomo::daemon {

struct Device {
  lomo::v1::DeviceInfo info;
  // Added to the training child's environment (CUDA_VISIBLE_DEVICES for a GPU).
  std::vector<std::string> child_env;
  // "cpu", "cuda0": part of the default worker id.
  std::string short_name;
};

// Describes the device named by a --device value. cpu: the model name from /proc/cpuinfo and
// MemTotal from /proc/meminfo. N: the CUDA runtime's properties of device N, in builds with CUDA.
// Throws std::invalid_argument with a message fit for the command line when the value is not a
// device this build and machine have.
Device detect_device(const std::string& device_flag);

// Parsers, exposed for tests: the first "model name" in /proc/cpuinfo text, and MemTotal in bytes
// from /proc/meminfo text (0 when absent).
std::string cpu_model_name(const std::string& cpuinfo_text);
int64_t meminfo_total_bytes(const std::string& meminfo_text);

}  // namespace lomo::daemon
