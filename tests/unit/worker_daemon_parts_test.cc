// The worker daemon's pieces on their own (daemon/): backoff, outbox, the trainer protocol's file
// tail, device description, the spec of an assignment, the checkpoint uploader, the job
// runner deciding an attempt's outcome from a fake training child's protocol records (and what a
// gang rank sends), the rendezvous relay's lines and the advertised address.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <set>
#include <thread>

#include "common/advertise_address.h"
#include "common/checkpoint_layout.h"
#include "common/checkpoint_manifest.h"
#include "common/rendezvous_relay.h"
#include "common/sha256.h"
#include "daemon/assignment_spec.h"
#include "daemon/backoff.h"
#include "daemon/checkpoint_uploader.h"
#include "daemon/device_info.h"
#include "daemon/job_runner.h"
#include "daemon/outbox.h"
#include "daemon/trainer_channel.h"
#include "daemon/worker_metrics.h"

namespace lomo::daemon {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using ::testing::HasSubstr;
using ::testing::Not;

struct TempDir {
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lomo-daemon-parts-XXXXXX").string();
    path = ::mkdtemp(pattern.data());
  }
  ~TempDir() { fs::remove_all(path); }
  fs::path path;
};

// Polls `condition` for up to 30 s: it normally holds within milliseconds, and a loaded 2-core CI
// machine may stall the threads involved for seconds.
bool testing_wait(const std::function<bool()>& condition) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(5));
  }
  return true;
}

lomo::v1::WorkerMessage log_event(const std::string& text) {
  lomo::v1::WorkerMessage m;
  m.mutable_events()->set_job_id("j");
  m.mutable_events()->add_events()->mutable_log()->set_text(text);
  return m;
}

TEST(BackoffTest, GrowsToTheCapWithJitterWithinHalfToFullAndResets) {
  Backoff backoff(milliseconds(100), milliseconds(1000), 2.0, /*seed=*/7);
  const int64_t ceilings[] = {100, 200, 400, 800, 1000, 1000};
  for (int64_t ceiling : ceilings) {
    const int64_t d = backoff.next().count();
    EXPECT_GE(d, ceiling / 2);
    EXPECT_LE(d, ceiling);
  }
  backoff.reset();
  EXPECT_LE(backoff.next().count(), 100);
}

TEST(BackoffTest, JitterSpreadsWorkersThatStartedTogether) {
  std::set<int64_t> delays;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    Backoff backoff(milliseconds(1000), milliseconds(1000), 2.0, seed);
    delays.insert(backoff.next().count());
  }
  EXPECT_GT(delays.size(), 10u);
}

TEST(OutboxTest, ReliableMessagesSurviveAReconnectAndConnectionMessagesDoNot) {
  Outbox outbox;
  outbox.open_connection(1);
  outbox.push(log_event("a"));
  lomo::v1::WorkerMessage chunk;
  chunk.mutable_checkpoint_chunk()->set_step(5);
  EXPECT_TRUE(outbox.push_for_connection(chunk, 1));
  EXPECT_FALSE(outbox.push_for_connection(chunk, 2));  // not the open connection
  outbox.close_connection();
  outbox.open_connection(2);
  auto item = outbox.pop(2, Outbox::Clock::now() + milliseconds(10));
  ASSERT_TRUE(item);
  EXPECT_TRUE(item->reliable);
  EXPECT_EQ(item->message.events().events(0).log().text(), "a");
  outbox.finish(std::move(*item), /*written=*/true);
  EXPECT_FALSE(outbox.pop(2, Outbox::Clock::now() + milliseconds(10)));
  EXPECT_TRUE(outbox.wait_until_delivered(Outbox::Clock::now()));
}

TEST(OutboxTest, AFailedWriteKeepsTheMessageFirstInLine) {
  Outbox outbox;
  outbox.open_connection(1);
  outbox.push(log_event("first"));
  outbox.push(log_event("second"));
  auto item = outbox.pop(1, Outbox::Clock::now());
  ASSERT_TRUE(item);
  outbox.finish(std::move(*item), /*written=*/false);
  EXPECT_EQ(outbox.reliable_pending(), 2u);
  item = outbox.pop(1, Outbox::Clock::now());
  EXPECT_EQ(item->message.events().events(0).log().text(), "first");
}

TEST(OutboxTest, WhenFullItDropsTheOldestEventsButNeverAStatusAndSaysSo) {
  Outbox::Limits limits;
  limits.max_reliable_messages = 3;
  Outbox outbox(limits);
  lomo::v1::WorkerMessage status;
  status.mutable_status()->set_state(lomo::v1::JOB_STATE_RUNNING);
  outbox.push(status);
  for (int i = 0; i < 5; ++i) outbox.push(log_event(std::to_string(i)));
  EXPECT_EQ(outbox.dropped_events(), 3);
  outbox.open_connection(1);
  auto first = outbox.pop(1, Outbox::Clock::now());
  EXPECT_TRUE(first->message.has_status());
  auto next = outbox.pop(1, Outbox::Clock::now());
  ASSERT_EQ(next->message.events().events_size(), 2);
  EXPECT_EQ(next->message.events().events(0).log().text(), "3");
  EXPECT_THAT(next->message.events().events(1).log().text(), HasSubstr("3 events were dropped"));
}

TEST(OutboxTest, AByteLimitBoundsWhatIsKeptWhileDisconnected) {
  Outbox::Limits limits;
  limits.max_reliable_bytes = 1000;
  Outbox outbox(limits);
  for (int i = 0; i < 10; ++i) outbox.push(log_event(std::string(300, 'a' + i)));
  EXPECT_EQ(outbox.reliable_pending(), 3u);  // 3 × ~310 bytes fit in 1000
  EXPECT_EQ(outbox.dropped_events(), 7);
  outbox.open_connection(1);
  auto first = outbox.pop(1, Outbox::Clock::now());
  EXPECT_EQ(first->message.events().events(0).log().text()[0], 'h');  // the newest three remain
}

