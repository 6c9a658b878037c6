#include "client/commands.h"

#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <iostream>

#include "client/render.h"
#include "client/watch.h"
#include "common/flags.h"
#include "common/printable.h"
#include "jobspec/job_spec.h"

namespace lomo::client {
namespace {

using google::protobuf::util::TimeUtil;

std::string time_text(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0 && t.nanos() == 0) return "-";
  google::protobuf::Timestamp seconds_only;
  seconds_only.set_seconds(t.seconds());
  return TimeUtil::ToString(seconds_only);
}

std::string age_text(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0) return "-";
  const int64_t seconds = std::max<int64_t>(0, TimeUtil::GetCurrentTime().seconds() - t.seconds());
  if (seconds < 60) return std::to_string(seconds) + "s ago";
  if (seconds < 3600) return std::to_string(seconds / 60) + "m ago";
  if (seconds < 86400) return std::to_string(seconds / 3600) + "h ago";
  return std::to_string(seconds / 86400) + "d ago";
}

std::string number_text(double value, const char* format) {
  char text[64];
  std::snprintf(text, sizeof(text), format, value);
  return text;
}

const std::string& one_positional(const ParsedArgs& args, const std::string& command,
                                  const std::string& what) {
  if (args.positional.size() != 1) {
    throw UsageError("lomoctl " + command + " needs exactly one " + what);
  }
  return args.positional[0];
}

}  // namespace

Client& CommandContext::client() {
  if (!client_) {
    ClientOptions options;
    options.address = config.coordinator;
    options.security = config.security;
    options.timeout =
        std::chrono::milliseconds(static_cast<int64_t>(config.timeout_seconds * 1000));
    client_ = std::make_unique<Client>(options);
  }
  return *client_;
}

std::optional<std::string> ParsedArgs::value(const std::string& name) const {
  const auto it = values.find(name);
  if (it == values.end() || it->second.empty()) return std::nullopt;
  return it->second.back();
}

std::vector<std::string> ParsedArgs::all(const std::string& name) const {
  const auto it = values.find(name);
  return it == values.end() ? std::vector<std::string>{} : it->second;
}

ParsedArgs parse_args(const std::vector<std::string>& args, const std::string& command,
                      const std::set<std::string>& with_value,
                      const std::set<std::string>& switches) {
  ParsedFlags flags;
  try {
    flags = parse_flags(args, {.switches = switches,
                               .allow_positional = true,
                               .with_value = with_value,
                               .unknown = UnknownFlags::kRefuse});
  } catch (const FlagError& e) {
    throw UsageError("lomoctl " + command + ": " + e.what());
  }
  // lomoctl's main answers --help wherever it stands; a command sees it only when called directly.
  if (flags.help)
    throw UsageError("lomoctl " + command + ": its flags are listed by lomoctl --help");
  ParsedArgs parsed;
  parsed.positional = std::move(flags.positional);
  for (auto& [name, value] : flags.flags) {
    if (switches.count(name)) {
      parsed.switches.insert(name);
    } else {
      parsed.values[name].push_back(std::move(value));
    }
  }
  return parsed;
}

lomo::v1::SubmitJobRequest load_submit_request(const std::string& file,
                                               const std::vector<std::string>& overrides,
                                               std::string* job_name, int64_t* world_size) {
  lomo::v1::SubmitJobRequest request;
  request.set_spec_text(read_job_spec_file(file));
  const JobSpec spec = parse_job_spec(request.spec_text(), file, overrides);
  for (const std::string& o : overrides) request.add_overrides(o);
  if (job_name != nullptr) *job_name = spec.name;
  if (world_size != nullptr) *world_size = spec.resources.world_size;
  return request;
}

// The job as REST answers with it (SubmitJobResponse, GetJobResponse, CancelJobResponse: the
// Job under "job"), so that a script reads lomoctl's JSON and the API's the same way
// (docs/openapi.yaml).
template <typename Response>
void print_job_response(const lomo::v1::Job& job) {
  Response response;
  *response.mutable_job() = job;
  std::cout << message_to_json(response, true) << "\n";
}

WatchOptions watch_options_for(const CommandContext& context) {
  WatchOptions options;
  options.tty = context.stdout_is_tty && !context.json;
  options.json = context.json;
  options.width = context.terminal_width;
  return options;
}

