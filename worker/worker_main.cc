// lomo-worker: the per-device training process.
//
//   lomo-worker train JOB.yaml [--set key=value]... [--restart]
//       Runs one job with no daemon: progress on the terminal, checkpoints and metrics.jsonl in the
//       job's output.dir. An earlier attempt's latest checkpoint there is resumed unless --restart.
//       Ctrl-C or SIGTERM finishes the current step, checkpoints, and exits; a second one kills.
//   lomo-worker init-model DIR [--preset tiny|reference] [--seed N]
//       Writes a randomly initialised LLaMA in Hugging Face layout (for demos and benchmarks).
//   lomo-worker serve --coordinator HOST:PORT [--device cpu|N] [--work-dir DIR] ...
//       The worker daemon: registers the device with the coordinator and runs each assignment as
//       a `train` child process. It is the lomo-workerd executable beside this one
//       (daemon/), kept apart because gRPC's libprotobuf and libsentencepiece's bundled
//       protobuf-lite crash when loaded into one process. SIGTERM stops it gracefully.
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "worker/engine/checkpoint_io.h"
#include "jobspec/job_spec.h"
#include "worker/train/trainer.h"

namespace {

std::atomic<bool> g_stop_requested{false};

void on_stop_signal(int signal) {
  if (g_stop_requested.exchange(true)) {
    std::signal(signal, SIG_DFL);
    std::raise(signal);
  }
}

int usage(const std::string& problem) {
  std::cerr << "lomo-worker: " << problem << "\n"
            << "usage:\n"
            << "  lomo-worker train JOB.yaml [--set key=value]... [--restart]\n"
            << "  lomo-worker init-model DIR [--preset tiny|reference] [--seed N]\n"
            << "  lomo-worker serve --coordinator HOST:PORT [--device cpu|N] [--work-dir DIR]\n"
            << "                    [--metrics-listen ADDR:PORT] [--worker-id ID]\n";
  return 2;
}

std::string format_duration(double seconds) {
  const long s = static_cast<long>(seconds + 0.5);
  char text[32];
  std::snprintf(text, sizeof(text), "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  return text;
}

int train_command(const std::vector<std::string>& args) {
  if (args.empty()) return usage("train needs a job file");
  lomo::JobSpec spec = lomo::load_job_spec(args[0]);
  lomo::TrainerOptions options;
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--set" && i + 1 < args.size()) {
      lomo::apply_job_spec_override(spec, args[++i]);
    } else if (args[i] == "--restart") {
      options.resume = false;
    } else {
      return usage("unknown argument '" + args[i] + "'");
    }
  }
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  options.stop_requested = &g_stop_requested;

  lomo::TrainerHooks hooks;
  const int64_t log_every = spec.training.log_every;
  hooks.on_log = [](const std::string& line) { std::printf("%s\n", line.c_str()); };
  hooks.on_step = [log_every](const lomo::TrainingMetrics& m) {
    if (m.step % log_every != 0 && m.step != 1 && m.step != m.total_steps) return;
    const double eta = m.elapsed_seconds / m.step * (m.total_steps - m.step);
    std::printf("step %6lld/%lld  loss %.4f  lr %.3e  grad_norm %.3f%s  %.0f tok/s  peak %.1f MiB"
                "  eta %s\n",
                static_cast<long long>(m.step), static_cast<long long>(m.total_steps), m.loss,
                m.lr, m.grad_norm, m.skipped ? " (skipped: fp16 overflow)" : "",
                m.tokens_per_second, m.memory.peak_total_bytes / 1048576.0,
                format_duration(eta).c_str());
    std::fflush(stdout);
  };
  hooks.on_eval = [](const lomo::EvalMetrics& m) {
    std::printf("eval at step %lld: loss %.4f  perplexity %.2f  (%lld tokens)",
                static_cast<long long>(m.step), m.loss, m.perplexity,
                static_cast<long long>(m.tokens));
    if (m.accuracy) {
      std::printf("  accuracy %.3f (%lld examples)", *m.accuracy,
                  static_cast<long long>(m.examples));
    }
    std::printf("\n");
  };
  std::printf("job %s: %s on %s, output %s\n", spec.name.empty() ? args[0].c_str() : spec.name.c_str(),
              spec.optimizer.name.c_str(), spec.model.path.c_str(), spec.output.dir.c_str());
  const lomo::TrainResult result = lomo::train(spec, options, hooks);
  std::printf("peak memory by kind:\n%s", result.memory.to_string().c_str());
  if (result.stopped) {
    std::printf("stopped at step %lld of %lld; run the same command to resume from %s\n",
                static_cast<long long>(result.steps_done), static_cast<long long>(result.total_steps),
                result.last_checkpoint.c_str());
    return 0;
  }
  std::printf("done: %lld steps; checkpoint %s\n", static_cast<long long>(result.steps_done),
              result.last_checkpoint.c_str());
  return 0;
}

