#include "daemon/checkpoint_fetcher.h"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "apiclient/lomo_client.h"
#include "daemon/log.h"

namespace lomo::daemon {

std::optional<int64_t> CoordinatorCheckpointFetcher::fetch_latest(
    const std::string& job_id, const std::filesystem::path& checkpoints_dir) {
  namespace fs = std::filesystem;
  client::ClientOptions options;
  options.address = address_;
  options.timeout = timeout_;
  client::Client client(options);
  std::vector<lomo::v1::CheckpointInfo> checkpoints = client.list_checkpoints(job_id);
  if (checkpoints.empty()) return std::nullopt;
  const auto newest =
      std::max_element(checkpoints.begin(), checkpoints.end(),
                       [](const auto& a, const auto& b) { return a.step() < b.step(); });
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(newest->step()));
  const fs::path temporary = checkpoints_dir / (std::string(".fetch-") + name);
  const fs::path final_dir = checkpoints_dir / name;
  fs::remove_all(temporary);
  log_line("job " + job_id + ": fetching checkpoint " + newest->checkpoint_id() +
           " from the coordinator to resume from it");
  client.download_checkpoint(newest->checkpoint_id(), temporary,
                             {newest->files().begin(), newest->files().end()});
  fs::remove_all(final_dir);
  fs::rename(temporary, final_dir);
  // The trainer resumes from the directory `latest` names (written whole, then renamed).
  const fs::path pointer_tmp = checkpoints_dir / ".latest.tmp";
  {
    std::ofstream out(pointer_tmp);
    out << name << "\n";
    if (!out.flush()) throw std::runtime_error("cannot write " + pointer_tmp.string());
  }
  fs::rename(pointer_tmp, checkpoints_dir / "latest");
  return newest->step();
}

}  // namespace lomo::daemon