int submit_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "submit", {"--set"}, {"--watch"});
  const std::string& file = one_positional(args, "submit", "job file (JOB.yaml)");
  std::string name;
  const lomo::v1::Job job =
      context.client().submit_job(load_submit_request(file, args.all("--set"), &name));
  if (context.json) {
    print_job_response<lomo::v1::SubmitJobResponse>(job);
  } else {
    std::cout << "submitted job " << job.id() << (name.empty() ? "" : " (" + name + ")") << ": "
              << state_name(job.state()) << "\n";
    if (!args.has("--watch")) std::cout << "follow it with: lomoctl watch " << job.id() << "\n";
  }
  std::cout << std::flush;
  if (!args.has("--watch")) return 0;
  const lomo::v1::Job done =
      watch_job_to_end(context.client(), job.id(), watch_options_for(context), std::cout);
  return exit_code_for(done.state());
}

int list_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "list", {"--state", "--limit"}, {"--all"});
  if (!args.positional.empty()) throw UsageError("lomoctl list takes no job id (see: lomoctl get)");
  std::vector<lomo::v1::JobState> states;
  for (const std::string& value : args.all("--state")) {
    size_t start = 0;
    while (start <= value.size()) {
      const size_t comma = std::min(value.find(',', start), value.size());
      const std::string one = value.substr(start, comma - start);
      const auto state = parse_state(one);
      if (!state) {
        throw UsageError("lomoctl list: --state " + one +
                         ": expected queued, assigned, running, succeeded, failed or cancelled");
      }
      states.push_back(*state);
      start = comma + 1;
    }
  }
  int limit = 50;
  if (args.has("--all")) limit = 0;
  if (const auto text = args.value("--limit")) {
    try {
      limit = std::stoi(*text);
    } catch (const std::exception&) {
      throw UsageError("lomoctl list: --limit expects a number");
    }
  }
  const std::vector<lomo::v1::Job> jobs = context.client().list_jobs(states, limit);
  if (context.json) {
    lomo::v1::ListJobsResponse response;
    for (const auto& job : jobs) *response.add_jobs() = job;
    std::cout << message_to_json(response, true) << "\n";
    return 0;
  }
  if (jobs.empty()) {
    std::cout << "no jobs\n";
    return 0;
  }
  // OWNER only when a job has one (a coordinator with authentication): admins see everyone's.
  const bool owners = std::any_of(jobs.begin(), jobs.end(),
                                  [](const lomo::v1::Job& job) { return !job.owner().empty(); });
  std::vector<std::vector<std::string>> rows{
      {"JOB ID", "NAME", "STATE", "STEP", "LOSS", "WORKER", "CREATED"}};
  if (owners) rows.front().insert(rows.front().begin() + 2, "OWNER");
  for (const auto& job : jobs) {
    const auto& p = job.progress();
    rows.push_back(
        {job.id(), job.name().empty() ? "-" : terminal_text(job.name()), state_name(job.state()),
         p.total_steps() > 0 ? std::to_string(p.step()) + "/" + std::to_string(p.total_steps())
                             : "-",
         p.step() > 0 ? number_text(p.loss(), "%.4f") : "-", workers_cell(job),
         age_text(job.create_time())});
    if (owners) {
      rows.back().insert(rows.back().begin() + 2,
                         job.owner().empty() ? "-" : terminal_text(job.owner()));
    }
  }
  std::cout << format_table(rows);
  return 0;
}

int get_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "get", {}, {});
  const lomo::v1::Job job = context.client().get_job(one_positional(args, "get", "job id"));
  if (context.json) {
    print_job_response<lomo::v1::GetJobResponse>(job);
    return 0;
  }
  const auto& p = job.progress();
  std::vector<std::vector<std::string>> rows{{"job:", job.id()}};
  if (!job.name().empty()) rows.push_back({"name:", terminal_text(job.name())});
  rows.push_back({"state:", state_name(job.state())});
  if (!job.failure_reason().empty()) {
    rows.push_back({"reason:", terminal_paragraph(job.failure_reason(), "         ")});
  }
  if (!job.owner().empty()) rows.push_back({"owner:", terminal_text(job.owner())});
  rows.push_back({"attempt:", std::to_string(job.attempt())});
  const std::vector<std::string> attempts = attempt_lines(job);
  for (size_t i = 0; i < attempts.size(); ++i) {
    rows.push_back({i == 0 ? "attempts:" : "", attempts[i]});
  }
  if (!job.wait_reason().empty()) rows.push_back({"waiting:", terminal_text(job.wait_reason())});
  const std::vector<std::string> gang = gang_lines(job);
  for (size_t i = 0; i < gang.size(); ++i) rows.push_back({i == 0 ? "gang:" : "", gang[i]});
  if (gang.empty() && !job.worker_id().empty()) rows.push_back({"worker:", job.worker_id()});
  if (p.step() > 0) {
    std::string progress =
        "step " + std::to_string(p.step()) + "/" + std::to_string(p.total_steps()) + ", loss " +
        number_text(p.loss(), "%.4f") + ", lr " + number_text(p.learning_rate(), "%.3e") + ", " +
        number_text(p.tokens_per_second(), "%.0f") + " tok/s";
    if (p.eval_loss() > 0) progress += ", eval loss " + number_text(p.eval_loss(), "%.4f");
    if (p.has_eval_accuracy()) {
      progress += ", eval accuracy " + number_text(p.eval_accuracy(), "%.3f");
    }
    // The ETA `watch` shows, from the job's metrics events (tqdm's smoothing, client/eta.h).
    if (const auto eta = smoothed_eta_seconds(context.client(), job)) {
      progress += ", ETA " + format_duration(*eta);
    }
    rows.push_back({"progress:", progress});
  }
  rows.push_back({"created:", time_text(job.create_time())});
  rows.push_back({"started:", time_text(job.start_time())});
  rows.push_back({"ended:", time_text(job.end_time())});
  std::cout << format_table(rows);
  return 0;
}