TEST(OutboxTest, ConnectionMessagesApplyBackpressureUntilTheWriterTakesThem) {
  Outbox::Limits limits;
  limits.max_connection_bytes = 100;
  Outbox outbox(limits);
  outbox.open_connection(1);
  lomo::v1::WorkerMessage chunk;
  chunk.mutable_checkpoint_chunk()->mutable_file()->set_data(std::string(80, 'x'));
  ASSERT_TRUE(outbox.push_for_connection(chunk, 1));
  std::atomic<bool> second_queued{false};
  std::thread pusher([&] {
    outbox.push_for_connection(chunk, 1);
    second_queued = true;
  });
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_FALSE(second_queued);
  ASSERT_TRUE(outbox.pop(1, Outbox::Clock::now()));
  pusher.join();
  EXPECT_TRUE(second_queued);
}

TEST(TrainerChannelTest, TurnsMetricsAndEvalRecordsIntoEventsWithAccuracy) {
  trainer_protocol::Metrics metrics;
  metrics.step = 3;
  metrics.total_steps = 50;
  metrics.loss = 2.5;
  metrics.lr = 0.01;
  metrics.peak_memory_bytes = {{"total", 20}};
  const lomo::v1::JobEvent training = metrics_event(metrics);
  ASSERT_TRUE(training.has_metrics());
  EXPECT_EQ(training.metrics().step(), 3);
  EXPECT_EQ(training.metrics().total_steps(), 50);
  EXPECT_DOUBLE_EQ(training.metrics().loss(), 2.5);
  EXPECT_DOUBLE_EQ(training.metrics().learning_rate(), 0.01);
  EXPECT_EQ(training.metrics().peak_memory_bytes().at("total"), 20);

  const lomo::v1::JobEvent eval = eval_event({50, 3.0, 20.1, 64, 0.75, 4});
  ASSERT_TRUE(eval.has_eval());
  EXPECT_DOUBLE_EQ(eval.eval().perplexity(), 20.1);
  ASSERT_TRUE(eval.eval().has_accuracy());
  EXPECT_DOUBLE_EQ(eval.eval().accuracy(), 0.75);
  EXPECT_EQ(eval.eval().examples(), 4);
  EXPECT_FALSE(eval_event({50, 3.0, 20.1, 64, std::nullopt, 0}).eval().has_accuracy());
}

TEST(TrainerChannelTest, ReadsCompleteRecordsOnlyAsTheFileGrows) {
  TempDir dir;
  const fs::path file = dir.path / "protocol.jsonl";
  TrainerChannel channel(file);
  std::vector<trainer_protocol::Record> records;
  auto keep = [&](trainer_protocol::Record r) { records.push_back(std::move(r)); };
  channel.poll(keep);  // no file yet
  EXPECT_TRUE(records.empty());
  const std::string started = trainer_protocol::to_line(trainer_protocol::Started{10, 0, ""});
  const std::string checkpoint =
      trainer_protocol::to_line(trainer_protocol::Checkpoint{5, "/out/checkpoints/step-00000005"});
  std::ofstream(file) << started << checkpoint.substr(0, 12);
  channel.poll(keep);
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(channel.pending_bytes(), 12u);
  std::ofstream(file, std::ios::app) << checkpoint.substr(12);
  channel.poll(keep);
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(std::get<trainer_protocol::Checkpoint>(records[1]).step, 5);
  channel.poll(keep);  // nothing new: nothing delivered twice
  EXPECT_EQ(records.size(), 2u);
}

TEST(TrainerChannelTest, ALineFromAnotherVersionIsAnErrorNamingTheLine) {
  TempDir dir;
  const fs::path file = dir.path / "protocol.jsonl";
  std::ofstream(file) << R"({"v":7,"type":"started","total_steps":1})"
                      << "\n";
  TrainerChannel channel(file);
  try {
    channel.poll([](const trainer_protocol::Record&) {});
    FAIL() << "no exception";
  } catch (const trainer_protocol::ProtocolError& e) {
    EXPECT_THAT(e.what(), HasSubstr("trainer protocol line 1: protocol version 7"));
  }
}

TEST(DeviceInfoTest, ReadsTheCpuNameAndTotalMemory) {
  EXPECT_EQ(cpu_model_name("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"),
            "AMD EPYC 9654 96-Core Processor");
  EXPECT_EQ(cpu_model_name("processor: 0\n"), "");
  EXPECT_EQ(meminfo_total_bytes("MemTotal:       16384 kB\nMemFree: 1 kB\n"), 16384 * 1024);
  const Device cpu = detect_device("cpu");
  EXPECT_EQ(cpu.info.kind(), lomo::v1::DEVICE_KIND_CPU);
  EXPECT_GT(cpu.info.memory_bytes(), 0);
  EXPECT_EQ(cpu.short_name, "cpu");
}

TEST(DeviceInfoTest, RejectsWhatIsNotADevice) {
  try {
    detect_device("gpu-please");
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_THAT(e.what(), HasSubstr("expected cpu or a GPU index"));
  }
}

// A job spec as an Assignment carries it: model.path /models/tiny, data.train [a.txt],
// training.steps 20.
google::protobuf::Struct small_spec() {
  google::protobuf::Struct spec;
  (*(*spec.mutable_fields())["model"].mutable_struct_value()->mutable_fields())["path"]
      .set_string_value("/models/tiny");
  auto& data = *(*spec.mutable_fields())["data"].mutable_struct_value()->mutable_fields();
  data["train"].mutable_list_value()->add_values()->set_string_value("a.txt");
  (*(*spec.mutable_fields())["training"].mutable_struct_value()->mutable_fields())["steps"]
      .set_number_value(20);
  return spec;
}

TEST(AssignmentSpecTest, ReadsAStructAsTheJobSchemaAndNamesABadField) {
  google::protobuf::Struct spec = small_spec();
  const JobSpec parsed = spec_from_struct(spec, "job j spec");
  EXPECT_EQ(parsed.model.path, "/models/tiny");
  EXPECT_EQ(parsed.training.steps, 20);
  (*(*spec.mutable_fields())["training"].mutable_struct_value()->mutable_fields())["steps"]
      .set_number_value(-3);
  try {
    spec_from_struct(spec, "job j spec");
    FAIL() << "no exception";
  } catch (const JobSpecError& e) {
    EXPECT_EQ(e.field(), "training.steps");
    EXPECT_THAT(e.what(), HasSubstr("job j spec"));
  }
}

