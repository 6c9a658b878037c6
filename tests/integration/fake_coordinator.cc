#include "tests/integration/fake_coordinator.h"

#include <functional>

#include "common/checkpoint_layout.h"
#include "common/sha256.h"

namespace lomo::testing {

using Clock = std::chrono::steady_clock;

grpc::Status FakeJobService::ListCheckpoints(grpc::ServerContext*,
                                             const lomo::v1::ListCheckpointsRequest* request,
                                             lomo::v1::ListCheckpointsResponse* response) {
  for (const auto& [step, files] : coordinator_.committed(request->job_id())) {
    auto* info = response->add_checkpoints();
    info->set_checkpoint_id(request->job_id() + "/" + checkpoint_directory_name(step));
    info->set_step(step);
    for (const auto& [path, bytes] : files) {
      auto* file = info->add_files();
      file->set_path(path);
      file->set_size_bytes(static_cast<int64_t>(bytes.size()));
      file->set_sha256(sha256_hex(bytes));
      info->set_size_bytes(info->size_bytes() + static_cast<int64_t>(bytes.size()));
    }
  }
  return grpc::Status::OK;
}

namespace {

// The files of a checkpoint as FileChunks of 64 KiB, each file's last chunk with its SHA-256,
// written by an implementation of its own (not common/file_transfer.h's sender).
void write_chunks(const std::map<std::string, std::string>& files,
                  const std::function<void(lomo::v1::FileChunk)>& write) {
  for (const auto& [path, bytes] : files) {
    size_t offset = 0;
    do {
      const size_t size = std::min<size_t>(64 << 10, bytes.size() - offset);
      lomo::v1::FileChunk chunk;
      chunk.set_path(path);
      chunk.set_offset(static_cast<int64_t>(offset));
      chunk.set_data(bytes.substr(offset, size));
      offset += size;
      if (offset == bytes.size()) {
        chunk.set_last_chunk_of_file(true);
        chunk.set_sha256(sha256_hex(bytes));
      }
      write(std::move(chunk));
    } while (offset < bytes.size());
  }
}

}  // namespace

grpc::Status FakeJobService::DownloadCheckpoint(
    grpc::ServerContext*, const lomo::v1::DownloadCheckpointRequest* request,
    grpc::ServerWriter<lomo::v1::DownloadCheckpointResponse>* writer) {
  const std::string& id = request->checkpoint_id();
  const size_t slash = id.rfind('/');
  if (slash == std::string::npos) return {grpc::StatusCode::INVALID_ARGUMENT, "bad id " + id};
  for (const auto& [step, files] : coordinator_.committed(id.substr(0, slash))) {
    if (id.substr(slash + 1) != checkpoint_directory_name(step)) continue;
    write_chunks(files, [&](lomo::v1::FileChunk chunk) {
      lomo::v1::DownloadCheckpointResponse response;
      *response.mutable_chunk() = std::move(chunk);
      writer->Write(response);
    });
    return grpc::Status::OK;
  }
  return {grpc::StatusCode::NOT_FOUND, "no checkpoint " + id};
}

grpc::Status FakeCoordinator::FetchCheckpoint(
    grpc::ServerContext*, const lomo::v1::FetchCheckpointRequest* request,
    grpc::ServerWriter<lomo::v1::FetchCheckpointResponse>* writer) {
  {
    std::lock_guard lock(mutex_);
    ++fetches_;
    last_fetch_ = *request;
  }
  const auto checkpoints = committed(request->job_id());
  if (checkpoints.empty()) return grpc::Status::OK;
  const auto& [step, files] = *checkpoints.rbegin();
  lomo::v1::FetchCheckpointResponse first;
  lomo::v1::CheckpointInfo* info = first.mutable_checkpoint();
  info->set_checkpoint_id(request->job_id() + "/" + checkpoint_directory_name(step));
  info->set_step(step);
  for (const auto& [path, bytes] : files) {
    lomo::v1::CheckpointFile* file = info->add_files();
    file->set_path(path);
    file->set_size_bytes(static_cast<int64_t>(bytes.size()));
    file->set_sha256(sha256_hex(bytes));
  }
  writer->Write(first);
  write_chunks(files, [&](lomo::v1::FileChunk chunk) {
    lomo::v1::FetchCheckpointResponse response;
    *response.mutable_chunk() = std::move(chunk);
    writer->Write(response);
  });
  return grpc::Status::OK;
}

std::optional<lomo::v1::FetchCheckpointRequest> FakeCoordinator::last_fetch() const {
  std::lock_guard lock(mutex_);
  if (fetches_ == 0) return std::nullopt;
  return last_fetch_;
}

FakeCoordinator::FakeCoordinator(int port, int64_t heartbeat_interval_ms)
    : heartbeat_interval_ms_(heartbeat_interval_ms) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:" + std::to_string(port), grpc::InsecureServerCredentials(),
                           &port_);
  builder.SetMaxReceiveMessageSize(16 << 20);
  builder.RegisterService(static_cast<lomo::v1::WorkerService::Service*>(this));
  builder.RegisterService(&job_service_);
  server_ = builder.BuildAndStart();
  if (!server_ || port_ == 0) throw std::runtime_error("fake coordinator: cannot listen");
}

