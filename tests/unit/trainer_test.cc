// The training loop end to end on a tiny model: resume equals an uninterrupted run bit for bit.
#include "worker/train/trainer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "common/checkpoint_manifest.h"
#include "common/printable.h"
#include "common/sha256.h"
#include "kernels/cpu/gemm_dispatch.h"
#include "worker/comm/in_process_communicator.h"
#include "worker/data/byte_tokenizer.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/engine/kv_cache_model.h"
#include "worker/generate/generation.h"
#include "worker/train/token_dataset.h"

namespace lomo {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  // The process id keeps concurrent runs of the suite (several build trees) apart.
  fs::path dir =
      fs::path(::testing::TempDir()) / ("trainer_test_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A byte-level model (vocab 256) and a small text corpus on disk.
struct Workspace {
  explicit Workspace(const std::string& name) : root(fresh_dir(name)) {
    LlamaConfig c;
    c.vocab_size = 256;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 8;
    c.max_position_embeddings = 64;
    MemoryAccountant accountant;
    LlamaWeights weights(c, DType::kF32, accountant);
    weights.init_random(2, 0.05f);
    save_llama_checkpoint(weights, root / "model");
    std::ofstream(root / "train.txt")
        << std::string(
               "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor "
               "jugs. "
               "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ") +
               std::string(600, 'a');
    std::ofstream(root / "eval.txt") << "The five boxing wizards jump quickly over the lazy dog.";
  }

  JobSpec spec(const std::string& optimizer, const std::string& output) const {
    JobSpec s;
    s.model.path = (root / "model").string();
    s.data.train = {(root / "train.txt").string()};
    s.data.eval = {(root / "eval.txt").string()};
    s.data.max_length = 16;
    s.optimizer.name = optimizer;
    s.optimizer.lr = optimizer == "adalomo" ? 1e-2 : 0.1;
    s.optimizer.schedule = "cosine";
    s.optimizer.warmup_steps = 2;
    s.optimizer.weight_decay = 0.01;
    s.training.batch_size = 3;
    s.training.steps = 12;
    s.training.eval_every = 4;
    s.training.eval_batches = 2;
    s.output.dir = (root / output).string();
    return s;
  }

  fs::path root;
};

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

struct ResumeCase {
  std::string optimizer;
  std::string dtype;
  bool clip;
  bool checkpointing;
};

void PrintTo(const ResumeCase& c, std::ostream* os) {
  *os << c.optimizer << "/" << c.dtype << (c.clip ? "/clip" : "")
      << (c.checkpointing ? "/ckpt" : "");
}

class ResumeTest : public ::testing::TestWithParam<ResumeCase> {};

TEST_P(ResumeTest, ResumedRunEqualsUninterruptedRunBitForBit) {
  const ResumeCase c = GetParam();
  Workspace ws("resume_" + c.optimizer + "_" + c.dtype + (c.clip ? "_clip" : "") +
               (c.checkpointing ? "_ckpt" : ""));
  auto configure = [&](JobSpec s) {
    s.precision.dtype = c.dtype;
    s.optimizer.stochastic_rounding = c.dtype == "bf16";
    if (c.clip) s.optimizer.clip_grad_norm = 0.5;
    if (c.dtype == "fp16") s.precision.loss_scale.growth_interval = 3;  // exercise growth too
    s.training.activation_checkpointing = c.checkpointing;
    return s;
  };
  const JobSpec straight = configure(ws.spec(c.optimizer, "straight"));
  const TrainResult full = train(straight, {}, {});
  EXPECT_EQ(full.steps_done, 12);
  EXPECT_FALSE(full.stopped);

  const JobSpec interrupted = configure(ws.spec(c.optimizer, "interrupted"));
  std::atomic<bool> stop{false};
  TrainerHooks hooks;
  hooks.on_step = [&](const TrainingMetrics& m) {
    if (m.step == 5) stop = true;
  };
  TrainerOptions options;
  options.stop_requested = &stop;
  const TrainResult first = train(interrupted, options, hooks);
  EXPECT_TRUE(first.stopped);
  EXPECT_EQ(first.steps_done, 5);
  const TrainResult second = train(interrupted, {}, {});  // resumes from step 5
  EXPECT_EQ(second.steps_done, 12);

  const fs::path a = full.last_checkpoint, b = second.last_checkpoint;
  EXPECT_EQ(a.filename(), "step-00000012");
  EXPECT_EQ(b.filename(), "step-00000012");
  EXPECT_EQ(file_bytes(a / "model.safetensors"), file_bytes(b / "model.safetensors"));
  EXPECT_EQ(file_bytes(a / "optimizer.safetensors"), file_bytes(b / "optimizer.safetensors"));
  EXPECT_EQ(file_bytes(a / "lomo_trainer_state.json"), file_bytes(b / "lomo_trainer_state.json"));
  // The metrics of both runs agree line for line (the interrupted one logged every step once).
  std::ifstream ma(fs::path(straight.output.dir) / "metrics.jsonl"),
      mb(fs::path(interrupted.output.dir) / "metrics.jsonl");
  std::string la, lb;
  int lines = 0;
  while (std::getline(ma, la)) {
    ASSERT_TRUE(std::getline(mb, lb)) << "interrupted run has fewer metric lines";
    // tokens_per_second and memory differ by nature; compare everything before them.
    EXPECT_EQ(la.substr(0, la.find("\"tokens_per_second\"")),
              lb.substr(0, lb.find("\"tokens_per_second\"")));
    ++lines;
  }
  EXPECT_FALSE(std::getline(mb, lb)) << "interrupted run has extra metric lines";
  EXPECT_EQ(lines, 12 + 3);  // 12 steps + evals at 4, 8 and the end
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ResumeTest,
                         ::testing::Values(ResumeCase{"lomo", "fp32", false, false},
                                           ResumeCase{"lomo", "fp32", true, true},
                                           ResumeCase{"adalomo", "fp32", false, false},
                                           ResumeCase{"adalomo", "bf16", true, false},
                                           ResumeCase{"lomo", "fp16", false, false},
                                           ResumeCase{"adamw", "fp32", true, false}));

// Every checkpoint carries a manifest of its files as written, and a resume refuses a checkpoint
// whose files no longer match it, naming the file, rather than training on from corrupted state.
TEST(Trainer, ACheckpointsManifestListsItsFilesAndAResumeRefusesATamperedOne) {
  Workspace ws("manifest");
  const JobSpec spec = ws.spec("lomo", "out");
  std::atomic<bool> stop{false};
  TrainerHooks hooks;
  hooks.on_step = [&](const TrainingMetrics& m) {
    if (m.step == 5) stop = true;
  };
  TrainerOptions options;
  options.stop_requested = &stop;
  const fs::path checkpoint = train(spec, options, hooks).last_checkpoint;
  ASSERT_EQ(checkpoint.filename(), "step-00000005");

  const std::optional<std::vector<ManifestEntry>> manifest = read_checkpoint_manifest(checkpoint);
  ASSERT_TRUE(manifest.has_value()) << "no " << kCheckpointManifestFile << " in " << checkpoint;
  std::vector<std::string> listed;
  for (const ManifestEntry& entry : *manifest) {
    listed.push_back(entry.path);
    EXPECT_EQ(entry.sha256, sha256_file_hex(checkpoint / entry.path)) << entry.path;
    EXPECT_EQ(entry.size_bytes, static_cast<int64_t>(fs::file_size(checkpoint / entry.path)));
  }
  std::vector<std::string> on_disk;
  for (const auto& file : fs::recursive_directory_iterator(checkpoint)) {
    const std::string path = fs::relative(file.path(), checkpoint).generic_string();
    if (file.is_regular_file() && path != kCheckpointManifestFile) on_disk.push_back(path);
  }
  std::sort(on_disk.begin(), on_disk.end());
  EXPECT_EQ(listed, on_disk);
  EXPECT_NE(std::find(listed.begin(), listed.end(), "optimizer.safetensors"), listed.end());

  // One byte of the optimizer state flips (bit rot, a bad copy): same size, another digest.
  std::string bytes = file_bytes(checkpoint / "optimizer.safetensors");
  bytes[bytes.size() / 2] ^= 0x01;
  std::ofstream(checkpoint / "optimizer.safetensors", std::ios::binary | std::ios::trunc) << bytes;
  try {
    train(spec, {}, {});
    FAIL() << "resumed from a checkpoint whose optimizer state does not match its manifest";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("optimizer.safetensors"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("does not match its manifest"), std::string::npos)
        << e.what();
  }
  // Nothing was trained past it.
  EXPECT_FALSE(fs::exists(fs::path(spec.output.dir) / "checkpoints" / "step-00000012"));
}

// A checkpoint is a complete Hugging Face model directory: the model's tokenizer files and
// generation_config.json byte for byte, config.json with the keys lomo does not own, and lomo's
// own state under a name of its own (Hugging Face's Trainer writes trainer_state.json).
TEST(Trainer, ACheckpointCarriesTheTokenizerGenerationConfigAndEveryConfigKey) {
  Workspace ws("complete_hf_output");
  const fs::path model = ws.root / "model";
  const fs::path tokenizers = fs::path(LOMO_TEST_DATA_DIR) / "tokenizers" / "qwen2_style";
  fs::copy_file(tokenizers / "tokenizer.json", model / "tokenizer.json");
  fs::copy_file(tokenizers / "tokenizer_config.json", model / "tokenizer_config.json");
  std::ofstream(model / "generation_config.json") << R"({"do_sample": true, "temperature": 0.7})";
  nlohmann::json config = nlohmann::json::parse(file_bytes(model / "config.json"));
  config["pad_token_id"] = 3;
  config["a_key_of_a_newer_transformers"] = {{"kept", true}};
  std::ofstream(model / "config.json", std::ios::trunc) << config.dump(2);

  JobSpec spec = ws.spec("lomo", "out");
  spec.training.steps = 2;
  const fs::path checkpoint = train(spec, {}, {}).last_checkpoint;
  for (const char* file : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
    EXPECT_EQ(file_bytes(checkpoint / file), file_bytes(model / file)) << file;
  }
  EXPECT_EQ(nlohmann::json::parse(file_bytes(checkpoint / "config.json")), config);
  EXPECT_TRUE(fs::exists(checkpoint / "lomo_trainer_state.json"));
  EXPECT_FALSE(fs::exists(checkpoint / "trainer_state.json"));

  // Without a generation_config.json of its own, the model gets transformers' derived one.
  fs::remove(model / "generation_config.json");
  spec.output.dir = (ws.root / "derived").string();
  const fs::path derived = train(spec, {}, {}).last_checkpoint;
  const nlohmann::json generation =
      nlohmann::json::parse(file_bytes(derived / "generation_config.json"));
  EXPECT_EQ(generation["pad_token_id"], 3);
  EXPECT_EQ(generation["eos_token_id"], config["eos_token_id"]);
  EXPECT_EQ(generation["_from_model_config"], true);
}

// A checkpoint written before the state file was renamed (trainer_state.json) still resumes, to
// the same weights as an uninterrupted run.
TEST(Trainer, ACheckpointWithTheOldStateFileNameResumes) {
  Workspace ws("legacy_state_name");
  const TrainResult full = train(ws.spec("adalomo", "straight"), {}, {});
  const JobSpec spec = ws.spec("adalomo", "old");
  std::atomic<bool> stop{false};
  TrainerHooks hooks;
  hooks.on_step = [&](const TrainingMetrics& m) {
    if (m.step == 5) stop = true;
  };
  TrainerOptions options;
  options.stop_requested = &stop;
  const fs::path old = train(spec, options, hooks).last_checkpoint;
  fs::rename(old / "lomo_trainer_state.json", old / "trainer_state.json");
  write_checkpoint_manifest(old);  // as the older trainer wrote it

  const TrainResult resumed = train(spec, {}, {});
  EXPECT_EQ(resumed.steps_done, 12);
  EXPECT_EQ(file_bytes(resumed.last_checkpoint / "model.safetensors"),
            file_bytes(full.last_checkpoint / "model.safetensors"));
}

TEST(Trainer, LossFallsAndEvalIsReported) {
  Workspace ws("loss_falls");
  JobSpec spec = ws.spec("adalomo", "out");
  spec.training.steps = 30;
  double first_loss = 0, last_loss = 0;
  int evals = 0;
  TrainerHooks hooks;
  hooks.on_step = [&](const TrainingMetrics& m) {
    if (m.step == 1) first_loss = m.loss;
    last_loss = m.loss;
  };
  hooks.on_eval = [&](const EvalMetrics& m) {
    ++evals;
    EXPECT_GT(m.tokens, 0);
    EXPECT_NEAR(m.perplexity, std::exp(m.loss), 1e-9 * m.perplexity);
  };
  const TrainResult r = train(spec, {}, hooks);
  EXPECT_LT(last_loss, first_loss - 1.0) << "30 AdaLomo steps on a tiny corpus should learn";
  EXPECT_EQ(evals, 30 / 4 + 1);
  // The latest pointer names the final checkpoint, which reloads as a Hugging Face model.
  EXPECT_EQ(latest_checkpoint(spec.output.dir), r.last_checkpoint);
  MemoryAccountant accountant;
  EXPECT_NO_THROW(load_llama_checkpoint(r.last_checkpoint, DType::kF32, accountant));
  for (const auto& entry : fs::directory_iterator(fs::path(spec.output.dir) / "checkpoints")) {
    EXPECT_NE(entry.path().filename().string().rfind(".tmp", 0), 0u) << "temporary left behind";
  }
}

// training.eval_prompts: at every evaluation rank 0 logs each prompt's greedy continuation by the
// weights of that moment, quoted and escaped; the last one equals generate() on the final
// checkpoint (the same weights).
TEST(Trainer, EvalPromptsAreContinuedAndLoggedAtEveryEvaluation) {
  Workspace ws("eval_samples");
  JobSpec spec = ws.spec("adalomo", "out");  // 12 steps, evaluation every 4
  spec.training.eval_prompts = {"The quick", "line\nbreak"};
  spec.training.eval_max_new_tokens = 6;
  std::vector<std::string> samples;
  TrainerHooks hooks;
  hooks.on_log = [&](const std::string& line) {
    if (line.starts_with("eval sample")) samples.push_back(line);
  };
  const TrainResult r = train(spec, {}, hooks);
  ASSERT_EQ(samples.size(), 3u * 2u) << "steps 4, 8 and 12 (the end), two prompts each";
  EXPECT_TRUE(samples[0].starts_with("eval sample at step 4 (1/2): \"The quick\" -> \""))
      << samples[0];
  EXPECT_TRUE(samples[5].starts_with("eval sample at step 12 (2/2): \"line\\x0abreak\" -> \""))
      << samples[5];
  for (const std::string& line : samples) {
    EXPECT_TRUE(std::none_of(line.begin(), line.end(),
                             [](char c) { return static_cast<unsigned char>(c) < 0x20; }))
        << "a control character reached the log: " << line;
  }
  MemoryAccountant accountant;
  LlamaWeights weights = load_llama_checkpoint(r.last_checkpoint, DType::kF32, accountant);
  ByteTokenizer tokenizer;
  const std::vector<int32_t> prompt = tokenizer.encode("The quick");
  GenerationOptions options;
  options.max_new_tokens = 6;
  KvCacheModel model(weights, accountant, static_cast<int64_t>(prompt.size()) + 5);
  const GenerationResult generated = generate(model, prompt, options, &tokenizer);
  ASSERT_EQ(generated.tokens.size(), 6u);
  EXPECT_EQ(samples[4], "eval sample at step 12 (1/2): \"The quick\" -> \"" +
                            printable_excerpt(generated.text, 4096) + "\"");
}

// A prompt longer than the model's positions is reported, not generated, and training goes on.
TEST(Trainer, AnEvalPromptBeyondTheModelsPositionsIsReportedNotGenerated) {
  Workspace ws("eval_sample_too_long");
  JobSpec spec = ws.spec("adalomo", "out");
  spec.training.steps = 1;
  spec.training.eval_prompts = {std::string(65, 'x')};  // max_position_embeddings 64
  std::vector<std::string> samples;
  TrainerHooks hooks;
  hooks.on_log = [&](const std::string& line) {
    if (line.starts_with("eval sample")) samples.push_back(line);
  };
  EXPECT_EQ(train(spec, {}, hooks).steps_done, 1);
  ASSERT_EQ(samples.size(), 1u);
  EXPECT_TRUE(samples[0].ends_with(
      ": not generated, the prompt's 65 tokens exceed max_position_embeddings 64"))
      << samples[0];
}

TEST(Trainer, MatmulPrecisionFollowsPrecisionMatmul) {
  using P = Backend::MatmulPrecision;
  JobSpec spec;
  const Device cpu = Device::cpu();
  EXPECT_EQ(matmul_precision_for(spec, DType::kF32, cpu, false), P::kFp32);  // auto
  EXPECT_EQ(matmul_precision_for(spec, DType::kBF16, cpu, false), P::kTf32);
  // On a GPU, auto multiplies bf16 weights as stored; fp16 ones in TF32.
  const Device gpu = Device::cuda(0);
  EXPECT_EQ(matmul_precision_for(spec, DType::kF32, gpu, false), P::kFp32);
  EXPECT_EQ(matmul_precision_for(spec, DType::kBF16, gpu, false), P::kBf16);
  EXPECT_EQ(matmul_precision_for(spec, DType::kF16, gpu, false), P::kTf32);
  spec.precision.matmul = "fp32";
  EXPECT_EQ(matmul_precision_for(spec, DType::kBF16, cpu, true), P::kFp32);
  EXPECT_EQ(matmul_precision_for(spec, DType::kBF16, gpu, false), P::kFp32);
  spec.precision.matmul = "bf16";
  EXPECT_EQ(matmul_precision_for(spec, DType::kF32, cpu, true), P::kBf16);
  EXPECT_EQ(matmul_precision_for(spec, DType::kF32, gpu, false), P::kBf16);
  try {
    matmul_precision_for(spec, DType::kF32, cpu, false);
    FAIL() << "bf16 accepted on a CPU without bf16 instructions";
  } catch (const JobSpecError& e) {
    EXPECT_EQ(e.field(), "precision.matmul");
    EXPECT_NE(std::string(e.what()).find("AVX512-BF16 or AMX-BF16"), std::string::npos) << e.what();
  }
}

// On a CPU with bf16 instructions a bf16-matmul run learns like the fp32 run (bf16 inputs, fp32
// accumulation); on one without, the run fails at its start naming the field.
TEST(Trainer, ABf16MatmulRunTrainsLikeFp32OrFailsNamingTheField) {
  Workspace ws("bf16_matmul");
  JobSpec spec = ws.spec("lomo", "fp32");
  std::vector<double> fp32_losses, bf16_losses;
  TrainerHooks hooks;
  hooks.on_step = [&](const TrainingMetrics& m) { fp32_losses.push_back(m.loss); };
  train(spec, {}, hooks);
  spec = ws.spec("lomo", "bf16");
  spec.precision.matmul = "bf16";
  hooks.on_step = [&](const TrainingMetrics& m) { bf16_losses.push_back(m.loss); };
  if (!cpu::bf16_matmul_supported()) {
    try {
      train(spec, {}, hooks);
      FAIL() << "bf16 matmuls ran on a CPU without bf16 instructions";
    } catch (const JobSpecError& e) {
      EXPECT_EQ(e.field(), "precision.matmul") << e.what();
    }
    return;
  }
  train(spec, {}, hooks);
  ASSERT_EQ(bf16_losses.size(), fp32_losses.size());
  for (size_t i = 0; i < fp32_losses.size(); ++i) {
    EXPECT_NEAR(bf16_losses[i], fp32_losses[i], 0.02 * fp32_losses[i]) << "step " << i + 1;
  }
  EXPECT_NE(bf16_losses, fp32_losses) << "the bf16 run computed exactly like fp32";
}

TEST(Trainer, EpochsDetermineTheStepCount) {
  Workspace ws("epochs");
  JobSpec spec = ws.spec("lomo", "out");
  spec.training.steps.reset();
  spec.training.epochs = 2;
  const TrainResult r = train(spec, {}, {});
  // 781 bytes → (781 − 1) / 16 = 48 rows; 16 batches of 3 per epoch.
  const int64_t rows = (static_cast<int64_t>(fs::file_size(ws.root / "train.txt")) - 1) / 16;
  EXPECT_EQ(r.total_steps, 2 * ((rows + 2) / 3));
}

TEST(Trainer, BadInputsFailWithTheirName) {
  Workspace ws("bad_inputs");
  JobSpec spec = ws.spec("lomo", "out");
  spec.data.train = {(ws.root / "missing.txt").string()};
  try {
    train(spec, {}, {});
    FAIL() << "a missing data file was accepted";
  } catch (const JobSpecError& e) {
    EXPECT_NE(std::string(e.what()).find("data.train[0]"), std::string::npos) << e.what();
  }
  spec = ws.spec("lomo", "out2");
  spec.data.max_length = 65;
  EXPECT_THROW(train(spec, {}, {}), JobSpecError);
  // A checkpoint written for another total step count is refused rather than silently reused.
  spec = ws.spec("lomo", "out3");
  train(spec, {}, {});
  spec.training.steps = 20;
  EXPECT_THROW(train(spec, {}, {}), std::runtime_error);
}

// Data-parallel ranks must start from one model: a rank whose weights differ is named before any
// step, on every rank (each sees the same gathered hashes).
TEST(Trainer, RanksStartingFromDifferentWeightsFailNamingTheRank) {
  Workspace ws("different_weights");
  {
    MemoryAccountant accountant;
    LlamaWeights other(load_llama_checkpoint(ws.root / "model", DType::kF32, accountant));
    other.init_random(3, 0.05f);
    save_llama_checkpoint(other, ws.root / "other_model");
  }
  std::vector<std::unique_ptr<Communicator>> world =
      make_in_process_world(2, std::chrono::seconds(20));
  std::string errors[2];
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      JobSpec spec = ws.spec("adalomo", "out");
      spec.training.batch_size = 4;
      spec.resources.world_size = 2;
      if (r == 1) spec.model.path = (ws.root / "other_model").string();
      TrainerOptions options;
      options.communicator = world[static_cast<size_t>(r)].get();
      try {
        train(spec, options, {});
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (std::thread& t : ranks) t.join();
  for (const std::string& error : errors) {
    EXPECT_NE(error.find("ranks hold different weights at the start: rank(s) 1 ("),
              std::string::npos)
        << error;
  }
  EXPECT_FALSE(fs::exists(fs::path(ws.root / "out" / "checkpoints"))) << "a step was taken";
}

// Every rank reports its own step: wall time, the part of it in collectives, and the payload it
// all-reduced — for LOMO every gradient in f32 plus the token count and loss sum (16 bytes), and
// nothing with one rank. Rank 0 also writes them to metrics.jsonl.
TEST(Trainer, EveryRankReportsItsStepTimeAndWhatItCommunicated) {
  Workspace ws("communication_figures");
  int64_t parameters = 0;
  {
    MemoryAccountant accountant;
    const LlamaWeights weights = load_llama_checkpoint(ws.root / "model", DType::kF32, accountant);
    for (const Parameter& p : weights.parameters()) parameters += p.numel();
  }
  std::vector<std::unique_ptr<Communicator>> world =
      make_in_process_world(2, std::chrono::seconds(20));
  std::vector<std::vector<TrainingMetrics>> steps(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      JobSpec spec = ws.spec("lomo", "gang");
      spec.training.batch_size = 4;
      spec.training.steps = 3;
      spec.resources.world_size = 2;
      TrainerOptions options;
      options.communicator = world[static_cast<size_t>(r)].get();
      TrainerHooks hooks;
      hooks.on_step = [&, r](const TrainingMetrics& m) { steps[r].push_back(m); };
      train(spec, options, hooks);
    });
  }
  for (std::thread& t : ranks) t.join();
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(steps[r].size(), 3u) << "rank " << r;
    for (const TrainingMetrics& m : steps[r]) {
      EXPECT_GT(m.step_seconds, 0) << "rank " << r << " step " << m.step;
      EXPECT_GE(m.communication_seconds, 0) << "rank " << r << " step " << m.step;
      EXPECT_LE(m.communication_seconds, m.step_seconds) << "rank " << r << " step " << m.step;
      EXPECT_EQ(m.communication_bytes, 4 * parameters + 16) << "rank " << r << " step " << m.step;
    }
  }
  std::ifstream lines(ws.root / "gang" / "metrics.jsonl");
  std::string first;
  std::getline(lines, first);
  EXPECT_NE(first.find("\"communication_bytes\":" + std::to_string(4 * parameters + 16)),
            std::string::npos)
      << first;
  EXPECT_NE(first.find("\"step_seconds\":"), std::string::npos) << first;

