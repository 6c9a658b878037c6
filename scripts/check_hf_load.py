#!/usr/bin/env python3
"""Checks that the real `transformers` loads a checkpoint directory (e.g. one lomo wrote).

    .venv/bin/pip install -r scripts/python-requirements.txt     # once
    .venv/bin/python scripts/check_hf_load.py out/finetune/checkpoint-final
    .venv/bin/python scripts/check_hf_load.py tests/data/hf/untied_mha \
        --expected tests/data/hf/untied_mha/expected.json

Loads MODEL_DIR (a local directory only; the hub is never contacted) with
AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=float32, output_loading_info=True) (Llama,
Mistral, Qwen2: the class config.json names) and prints
the parameter count, the stored and loaded dtypes, and the logits and loss for a fixed input.

Exits non-zero when:
  - transformers reports missing, unexpected or mismatched keys, or loading errors;
  - the safetensors files hold a tensor the model does not have, or the model has a parameter
    that is neither in the files nor tied to one that is (a check that does not depend on
    transformers' own lists of keys it silently ignores);
  - a loaded parameter differs from the stored tensor (upcast to float32), i.e. was re-initialised;
  - the logits or loss are not finite;
  - with --expected JSON (the format of tests/data/hf/*/expected.json): the logits or loss differ
    from the expected values beyond --atol/--rtol; its input_ids and labels are used as the input.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def safetensors_files(model_dir: Path) -> list:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    fail(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def stored_tensors(files: list) -> dict:
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    fail(f"tensor {key} stored twice ({path})")
                tensors[key] = f.get_tensor(key)
    return tensors


def fixed_input(vocab: int, max_positions: int):
    seq = min(8, max_positions)
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, vocab, (2, seq), generator=gen)
    return input_ids, input_ids.clone()


def main() -> int:
    parser = argparse.ArgumentParser(description="Load a checkpoint with transformers; fail loudly.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--expected", type=Path, help="expected.json to compare logits/loss with")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args()

    if not args.model_dir.is_dir():
        fail(f"{args.model_dir} is not a local directory")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"model dir: {args.model_dir.resolve()}")

    model, info = AutoModelForCausalLM.from_pretrained(
        str(args.model_dir),
        dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,
        output_loading_info=True,
    )
    model.eval()
    print("loading info: " + json.dumps({k: sorted(map(str, v)) for k, v in info.items()}))
    problems = {k: v for k, v in info.items() if v}
    if problems:
        fail(f"transformers reported loading problems: {problems}")

    # Independent key check against the files themselves.
    files = safetensors_files(args.model_dir)
    stored = stored_tensors(files)
    state = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
    unexpected = sorted(set(stored) - set(state))
    if unexpected:
        fail(f"stored tensors the model does not have: {unexpected}")
    stored_ptrs = {params[k].data_ptr() for k in stored if k in params}
    missing = sorted(k for k, p in params.items() if k not in stored and p.data_ptr() not in stored_ptrs)
    if missing:
        fail(f"model parameters neither stored nor tied to a stored one: {missing}")
    tied = sorted(k for k in params if k not in stored)
    for key, tensor in stored.items():
        loaded = state[key]
        if tuple(loaded.shape) != tuple(tensor.shape):
            fail(f"{key}: stored shape {tuple(tensor.shape)} != model shape {tuple(loaded.shape)}")
        if not torch.equal(loaded, tensor.to(torch.float32)):
            fail(f"{key}: loaded values differ from the stored tensor (re-initialised?)")

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    stored_dtypes = sorted({str(t.dtype).replace("torch.", "") for t in stored.values()})
    loaded_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    print(f"files: {[f.name for f in files]}, {len(stored)} tensors, stored dtype {stored_dtypes}")
    print(f"config: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, intermediate "
          f"{cfg.intermediate_size}, layers {cfg.num_hidden_layers}, heads "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, tied "
          f"{cfg.tie_word_embeddings}, rope {getattr(cfg, 'rope_parameters', None)}")
    print(f"parameters: {n_params} (unique), loaded dtype {loaded_dtypes}, tied (not stored): {tied}")

    expected = None
    if args.expected:
        with open(args.expected) as f:
            expected = json.load(f)
        input_ids = torch.tensor(expected["input_ids"])
        labels = torch.tensor(expected["labels"])
    else:
        input_ids, labels = fixed_input(cfg.vocab_size, cfg.max_position_embeddings)
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    logits, loss = out.logits, out.loss
    print(f"input_ids: {input_ids.tolist()}")
    print(f"logits: shape {list(logits.shape)}, mean {logits.mean().item():.6f}, "
          f"abs max {logits.abs().max().item():.6f}")
    print(f"logits[0, 0, :5]: {logits[0, 0, :5].tolist()}")
    print(f"logits[-1, -1, :5]: {logits[-1, -1, :5].tolist()}")
    print(f"loss: {loss.item()!r}")
    if not (torch.isfinite(logits).all() and torch.isfinite(loss)):
        fail("non-finite logits or loss")

    if expected is not None:
        want = torch.tensor(expected["logits"], dtype=torch.float32).reshape(logits.shape)
        diff = (logits - want).abs().max().item()
        loss_diff = abs(loss.item() - expected["loss"])
        print(f"vs expected: logits max abs diff {diff:.3g}, loss diff {loss_diff:.3g}")
        if not torch.allclose(logits, want, atol=args.atol, rtol=args.rtol):
            fail(f"logits differ from {args.expected} (max abs diff {diff})")
        if loss_diff > args.atol + args.rtol * abs(expected["loss"]):
            fail(f"loss {loss.item()} differs from expected {expected['loss']}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
