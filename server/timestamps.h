// Wall-clock time as a protobuf Timestamp, to the microsecond. Not TimeUtil::GetCurrentTime():
// protobuf 3.21 (Debian 12) fills it to the whole second only, which would make every event of a
// second look simultaneous and scheduling latency wrong by up to a second.
#pragma once

#include <google/protobuf/timestamp.pb.h>

#include <chrono>

namespace lomo::server {

inline google::protobuf::Timestamp now_timestamp() {
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  google::protobuf::Timestamp timestamp;
  timestamp.set_seconds(micros / 1000000);
  timestamp.set_nanos(static_cast<int32_t>(micros % 1000000) * 1000);
  return timestamp;
}

}  // namespace lomo::server