// Replaces this process with lomo-workerd (beside this executable), telling it to run this
// executable for training. Returns only if that fails.
int serve_command(const std::vector<std::string>& args) {
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) {
    std::cerr << "lomo-worker serve: cannot find its own executable: " << error.message() << "\n";
    return 1;
  }
  const std::filesystem::path daemon = self.parent_path() / "lomo-workerd";
  std::vector<std::string> daemon_args{daemon.string(), "--trainer", self.string()};
  daemon_args.insert(daemon_args.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : daemon_args) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(daemon.c_str(), argv.data());
  std::cerr << "lomo-worker serve: cannot run " << daemon.string() << ": " << std::strerror(errno)
            << " (it is built beside lomo-worker: target lomo-workerd)\n";
  return 1;
}

int init_model_command(const std::vector<std::string>& args) {
  if (args.empty()) return usage("init-model needs a directory");
  std::string preset = "tiny";
  uint64_t seed = 1;
  for (size_t i = 1; i + 1 < args.size(); i += 2) {
    if (args[i] == "--preset") {
      preset = args[i + 1];
    } else if (args[i] == "--seed") {
      seed = std::stoull(args[i + 1]);
    } else {
      return usage("unknown argument '" + args[i] + "'");
    }
  }
  lomo::LlamaConfig config;
  if (preset == "tiny") {  // 0.76M parameters: the README's demo
    config.vocab_size = 256;
    config.hidden_size = 128;
    config.intermediate_size = 344;
    config.num_hidden_layers = 4;
    config.num_attention_heads = 4;
    config.num_key_value_heads = 2;
    config.head_dim = 32;
    config.max_position_embeddings = 1024;
    config.tie_word_embeddings = true;
  } else if (preset == "reference") {  // 58M parameters: the benchmarks' reference config
    config.vocab_size = 32000;
    config.hidden_size = 512;
    config.intermediate_size = 1376;
    config.num_hidden_layers = 8;
    config.num_attention_heads = 8;
    config.num_key_value_heads = 8;
    config.head_dim = 64;
    config.max_position_embeddings = 2048;
  } else {
    return usage("unknown preset '" + preset + "'");
  }
  lomo::MemoryAccountant accountant;
  lomo::LlamaWeights weights(config, lomo::DType::kF32, accountant);
  weights.init_random(seed, 0.02f);
  lomo::save_llama_checkpoint(weights, args[0]);
  std::printf("wrote a random %.2fM-parameter LLaMA (%s) to %s\n",
              weights.parameter_count() / 1e6, preset.c_str(), args[0].c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage("no command");
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  try {
    if (command == "train") return train_command(args);
    if (command == "init-model") return init_model_command(args);
    if (command == "serve") return serve_command(args);
    return usage("unknown command '" + command + "'");
  } catch (const std::exception& e) {
    std::cerr << "lomo-worker " << command << ": " << e.what() << "\n";
    return 1;
  }
}
