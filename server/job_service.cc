#include "server/job_service.h"

#include <deque>
#include <fstream>
#include <memory>
#include <mutex>

#include "common/sha256.h"

namespace lomo::server {

namespace {

constexpr int kWatchBatch = 256;
constexpr int64_t kDownloadChunkBytes = 1 << 20;  // well under gRPC's 4 MiB default message

// Shared by both streaming reactors: a pump that never runs twice at once (on the Executor), and
// Finish once, after any write in flight.
template <typename Response>
class StreamReactor : public grpc::ServerWriteReactor<Response> {
 public:
  StreamReactor(Executor& executor, InFlight& in_flight)
      : executor_(executor), in_flight_(in_flight) {
    in_flight_.begin();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard lock(mu_);
      writing_ = false;
      if (!ok) {
        // The client is gone (cancelled, deadline, connection lost).
        finish_wanted_ = true;
        finish_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      }
      if (finish_wanted_) {
        finish_now_locked();
        return;
      }
    }
    request_pump();
  }

  void OnCancel() override {
    std::lock_guard lock(mu_);
    finish_locked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
  }

 protected:
  // One step of work: write one message (write()), finish (finish()), or wait for a wake-up.
  virtual void pump_once() = 0;
  virtual std::shared_ptr<StreamReactor> self() = 0;

  void request_pump() {
    {
      std::lock_guard lock(mu_);
      if (finished_) return;
      if (pumping_) {
        again_ = true;
        return;
      }
      pumping_ = true;
    }
    executor_.post([self = self()] {
      for (;;) {
        self->pump_once();
        std::lock_guard lock(self->mu_);
        if (!self->again_ || self->finished_) {
          self->pumping_ = false;
          return;
        }
        self->again_ = false;
      }
    });
  }

  bool busy() {
    std::lock_guard lock(mu_);
    return writing_ || finished_ || finish_wanted_;
  }

  // `message` must stay untouched until the next pump.
  void write(const Response* message) {
    std::lock_guard lock(mu_);
    if (finished_ || finish_wanted_) return;
    writing_ = true;
    this->StartWrite(message);
  }

  void finish(const grpc::Status& status) {
    std::lock_guard lock(mu_);
    finish_locked(status);
  }

 private:
  void finish_locked(const grpc::Status& status) {
    if (finished_ || finish_wanted_) return;
    finish_wanted_ = true;
    finish_status_ = status;
    if (!writing_) finish_now_locked();
  }
  void finish_now_locked() {
    if (finished_) return;
    finished_ = true;
    this->Finish(finish_status_);
  }

  Executor& executor_;

 protected:
  InFlight& in_flight_;  // end() in the subclass's OnDone

 private:
  std::mutex mu_;
  bool pumping_ = false;
  bool again_ = false;
  bool writing_ = false;
  bool finish_wanted_ = false;
  bool finished_ = false;
  grpc::Status finish_status_;
};

// A unary call, counted in InFlight until gRPC is done with it (its status sent).
class CountedUnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit CountedUnaryReactor(InFlight& in_flight) : in_flight_(in_flight) { in_flight_.begin(); }
  void OnDone() override {
    in_flight_.end();
    delete this;
  }

 private:
  InFlight& in_flight_;
};

