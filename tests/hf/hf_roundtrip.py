#!/usr/bin/env python3
"""The Hugging Face round trip of each model family through a lomo fine-tune.

Run by tests/hf/hf_roundtrip_test.sh inside a virtual environment holding
scripts/python-requirements.txt. For each family:

  1. transformers builds a small model (vocabulary of the qwen2_style test tokenizer, random
     weights, random biases where the family has them) and save_pretrained()s it with the
     tokenizer files beside it, config.json carrying pad_token_id and a key lomo does not know;
  2. `lomo-worker train` fine-tunes it with AdaLomo for a few steps on text tokenised with that
     tokenizer.json and writes a checkpoint;
  3. transformers loads the checkpoint with AutoModelForCausalLM (no missing, unexpected or
     mismatched keys; the family's class) and AutoTokenizer (the same ids as the original);
  4. every tensor moved (the biases included: their gradients reached AdaLomo);
  5. transformers' logits on a row longer than Mistral's window equal lomo's on the same
     checkpoint (tests/hf/checkpoint_logits.cc), within 1e-4 of the largest logit;
  6. config.json kept every key of the original but the dtype; generation_config.json equals the
     model's.
Exits non-zero with the reason on the first failure.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)
PROBE = "Sphinx of black quartz, judge my vow; the five boxing wizards jump quickly."
SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=600,
    bos_token_id=600,
    eos_token_id=602,
)
FAMILIES = {
    "llama_bias": (LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),
    "mistral_window": (MistralConfig, dict(sliding_window=4)),
}
LOGIT_TOLERANCE = 1e-4  # of the largest |logit|: two fp32 computations, different orders


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def build_model(name: str, vocab: int, model_dir: Path, tokenizer_dir: Path):
    config_class, extra = FAMILIES[name]
    config = config_class(vocab_size=vocab, **SIZES, **extra)
    config.lomo_roundtrip_marker = {"kept": True}  # a key no transformers version knows
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith(".bias"):
                param.normal_(0.0, 0.2)  # transformers starts biases at 0; make them visible
    model.save_pretrained(str(model_dir))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / file, model_dir / file)
    return model


def fine_tune(worker: str, model_dir: Path, workdir: Path) -> Path:
    (workdir / "train.txt").write_text(TEXT * 8)
    out = workdir / "out"
    job = {
        "name": "hf-roundtrip",
        "model": {"path": str(model_dir)},
        "tokenizer": {"kind": "auto"},
        "data": {"format": "text", "train": [str(workdir / "train.txt")], "max_length": 32},
        "optimizer": {"name": "adalomo", "lr": 0.05, "schedule": "constant", "weight_decay": 0.0},
        "precision": {"dtype": "fp32"},
        "training": {"batch_size": 2, "steps": 4, "log_every": 1, "seed": 1},
        "output": {"dir": str(out)},
        "resources": {"device": "cpu"},
    }
    (workdir / "job.yaml").write_text(json.dumps(job, indent=2))  # JSON is YAML
    run = subprocess.run([worker, "train", str(workdir / "job.yaml")], capture_output=True,
                         text=True)
    if run.returncode != 0:
        fail(f"lomo-worker train exited {run.returncode}:\n{run.stdout}\n{run.stderr}")
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return out / "checkpoints" / latest


def load_checkpoint(name: str, checkpoint: Path, family_class):
    model, info = AutoModelForCausalLM.from_pretrained(
        str(checkpoint), dtype=torch.float32, attn_implementation="eager",
        local_files_only=True, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        fail(f"{name}: transformers reported loading problems: {problems}")
    if type(model.config) is not family_class:
        fail(f"{name}: loaded as {type(model.config).__name__}, not {family_class.__name__}")
    model.eval()
    return model


def check_every_tensor_moved(name: str, model_dir: Path, checkpoint: Path) -> int:
    before, after = load_file(model_dir / "model.safetensors"), load_file(
        checkpoint / "model.safetensors")
    if sorted(before) != sorted(after):
        fail(f"{name}: the checkpoint's tensors {sorted(set(before) ^ set(after))} differ in name")
    biases = 0
    for key, tensor in before.items():
        if key.endswith("norm.weight"):
            continue  # AdaLomo's relative step may leave a few norm entries unchanged
        if torch.equal(tensor, after[key]):
            fail(f"{name}: {key} did not change in the fine-tune")
        biases += key.endswith(".bias")
    return biases


def check_config_files(name: str, model_dir: Path, checkpoint: Path) -> None:
    original = json.loads((model_dir / "config.json").read_text())
    saved = json.loads((checkpoint / "config.json").read_text())
    for key, value in original.items():
        if key not in ("dtype", "torch_dtype") and saved.get(key) != value:
            fail(f"{name}: config.json key {key!r} was {value!r}, lomo wrote {saved.get(key)!r}")
    for file in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (checkpoint / file).read_bytes() != (model_dir / file).read_bytes():
            fail(f"{name}: {file} in the checkpoint differs from the model's")
    if (checkpoint / "trainer_state.json").exists():
        fail(f"{name}: the checkpoint holds a trainer_state.json (Hugging Face's Trainer's name)")


def compare_logits(name: str, model, logits_tool: str, checkpoint: Path, ids: list) -> float:
    run = subprocess.run([logits_tool, str(checkpoint), ",".join(map(str, ids))],
                         capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{name}: checkpoint_logits exited {run.returncode}: {run.stderr}")
    lomo = json.loads(run.stdout)
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0]
    ours = torch.tensor(lomo["logits"], dtype=torch.float32).reshape(hf.shape)
    diff = (ours - hf).abs().max().item()
    scale = hf.abs().max().item()
    if not diff <= LOGIT_TOLERANCE * scale:
        fail(f"{name}: lomo's logits differ from transformers' by {diff} (largest logit {scale})")
    return diff / scale


def round_trip(name: str, args, root: Path, tokenizer_dir: Path, vocab: int) -> None:
    workdir = root / name
    model_dir = workdir / "model"
    workdir.mkdir(parents=True)
    build_model(name, vocab, model_dir, tokenizer_dir)
    checkpoint = fine_tune(args.worker, model_dir, workdir)
    check_config_files(name, model_dir, checkpoint)
    biases = check_every_tensor_moved(name, model_dir, checkpoint)
    model = load_checkpoint(name, checkpoint, FAMILIES[name][0])

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    original = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = tokenizer(PROBE)["input_ids"]
    if ids != original(PROBE)["input_ids"]:
        fail(f"{name}: the checkpoint's tokenizer encodes differently from the model's")
    window = getattr(model.config, "sliding_window", None)
    if window and len(ids) <= window:
        fail(f"{name}: the probe ({len(ids)} tokens) does not exceed the window {window}")
    relative = compare_logits(name, model, args.logits, checkpoint, ids)
    print(f"{name}: {type(model).__name__}, {biases} bias tensors trained, {len(ids)} tokens, "
          f"logits within {relative:.2e} of the largest; tokenizer and config kept")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", required=True)
    parser.add_argument("--logits", required=True)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    tokenizer_dir = args.source / "tests" / "data" / "tokenizers" / "qwen2_style"
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
    for name in FAMILIES:
        round_trip(name, args, args.workdir, tokenizer_dir, vocab)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