// The canonical YAML is what the child runs; the Struct beside it (rounded to doubles) is only for
// display, so a spec that differs there proves which one is read.
TEST(AssignmentSpecTest, TheCanonicalSpecIsReadExactlyAndWinsOverTheStruct) {
  v1::Assignment assignment;
  assignment.set_canonical_spec(
      "model: {path: /models/tiny}\ndata: {train: [a.txt]}\n"
      "training: {steps: 20, seed: 9223372036854775807}\n");
  (*assignment.mutable_spec()->mutable_fields())["name"].set_string_value("not this one");
  const JobSpec parsed = spec_from_assignment(assignment, "job j spec");
  EXPECT_EQ(parsed.training.seed, 9223372036854775807u);
  EXPECT_EQ(parsed.name, "");
  // Without a canonical spec (a coordinator that sends only the Struct), the Struct is read.
  assignment.clear_canonical_spec();
  EXPECT_THROW(spec_from_assignment(assignment, "job j spec"), JobSpecError)
      << "the Struct lacks model.path";
}

TEST(JobRunnerTest, DescribesHowTheTrainingProcessEnded) {
  EXPECT_EQ(describe_child_end(false, 1, 0), "exited with code 1");
  EXPECT_EQ(describe_child_end(true, 0, SIGKILL), "killed by SIGKILL (out of memory?)");
  EXPECT_EQ(describe_child_end(true, 0, SIGSEGV), "killed by SIGSEGV (crashed)");
}

// A ChunkChannel that collects chunks and can answer commits or drop the connection.
class FakeChannel : public ChunkChannel {
 public:
  uint64_t wait_connected(std::chrono::steady_clock::time_point until) override {
    std::unique_lock lock(mutex);
    changed.wait_until(lock, until, [&] { return connected; });
    return connected ? generation_value : 0;
  }
  uint64_t generation() override {
    std::lock_guard lock(mutex);
    return connected ? generation_value : 0;
  }
  bool send(lomo::v1::WorkerMessage message, uint64_t generation) override {
    std::lock_guard lock(mutex);
    if (!connected || generation != generation_value) return false;
    chunks.push_back(message.checkpoint_chunk());
    if (drop_after_chunks > 0 && static_cast<int>(chunks.size()) == drop_after_chunks) {
      connected = false;
      drop_after_chunks = 0;
    }
    changed.notify_all();
    return true;
  }
  void reconnect() {
    std::lock_guard lock(mutex);
    ++generation_value;
    connected = true;
    changed.notify_all();
  }
  size_t commits() {
    std::lock_guard lock(mutex);
    size_t n = 0;
    for (const auto& c : chunks) n += c.commit() ? 1 : 0;
    return n;
  }

  std::mutex mutex;
  std::condition_variable changed;
  bool connected = true;
  uint64_t generation_value = 1;
  int drop_after_chunks = 0;
  std::vector<lomo::v1::CheckpointChunk> chunks;
};

lomo::v1::CheckpointAck ack(int64_t step, bool committed, const std::string& error = "") {
  lomo::v1::CheckpointAck a;
  a.set_job_id("job");
  a.set_step(step);
  a.set_committed(committed);
  a.set_error(error);
  return a;
}

void write_file(const fs::path& file, const std::string& bytes) {
  fs::create_directories(file.parent_path());
  std::ofstream(file, std::ios::binary) << bytes;
}

TEST(CheckpointUploaderTest, SendsEveryFileInBoundedChunksWithItsShaThenCommits) {
  TempDir dir;
  const fs::path checkpoint = dir.path / "step-00000007";
  const std::string big(2500, 'b');
  write_file(checkpoint / "model.safetensors", big);
  write_file(checkpoint / "config.json", "{}");
  write_file(checkpoint / "empty", "");
  FakeChannel channel;
  UploaderOptions options;
  options.chunk_bytes = 1000;
  CheckpointUploader uploader("job", 3, channel, options);
  uploader.offer(7, checkpoint);
  ASSERT_TRUE(testing_wait([&] { return channel.commits() == 1; }));
  uploader.on_ack(ack(7, true));
  std::string error;
  EXPECT_EQ(uploader.wait_idle(std::chrono::steady_clock::now() + std::chrono::seconds(30), &error),
            CheckpointUploader::Outcome::kDone);
  EXPECT_EQ(uploader.last_committed_step(), 7);

  std::map<std::string, std::string> files;
  for (const auto& c : channel.chunks) {
    EXPECT_EQ(c.job_id(), "job");
    EXPECT_EQ(c.attempt(), 3);
    EXPECT_EQ(c.step(), 7);
    if (c.commit()) continue;
    const lomo::v1::FileChunk& file = c.file();
    EXPECT_LE(file.data().size(), 1000u);
    EXPECT_EQ(static_cast<size_t>(file.offset()), files[file.path()].size());
    files[file.path()] += file.data();
    if (file.last_chunk_of_file()) {
      EXPECT_EQ(file.sha256(), sha256_hex(files[file.path()]));
    } else {
      EXPECT_TRUE(file.sha256().empty());
    }
  }
  EXPECT_EQ(files.size(), 3u);
  EXPECT_EQ(files["model.safetensors"], big);
  EXPECT_EQ(files["empty"], "");
  EXPECT_TRUE(channel.chunks.back().commit());
}