class WatchReactor final : public StreamReactor<v1::WatchJobResponse>,
                           public std::enable_shared_from_this<WatchReactor> {
 public:
  WatchReactor(Coordinator& coordinator, Executor& executor, InFlight& in_flight,
               const v1::WatchJobRequest& request)
      : StreamReactor(executor, in_flight),
        coordinator_(coordinator),
        job_id_(request.job_id()),
        follow_(request.follow()),
        after_(request.after_sequence()) {}

  void start() {
    self_ = shared_from_this();
    if (follow_) {
      // Before the first read, so that no event stored after that read goes unnoticed.
      std::weak_ptr<WatchReactor> weak = self_;
      subscription_ = coordinator_.event_hub().subscribe(job_id_, [weak] {
        if (auto reactor = weak.lock()) reactor->request_pump();
      });
    }
    request_pump();
  }

  void OnDone() override {
    if (subscription_ != 0) coordinator_.event_hub().unsubscribe(subscription_);
    in_flight_.end();
    self_.reset();
  }

 private:
  std::shared_ptr<StreamReactor> self() override { return shared_from_this(); }

  void pump_once() override {
    if (busy()) return;
    if (pending_.empty()) {
      EventBatch batch;
      const grpc::Status status = coordinator_.read_events(job_id_, after_, kWatchBatch, &batch);
      if (!status.ok()) return finish(status);
      for (v1::JobEvent& event : batch.events) {
        after_ = event.sequence();
        v1::WatchJobResponse& response = pending_.emplace_back();
        *response.mutable_event() = std::move(event);
        *response.mutable_job() = batch.job.job;
      }
      if (pending_.empty()) {
        if (!follow_ || is_terminal(batch.job.job.state())) return finish(grpc::Status::OK);
        if (coordinator_.event_hub().closed()) {
          return finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "the coordinator is shutting down; watch again with "
                                     "after_sequence=" +
                                         std::to_string(after_)));
        }
        return;  // wait for the hub
      }
    }
    current_ = std::move(pending_.front());
    pending_.pop_front();
    write(&current_);
  }

  Coordinator& coordinator_;
  const std::string job_id_;
  const bool follow_;
  int64_t after_;
  uint64_t subscription_ = 0;
  std::deque<v1::WatchJobResponse> pending_;  // read, not yet written (pump only)
  v1::WatchJobResponse current_;              // being written
  std::shared_ptr<WatchReactor> self_;
};

class DownloadReactor final : public StreamReactor<v1::DownloadCheckpointResponse>,
                              public std::enable_shared_from_this<DownloadReactor> {
 public:
  DownloadReactor(Coordinator& coordinator, Executor& executor, InFlight& in_flight,
                  std::string checkpoint_id)
      : StreamReactor(executor, in_flight),
        coordinator_(coordinator),
        checkpoint_id_(std::move(checkpoint_id)) {}

  void start() {
    self_ = shared_from_this();
    request_pump();
  }
  void OnDone() override {
    in_flight_.end();
    self_.reset();
  }

 private:
  std::shared_ptr<StreamReactor> self() override { return shared_from_this(); }

  void pump_once() override {
    if (busy()) return;
    if (!opened_) {
      opened_ = true;
      const grpc::Status status = coordinator_.find_checkpoint(checkpoint_id_, &info_, &dir_);
      if (!status.ok()) return finish(status);
    }
    if (file_index_ >= info_.files_size()) return finish(grpc::Status::OK);
    const v1::CheckpointFile& file = info_.files(file_index_);
    if (!file_.is_open()) {
      const std::filesystem::path path = dir_ / file.path();
      std::error_code error;
      const auto size = std::filesystem::file_size(path, error);
      if (error || static_cast<int64_t>(size) != file.size_bytes()) {
        return finish(data_loss(file, error ? "cannot read it: " + error.message()
                                            : "it has " + std::to_string(size) +
                                                  " bytes on disk, the record says " +
                                                  std::to_string(file.size_bytes())));
      }
      file_.open(path, std::ios::binary);
      if (!file_) return finish(data_loss(file, "cannot open it"));
      offset_ = 0;
      hash_ = Sha256();
    }
    const int64_t want = std::min(kDownloadChunkBytes, file.size_bytes() - offset_);
    std::string data(static_cast<size_t>(want), '\0');
    file_.read(data.data(), want);
    if (file_.gcount() != want) return finish(data_loss(file, "it ended early while reading"));
    hash_.update(data);
    chunk_.Clear();
    chunk_.set_path(file.path());
    chunk_.set_offset(offset_);
    offset_ += want;
    *chunk_.mutable_data() = std::move(data);
    if (offset_ == file.size_bytes()) {
      const std::string digest = hash_.hex_digest();
      if (digest != file.sha256()) {
        return finish(data_loss(
            file, "its SHA-256 on disk is " + digest + ", the record says " + file.sha256()));
      }
      chunk_.set_last_chunk_of_file(true);
      chunk_.set_sha256(digest);
      file_.close();
      ++file_index_;
    }
    write(&chunk_);
  }

  grpc::Status data_loss(const v1::CheckpointFile& file, const std::string& what) const {
    return grpc::Status(grpc::StatusCode::DATA_LOSS,
                        "checkpoint " + checkpoint_id_ + ", file " + file.path() + ": " + what);
  }

  Coordinator& coordinator_;
  const std::string checkpoint_id_;
  bool opened_ = false;
  v1::CheckpointInfo info_;
  std::filesystem::path dir_;
  int file_index_ = 0;
  std::ifstream file_;
  int64_t offset_ = 0;
  Sha256 hash_;
  v1::DownloadCheckpointResponse chunk_;  // being written
  std::shared_ptr<DownloadReactor> self_;
};

}  // namespace