  JobSpec alone = ws.spec("lomo", "alone");
  alone.training.steps = 2;
  TrainerHooks hooks;
  hooks.on_step = [](const TrainingMetrics& m) {
    EXPECT_EQ(m.communication_bytes, 0) << "one rank communicates nothing";
    EXPECT_GT(m.step_seconds, 0);
  };
  train(alone, {}, hooks);
}

TEST(Trainer, ASpecForTwoRanksIsRefusedByOneRank) {
  Workspace ws("world_mismatch");
  JobSpec spec = ws.spec("lomo", "out");
  spec.training.batch_size = 4;
  spec.resources.world_size = 2;
  try {
    train(spec, {}, {});  // no communicator: one rank alone
    FAIL() << "a world_size 2 spec trained on one rank";
  } catch (const JobSpecError& e) {
    EXPECT_EQ(e.field(), "resources.world_size");
    EXPECT_NE(std::string(e.what()).find("this run has 1 data-parallel rank"), std::string::npos)
        << e.what();
  }
}

TEST(TokenDataset, CursorRestoresTheExactSequenceOfBatches) {
  std::vector<int32_t> tokens(101);
  for (int i = 0; i < 101; ++i) tokens[static_cast<size_t>(i)] = i;
  TokenDataset a(tokens, 10, 7, true), b(tokens, 10, 7, true);
  EXPECT_EQ(a.row_count(), 10);
  for (int i = 0; i < 7; ++i) a.next_batch(3);  // crosses two epoch boundaries
  b.restore(a.cursor());
  for (int i = 0; i < 5; ++i) EXPECT_EQ(a.next_batch(3).input_ids, b.next_batch(3).input_ids);
  // Targets are the inputs shifted by one token.
  const TokenBatch batch = a.rows_in_order(2, 1);
  EXPECT_EQ(batch.input_ids.front(), 20);
  EXPECT_EQ(batch.targets.front(), 21);
  EXPECT_EQ(batch.targets.back(), 30);
  EXPECT_THROW(b.restore(DatasetCursor{0, 11}), std::invalid_argument);
  EXPECT_THROW(TokenDataset(std::vector<int32_t>(10), 10, 0, false), std::invalid_argument);
}

}  // namespace
}  // namespace lomo