TEST(CheckpointUploaderTest, ABrokenConnectionRestartsTheUploadFromItsFirstChunk) {
  TempDir dir;
  const fs::path checkpoint = dir.path / "step-00000002";
  write_file(checkpoint / "model.safetensors", std::string(3000, 'm'));
  FakeChannel channel;
  channel.drop_after_chunks = 2;
  UploaderOptions options;
  options.chunk_bytes = 1000;
  CheckpointUploader uploader("job", 1, channel, options);
  uploader.offer(2, checkpoint);
  ASSERT_TRUE(testing_wait([&] {
    std::lock_guard lock(channel.mutex);
    return !channel.connected;
  }));
  channel.reconnect();
  ASSERT_TRUE(testing_wait([&] { return channel.commits() == 1; }));
  uploader.on_ack(ack(2, true));
  EXPECT_EQ(
      uploader.wait_idle(std::chrono::steady_clock::now() + std::chrono::seconds(30), nullptr),
      CheckpointUploader::Outcome::kDone);
  // Two chunks on the first connection, then all three again and the commit.
  ASSERT_EQ(channel.chunks.size(), 6u);
  EXPECT_EQ(channel.chunks[2].file().offset(), 0);
}

TEST(CheckpointUploaderTest, GivesUpAfterRepeatedRejectionsWithTheCoordinatorsReason) {
  TempDir dir;
  const fs::path checkpoint = dir.path / "step-00000004";
  write_file(checkpoint / "config.json", "{}");
  FakeChannel channel;
  UploaderOptions options;
  options.max_rejections = 2;
  CheckpointUploader uploader("job", 1, channel, options);
  uploader.offer(4, checkpoint);
  for (size_t commits = 1; commits <= 2; ++commits) {
    ASSERT_TRUE(testing_wait([&] { return channel.commits() == commits; }));
    uploader.on_ack(ack(4, false, "checksum mismatch"));
  }
  std::string error;
  EXPECT_EQ(uploader.wait_idle(std::chrono::steady_clock::now() + std::chrono::seconds(30), &error),
            CheckpointUploader::Outcome::kFailed);
  EXPECT_THAT(error, HasSubstr("checksum mismatch"));
  EXPECT_THAT(error, HasSubstr("step-00000004"));
}

TEST(CheckpointUploaderTest, SendsTheManifestWithTheCommitAndTheManifestFileAlong) {
  TempDir dir;
  const fs::path checkpoint = dir.path / "step-00000006";
  write_file(checkpoint / "model.safetensors", std::string(1500, 'm'));
  write_file(checkpoint / "trainer_state.json", "{}");
  const std::vector<ManifestEntry> manifest = write_checkpoint_manifest(checkpoint);
  FakeChannel channel;
  CheckpointUploader uploader("job", 1, channel);
  uploader.offer(6, checkpoint);
  ASSERT_TRUE(testing_wait([&] { return channel.commits() == 1; }));
  uploader.on_ack(ack(6, true));
  EXPECT_EQ(
      uploader.wait_idle(std::chrono::steady_clock::now() + std::chrono::seconds(30), nullptr),
      CheckpointUploader::Outcome::kDone);
  const lomo::v1::CheckpointChunk& commit = channel.chunks.back();
  ASSERT_TRUE(commit.commit());
  ASSERT_EQ(commit.manifest_size(), 2);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(commit.manifest(i).path(), manifest[i].path);
    EXPECT_EQ(commit.manifest(i).size_bytes(), manifest[i].size_bytes);
    EXPECT_EQ(commit.manifest(i).sha256(), manifest[i].sha256);
  }
  std::set<std::string> sent;
  for (const auto& c : channel.chunks) {
    if (c.has_file()) sent.insert(c.file().path());
  }
  EXPECT_EQ(sent, (std::set<std::string>{"lomo_manifest.json", "model.safetensors",
                                         "trainer_state.json"}));
}

// A file that changed after the trainer committed the checkpoint is never committed: no commit
// message goes out, the upload is not retried, and the reason names the file.
TEST(CheckpointUploaderTest, AFileThatNoLongerMatchesTheManifestIsNotUploadedAndNamed) {
  TempDir dir;
  const fs::path checkpoint = dir.path / "step-00000008";
  write_file(checkpoint / "model.safetensors", std::string(1500, 'm'));
  write_file(checkpoint / "trainer_state.json", "{}");
  write_checkpoint_manifest(checkpoint);
  write_file(checkpoint / "model.safetensors", std::string(1499, 'm') + "X");  // same size
  FakeChannel channel;
  CheckpointUploader uploader("job", 1, channel);
  uploader.offer(8, checkpoint);
  std::string error;
  EXPECT_EQ(uploader.wait_idle(std::chrono::steady_clock::now() + std::chrono::seconds(30), &error),
            CheckpointUploader::Outcome::kFailed);
  EXPECT_THAT(error, HasSubstr("step-00000008"));
  EXPECT_THAT(error, HasSubstr("no longer matches its lomo_manifest.json"));
  EXPECT_THAT(error, HasSubstr("model.safetensors"));
  EXPECT_EQ(channel.commits(), 0u);
  EXPECT_EQ(uploader.last_committed_step(), -1);
}

// --- The job runner's decision, against a fake training child (a shell script) -------------
// The script gets lomo-worker train's command line (train JOB --protocol-file FILE), prints what
// it is told to, appends protocol lines made by the real writer, and exits with a chosen code.

class RecordingListener : public JobRunnerListener {
 public:
  void on_status(const lomo::v1::JobStatusUpdate& status) override {
    std::lock_guard lock(mutex);
    statuses.push_back(status);
  }
  void on_events(const lomo::v1::JobEvents& batch) override {
    std::lock_guard lock(mutex);
    for (const auto& e : batch.events()) events.push_back(e);
  }
  void on_training_metrics(const lomo::v1::TrainingMetrics& m, int64_t) override {
    std::lock_guard lock(mutex);
    metrics.push_back(m);
  }
  void on_eval(const lomo::v1::EvalResult& eval) override {
    std::lock_guard lock(mutex);
    evals.push_back(eval);
  }
  void on_rank_step(const std::string& job_id, int rank,
                    const trainer_protocol::Metrics& m) override {
    std::lock_guard lock(mutex);
    rank_steps.push_back({job_id, rank, m});
  }

