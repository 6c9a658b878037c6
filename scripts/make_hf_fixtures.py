#!/usr/bin/env python3
"""Generates Hugging Face parity fixtures under tests/data/hf/ with the real `transformers`.

Run once by a developer when the fixtures need regenerating (CI never runs this; it only reads
the files it leaves):

    python3 -m venv .venv
    .venv/bin/pip install -r scripts/python-requirements.txt
    .venv/bin/python scripts/make_hf_fixtures.py            # writes tests/data/hf/<variant>/

(The torch wheel on PyPI pulls the nvidia-* CUDA wheels, about 4 GiB; everything here runs on
CPU.) Nothing is downloaded from the Hugging Face hub: the models are built from LlamaConfig,
MistralConfig and Qwen2Config.

For each variant it writes tests/data/hf/<variant>/:
  config.json, generation_config.json, model.safetensors  -- from model.save_pretrained()
  expected.json -- the float32 forward/backward of transformers on a fixed batch:
    input_ids        [2][7] ints in [0, vocab)
    labels           [2][7], HF convention (unshifted; two positions set to -100)
    shifted_targets  [2][7], lomo's convention: labels[b][t+1] for t < 6, -100 at t = 6
                     (equals the shift transformers does inside its loss)
    logits           flat [2*7*vocab] float32 values (row-major [batch][seq][vocab]), each written
                     as the exact decimal of the float32 value
    loss             model(input_ids, labels=labels).loss: mean cross entropy over the targets
                     that are not -100
    grad_norm_sq     sum over all parameters of grad^2 of that loss (accumulated in float64);
                     a tied embedding counts once, its grad holding both uses
    grad_samples     {parameter name: first 5 values of its flattened .grad}; names as in
                     model.named_parameters() (a tied lm_head is not listed separately)
    transformers_version, torch_version, and a few descriptive fields

Variants:
  untied_mha      fp32, 4 heads / 4 kv heads, untied lm_head, rope_theta 500
  tied_gqa_llama3 fp32, 4 heads / 2 kv heads, tied embeddings, llama3 RoPE scaling
  bf16_untied     like untied_mha but stored in bfloat16; the expected values come from loading
                  that checkpoint back upcast to float32, so an fp32 engine reading bf16 storage
                  should match to fp32 tolerance
  llama_bias      fp32 Llama with attention_bias and mlp_bias (biases on all seven projections),
                  4 heads / 2 kv heads, untied, pad_token_id set
  qwen2_tied      fp32 Qwen2ForCausalLM: q/k/v biases, 4 heads / 2 kv heads, tied embeddings,
                  rope_theta 1e4 in rope_parameters, pad_token_id set
  mistral_window  fp32 MistralForCausalLM with sliding_window 3 (shorter than the 7-token batch,
                  so the window masks keys), 4 heads / 1 kv head, untied

Weights: every matrix ~ N(0, 0.5^2), every bias ~ N(0, 0.5^2), every RMSNorm weight
= 1 + 0.1 * N(0, 1), so a mix-up of norm weights, a missed bias or a missed transpose shows. The expected values are always computed from the saved
checkpoint loaded back with AutoModelForCausalLM.from_pretrained (local directory), which also
checks that the files round-trip through transformers.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "hf"

BATCH, SEQ = 2, 7
IGNORE = -100
# Positions (batch, seq) whose label is -100. Both fall in the shifted region (t >= 1), so each
# removes one target from the loss.
IGNORED_LABELS = [(0, 3), (1, 5)]
GRAD_SAMPLES = 5

BASE = dict(
    vocab_size=37,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=500.0,
    tie_word_embeddings=False,
)

VARIANTS = {
    "untied_mha": dict(seed=1001, config=dict(BASE), dtype=torch.float32),
    "tied_gqa_llama3": dict(
        seed=1002,
        config=dict(
            BASE,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        dtype=torch.float32,
    ),
    "bf16_untied": dict(seed=1003, config=dict(BASE), dtype=torch.bfloat16),
    "llama_bias": dict(
        seed=1004,
        config=dict(
            BASE, num_key_value_heads=2, attention_bias=True, mlp_bias=True, pad_token_id=0
        ),
        dtype=torch.float32,
    ),
    "qwen2_tied": dict(
        seed=1005,
        family=Qwen2Config,
        config=dict(
            {k: v for k, v in BASE.items() if k != "rope_theta"},
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        dtype=torch.float32,
    ),
    "mistral_window": dict(
        seed=1006,
        family=MistralConfig,
        config=dict(BASE, num_key_value_heads=1, sliding_window=3),
        dtype=torch.float32,
    ),
}


def init_weights(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param.dim() >= 2 or name.endswith(".bias"):
                torch.nn.init.normal_(param, mean=0.0, std=0.5)
            else:
                raise RuntimeError(f"unexpected 1-D parameter {name}")


def load_fp32(directory: Path):
    model, info = AutoModelForCausalLM.from_pretrained(
        str(directory),
        dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"{directory}: transformers reported loading problems: {problems}")
    model.eval()
    return model


def make_batch(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    for b, t in IGNORED_LABELS:
        labels[b, t] = IGNORE
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    return input_ids, labels, shifted


def build_variant(name: str, spec: dict, out_root: Path) -> dict:
    torch.manual_seed(spec["seed"])
    config = spec.get("family", LlamaConfig)(**spec["config"], attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    init_weights(model)
    model.eval()

    directory = out_root / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    fp32_logits = None
    if spec["dtype"] == torch.float32:
        input_ids, _, _ = make_batch(config.vocab_size, spec["seed"])
        with torch.no_grad():
            fp32_logits = model(input_ids).logits
    model.to(spec["dtype"]).save_pretrained(str(directory), safe_serialization=True)

    # Expected values come from the checkpoint as transformers loads it back, in float32.
    ref = load_fp32(directory)
    assert type(ref.config) is type(config), (type(ref.config), type(config))
    assert ref.config.tie_word_embeddings == spec["config"]["tie_word_embeddings"]
    if ref.config.tie_word_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    input_ids, labels, shifted = make_batch(ref.config.vocab_size, spec["seed"])
    out = ref(input_ids=input_ids, labels=labels)
    logits, loss = out.logits, out.loss
    assert logits.dtype == torch.float32 and logits.shape == (BATCH, SEQ, config.vocab_size)
    if fp32_logits is not None:
        # An fp32 checkpoint must round-trip exactly.
        assert torch.equal(fp32_logits, logits.detach()), f"{name}: reload changed the logits"

    # lomo's shifted_targets must give HF's loss on HF's logits.
    manual = torch.nn.functional.cross_entropy(
        logits.detach().reshape(-1, config.vocab_size).double(),
        shifted.reshape(-1),
        ignore_index=IGNORE,
    )
    assert abs(manual.item() - loss.item()) < 1e-5, (manual.item(), loss.item())
    if getattr(ref.config, "sliding_window", None):
        # The window must shape the result, or the fixture would not test it.
        assert config.sliding_window < SEQ
        unlimited = AutoModelForCausalLM.from_config(
            type(config)(**dict(spec["config"], sliding_window=None), attn_implementation="eager")
        ).to(torch.float32)
        unlimited.load_state_dict(ref.state_dict())
        with torch.no_grad():
            assert not torch.allclose(unlimited(input_ids).logits, logits.detach(), atol=1e-3)

    loss.backward()
    grad_norm_sq = 0.0
    grad_samples = {}
    for pname, param in ref.named_parameters():
        assert param.grad is not None, pname
        grad_norm_sq += param.grad.double().pow(2).sum().item()
        grad_samples[pname] = param.grad.reshape(-1)[:GRAD_SAMPLES].tolist()

    expected = {
        "variant": name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "storage_dtype": str(spec["dtype"]).replace("torch.", ""),
        "compute_dtype": "float32",
        "attn_implementation": "eager",
        "architecture": ref.config.architectures[0],
        "tie_word_embeddings": bool(ref.config.tie_word_embeddings),
        "batch": BATCH,
        "seq": SEQ,
        "vocab_size": config.vocab_size,
        "ignore_index": IGNORE,
        "input_ids": input_ids.tolist(),
        "labels": labels.tolist(),
        "shifted_targets": shifted.tolist(),
        "loss": loss.item(),
        "grad_norm_sq": grad_norm_sq,
        # float32 -> Python float is exact; json writes the shortest decimal of that double.
        "logits": logits.detach().reshape(-1).tolist(),
        "grad_samples": grad_samples,
    }
    # One top-level key a line, each value compact: small, and diffs stay readable.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in expected.items()]
    with open(directory / "expected.json", "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    with open(directory / "expected.json") as f:
        assert json.load(f) == expected
    return expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root")
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append", help="variant(s)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    names = args.only or list(VARIANTS)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name in names:
        expected = build_variant(name, VARIANTS[name], args.out)
        print(
            f"{name}: loss {expected['loss']!r} grad_norm_sq {expected['grad_norm_sq']!r} "
            f"-> {args.out / name}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
