#include "server/coordinator_state.h"

#include <cstdio>

#include "common/log.h"
#include "server/job_text.h"

namespace lomo::server {

Worker* CoordinatorState::worker_for_locked(const WorkerConnection& connection) {
  const auto id = connections.find(connection.id());
  if (id == connections.end()) return nullptr;
  const auto worker = workers.find(id->second);
  if (worker == workers.end() || worker->second.connection.get() != &connection) return nullptr;
  return &worker->second;
}

int ActiveJob::rank_of(const std::string& worker_id) const {
  if (record.job.state() == v1::JOB_STATE_QUEUED) return -1;
  for (const v1::RankAssignment& assignment : record.job.assignments()) {
    if (assignment.worker_id() == worker_id) return assignment.rank();
  }
  return -1;
}

namespace {

// " on worker W" or " on workers W0, W1" (rank order); "" before any assignment.
std::string gang_text(const v1::Job& job) {
  if (job.assignments_size() <= 1) {
    return job.worker_id().empty() ? "" : " on worker " + job.worker_id();
  }
  std::string text = " on workers ";
  for (int i = 0; i < job.assignments_size(); ++i) {
    text += (i == 0 ? "" : ", ") + job.assignments(i).worker_id();
  }
  return text;
}

}  // namespace

std::string CoordinatorState::ownership_problem_locked(const Worker* worker,
                                                       const std::string& job_id,
                                                       int64_t attempt) const {
  if (worker == nullptr) return "the stream is not registered (send Register first)";
  const auto it = active.find(job_id);
  if (it == active.end()) {
    return "job " + job_id + " is not active (unknown, or it has ended)";
  }
  const v1::Job& job = it->second.record.job;
  if (job.attempt() != attempt || it->second.rank_of(worker->id) < 0 || worker->job_id != job_id ||
      worker->attempt != attempt) {
    return "job " + job_id + " attempt " + std::to_string(attempt) + " is not assigned to worker " +
           worker->id + " (the job is " + state_name(job.state()) + ", attempt " +
           std::to_string(job.attempt()) + gang_text(job) + ")";
  }
  return "";
}

bool CoordinatorState::draining_locked(const Worker& worker, const std::string& job_id,
                                       int64_t attempt) const {
  if (worker.job_id.empty() || worker.job_id != job_id || worker.attempt != attempt) return false;
  const auto it = active.find(job_id);
  // A job queued again (a restart) keeps the number of the attempt that ended until the next
  // one is assigned: that attempt's ranks drain too.
  return it == active.end() || it->second.record.job.attempt() != attempt ||
         it->second.record.job.state() == v1::JOB_STATE_QUEUED;
}

void CoordinatorState::send_cancel_locked(Worker& worker) {
  if (worker.connection == nullptr || worker.job_id.empty()) return;
  if (worker.cancel_sent_on == worker.connection->id()) return;
  v1::CoordinatorMessage message;
  message.mutable_cancel()->set_job_id(worker.job_id);
  message.mutable_cancel()->set_attempt(worker.attempt);
  if (worker.connection->send(message)) worker.cancel_sent_on = worker.connection->id();
}

void CoordinatorState::disconnect_locked(Worker& worker) {
  if (worker.connection == nullptr) return;
  worker.last_seen = worker.connection->last_heartbeat();
  connections.erase(worker.connection->id());
  metrics.add_workers_connected(worker.device.kind(), -1);
  scheduler.remove_worker(worker.id);
  worker.connection.reset();
}

void CoordinatorState::release_worker_locked(Worker& worker) {
  worker.job_id.clear();
  worker.attempt = 0;
  worker.rank = 0;
  worker.assigned_on = worker.confirmed_on = worker.cancel_sent_on = 0;
  worker.restored = false;
  if (worker.connection != nullptr && !shutting_down) {
    if (worker.unsettled) {
      scheduler.add_busy_worker(worker.id, worker.device.kind());
    } else {
      scheduler.add_idle_worker(worker.id, worker.device.kind());
    }
  }
}

std::string CoordinatorState::new_id_locked(const std::string& prefix) {
  char text[32];
  std::snprintf(text, sizeof(text), "%012llx",
                static_cast<unsigned long long>(random_() & 0xffffffffffffull));
  return prefix + text;
}

void CoordinatorState::when_durable(Done done, const std::string& what) {
  store.when_durable([done = std::move(done), what](const std::string& error) {
    if (error.empty()) return done(grpc::Status::OK);
    log_line("error: " + what + " was recorded but cannot be made durable: " + error);
    done(grpc::Status(grpc::StatusCode::INTERNAL,
                      what + " was recorded but cannot be made durable: " + error));
  });
}

}  // namespace lomo::server