FakeCoordinator::~FakeCoordinator() { shutdown(); }

void FakeCoordinator::shutdown() {
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    server_->Wait();
    server_.reset();
  }
}

grpc::Status FakeCoordinator::Connect(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<lomo::v1::CoordinatorMessage, lomo::v1::WorkerMessage>* stream) {
  lomo::v1::WorkerMessage message;
  if (!stream->Read(&message) || !message.has_register_()) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "first message must be Register");
  }
  lomo::v1::CoordinatorMessage reply;
  reply.mutable_registered()->set_worker_id(message.register_().worker_id());
  reply.mutable_registered()->set_heartbeat_interval_ms(heartbeat_interval_ms_);
  uint64_t connection;
  {
    std::lock_guard write_lock(write_mutex_);
    stream->Write(reply);
    std::lock_guard lock(mutex_);
    connection = ++connection_;
    stream_ = stream;
    ++registrations_;
    last_register_ = message.register_();
  }
  changed_.notify_all();
  while (stream->Read(&message)) {
    if (message.has_checkpoint_chunk()) {
      handle_chunk(message.checkpoint_chunk(), connection);
      continue;
    }
    std::lock_guard lock(mutex_);
    if (message.has_heartbeat()) {
      ++heartbeats_;
      last_heartbeat_ = message.heartbeat();
    } else if (message.has_status()) {
      statuses_.push_back(message.status());
    } else if (message.has_events()) {
      auto& list = events_[message.events().job_id()];
      for (const auto& e : message.events().events()) list.push_back(e);
    }
    changed_.notify_all();
  }
  {
    std::lock_guard write_lock(write_mutex_);
    std::lock_guard lock(mutex_);
    if (stream_ == stream) stream_ = nullptr;
    // An upload belongs to its connection.
    for (auto it = uploads_.begin(); it != uploads_.end();) {
      it = it->first.first == connection ? uploads_.erase(it) : std::next(it);
    }
  }
  changed_.notify_all();
  (void)context;
  return grpc::Status::OK;
}

void FakeCoordinator::handle_chunk(const lomo::v1::CheckpointChunk& chunk, uint64_t connection) {
  std::unique_lock lock(mutex_);
  Upload& upload = uploads_[{connection, chunk.job_id()}][chunk.step()];
  if (chunk.commit()) {
    bool ok = upload.error.empty() && upload.in_progress.empty() && !upload.files.empty();
    std::string error = !upload.error.empty()         ? upload.error
                        : !upload.in_progress.empty() ? "incomplete file"
                        : upload.files.empty()        ? "no files"
                                                      : "";
    if (ok && reject_commits_ > 0) {
      --reject_commits_;
      ok = false;
      error = "rejected by the test";
    }
    if (ok) committed_[chunk.job_id()][chunk.step()] = upload.files;
    commit_answers_.emplace_back(chunk.step(), ok);
    statuses_at_commit_[chunk.step()] = statuses_.size();
    uploads_[{connection, chunk.job_id()}].erase(chunk.step());
    lomo::v1::CoordinatorMessage ack;
    ack.mutable_checkpoint_ack()->set_job_id(chunk.job_id());
    ack.mutable_checkpoint_ack()->set_step(chunk.step());
    ack.mutable_checkpoint_ack()->set_committed(ok);
    ack.mutable_checkpoint_ack()->set_error(error);
    lock.unlock();
    changed_.notify_all();
    std::lock_guard write_lock(write_mutex_);
    std::lock_guard relock(mutex_);
    if (stream_ != nullptr) stream_->Write(ack);
    return;
  }
  if (!upload.error.empty()) return;
  const lomo::v1::FileChunk& file = chunk.file();
  std::string& bytes = upload.in_progress[file.path()];
  if (static_cast<int64_t>(bytes.size()) != file.offset()) {
    upload.error = file.path() + ": chunk at offset " + std::to_string(file.offset()) +
                   ", expected " + std::to_string(bytes.size());
    return;
  }
  if (file.data().size() > (1u << 20)) upload.error = file.path() + ": chunk over 1 MiB";
  bytes += file.data();
  if (file.last_chunk_of_file()) {
    if (sha256_hex(bytes) != file.sha256()) upload.error = file.path() + ": SHA-256 mismatch";
    upload.files[file.path()] = std::move(bytes);
    upload.in_progress.erase(file.path());
  }
}