grpc::ServerUnaryReactor* JobServiceImpl::finish_now(const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = new CountedUnaryReactor(in_flight_);
  reactor->Finish(status);
  return reactor;
}

grpc::ServerUnaryReactor* JobServiceImpl::finish_on_executor(
    std::function<void(std::function<void(const grpc::Status&)>)> write) {
  grpc::ServerUnaryReactor* reactor = new CountedUnaryReactor(in_flight_);
  executor_.post([write = std::move(write), reactor] {
    write([reactor](const grpc::Status& status) { reactor->Finish(status); });
  });
  return reactor;
}

grpc::ServerUnaryReactor* JobServiceImpl::SubmitJob(grpc::CallbackServerContext* /*context*/,
                                                    const v1::SubmitJobRequest* request,
                                                    v1::SubmitJobResponse* response) {
  return finish_on_executor([this, request, response](auto done) {
    coordinator_.submit_job(*request, response, std::move(done));
  });
}

// Reads run on gRPC's thread: they use the store's reader connections, never wait for a writer,
// and would otherwise queue behind writes on the Executor.
grpc::ServerUnaryReactor* JobServiceImpl::GetJob(grpc::CallbackServerContext* /*context*/,
                                                 const v1::GetJobRequest* request,
                                                 v1::GetJobResponse* response) {
  return finish_now(coordinator_.get_job(*request, response));
}

grpc::ServerUnaryReactor* JobServiceImpl::ListJobs(grpc::CallbackServerContext* /*context*/,
                                                   const v1::ListJobsRequest* request,
                                                   v1::ListJobsResponse* response) {
  return finish_now(coordinator_.list_jobs(*request, response));
}

grpc::ServerUnaryReactor* JobServiceImpl::CancelJob(grpc::CallbackServerContext* /*context*/,
                                                    const v1::CancelJobRequest* request,
                                                    v1::CancelJobResponse* response) {
  return finish_on_executor([this, request, response](auto done) {
    coordinator_.cancel_job(*request, response, std::move(done));
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::ListCheckpoints(grpc::CallbackServerContext* /*context*/,
                                                          const v1::ListCheckpointsRequest* request,
                                                          v1::ListCheckpointsResponse* response) {
  return finish_now(coordinator_.list_checkpoints(*request, response));
}

grpc::ServerWriteReactor<v1::WatchJobResponse>* JobServiceImpl::WatchJob(
    grpc::CallbackServerContext* /*context*/, const v1::WatchJobRequest* request) {
  auto reactor = std::make_shared<WatchReactor>(coordinator_, executor_, in_flight_, *request);
  reactor->start();
  return reactor.get();
}

grpc::ServerWriteReactor<v1::DownloadCheckpointResponse>* JobServiceImpl::DownloadCheckpoint(
    grpc::CallbackServerContext* /*context*/, const v1::DownloadCheckpointRequest* request) {
  auto reactor = std::make_shared<DownloadReactor>(coordinator_, executor_, in_flight_,
                                                   request->checkpoint_id());
  reactor->start();
  return reactor.get();
}

}  // namespace lomo::server