  struct RankStepSeen {
    std::string job_id;
    int rank;
    trainer_protocol::Metrics metrics;
  };
  std::mutex mutex;
  std::vector<RankStepSeen> rank_steps;
  std::vector<lomo::v1::JobStatusUpdate> statuses;
  std::vector<lomo::v1::JobEvent> events;
  std::vector<lomo::v1::TrainingMetrics> metrics;
  std::vector<lomo::v1::EvalResult> evals;
};

// `text` as one single-quoted shell word.
std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// A shell line that appends `record` to the protocol file.
std::string report(const trainer_protocol::Record& record) {
  std::string line = trainer_protocol::to_line(record);
  line.pop_back();
  return "printf '%s\\n' " + shell_quote(line) + " >> \"$4\"\n";
}

// Shell lines that print `lines` on stdout (human text: it must not matter).
std::string say(const std::vector<std::string>& lines) {
  std::string script;
  for (const std::string& l : lines) script += "echo " + shell_quote(l) + "\n";
  return script;
}

// A rank's place in a gang (world_size 1: a job of its own) and how it meets its peers.
struct GangPlace {
  int rank = 0;
  int world_size = 1;
  GangOptions gang;
  std::chrono::milliseconds finish_timeout{10000};  // for the last checkpoint's upload
};

// Runs one attempt of job "job-p" with `script_body` as the training program; its final status.
// `channel`, when given, receives the checkpoint uploads.
lomo::v1::JobStatusUpdate run_attempt(const TempDir& dir, const std::string& script_body,
                                      RecordingListener& listener, const GangPlace& place = {},
                                      FakeChannel* channel = nullptr) {
  const fs::path program = dir.path / "fake-trainer";
  write_file(program, "#!/bin/sh\n" + script_body);
  ::chmod(program.c_str(), 0755);
  lomo::v1::Assignment assignment;
  assignment.set_job_id("job-p");
  assignment.set_attempt(1);
  assignment.set_rank(place.rank);
  assignment.set_world_size(place.world_size);
  *assignment.mutable_spec() = small_spec();
  JobRunnerOptions options;
  options.work_dir = dir.path / "work";
  options.trainer_program = program;
  options.poll_interval = milliseconds(20);
  options.finish_timeout = place.finish_timeout;
  options.gang = place.gang;
  FakeChannel own_channel;
  JobRunner runner(assignment, options, listener, channel ? *channel : own_channel, nullptr);
  runner.join();
  return runner.final_status();
}

// run_attempt in a directory of its own, for the tests that look only at the final status and at
// what the listener received.
lomo::v1::JobStatusUpdate run_attempt(const std::string& script_body, RecordingListener& listener) {
  TempDir dir;
  return run_attempt(dir, script_body, listener);
}

// The final status alone.
lomo::v1::JobStatusUpdate run_attempt(const std::string& script_body) {
  RecordingListener listener;
  return run_attempt(script_body, listener);
}

namespace protocol = trainer_protocol;

const std::vector<std::string> kAlarmingText = {
    "error: training failed",
    "Traceback (most recent call last):", "stopped at step 3 of 20; run the same command to resume",
    "step      1/999  loss nan"};
const std::vector<std::string> kCheerfulText = {
    "step     20/20  loss 0.1000", "done: 20 steps; checkpoint /tmp/x", "training finished"};

TEST(JobRunnerProtocolTest, ASuccessReportedInTheProtocolSucceedsWhateverTheChildPrints) {
  const std::string reported_success =
      report(protocol::Started{7, 0, ""}) +
      report(protocol::Metrics{1, 7, 2.5, 0.01, 1.0, 1.0, false, 0, 512, 100.0, 0.1, {}}) +
      report(protocol::Outcome{protocol::Status::kSucceeded, "", 7, 7}) + "exit 0\n";
  for (const auto& text : {kAlarmingText, kCheerfulText}) {
    RecordingListener listener;
    const auto status =
        run_attempt(say(text) + "echo 'fatal error' >&2\n" + reported_success, listener);
    EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_SUCCEEDED) << status.reason();
    // The total comes from the protocol (7), not from a "step 1/999" line.
    ASSERT_EQ(listener.metrics.size(), 1u);
    EXPECT_EQ(listener.metrics[0].total_steps(), 7);
    // The text still reaches the job's log.
    bool logged = false;
    for (const auto& e : listener.events) logged = logged || e.log().text() == text[0];
    EXPECT_TRUE(logged);
  }
}

TEST(JobRunnerProtocolTest, AFailureReportedInTheProtocolFailsWhateverTheChildPrints) {
  const std::string reported_failure =
      report(protocol::Started{20, 0, ""}) +
      report(
          protocol::Outcome{protocol::Status::kNonFinite, "gradient of 'w' is not finite", 3, 20}) +
      "exit 5\n";
  for (const auto& text : {kCheerfulText, kAlarmingText}) {
    const auto status = run_attempt(say(text) + reported_failure);
    EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_FAILED);
    EXPECT_THAT(status.reason(), HasSubstr("exited with code 5"));
    // With nothing on stderr, the reason is the report's.
    EXPECT_THAT(status.reason(), HasSubstr("gradient of 'w' is not finite"));
  }
}

// The coordinator restarts a failed job unless its failure is marked permanent: only the outcomes
// that a new attempt would meet again (exit codes 3, 4 and 5) are.
TEST(JobRunnerProtocolTest, OnlyABadSpecBadDataOrNonFiniteOutcomeIsAPermanentFailure) {
  const struct {
    protocol::Status status;
    bool permanent;
  } cases[] = {{protocol::Status::kBadSpec, true},
               {protocol::Status::kBadData, true},
               {protocol::Status::kNonFinite, true},
               {protocol::Status::kFailed, false}};
  for (const auto& c : cases) {
    const auto status = run_attempt(report(protocol::Started{20, 0, ""}) +
                                    report(protocol::Outcome{c.status, "why", 3, 20}) + "exit " +
                                    std::to_string(protocol::exit_code_for(c.status)) + "\n");
    EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_FAILED) << protocol::status_name(c.status);
    EXPECT_EQ(status.permanent(), c.permanent) << protocol::status_name(c.status);
  }
  // A failed collective names the peer it lost: the coordinator waits for that rank's report.
  const auto lost_peer = run_attempt(
      report(protocol::Started{20, 0, ""}) +
      report(protocol::Outcome{protocol::Status::kFailed, "peer gone", 3, 20, 1}) + "exit 1\n");
  EXPECT_FALSE(lost_peer.permanent());
  ASSERT_TRUE(lost_peer.has_peer_rank());
  EXPECT_EQ(lost_peer.peer_rank(), 1);
  // A child that dies without an outcome (killed, crashed) may well succeed next time.
  const auto killed = run_attempt(report(protocol::Started{20, 0, ""}) + "kill -9 $$\n");
  EXPECT_EQ(killed.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(killed.reason(), HasSubstr("SIGKILL"));
  EXPECT_FALSE(killed.permanent());
}

