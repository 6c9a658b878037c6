#include "daemon/checkpoint_fetcher.h"

#include <grpcpp/grpcpp.h>

#include <stdexcept>
#include <vector>

#include "common/checkpoint_layout.h"
#include "common/file_transfer.h"
#include "common/grpc_channel.h"
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
  ChunkStream stream;
  stream.next = [&]() { return reader.Read(&response) ? &response.chunk() : nullptr; };
  stream.cancel = [&] {
    context.TryCancel();
    reader.Finish();
  };
  stream.check_end = [&] {
    if (const grpc::Status status = reader.Finish(); !status.ok()) {
      throw std::runtime_error("the coordinator ended the fetch: " + status.error_message());
    }
  };
  receive_transfer(receiver, stream,
                   std::vector<lomo::v1::CheckpointFile>(info.files().begin(), info.files().end()));
}

}  // namespace

std::optional<int64_t> CoordinatorCheckpointFetcher::fetch_latest(const std::string& job_id,
                                                                  int64_t attempt,
                                                                  const fs::path& checkpoints_dir) {
  const auto stub = lomo::v1::WorkerService::NewStub(make_channel(address_));
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
  write_latest_checkpoint(checkpoints_dir, info.step());
  return info.step();
}

}  // namespace lomo::daemon
