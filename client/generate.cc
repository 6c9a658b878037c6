// `lomoctl generate CHECKPOINT_DIR ...`: generation on a downloaded checkpoint, on this machine.
// lomoctl itself holds no model code (it links gRPC, whose libprotobuf cannot share a process with
// the tokenizer's bundled protobuf-lite): it runs `lomo-worker generate --model CHECKPOINT_DIR`
// with the remaining arguments, found as `lomoctl local` finds it.
#include <filesystem>
#include <string>
#include <vector>

#include "client/commands.h"
#include "client/local_mode.h"
#include "client/render.h"
#include "common/child_process.h"

namespace lomo::client {

namespace fs = std::filesystem;

namespace {

constexpr const char* kGenerateHelp =
    "usage: lomoctl generate CHECKPOINT_DIR (--prompt TEXT | --prompt-file FILE | "
    "--prompt-ids 1,2,3)\n"
    "           [--chat [--system TEXT] [--chat-template auto|NAME]] [--max-new-tokens N]\n"
    "           [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STRING]...\n"
    "  CHECKPOINT_DIR: a directory from `lomoctl download` or `lomoctl local --out`, or any\n"
    "  Hugging Face model directory. Runs `lomo-worker generate` ($LOMO_WORKER_BIN, beside\n"
    "  lomoctl, or in PATH) here, on the CPU; --output json prints its JSON object. --chat uses\n"
    "  the checkpoint's own chat_template (tokenizer_config.json) unless NAME picks a built-in.\n";

}  // namespace

int generate_command(CommandContext& context) {
  const std::vector<std::string>& args = context.args;
  if (args.empty() || args[0].rfind("-", 0) == 0) {
    throw UsageError("generate needs CHECKPOINT_DIR first\n" + std::string(kGenerateHelp));
  }
  const fs::path dir = args[0];
  if (!fs::is_regular_file(dir / "config.json")) {
    throw UsageError("generate: " + dir.string() +
                     " is not a model directory (it has no config.json)");
  }
  std::error_code error;
  const fs::path self_dir = fs::read_symlink("/proc/self/exe", error).parent_path();
  const fs::path worker =
      find_program("lomo-worker", std::nullopt, "LOMO_WORKER_BIN",
                   {self_dir / "lomo-worker", self_dir / ".." / "worker" / "lomo-worker"});
  ChildOptions options;
  options.argv = {worker.string(), "generate", "--model", dir.string()};
  options.argv.insert(options.argv.end(), args.begin() + 1, args.end());
  if (context.json) options.argv.push_back("--json");
  ChildProcess child(options);
  const ExitStatus status = child.wait();
  // lomo-worker has said what went wrong on stderr; lomoctl's own code for "could not do it".
  return status.success() ? 0 : kExitError;
}

}  // namespace lomo::client
