#!/usr/bin/env python3
"""Writes tests/data/generation/greedy.json: transformers' greedy `generate` on the parity models.

Run by a developer when the fixtures under tests/data/hf/ change (CI only reads the result), with
the environment tests/hf/hf_roundtrip_test.sh creates or any venv holding torch and transformers:

    ~/.cache/lomo/hf-venv-*/bin/python scripts/make_generation_fixtures.py

For every model directory tests/data/hf/<variant>/ and each prompt (rows of token ids; these tiny
models have no tokenizer), two greedy runs, float32, eager attention, with the KV cache
transformers uses by default:
  with_eos:  the model's own generation_config.json (its eos_token_id stops the run)
  no_eos:    no stop token at all, so exactly max_new_tokens are produced
Each entry records the new token ids only (the prompt is not repeated). max_new_tokens takes the
sequences past mistral_window's 3-token sliding window many times over.

It also writes tests/data/generation/qwen2_text/: a tiny random Qwen2ForCausalLM over the
tests/data/tokenizers/qwen2_style tokenizer (its vocabulary, <|im_end|> as eos), with
expected.json: for each text prompt the ids `tokenizers` gives it, the ids transformers' greedy
generate() adds, and their text (tokenizers' decode, special tokens kept): the whole text path.

And tests/data/generation/qwen2_chat/: that tokenizer with a tokenizer_config.json carrying the
Qwen2.5 chat_template (tests/data/chat_templates/qwen2_5.jinja), and expected.json: for each chat
(an optional system message and a user message) the prompt transformers' apply_chat_template
renders (add_generation_prompt=True) as text and ids, and the greedy continuation of the
qwen2_text model. `--chat-only` writes just this directory (the random models stay as they are).

And tests/data/generation/sp_chat/: the SentencePiece-style tests/data/tokenizers/
metaspace_first_style tokenizer (Metaspace, byte fallback; 601 tokens, so the qwen2_text model can
run it) with the Mistral chat_template (tests/data/chat_templates/mistral.jinja), and expected.json:
the same kind of chat runs (greedy stops at the model's eos or the template's </s>, as lomo's chat
mode does), and one training conversation with the ids transformers' apply_chat_template
(tokenize=True) gives it. `--sp-chat-only` writes just this directory.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil  # noqa: E402

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HF_DIR = ROOT / "tests" / "data" / "hf"
OUT = ROOT / "tests" / "data" / "generation" / "greedy.json"
PROMPTS = [[13, 23, 31, 24, 30, 35, 6], [5], [15, 4, 16, 21, 9, 6, 29, 8, 3, 11, 27]]
MAX_NEW_TOKENS = 40


def greedy(model, prompt, generation_config):
    # generate() fills a stop token the given config leaves unset from the model's own config:
    # clear the model's for the run without one.
    model.generation_config.eos_token_id = generation_config.eos_token_id
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, generation_config=generation_config,
                             attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


TEXT_PROMPTS = ["hello world", "The quick brown fox", "lomo: 1 2 3"]
TEXT_MAX_NEW_TOKENS = 24


def text_model():
    source = ROOT / "tests" / "data" / "tokenizers" / "qwen2_style"
    out = OUT.parent / "qwen2_text"
    tok = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    config = Qwen2Config(vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=32,
                         intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=im_end,
                         pad_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(20261126)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # as make_hf_fixtures.py: large weights, decisive greedy choices
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                torch.nn.init.normal_(param, mean=0.0, std=0.5)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    own = GenerationConfig.from_pretrained(out)
    own.do_sample = False
    own.max_new_tokens = TEXT_MAX_NEW_TOKENS
    runs = []
    for text in TEXT_PROMPTS:
        ids = tok.encode(text).ids
        new = greedy(model, ids, own)
        runs.append({"prompt": text, "prompt_ids": ids, "tokens": new,
                     "text": tok.decode(new, skip_special_tokens=False)})
        print("qwen2_text", repr(text), new[:8], repr(runs[-1]["text"][:40]))
    expected = {"transformers_version": transformers.__version__,
                "tokenizers_version": tokenizers.__version__, "max_new_tokens": TEXT_MAX_NEW_TOKENS,
                "eos_token_id": im_end, "runs": runs}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


CHATS = [("", "hello world"), ("be brief", "The quick brown fox")]


def chat_fixture_dir(style, template, name):
    """tests/data/generation/<name>: the tokenizer of tests/data/tokenizers/<style> with the chat
    template of tests/data/chat_templates/<template>, loaded by transformers."""
    source = ROOT / "tests" / "data" / "tokenizers" / style
    out = OUT.parent / name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = (ROOT / "tests" / "data" / "chat_templates" /
                               template).read_text(encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out, transformers.AutoTokenizer.from_pretrained(out)


def chat_runs(out, tok, stop_token=None):
    """Each chat of CHATS rendered with the generation prompt, tokenized, and continued greedily
    by the qwen2_text model (stopping also at `stop_token`, as lomo's chat mode does); the
    expected.json to write, without its "runs" written yet."""
    model_dir = OUT.parent / "qwen2_text"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    own = GenerationConfig.from_pretrained(model_dir)
    own.do_sample = False
    own.max_new_tokens = TEXT_MAX_NEW_TOKENS
    if stop_token is not None:
        own.eos_token_id = [own.eos_token_id, tok.convert_tokens_to_ids(stop_token)]
    library = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    runs = []
    for system, user in CHATS:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # transformers' tokenizer class may rebuild the pipeline: it must be the file's here.
        assert ids == library.encode(text, add_special_tokens=False).ids
        new = greedy(model, ids, own)
        runs.append({"system": system, "prompt": user, "prompt_text": text, "prompt_ids": ids,
                     "tokens": new, "text": tok.decode(new, skip_special_tokens=False)})
        print(out.name, repr(text[-40:]), new[:8])
    return {"transformers_version": transformers.__version__,
            "tokenizers_version": tokenizers.__version__, "max_new_tokens": TEXT_MAX_NEW_TOKENS,
            "eos_token_id": own.eos_token_id, "runs": runs}


def chat_fixture():
    out, tok = chat_fixture_dir("qwen2_style", "qwen2_5.jinja", "qwen2_chat")
    expected = chat_runs(out, tok)
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


SP_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! I'm here."},
    {"role": "user", "content": "2+2? 中文😀"},
    {"role": "assistant", "content": "4, of course"},
]


def sp_chat_fixture():
    out, tok = chat_fixture_dir("metaspace_first_style", "mistral.jinja", "sp_chat")
    expected = chat_runs(out, tok, stop_token="</s>")
    training = tok.apply_chat_template(SP_CONVERSATION, tokenize=False)
    training_ids = tok.apply_chat_template(SP_CONVERSATION, tokenize=True, return_dict=False)
    library = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert training_ids == library.encode(training, add_special_tokens=False).ids
    expected["training"] = {"messages": SP_CONVERSATION, "text": training, "ids": training_ids}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def main():
    if sys.argv[1:] == ["--chat-only"]:
        chat_fixture()
        return
    if sys.argv[1:] == ["--sp-chat-only"]:
        sp_chat_fixture()
        return
    result = {"transformers_version": transformers.__version__,
              "torch_version": torch.__version__, "max_new_tokens": MAX_NEW_TOKENS,
              "variants": {}}
    for variant_dir in sorted(p for p in HF_DIR.iterdir() if p.is_dir()):
        model = AutoModelForCausalLM.from_pretrained(variant_dir, dtype=torch.float32,
                                                     attn_implementation="eager")
        model.eval()
        own = GenerationConfig.from_pretrained(variant_dir)
        own.do_sample = False
        own.max_new_tokens = MAX_NEW_TOKENS
        own.pad_token_id = own.pad_token_id if own.pad_token_id is not None else 0
        no_eos = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                  eos_token_id=None, pad_token_id=0, bos_token_id=None)
        runs = []
        for prompt in PROMPTS:
            runs.append({"prompt": prompt, "eos_token_id": own.eos_token_id,
                         "with_eos": greedy(model, prompt, own),
                         "no_eos": greedy(model, prompt, no_eos)})
            if len(runs[-1]["no_eos"]) != MAX_NEW_TOKENS:
                sys.exit(f"{variant_dir.name}: no_eos run stopped early")
        result["variants"][variant_dir.name] = runs
        print(variant_dir.name, [r["with_eos"][:8] for r in runs])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", OUT)
    text_model()
    chat_fixture()
    sp_chat_fixture()


if __name__ == "__main__":
    main()
