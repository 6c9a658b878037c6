#include "daemon/checkpoint_fetcher.h"

#include <grpcpp/grpcpp.h>

#include <fstream>
#include <stdexcept>
#include <vector>

#include "common/checkpoint_layout.h"
#include "common/file_transfer.h"
#include "common/log.h"
#include "lomo/v1/workers.grpc.pb.h"

namespace lomo::daemon {

namespace fs = std::filesystem;

namespace {

using Reader = grpc::ClientReader<lomo::v1::FetchCheckpointResponse>;

// Receives the checkpoint's files into `directory`; throws TransferError or std::runtime_error,
// with the stream finished either way.
void receive_files(Reader& reader, grpc::ClientContext& context,
                   const lomo::v1::CheckpointInfo& info, const fs::path& directory) {
  FileReceiver receiver(directory);
  lomo::v1::FetchCheckpointResponse response;
  try {
    while (reader.Read(&response)) receiver.accept(response.chunk());
  } catch (const TransferError&) {
    context.TryCancel();
    reader.Finish();
    throw;
  }
  const grpc::Status status = reader.Finish();
  if (!status.ok()) {
    throw std::runtime_error("the coordinator ended the fetch: " + status.error_message());
  }
  receiver.finish();
  const std::string mismatch = compare_with_record(
      receiver.files(),
      std::vector<lomo::v1::CheckpointFile>(info.files().begin(), info.files().end()));
  if (!mismatch.empty()) throw TransferError(mismatch);
}

// Points <checkpoints_dir>/latest at `name` (written whole, then renamed): the trainer resumes
// from the directory it names.
void point_latest_at(const fs::path& checkpoints_dir, const std::string& name) {
  const fs::path pointer_tmp = checkpoints_dir / ".latest.tmp";
  {
    std::ofstream out(pointer_tmp);
    out << name << "\n";
    if (!out.flush()) throw std::runtime_error("cannot write " + pointer_tmp.string());
  }
  fs::rename(pointer_tmp, latest_checkpoint_pointer(checkpoints_dir));
}

}  // namespace

std::optional<int64_t> CoordinatorCheckpointFetcher::fetch_latest(const std::string& job_id,
                                                                  int64_t attempt,
                                                                  const fs::path& checkpoints_dir) {
  const auto stub = lomo::v1::WorkerService::NewStub(
      grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + deadline_);
  lomo::v1::FetchCheckpointRequest request;
  request.set_worker_id(worker_id_);
  request.set_job_id(job_id);
  request.set_attempt(attempt);
  const std::unique_ptr<Reader> reader = stub->FetchCheckpoint(&context, request);
  lomo::v1::FetchCheckpointResponse first;
  if (!reader->Read(&first)) {
    const grpc::Status status = reader->Finish();
    if (status.ok()) return std::nullopt;  // the job has no committed checkpoint
    throw std::runtime_error("cannot fetch a checkpoint of job " + job_id + ": " +
                             status.error_message());
  }
  const lomo::v1::CheckpointInfo& info = first.checkpoint();
  const std::string name = checkpoint_directory_name(info.step());
  const fs::path temporary = checkpoints_dir / (".fetch-" + name);
  fs::remove_all(temporary);
  log_line("job " + job_id + ": fetching checkpoint " + info.checkpoint_id() +
           " from the coordinator to resume from it");
  try {
    receive_files(*reader, context, info, temporary);
  } catch (const std::exception&) {
    fs::remove_all(temporary);
    throw;
  }
  const fs::path final_dir = checkpoint_directory(checkpoints_dir, info.step());
  fs::remove_all(final_dir);
  fs::rename(temporary, final_dir);
  point_latest_at(checkpoints_dir, name);
  return info.step();
}

}  // namespace lomo::daemon