TEST(JobRunnerProtocolTest, ACleanExitWithoutAnOutcomeRecordIsAFailure) {
  const auto status =
      run_attempt(say(kCheerfulText) + report(protocol::Started{20, 0, ""}) + "exit 0\n");
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status.reason(), HasSubstr("without reporting an outcome"));
}

TEST(JobRunnerProtocolTest, AnExitCodeThatContradictsTheReportedOutcomeIsAFailure) {
  const auto status =
      run_attempt(report(protocol::Outcome{protocol::Status::kSucceeded, "", 20, 20}) + "exit 1\n");
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status.reason(), HasSubstr("exited with code 1"));
  EXPECT_THAT(status.reason(), HasSubstr("its report said 'succeeded', whose exit code is 0"));
}

TEST(JobRunnerProtocolTest, AnUnreadableReportFailsTheAttemptNamingTheLine) {
  const auto status =
      run_attempt(report(protocol::Started{20, 0, ""}) + "echo 'step 20/20 done' >> \"$4\"\n" +
                  report(protocol::Outcome{protocol::Status::kSucceeded, "", 20, 20}) + "exit 0\n");
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status.reason(), HasSubstr("trainer protocol line 2: not a JSON object"));
}

// The child writes everything and exits before the runner's last read, so that read meets the bad
// line first: the records behind it (here an evaluation; in a real run perhaps the last committed
// checkpoint) must still be delivered, while the attempt fails for the bad line.
TEST(JobRunnerProtocolTest, RecordsAfterABadLineAreStillDelivered) {
  RecordingListener listener;
  const auto status = run_attempt(
      report(protocol::Started{20, 0, ""}) + "echo 'not json' >> \"$4\"\n" +
          "echo 'still not json' >> \"$4\"\n" + report(protocol::Eval{20, 1.5, 4.48, 64, 0.75, 4}) +
          report(protocol::Outcome{protocol::Status::kSucceeded, "", 20, 20}) + "exit 0\n",
      listener);
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status.reason(), HasSubstr("trainer protocol line 2"));
  ASSERT_EQ(listener.evals.size(), 1u);
  EXPECT_EQ(listener.evals[0].step(), 20);
}

TEST(JobRunnerProtocolTest, EvaluationAccuracyIsCarriedIntoTheEvalEvent) {
  RecordingListener listener;
  const auto status = run_attempt(
      report(protocol::Started{20, 0, ""}) + report(protocol::Eval{20, 1.5, 4.48, 64, 0.75, 4}) +
          report(protocol::Outcome{protocol::Status::kSucceeded, "", 20, 20}) + "exit 0\n",
      listener);
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_SUCCEEDED) << status.reason();
  ASSERT_EQ(listener.evals.size(), 1u);
  ASSERT_TRUE(listener.evals[0].has_accuracy());
  EXPECT_DOUBLE_EQ(listener.evals[0].accuracy(), 0.75);
  EXPECT_EQ(listener.evals[0].examples(), 4);
}

TEST(WorkerMetricsTest, NamesFollowTheConventions) {
  WorkerMetrics metrics("");
  lomo::v1::TrainingMetrics m;
  m.set_step(1);
  m.set_loss(2.0);
  m.set_learning_rate(0.5);
  m.set_loss_scale(1024);
  m.set_grad_norm(3.0);
  m.set_tokens_per_second(1000);
  (*m.mutable_peak_memory_bytes())["total"] = 4096;
  metrics.observe_step(m, 500);  // 0.5 s a step
  metrics.job_finished(lomo::v1::JOB_STATE_CANCELLED);
  const std::string text = metrics.render();
  EXPECT_THAT(text, HasSubstr("lomo_worker_step_duration_seconds_bucket{le=\"0.5\"} 1"));
  EXPECT_THAT(text, HasSubstr("lomo_worker_step_duration_seconds_bucket{le=\"0.25\"} 0"));
  EXPECT_THAT(text, HasSubstr("lomo_worker_tokens_total 500"));
  EXPECT_THAT(text, HasSubstr("lomo_worker_loss_scale 1024"));
  EXPECT_THAT(text, HasSubstr("lomo_worker_device_memory_peak_bytes{kind=\"total\"} 4096"));
  EXPECT_THAT(text, HasSubstr("lomo_worker_jobs_total{outcome=\"cancelled\"} 1"));
  EXPECT_EQ(metrics.port(), 0);
}

}  // namespace
}  // namespace lomo::daemon