int watch_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "watch", {}, {"--logs"});
  WatchOptions options = watch_options_for(context);
  options.show_logs = args.has("--logs");
  const lomo::v1::Job job = watch_job_to_end(
      context.client(), one_positional(args, "watch", "job id"), options, std::cout);
  return exit_code_for(job.state());
}

int logs_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "logs", {}, {"-f", "--follow"});
  const std::string& job_id = one_positional(args, "logs", "job id");
  const bool follow = args.has("-f") || args.has("--follow");
  context.client().watch_job(job_id, 0, follow, [&](const lomo::v1::WatchJobResponse& r) {
    if (!r.has_event() || !r.event().has_log()) return true;
    if (context.json) {
      std::cout << message_to_json(r.event(), false) << "\n";
    } else {
      std::cout << lomo::terminal_line(r.event().log().text()) << "\n";
    }
    std::cout << std::flush;
    return true;
  });
  return 0;
}

int cancel_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "cancel", {}, {});
  const lomo::v1::Job job = context.client().cancel_job(one_positional(args, "cancel", "job id"));
  if (context.json) {
    print_job_response<lomo::v1::CancelJobResponse>(job);
  } else {
    std::cout << "job " << job.id() << ": cancel requested, now " << state_name(job.state())
              << "\n";
  }
  return 0;
}

int checkpoints_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "checkpoints", {}, {});
  const auto checkpoints =
      context.client().list_checkpoints(one_positional(args, "checkpoints", "job id"));
  if (context.json) {
    lomo::v1::ListCheckpointsResponse response;
    for (const auto& c : checkpoints) *response.add_checkpoints() = c;
    std::cout << message_to_json(response, true) << "\n";
    return 0;
  }
  if (checkpoints.empty()) {
    std::cout << "no committed checkpoints\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows{
      {"CHECKPOINT ID", "STEP", "SIZE", "FILES", "COMMITTED"}};
  for (const auto& c : checkpoints) {
    rows.push_back({c.checkpoint_id(), std::to_string(c.step()), format_bytes(c.size_bytes()),
                    std::to_string(c.files_size()), time_text(c.commit_time())});
  }
  std::cout << format_table(rows);
  return 0;
}

int download_command(CommandContext& context) {
  const ParsedArgs args = parse_args(context.args, "download", {}, {});
  if (args.positional.size() != 2) {
    throw UsageError(
        "lomoctl download needs a checkpoint id and a directory "
        "(lomoctl download JOB_ID/step-00000100 DIR)");
  }
  const std::string& id = args.positional[0];
  const std::filesystem::path directory = args.positional[1];
  // The checkpoint's record, when its job can be listed: the files received must match it.
  std::vector<lomo::v1::CheckpointFile> expected;
  if (const size_t slash = id.rfind('/'); slash != std::string::npos) {
    for (const auto& c : context.client().list_checkpoints(id.substr(0, slash))) {
      if (c.checkpoint_id() == id) expected.assign(c.files().begin(), c.files().end());
    }
  }
  const bool show_progress = context.stdout_is_tty && !context.json;
  const DownloadResult result =
      context.client().download_checkpoint(id, directory, expected, [&](const DownloadProgress& p) {
        if (show_progress)
          std::cout << "\r\033[K" << p.path << "  " << format_bytes(p.bytes) << std::flush;
      });
  if (show_progress) std::cout << "\r\033[K";
  if (context.json) {
    lomo::v1::CheckpointInfo info;
    info.set_checkpoint_id(id);
    info.set_size_bytes(result.bytes);
    for (const auto& f : result.files) *info.add_files() = f;
    std::cout << message_to_json(info, true) << "\n";
  } else {
    std::cout << "downloaded " << id << " to " << directory.string() << ": " << result.files.size()
              << " files, " << format_bytes(result.bytes) << ", SHA-256 verified\n";
  }
  return 0;
}

}  // namespace lomo::client
