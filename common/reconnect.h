// How long a worker may take to find a coordinator that came back, and hence how long the
// coordinator waits for a worker whose stream broke before it ends that worker's job attempt.
// One header for both sides so that the relation cannot drift: the re-attach window must exceed
// the longest a worker can take to dial again after a coordinator restart or a broken stream,
// which is its largest backoff delay plus one dial (connect + Register/Registered), plus a margin
// for the first heartbeat. Otherwise the coordinator blames workers for its own outage.
#pragma once

#include <chrono>

namespace lomo {

// The worker daemon's reconnect backoff (daemon/session.h SessionOptions defaults).
inline constexpr std::chrono::milliseconds kWorkerInitialBackoff{250};
inline constexpr std::chrono::milliseconds kWorkerMaxBackoff{15000};
// Dialling plus the Register/Registered exchange (SessionOptions::connect_timeout).
inline constexpr std::chrono::milliseconds kWorkerConnectTimeout{5000};
// Room for the worker's first heartbeat and a loaded machine on top of the worst case. 5 s was
// once too little: in a chaos soak on 2 busy cores a worker came back 0.3 s after a 25 s window.
inline constexpr std::chrono::milliseconds kReattachMargin{10000};

// The coordinator's default re-attach window (server/config.h reattach_window_seconds): the
// worst-case time from a worker's stream breaking to its next successful registration, plus the
// margin. 30 s with the defaults above. The coordinator counts it from the moment its listeners
// accept connections again (Coordinator::serving_from_now), not from its start.
inline constexpr std::chrono::milliseconds kDefaultReattachWindow =
    kWorkerMaxBackoff + kWorkerConnectTimeout + kReattachMargin;

static_assert(kDefaultReattachWindow > kWorkerMaxBackoff + kWorkerConnectTimeout,
              "the coordinator must wait longer than a worker can take to re-attach");

}  // namespace lomo