namespace lomo::daemon {
namespace {

namespace protocol = trainer_protocol;

// Shell lines that commit checkpoint `step` where the runner looks for it (the attempt's out/
// directory beside job.yaml, "$2") and report it.
std::string commit_checkpoint(int64_t step) {
  return "d=\"$(dirname \"$2\")/out/checkpoints/" + checkpoint_directory_name(step) +
         "\"\nmkdir -p \"$d\"\necho weights > \"$d/model.safetensors\"\n" +
         report(protocol::Checkpoint{step, "ignored"});
}

// What a rank's trainer reports: a step's metrics, an evaluation, a committed checkpoint, success.
std::string a_short_run() {
  protocol::Metrics step{2, 2, 2.5, 0.01, 1.0, 1.0, false, 0, 512, 100.0, 0.1, {}};
  step.step_seconds = 0.25;
  step.communication_seconds = 0.125;
  step.communication_bytes = 4096;
  return report(protocol::Started{2, 0, ""}) + report(step) +
         report(protocol::Eval{2, 1.5, 4.48, 64, std::nullopt, 0}) + commit_checkpoint(2) +
         report(protocol::Outcome{protocol::Status::kSucceeded, "", 2, 2}) + "exit 0\n";
}

// A trainer that, when a cancel's SIGTERM stops it, commits checkpoint 7 and reports that it was
// interrupted (as lomo-worker train does); `ready` exists once its handler is installed.
std::string stops_with_a_checkpoint(const fs::path& ready) {
  return "on_term() {\n" + commit_checkpoint(7) +
         report(protocol::Outcome{protocol::Status::kInterrupted, "", 7, 100}) + "exit 6\n}\n" +
         "trap 'on_term \"$@\"' TERM\n" + report(protocol::Started{100, 0, ""}) + "touch " +
         shell_quote(ready.string()) + "\nwhile :; do sleep 0.02; done\n";
}

// Runs that trainer, cancels it once it is ready and returns the final status; `acked` says
// whether the coordinator (here the test) acknowledges the checkpoint's commit.
lomo::v1::JobStatusUpdate cancel_a_trainer_that_checkpoints(bool acked, FakeChannel& channel) {
  TempDir dir;
  const fs::path program = dir.path / "fake-trainer";
  write_file(program, "#!/bin/sh\n" + stops_with_a_checkpoint(dir.path / "ready"));
  ::chmod(program.c_str(), 0755);
  lomo::v1::Assignment assignment;
  assignment.set_job_id("job-p");
  assignment.set_attempt(1);
  *assignment.mutable_spec() = small_spec();
  JobRunnerOptions options;
  options.work_dir = dir.path / "work";
  options.trainer_program = program;
  options.poll_interval = milliseconds(20);
  options.cancel_grace = milliseconds(1500);
  RecordingListener listener;
  JobRunner runner(assignment, options, listener, channel, nullptr);
  EXPECT_TRUE(testing_wait([&] { return fs::exists(dir.path / "ready"); }));
  runner.cancel();
  if (acked) {
    EXPECT_TRUE(testing_wait([&] { return channel.commits() == 1; }));
    lomo::v1::CheckpointAck ack;
    ack.set_job_id("job-p");
    ack.set_step(7);
    ack.set_committed(true);
    runner.on_ack(ack);
  }
  runner.join();
  return runner.final_status();
}

TEST(JobRunnerCancelTest, ACancelConfirmsOnlyOnceTheCheckpointWrittenOnStopIsCommitted) {
  FakeChannel channel;
  const auto status = cancel_a_trainer_that_checkpoints(true, channel);
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(status.reason(), "cancelled");
  ASSERT_EQ(channel.commits(), 1u);
  EXPECT_EQ(channel.chunks.back().step(), 7);
}

TEST(JobRunnerCancelTest, ACancelWhoseCheckpointIsNotCommittedInTheGracePeriodSaysSo) {
  FakeChannel channel;
  const auto status = cancel_a_trainer_that_checkpoints(false, channel);
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(status.reason(),
            "cancelled; the last checkpoint was not kept: its upload did not finish within the "
            "cancel grace period");
}

GangPlace rank_of_two(int rank) {
  return {rank, 2, {"coordinator.example:50051", "worker-b", "10.0.0.7"}, milliseconds(10000)};
}

TEST(JobRunnerGangTest, ARankIsStartedWithItsPlaceInTheGangAndTheRendezvous) {
  TempDir dir;
  RecordingListener listener;
  const fs::path args_file = dir.path / "args";
  const auto status = run_attempt(
      dir,
      "printf '%s\\n' \"$@\" > " + shell_quote(args_file.string()) + "\n" +
          report(protocol::Outcome{protocol::Status::kSucceeded, "", 0, 0}) + "exit 0\n",
      listener, rank_of_two(1));
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_SUCCEEDED) << status.reason();
  std::vector<std::string> args;
  std::ifstream in(args_file);
  for (std::string line; std::getline(in, line);) args.push_back(line);
  ASSERT_GE(args.size(), 4u);
  EXPECT_EQ(args[0], "train");
  EXPECT_EQ(args[2], "--protocol-file");
  EXPECT_EQ(std::vector<std::string>(args.begin() + 4, args.end()),
            (std::vector<std::string>{"--rank", "1", "--world-size", "2", "--rendezvous",
                                      "coordinator://coordinator.example:50051", "--worker-id",
                                      "worker-b", "--job-id", "job-p", "--attempt", "1",
                                      "--advertise-address", "10.0.0.7"}));
}

TEST(JobRunnerGangTest, AJobOfItsOwnGetsNoRankFlags) {
  TempDir dir;
  RecordingListener listener;
  const fs::path args_file = dir.path / "args";
  const auto status = run_attempt(
      dir,
      "printf '%s\\n' \"$@\" > " + shell_quote(args_file.string()) + "\n" +
          report(protocol::Outcome{protocol::Status::kSucceeded, "", 0, 0}) + "exit 0\n",
      listener, {0, 1, rank_of_two(0).gang, milliseconds(10000)});
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_SUCCEEDED) << status.reason();
  std::ifstream in(args_file);
  size_t count = 0;
  for (std::string line; std::getline(in, line);) ++count;
  EXPECT_EQ(count, 4u) << "train JOB.yaml --protocol-file FILE, nothing more";
}

