#include "client/help.h"

#include <map>

namespace lomo::client {
namespace {

// Shown under every command: the flags lomoctl takes before or after any command.
constexpr const char* kGlobalFlags = R"(
global flags (before or after the command):
  --coordinator HOST:PORT  the coordinator's gRPC address (else $LOMO_COORDINATOR, else
                           "coordinator:" in ~/.config/lomo/lomoctl.yaml, else 127.0.0.1:7070)
  -o, --output text|json   json: the REST API's JSON (protobuf's JSON mapping, camelCase)
  --timeout SECONDS        deadline of each call to the coordinator
  --version                lomoctl's version and build revision
)";

const std::map<std::string, std::string>& help_texts() {
  static const std::map<std::string, std::string> texts{
      {"submit", R"(usage: lomoctl submit JOB.yaml [--set key=value]... [--watch]

Validates the job spec here (every problem with its field and line), then submits it.
Prints the new job's id (--output json: the SubmitJobResponse).

flags:
  --set key=value   override a field of the spec, e.g. --set optimizer.lr=1e-5 (repeatable)
  --watch           follow the job to its end as `lomoctl watch` does; the exit status is
                    then the job's (0 SUCCEEDED, 1 FAILED, 2 CANCELLED)

examples:
  lomoctl submit examples/tiny-lomo.yaml
  lomoctl submit job.yaml --set training.steps=200 --set name=short-run --watch
)"},
      {"list", R"(usage: lomoctl list [--state STATE[,STATE]]... [--limit N | --all]

Jobs, newest first: id, name, state, step, loss, worker(s), age.

flags:
  --state STATE   only jobs in these states: queued, assigned, running, succeeded, failed,
                  cancelled (comma-separated or repeated)
  --limit N       at most N jobs (default 50)
  --all           every job

examples:
  lomoctl list --state running,queued
  lomoctl list --all --output json
)"},
      {"get", R"(usage: lomoctl get JOB_ID

One job: state, failure reason, attempts, gang, progress (step, loss, lr, tok/s, eval
loss; for a running job the ETA `watch` shows), created/started/ended times. --output json prints
GET /v1/jobs/JOB_ID's answer, the GetJobResponse {"job": {...}}.

example:
  lomoctl get job-1a2b3c
)"},
      {"watch", R"(usage: lomoctl watch JOB_ID [--logs]

Follows a job to its end: a progress bar on a terminal (ETA smoothed as tqdm does), plain
lines otherwise, one WatchJobResponse per line with --output json. Reconnects when the
coordinator restarts. Exit status: 0 SUCCEEDED, 1 FAILED, 2 CANCELLED.

flags:
  --logs   show the training process's log lines too

example:
  lomoctl watch job-1a2b3c --logs
)"},
      {"logs", R"(usage: lomoctl logs JOB_ID [-f | --follow]

The job's log lines: what the training process printed.

flags:
  -f, --follow   keep printing new lines until the job ends

example:
  lomoctl logs job-1a2b3c -f
)"},
      {"cancel", R"(usage: lomoctl cancel JOB_ID

Cancels a queued or running job (its workers stop it; committed checkpoints stay).
--output json prints the CancelJobResponse {"job": {...}}, as POST /v1/jobs/JOB_ID:cancel does.

example:
  lomoctl cancel job-1a2b3c
)"},
      {"checkpoints", R"(usage: lomoctl checkpoints JOB_ID

The job's committed checkpoints: id, step, size, time (--output json: checkpointId, ...).

example:
  lomoctl checkpoints job-1a2b3c
)"},
      {"download", R"(usage: lomoctl download CHECKPOINT_ID DIR

Fetches a checkpoint (a Hugging Face model directory) into DIR, which must be absent or
empty; every file is checked against its SHA-256 before DIR appears.

example:
  lomoctl download job-1a2b3c/step-00000200 ./my-model
)"},
      {"local",
       R"(usage: lomoctl local JOB.yaml [--workers N] [--set key=value]... [--state-dir DIR]
                     [--out DIR] [--coordinator-bin PATH] [--worker-bin PATH]

Runs a coordinator and N CPU workers on this machine, runs the job on all of them and keeps
its final checkpoint. Exit status: the job's (0 SUCCEEDED, 1 FAILED, 2 CANCELLED).

flags:
  --workers N            workers (ranks) to start; default the spec's resources.world_size
  --set key=value        override a field of the spec (repeatable)
  --state-dir DIR        the coordinator's and workers' files (default out/local)
  --out DIR              where the final checkpoint goes (default
                         STATE_DIR/checkpoints/JOB_ID)
  --coordinator-bin PATH, --worker-bin PATH
                         the programs to run (default: beside lomoctl, then PATH)

example:
  lomoctl local examples/tiny-lomo.yaml --workers 2 --out ./tiny-model
)"},
      {"generate", R"(usage: lomoctl generate CHECKPOINT_DIR (--prompt TEXT | --prompt-file FILE |
                        --prompt-ids 1,2,3) [--chat [--system TEXT] [--chat-template NAME]]
                        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                        [--seed S] [--stop STRING]...

Text from a downloaded checkpoint (or any Hugging Face model directory), generated here on
the CPU by `lomo-worker generate`, which lists every flag (lomo-worker generate --help).
Greedy at temperature 0 (the default). --output json prints one object with the prompt and
new tokens, the text and the stop reason.

examples:
  lomoctl generate ./my-model --prompt "The capital of France is" --max-new-tokens 20
  lomoctl generate ./my-model --chat --prompt "Write a haiku about GPUs" --temperature 0.7
)"},
  };
  return texts;
}

}  // namespace

std::optional<std::string> command_help(const std::string& command) {
  const auto it = help_texts().find(command);
  if (it == help_texts().end()) return std::nullopt;
  return it->second + kGlobalFlags;
}

}  // namespace lomo::client
