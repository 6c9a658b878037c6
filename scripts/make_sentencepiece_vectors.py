"""Test vectors for lomo's SentencePiece tokenizer.model path (worker/data/sentencepiece_tokenizer):
special pieces written in a text, the dummy prefix only at the start of a text, a chat template
rendered and encoded as transformers does it, and encoding without the dummy prefix.

Writes tests/data/llama2_tokenizer/special_text_vectors.json. Inputs: the committed Llama 2
tokenizer.model (tests/data/llama2_tokenizer) and the Mistral chat template of
tests/data/generation/sp_chat/tokenizer_config.json. References:
  - transformers' tokenizer for a directory holding only tokenizer.model + tokenizer_config.json
    (what a user of such a directory gets: LlamaTokenizer, non-legacy), encode(text,
    add_special_tokens=False) and apply_chat_template(tokenize=True);
  - the sentencepiece library on the same model with normalizer_spec.add_dummy_prefix = False.
Texts avoid runs of several spaces: there transformers' conversion of the model to BPE and the
sentencepiece library disagree (docs/ARCHITECTURE.md, "Tokenizers").

    python scripts/make_sentencepiece_vectors.py   # in a venv with transformers, sentencepiece,
                                                   # protobuf (e.g. transformers 5.24)
"""
import json
import pathlib
import shutil
import tempfile

import sentencepiece as spm
import transformers
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/data/llama2_tokenizer/tokenizer.model"
CONFIG = ROOT / "tests/data/generation/sp_chat/tokenizer_config.json"
OUT = ROOT / "tests/data/llama2_tokenizer/special_text_vectors.json"

TEXTS = ["<s>Hello", "<s> [INST] hello world [/INST]", "Hi there friend</s>",
         "before<unk>after", "a</s><s>b", "<s>", "</s> trailing", "x <s> y",
         "<<s>>", "Hello"]
CONTINUATIONS = ["Hello", " Hello", "world!", "中文", "😀", "[/INST]", " [INST]", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "Hi there friend"},
     {"role": "user", "content": "And then?"}],
    [{"role": "system", "content": "be brief"},
     {"role": "user", "content": "The quick brown fox"},
     {"role": "assistant", "content": "jumps."}],
]


def main():
    config = json.loads(CONFIG.read_text())
    config.pop("added_tokens_decoder", None)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(MODEL, pathlib.Path(tmp) / "tokenizer.model")
        (pathlib.Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        tok = AutoTokenizer.from_pretrained(tmp)
        texts = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
        chats = []
        for messages in CONVERSATIONS:
            ids = tok.apply_chat_template(messages, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            chats.append({"messages": messages, "ids": list(ids),
                          "text": tok.apply_chat_template(messages, tokenize=False)})
    proto = model_pb2.ModelProto()
    proto.ParseFromString(MODEL.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    continuations = [{"text": t, "ids": plain.encode(t)} for t in CONTINUATIONS]
    OUT.write_text(json.dumps({
        "transformers_version": transformers.__version__,
        "sentencepiece_version": spm.__version__,
        "tokenizer_class": type(tok).__name__,
        "chat_template_from": "tests/data/generation/sp_chat/tokenizer_config.json",
        "texts": texts, "continuations": continuations, "chats": chats}, indent=1,
        ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
