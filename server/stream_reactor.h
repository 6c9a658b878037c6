// Server-streaming reactors on gRPC's callback API that the coordinator's services share: the pump
// base (StreamReactor) and the reactor that streams a committed checkpoint's files as FileChunks
// (DownloadCheckpoint to users, FetchCheckpoint to the worker that resumes a job).
#pragma once

#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/file_transfer.h"
#include "lomo/v1/jobs.pb.h"
#include "server/executor.h"
#include "server/in_flight.h"

namespace lomo::server {

// A streaming call refused before it starts (authentication, authorization): finishes at once
// with `status` and deletes itself when gRPC is done with it. `Base` is the reactor type the
// method returns (grpc::ServerWriteReactor<R>, grpc::ServerBidiReactor<Q, R>).
template <typename Base>
class RefusedReactor final : public Base {
 public:
  RefusedReactor(InFlight& in_flight, const grpc::Status& status) : in_flight_(in_flight) {
    in_flight_.begin();
    this->Finish(status);
  }
  void OnDone() override {
    in_flight_.end();
    delete this;
  }

 private:
  InFlight& in_flight_;
};

template <typename Response>
grpc::ServerWriteReactor<Response>* refuse_stream(InFlight& in_flight, const grpc::Status& status) {
  return new RefusedReactor<grpc::ServerWriteReactor<Response>>(in_flight, status);
}

// The base of every server-streaming reactor (WatchJob, DownloadCheckpoint, FetchCheckpoint): a
// pump that never runs twice at once (on the Executor), and Finish once, after any write in
// flight.
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

// Streams the files of one committed checkpoint, read on the Executor by a FileSender that checks
// each file against the record (size, SHA-256) as it reads it; a mismatch ends the stream with
// DATA_LOSS. `Response` wraps the chunks (and, for FetchCheckpoint, a first message naming the
// checkpoint).
template <typename Response>
class CheckpointFilesReactor final
    : public StreamReactor<Response>,
      public std::enable_shared_from_this<CheckpointFilesReactor<Response>> {
 public:
  struct Source {
    v1::CheckpointInfo info;
    std::filesystem::path directory;
  };
  // Finds the checkpoint on the Executor: an error ends the stream with it; nullopt ends it OK
  // with nothing sent.
  using Locate = std::function<grpc::Status(std::optional<Source>* source)>;
  // The message sent before the files, if any.
  using Header = std::function<std::optional<Response>(const v1::CheckpointInfo& info)>;
  using Wrap = std::function<Response(v1::FileChunk chunk)>;

  CheckpointFilesReactor(Executor& executor, InFlight& in_flight, std::string what, Locate locate,
                         Header header, Wrap wrap)
      : StreamReactor<Response>(executor, in_flight),
        what_(std::move(what)),
        locate_(std::move(locate)),
        header_(std::move(header)),
        wrap_(std::move(wrap)) {}

  void start() {
    self_ = this->shared_from_this();
    this->request_pump();
  }
  void OnDone() override {
    this->in_flight_.end();
    self_.reset();
  }

 private:
  std::shared_ptr<StreamReactor<Response>> self() override { return this->shared_from_this(); }

  void pump_once() override {
    if (this->busy()) return;
    if (!sender_) {
      if (!open()) return;
      if (header_) {
        if (std::optional<Response> first = header_(info_)) {
          current_ = std::move(*first);
          return this->write(&current_);
        }
      }
    }
    std::optional<v1::FileChunk> chunk;
    try {
      chunk = sender_->next();
    } catch (const TransferError& error) {
      return this->finish(grpc::Status(grpc::StatusCode::DATA_LOSS, what_ + ", " + error.what()));
    }
    if (!chunk) return this->finish(grpc::Status::OK);
    current_ = wrap_(std::move(*chunk));
    this->write(&current_);
  }

  // Locates the checkpoint and prepares its sender; false when the stream has finished.
  bool open() {
    std::optional<Source> source;
    const grpc::Status status = locate_(&source);
    if (!status.ok()) {
      this->finish(status);
      return false;
    }
    if (!source) {
      this->finish(grpc::Status::OK);
      return false;
    }
    info_ = std::move(source->info);
    std::vector<TransferFile> files;
    for (const v1::CheckpointFile& file : info_.files()) {
      files.push_back(TransferFile{file.path(), file.size_bytes(), file.sha256()});
    }
    sender_.emplace(std::move(source->directory), std::move(files));
    return true;
  }

  const std::string what_;  // "checkpoint <id>": how errors name the transfer
  const Locate locate_;
  const Header header_;
  const Wrap wrap_;
  v1::CheckpointInfo info_;
  std::optional<FileSender> sender_;
  Response current_;  // being written
  std::shared_ptr<CheckpointFilesReactor> self_;
};

}  // namespace lomo::server
