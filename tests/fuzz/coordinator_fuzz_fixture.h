// The real coordinator in the fuzz target's process, made once: a store in a temporary data dir,
// the checkpoint store, metrics, the Coordinator with its roles and background thread, an
// executor, and authentication on with one admin and one worker token (so that inputs carrying
// them reach the handlers behind the checks, and inputs without them exercise the refusals).
// Nothing is mocked: the network targets feed raw bytes to the same code lomo-coordinator runs.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "common/sha256.h"
#include "server/auth.h"
#include "server/checkpoint_store.h"
#include "server/coordinator.h"
#include "server/executor.h"
#include "server/in_flight.h"
#include "server/metrics.h"
#include "server/store.h"

namespace lomo::fuzz {

// The tokens the seed corpora use (Authorization: Bearer ... / gRPC metadata).
inline const std::string kAdminToken = "lomo_" + std::string(43, 'A');
inline const std::string kWorkerToken = "lomo_" + std::string(43, 'W');

struct CoordinatorFixture {
  CoordinatorFixture() : dir(make_dir()), auth(write_tokens(dir / "tokens.yaml")) {
    store = std::make_unique<server::Store>(dir / "coordinator.db", 2, server::StoreOpen::kCreate);
    checkpoints = std::make_unique<server::CheckpointStore>(dir / "checkpoints");
    server::CoordinatorOptions options;
    options.heartbeat_timeout_seconds = 5;
    options.heartbeat_interval_ms = 200;
    options.reattach_window_seconds = 5;
    coordinator = std::make_unique<server::Coordinator>(options, *store, *checkpoints, metrics);
    coordinator->start();
  }

  static std::filesystem::path make_dir() {
    char pattern[] = "/tmp/lomo-fuzz-coordinator-XXXXXX";
    if (mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
    return pattern;
  }

  static std::filesystem::path write_tokens(const std::filesystem::path& file) {
    std::ofstream(file) << "tokens:\n"
                        << "  - name: fuzz-admin\n    role: admin\n    sha256: "
                        << sha256_hex(kAdminToken) << "\n"
                        << "  - name: fuzz-workers\n    role: worker\n    sha256: "
                        << sha256_hex(kWorkerToken) << "\n    worker_ids: [\"fuzz-*\"]\n";
    return file;
  }

  std::filesystem::path dir;
  server::Authenticator auth;
  server::Metrics metrics;
  std::unique_ptr<server::Store> store;
  std::unique_ptr<server::CheckpointStore> checkpoints;
  std::unique_ptr<server::Coordinator> coordinator;
  server::Executor executor{4};
  server::InFlight in_flight;
};

// Made on first use and never destroyed: the servers' threads run until the process exits.
// The data dir is removed at exit (the open files stay valid until then).
inline CoordinatorFixture& coordinator_fixture() {
  static CoordinatorFixture* fixture = [] {
    auto* made = new CoordinatorFixture();
    static const std::filesystem::path dir = made->dir;
    atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
    });
    return made;
  }();
  return *fixture;
}

}  // namespace lomo::fuzz