std::optional<lomo::v1::Register> FakeCoordinator::wait_registered(
    int count, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!changed_.wait_for(lock, timeout,
                         [&] { return registrations_ >= count && stream_ != nullptr; })) {
    return std::nullopt;
  }
  return last_register_;
}

bool FakeCoordinator::send(const lomo::v1::CoordinatorMessage& message) {
  std::lock_guard write_lock(write_mutex_);
  std::lock_guard lock(mutex_);
  return stream_ != nullptr && stream_->Write(message);
}

bool FakeCoordinator::assign(const std::string& job_id, int64_t attempt,
                             const google::protobuf::Struct& spec) {
  lomo::v1::CoordinatorMessage message;
  auto* a = message.mutable_assignment();
  a->set_job_id(job_id);
  a->set_attempt(attempt);
  *a->mutable_spec() = spec;
  return send(message);
}

bool FakeCoordinator::cancel(const std::string& job_id, int64_t attempt) {
  lomo::v1::CoordinatorMessage message;
  message.mutable_cancel()->set_job_id(job_id);
  message.mutable_cancel()->set_attempt(attempt);
  return send(message);
}

std::optional<lomo::v1::JobStatusUpdate> FakeCoordinator::wait_terminal(
    const std::string& job_id, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  std::optional<lomo::v1::JobStatusUpdate> found;
  changed_.wait_for(lock, timeout, [&] {
    for (const auto& s : statuses_) {
      if (s.job_id() == job_id &&
          (s.state() == lomo::v1::JOB_STATE_SUCCEEDED || s.state() == lomo::v1::JOB_STATE_FAILED ||
           s.state() == lomo::v1::JOB_STATE_CANCELLED)) {
        found = s;
        return true;
      }
    }
    return false;
  });
  return found;
}

bool FakeCoordinator::wait_state(const std::string& job_id, lomo::v1::JobState state,
                                 std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  return changed_.wait_for(lock, timeout, [&] {
    for (const auto& s : statuses_) {
      if (s.job_id() == job_id && s.state() == state) return true;
    }
    return false;
  });
}

std::vector<lomo::v1::JobStatusUpdate> FakeCoordinator::statuses() const {
  std::lock_guard lock(mutex_);
  return statuses_;
}

std::vector<lomo::v1::JobEvent> FakeCoordinator::events(const std::string& job_id) const {
  std::lock_guard lock(mutex_);
  const auto it = events_.find(job_id);
  return it == events_.end() ? std::vector<lomo::v1::JobEvent>{} : it->second;
}

int64_t FakeCoordinator::heartbeats() const {
  std::lock_guard lock(mutex_);
  return heartbeats_;
}

lomo::v1::Heartbeat FakeCoordinator::last_heartbeat() const {
  std::lock_guard lock(mutex_);
  return last_heartbeat_;
}

std::map<int64_t, std::map<std::string, std::string>> FakeCoordinator::committed(
    const std::string& job_id) const {
  std::lock_guard lock(mutex_);
  const auto it = committed_.find(job_id);
  return it == committed_.end() ? std::map<int64_t, std::map<std::string, std::string>>{}
                                : it->second;
}

std::vector<std::pair<int64_t, bool>> FakeCoordinator::commit_answers() const {
  std::lock_guard lock(mutex_);
  return commit_answers_;
}

size_t FakeCoordinator::statuses_before_commit(int64_t step) const {
  std::lock_guard lock(mutex_);
  const auto it = statuses_at_commit_.find(step);
  return it == statuses_at_commit_.end() ? SIZE_MAX : it->second;
}

void FakeCoordinator::reject_commits(int count) {
  std::lock_guard lock(mutex_);
  reject_commits_ = count;
}

}  // namespace lomo::testing