// A rank above 0 reports its status and output, keeps its step times for this worker's /metrics,
// and sends neither metrics nor eval events nor checkpoints: rank 0 speaks for the job. Had the
// checkpoint been offered, the upload would wait for an ack the fake channel never sends and the
// attempt would fail after finish_timeout.
TEST(JobRunnerGangTest, ARankAboveZeroSendsNoMetricsEvalOrCheckpoint) {
  TempDir dir;
  RecordingListener listener;
  FakeChannel channel;
  const auto status =
      run_attempt(dir, "echo 'rank 1 here'\n" + a_short_run(), listener, rank_of_two(1), &channel);
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_SUCCEEDED) << status.reason();
  EXPECT_TRUE(listener.metrics.empty());
  EXPECT_TRUE(listener.evals.empty());
  EXPECT_TRUE(channel.chunks.empty());
  bool logged = false;
  for (const auto& e : listener.events) {
    EXPECT_FALSE(e.has_metrics() || e.has_eval()) << e.DebugString();
    logged = logged || e.log().text() == "rank 1 here";
  }
  EXPECT_TRUE(logged);
  ASSERT_EQ(listener.rank_steps.size(), 1u);
  EXPECT_EQ(listener.rank_steps[0].job_id, "job-p");
  EXPECT_EQ(listener.rank_steps[0].rank, 1);
  EXPECT_EQ(listener.rank_steps[0].metrics.step, 2);
  EXPECT_EQ(listener.rank_steps[0].metrics.step_seconds, 0.25);
  EXPECT_EQ(listener.rank_steps[0].metrics.communication_seconds, 0.125);
  EXPECT_EQ(listener.rank_steps[0].metrics.communication_bytes, 4096);
  // RUNNING, then the terminal status.
  ASSERT_EQ(listener.statuses.size(), 2u);
  EXPECT_EQ(listener.statuses[0].state(), lomo::v1::JOB_STATE_RUNNING);
}

// Rank 0 of the same gang sends the job's metrics and eval events and uploads its checkpoint.
TEST(JobRunnerGangTest, RankZeroSpeaksForTheJob) {
  TempDir dir;
  RecordingListener listener;
  FakeChannel channel;
  GangPlace place = rank_of_two(0);
  place.finish_timeout = milliseconds(1000);
  const auto status = run_attempt(dir, a_short_run(), listener, place, &channel);
  // The upload waits for an ack this fake channel never sends: the attempt fails for that reason
  // alone, after finish_timeout, with the checkpoint sent and committed from the worker's side.
  EXPECT_EQ(status.state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status.reason(), HasSubstr("upload"));
  EXPECT_EQ(channel.commits(), 1u);
  EXPECT_EQ(listener.metrics.size(), 1u);
  EXPECT_EQ(listener.evals.size(), 1u);
  ASSERT_EQ(listener.rank_steps.size(), 1u);
  EXPECT_EQ(listener.rank_steps[0].rank, 0);
}

TEST(WorkerMetricsTest, EachRanksStepAndCommunicationTimesAreLabelledWithJobAndRank) {
  WorkerMetrics metrics("");
  metrics.observe_rank_step("job-a", 1, {0.5, 0.125, 4096});
  metrics.observe_rank_step("job-a", 1, {0.25, 0.0625, 4096});
  std::string text = metrics.render();
  // Gauges hold the latest step; counters its sums (all values exact in binary).
  EXPECT_THAT(text, HasSubstr("lomo_worker_step_seconds{job_id=\"job-a\",rank=\"1\"} 0.25"));
  EXPECT_THAT(text,
              HasSubstr("lomo_worker_communication_seconds{job_id=\"job-a\",rank=\"1\"} 0.0625"));
  EXPECT_THAT(text, HasSubstr("lomo_worker_step_seconds_total{job_id=\"job-a\",rank=\"1\"} 0.75"));
  EXPECT_THAT(
      text,
      HasSubstr("lomo_worker_communication_seconds_total{job_id=\"job-a\",rank=\"1\"} 0.1875"));
  EXPECT_THAT(text,
              HasSubstr("lomo_worker_communication_bytes_total{job_id=\"job-a\",rank=\"1\"} 8192"));
  // The next job's series replace the last one's: the labels stay bounded.
  metrics.observe_rank_step("job-b", 0, {1.0, 0.5, 16});
  text = metrics.render();
  EXPECT_THAT(text, HasSubstr("lomo_worker_step_seconds{job_id=\"job-b\",rank=\"0\"} 1"));
  EXPECT_THAT(text, Not(HasSubstr("job-a")));
}

TEST(RendezvousRelayLinesTest, RequestsAndRepliesCarryAnyBytesAndEmptyFields) {
  namespace relay = rendezvous_relay;
  const std::string binary("a\0 b\n\xff", 6);
  const std::vector<relay::Request> requests = {
      relay::SetRequest{"job/1/attempt/2/rank_0", binary}, relay::SetRequest{"k", ""},
      relay::GetRequest{{"a", binary, "c"}, milliseconds(1500)}};
  for (const relay::Request& request : requests) {
    const std::string line = relay::format_request(request);
    EXPECT_EQ(line.find('\n'), std::string::npos);
    EXPECT_EQ(relay::parse_request(line), request);
  }
  const std::vector<relay::Reply> replies = {
      {true, {}, ""}, {true, {binary, ""}, ""}, {false, {}, "key 'x' not set within 5 ms"}};
  for (const relay::Reply& reply : replies) {
    const std::string line = relay::format_reply(reply);
    EXPECT_EQ(line.find('\n'), std::string::npos);
    EXPECT_EQ(relay::parse_reply(line), reply);
  }
  EXPECT_THROW(relay::parse_request("get 10"), std::invalid_argument);  // no key
  EXPECT_THROW(relay::parse_request("set 6"), std::invalid_argument);   // no value
  EXPECT_THROW(relay::parse_request("set 6 0g"), std::invalid_argument);
  EXPECT_THROW(relay::parse_reply("okay"), std::invalid_argument);
}

TEST(AdvertiseAddressTest, ALoopbackCoordinatorGivesTheLoopbackAddress) {
  EXPECT_EQ(local_address_toward("127.0.0.1:50051"), "127.0.0.1");
  EXPECT_EQ(local_address_toward("localhost:50051"), "127.0.0.1");  // IPv4 first
}

TEST(AdvertiseAddressTest, AnUnresolvableCoordinatorIsAnErrorNamingIt) {
  try {
    local_address_toward("no-such-host.invalid:50051");
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("no-such-host.invalid:50051"));
  }
  EXPECT_THROW(local_address_toward("no-port"), std::runtime_error);
}

}  // namespace
}  // namespace lomo::daemon
