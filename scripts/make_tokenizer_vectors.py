#!/usr/bin/env python3
"""Builds the BPE test tokenizers and their parity vectors with Hugging Face `tokenizers`, the
reference lomo's C++ BPE (worker/data/bpe_tokenizer.cc) must agree with.

Writes, for each style (byte-level: llama3_style, gpt2_style, qwen2_style, and o200k_style,
normalized_style, behaviors_style, byte_fallback_style for tokenizer.json features beyond the three
classic ones; SentencePiece-style, vocabularies of text pieces with byte fallback, as Hugging Face
converts Llama 2 / Mistral / TinyLlama tokenizers: sp_legacy_style, metaspace_first_style,
metaspace_always_style, metaspace_never_style):
    tests/data/tokenizers/<style>/tokenizer.json         trained here on a small multilingual text
    tests/data/tokenizers/<style>/tokenizer_config.json  BOS/EOS/pad as a model directory has them
    tests/data/tokenizers/<style>/vectors.json           [{text, ids[, decoded]}] from tokenizers
and small seed inputs for the fuzz target in tests/fuzz/corpus/tokenizer_json_fuzz/.

Run once with the repository's virtual environment and commit the output:
    .venv/bin/python scripts/make_tokenizer_vectors.py
Training and encoding are deterministic, so a re-run with the same `tokenizers` version
reproduces the files.
"""
import collections
import json
import pathlib
import random
import sys

import tokenizers
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, trainers)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "tokenizers"
FUZZ_CORPUS = ROOT / "tests" / "fuzz" / "corpus" / "tokenizer_json_fuzz"

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-4o's (tiktoken o200k_base), as its tokenizer.json spells it.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# The training text: several scripts, digits, code and whitespace, so that merges exist for all.
CORPUS = """\
The quick brown fox jumps over the lazy dog. It's 2024, and we're testing tokenizers; they'll
see numbers like 3.14159, 1,000,000 and 42 -- or 0x1F600. Don't panic! She'd said: "I've got it."
Le cœur a ses raisons que la raison ne connaît point. Où est la bibliothèque ? Ça va très bien.
Ich möchte ein Stück Käse, bitte. Grüße aus Zürich und München! Straße, Fußgänger, Äpfel.
¿Dónde está el baño? El niño comió piña y jalapeño. São Paulo é uma cidade enorme.
Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир!
Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε.
中文测试：我们正在训练一个分词器。你好，世界！今天天气很好。
日本語のテキストです。こんにちは、世界。カタカナとひらがなと漢字。
한국어 텍스트입니다. 안녕하세요, 세계! 감사합니다.
हिन्दी में लिखा गया वाक्य। नमस्ते दुनिया।
مرحبا بالعالم. هذه جملة باللغة العربية ١٢٣ ٤٥٦.
שלום עולם. זהו משפט בעברית.
Emoji: 😀 😃 👍🏽 ❤️ 🇫🇷 👨‍👩‍👧 🚀 ✨ — and symbols ©®™ § ¶ † ‡ • … ‰ € £ ¥ ½ ² ³.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for (int i = 0; i < 10; ++i) { printf("%d\\n", i * i); }
\t\tIndented with tabs\r\nWindows line end\r\n
Mixed   spaces    and\t\ttabs   and


blank lines.
12345678901234567890 9876543210 000 007 1e-5 -273.15 +49 30% $19.99
"""


def training_lines():
    return CORPUS.splitlines(keepends=True) * 3


def train(pattern, vocab_size, ignore_merges, add_prefix_space, special_tokens=(),
          normalizer=None, pre_tokenizer=None):
    """A byte-level BPE: `pattern` None means ByteLevel's own GPT-2 split (use_regex);
    `pre_tokenizer`, when given, replaces the pattern's."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    elif pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space,
                                                     use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)
    tok.train_from_iterator(training_lines(), trainer=trainer)
    return tok


def with_extra_vocab(tok, words):
    """Adds whole-word tokens that no merge produces: with ignore_merges, encode must still pick
    them for exactly that word."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    byte_char = bytes_to_unicode()
    for word in words:
        token = "".join(byte_char[b] for b in word.encode("utf-8"))
        vocab.setdefault(token, len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def legacy_merges(tok):
    """The same tokenizer with merges spelled "a b" (older tokenizer.json files)."""
    spec = json.loads(tok.to_str())
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    return Tokenizer.from_str(json.dumps(spec))


# ---------------------------------------------------------------------------------------------
# Test texts.

COMMON_TEXTS = [
    "",
    "Hello, world!",
    "Hello world",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "tabs\there\t\tand\t",
    "new\nlines\n\n\nmany",
    "\r\n windows \r\n",
    "mixed \t \n \r\n  end  ",
    "   ",
    " ",
    "\n",
    "\t",
    "\n\n\n\n\n\n\n\n\n\n",
    " " * 20,
    "a" + " " * 7 + "b",
    "a  b   c    d",
    "x \n y",
    "word\n  indented",
    "end with newline\n",
    "\u00a0nbsp\u00a0",
    "\u3000ideographic\u3000space",
    "line\u2028separator",
    "x\u0085y",
    "\x0b\x0cvertical",
    "\x00nul and \x7f del and \x1b[0m",
    # digits
    "1",
    "12",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159",
    "1,000,000",
    "a1b22c333d4444e55555",
    " 2024",
    "x 123 y",
    "٣٤٥٦٧",
    "१२३४",
    "①②③④",
    "Ⅻ and ⅷ",
    "²³½7",
    "0x1F600",
    # contractions
    "I'm",
    "don't",
    "they're",
    "we've",
    "she'll",
    "he'd",
    "it's",
    "IT'S",
    "DON'T",
    "They'Re WE'VE",
    "'s",
    "'",
    "''",
    "''s",
    "rock 'n' roll",
    "'ſ and 'ſt",
    "'ß",
    "O'Neil y'all",
    " 's",
    "'sup",
    "I'M SHE'LL HE'D",
    # punctuation and code
    "!!!",
    "...",
    "—–-",
    "(a) [b] {c}",
    "<html><body>",
    "def f(x): return x**2",
    "#include <stdio.h>",
    "a.b.c",
    "?!\n",
    "!!!\n\n",
    " ...\r\n",
    "foo()\n\n\tbar();\r\n",
    "'''docstring'''",
    # Unicode
    "café",
    "naïve",
    "Zürich",
    "São Paulo",
    "Ελληνικά",
    "Русский текст",
    "中文测试",
    "日本語のテキスト",
    "한국어 텍스트",
    "हिन्दी",
    "e\u0301",
    "a\u0300\u0301\u0302",
    "\u0301start",
    "עברית",
    "العربية",
    "مرحبا بالعالم",
    "abc עברית 123 العربية",
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "🇫🇷",
    "I ❤ NY",
    "\U0001F600\U0001F601 x",
    "\u200b zero width",
    "\ufeffBOM",
    "ﬁ ligature",
    "ǅ Lt",
    "ᾈ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\U00010000 \U0010FFFD",
    "Ａ full width",
]


def special_texts(specials):
    a, b = specials[0], specials[-1]
    return [
        a,
        a + "Hello" + b,
        "x" + b + "y",
        b + b,
        " " + b + " ",
        "  " + b + "\n\n" + a,
        b[:-1],
        b[:-2] + " " + b[-2:],
        "text " + a + " more " + b + " end",
    ]


def random_texts(rng, specials, count):
    pools = [
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        list("0123456789"),
        [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\n\n", "\u00a0", "\u3000"],
        list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~"),
        ["'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'ſ"],
        list("éèêëàâäôöûüçñßøåæœ"),
        list("中文日本語한국어"),
        list("абвгдежзийклмнопрстуфхцчшщыэюя"),
        list("αβγδεζηθικλμ"),
        list("שלוםمرحبا"),
        ["\u0301", "\u0308", "\u093f", "\u094d"],
        list("٣٤۵१२①Ⅻ²"),
        ["😀", "👍🏽", "🚀", "❤️", "🇫🇷", "👨‍👩‍👧"],
        list(specials),
        ["hello", " world", "the", " The", "tokenizer", " 2024", "ing"],
    ]
    texts = []
    for _ in range(count):
        pieces = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 24))]
        texts.append("".join(pieces))
    return texts


# ---------------------------------------------------------------------------------------------


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n",
                    encoding="utf-8")


def write_vectors(path, tok, texts):
    lines = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        vector = {"text": text, "ids": ids}
        # Byte-level BPE decodes back to the text, except where an lstrip/rstrip added token
        # absorbed the whitespace beside it: then the vector records what decode gives.
        decoded = tok.decode(ids, skip_special_tokens=False)
        if decoded != text:
            vector["decoded"] = decoded
        lines.append(json.dumps(vector, ensure_ascii=False, separators=(",", ":")))
    header = json.dumps({
        "generator": "scripts/make_tokenizer_vectors.py",
        "tokenizers_version": tokenizers.__version__,
        "python_version": sys.version.split()[0],
    }, separators=(",", ":"))
    path.write_text(header[:-1] + ',"vectors":[\n' + ",\n".join(lines) + "\n]}\n",
                    encoding="utf-8")


def save_style(name, tok, config, texts):
    """Writes the tokenizer compactly, then reloads that file so the vectors come from exactly
    what is committed."""
    out = DATA / name
    write_json(out / "tokenizer.json", json.loads(tok.to_str()))
    reloaded = Tokenizer.from_file(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", config)
    write_vectors(out / "vectors.json", reloaded, texts)
    sizes = sum(p.stat().st_size for p in out.iterdir())
    print("%s: %d vectors, vocab %d, %d bytes" % (name, len(texts),
                                                 reloaded.get_vocab_size(), sizes))


def llama3_style():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = train(LLAMA3_PATTERN, 1000, ignore_merges=True, add_prefix_space=False)
    tok = with_extra_vocab(tok, [" zzqx", "qqqq"])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    # A non-special added token, matched after the special ones (normalized=True).
    tok.add_tokens([AddedToken("<think>", special=False, normalized=True)])
    chat = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat's 12345 + 678?"
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>easy</think>"
            "13023<|eot_id|>")
    texts = (COMMON_TEXTS + special_texts(specials) +
             [chat, " zzqx", "zzqx", " zzqxy", "qqqq", "qqqqq", "<think> x </think>"] +
             random_texts(random.Random(3), specials + ["<think>"], 150))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    save_style("llama3_style", tok, config, texts)


def gpt2_style():
    tok = train(None, 1000, ignore_merges=False, add_prefix_space=False,
                special_tokens=["<|endoftext|>"])
    # lstrip takes the whitespace before the token with it, rstrip the whitespace after.
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    tok.add_tokens([AddedToken("[SEP]", special=False, rstrip=True, normalized=True),
                    AddedToken("[SEP][SEP]", special=False, normalized=True)])
    tok = legacy_merges(tok)
    specials = ["<|endoftext|>", "<mask>"]
    texts = (COMMON_TEXTS + special_texts(specials) + [
        "hello   <mask> world", "<mask>", "  <mask>  ", "a\t\n <mask>\n", "x[SEP]  y",
        "[SEP][SEP][SEP]", "[SEP] \n [SEP]", "a <mask>[SEP]   <mask> b", "[SEP]<mask>",
    ] + random_texts(random.Random(2), specials + ["[SEP]"], 150))
    config = {
        "bos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False, "__type": "AddedToken"},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False, "__type": "AddedToken"},
        "tokenizer_class": "GPT2Tokenizer",
    }
    save_style("gpt2_style", tok, config, texts)


def qwen2_style():
    # add_prefix_space=True is not Qwen2's setting; it is here to exercise that option.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train(QWEN2_PATTERN, 600, ignore_merges=False, add_prefix_space=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    texts = (COMMON_TEXTS + special_texts(specials) +
             ["<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2=?<|im_end|>"]
             + random_texts(random.Random(1), specials, 100))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    save_style("qwen2_style", tok, config, texts)


NORMALIZATION_TEXTS = [
    "ﬁne ﬂour", "Ａｂｃ１２３", "①②", "e\u0301 vs \u00e9", "A\u030a", "Å", "İstanbul", "ΣΑΣ ΟΔΟΣ",
    "ẞ STRASSE", "ǅungla", "x\u00b2 + y\u2075", "\u2126 \u212b", "\u1e9b\u0323", "``quoted''",
    "TAB\tAND  SPACES", "Ⅷ ⅷ", "㎏ ㍱", "\uff76\uff9e", "한국어", "\u1100\u1161\u11a8",
    "x\u0301\u0301\u0316", "MiXeD CaSe İİ", "- dash-separated-words -",
    "a...b,,c!!d", "3.14 and 2,5", "one--two", "99 bottles: 1 2 3",
]


def tokenizer_with(spec_change, tok):
    spec = json.loads(tok.to_str())
    spec_change(spec)
    return Tokenizer.from_str(json.dumps(spec))


def o200k_style():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train(O200K_PATTERN, 800, ignore_merges=False, add_prefix_space=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    texts = (COMMON_TEXTS + NORMALIZATION_TEXTS + special_texts(specials) +
             ["HelloWorld FooBAR camelCaseWord URLs/like/this\n", "ÉCOLE École's", "a/b//\n"] +
             random_texts(random.Random(4), specials, 150))
    config = {"bos_token": None, "eos_token": "<|endoftext|>"}
    save_style("o200k_style", tok, config, texts)


def normalized_style():
    """Normalizers NFKC, Lowercase, Replace (String and Regex) and Prepend; WhitespaceSplit and
    Whitespace pre-tokenizers; a normalized added token that only matches after normalization."""
    normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace("``", '"'),
        normalizers.Replace(Regex(r"[ \t]{2,}"), " "),
        normalizers.Lowercase(),
        normalizers.Prepend("\u2581"),
    ])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Whitespace(),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok = train(None, 700, ignore_merges=False, add_prefix_space=False,
                normalizer=normalizer, pre_tokenizer=pre_tokenizer)
    tok.add_special_tokens([AddedToken("<|EOT|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("[note]", special=False, normalized=True)])
    texts = (COMMON_TEXTS + NORMALIZATION_TEXTS +
             ["<|EOT|>", "a<|EOT|>b", "[NOTE] x [note]", "［ＮＯＴＥ］", "<|eot|>"] +
             random_texts(random.Random(5), ["<|EOT|>", "[NOTE]"], 150))
    save_style("normalized_style", tok, {"bos_token": None, "eos_token": "<|EOT|>"}, texts)


def behaviors_style():
    """Every Split behavior, invert, a String pattern and an NFC normalizer, ahead of a ByteLevel
    that splits again with its own regex."""
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("-", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[.,;:!?]"), behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"\n+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"[^\p{Han}]+"), behavior="isolated", invert=True),
        pre_tokenizers.Split(Regex(r"\b"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
    ])
    tok = train(None, 600, ignore_merges=False, add_prefix_space=False,
                normalizer=normalizers.NFC(), pre_tokenizer=pre_tokenizer)
    texts = (COMMON_TEXTS + NORMALIZATION_TEXTS + random_texts(random.Random(6), ["-", "..."], 150))
    save_style("behaviors_style", tok, {"bos_token": None, "eos_token": None}, texts)


def byte_fallback_style():
    """byte_fallback on a byte-level vocabulary missing some byte characters: their UTF-8 bytes
    as <0xXX> tokens where those exist, else the (fused) unknown token."""
    tok = train(None, 500, ignore_merges=False, add_prefix_space=False)
    byte_char = bytes_to_unicode()
    removed = [byte_char[0xC3], byte_char[0xA9], byte_char[0xF0], byte_char[0x7E]]

    def change(spec):
        model = spec["model"]
        vocab = model["vocab"]
        freed = sorted(vocab.pop(c) for c in removed)
        model["merges"] = [m for m in model["merges"] if m[0] not in removed and m[1] not in removed]
        # <0xB0> stays missing, so 0xF0 ('ð', UTF-8 C3 B0) falls back to <unk>.
        new = ["<0xC3>", "<0x83>", "<0xC2>", "<0xA9>", "<0x7E>", "<unk>"]
        ids = freed + list(range(len(vocab) + len(freed), len(vocab) + len(new)))
        for token, token_id in zip(new, ids):
            vocab[token] = token_id
        model["byte_fallback"] = True
        model["unk_token"] = "<unk>"
        model["fuse_unk"] = True

    tok = tokenizer_with(change, tok)
    tok.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    texts = (COMMON_TEXTS + NORMALIZATION_TEXTS +
             ["é", "ð", "©é~", "😀😀", "x\u00f0\u00f0y", "~~~", "é😀é"] +
             random_texts(random.Random(7), ["</s>", "~"], 150))
    save_style("byte_fallback_style", tok, {"bos_token": None, "eos_token": "</s>"}, texts)


# ---------------------------------------------------------------------------------------------
# SentencePiece-style tokenizers: the vocabulary holds text pieces ("▁the"), ids 0-2 are <unk>,
# <s>, </s> and 3-258 the byte-fallback tokens <0x00>..<0xFF>, as in Llama 2's tokenizer.json.

METASPACE = "\u2581"
SP_SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = ["<0x%02X>" % b for b in range(256)]
LLAMA2_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": METASPACE},
    {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}]}
LLAMA2_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": METASPACE}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
LLAMA2_POST_PROCESSOR = {"type": "TemplateProcessing",
                         "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}}],
                         "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}},
                                  {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                  {"Sequence": {"id": "B", "type_id": 1}}],
                         "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}


def metaspace(prepend_scheme, split):
    return {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": prepend_scheme,
            "split": split}


def train_text_pieces(vocab_size, limit_alphabet, split):
    """A BPE over text pieces with byte_fallback, trained through Metaspace (split: merges stay
    inside words, as SentencePiece's; not split: merges may cross the "▁" between words). Only
    <unk>, <s> and </s> stay added tokens; the byte tokens are plain vocabulary. limit_alphabet
    leaves rare characters (most CJK, emoji) to the byte fallback."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always",
                                                 split=split)
    # The alphabet chosen here, not by limit_alphabet alone, which breaks ties between equally
    # frequent characters differently from run to run.
    counts = collections.Counter("".join(training_lines()).replace(" ", METASPACE))
    alphabet = sorted(counts, key=lambda c: (-counts[c], c))[:limit_alphabet]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  special_tokens=SP_SPECIALS + BYTE_TOKENS, show_progress=False)
    tok.train_from_iterator(training_lines(), trainer=trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SP_SPECIALS]
    for token in spec["added_tokens"]:
        token["normalized"] = False
    return spec


def with_pipeline(spec, normalizer, pre_tokenizer, decoder, post_processor=None):
    spec = json.loads(json.dumps(spec))
    spec["normalizer"] = normalizer
    spec["pre_tokenizer"] = pre_tokenizer
    spec["decoder"] = decoder
    spec["post_processor"] = post_processor
    return Tokenizer.from_str(json.dumps(spec))


# Spaces and "▁" where SentencePiece-style tokenizers treat them specially, and text around the
# special tokens (whether "▁" is prepended after one depends on the style).
SPACE_TEXTS = [
    " ", "  ", "   x", "x   ", " x ", "a  b", "\u2581", "\u2581x", "x\u2581", " \u2581 ", "\u2581\u2581a",
    "Hello", " Hello", "  Hello", "Hello ", "Hello  world  ", "\tHello", "\nHello", "\n Hello",
    "<s>", "<s>Hello", "<s> Hello", "<s>  Hello", "Hello</s>", "Hello </s>", "<s></s>", "<s> </s>",
    "a<s>b</s>c", " <s> ", "<unk>", "x<unk>y", "<s>[INST] What's 2+2? [/INST] 4 </s>",
    "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]",
    "<0x41>", "<0xE4><0xB8>", "中文😀", " 中", "😀 ", "Ω≈ç√∫", "é", "\U0001F600\U0001F600",
]


def sp_style_texts(seed, extra_specials=()):
    return (COMMON_TEXTS + SPACE_TEXTS + special_texts(SP_SPECIALS[1:]) +
            random_texts(random.Random(seed), SP_SPECIALS + list(extra_specials) + [" ", METASPACE],
                         150))


def sp_config():
    return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
            "add_bos_token": True, "tokenizer_class": "LlamaTokenizer"}


def sp_legacy_style():
    """Llama 2 / Mistral v0.1 as Hugging Face converts them: normalizer Prepend("▁") and
    Replace(" ", "▁"), no pre-tokenizer (the model sees each section between added tokens
    whole), the Replace/ByteFallback/Fuse/Strip decoder."""
    spec = train_text_pieces(800, 150, split=True)
    tok = with_pipeline(spec, LLAMA2_NORMALIZER, None, LLAMA2_DECODER, LLAMA2_POST_PROCESSOR)
    save_style("sp_legacy_style", tok, sp_config(), sp_style_texts(11))


def metaspace_first_style():
    """Newer conversions (Llama with legacy=False, Mistral v0.3, TinyLlama): no normalizer,
    Metaspace prepending only where the text starts, no split, the Llama 2 decoder, and a
    non-special added token. 600 tokens: tests/data/generation/sp_chat runs it with the
    qwen2_text model (603 embedding rows)."""
    spec = train_text_pieces(600, 150, split=True)
    tok = with_pipeline(spec, None, metaspace("first", False), LLAMA2_DECODER,
                        LLAMA2_POST_PROCESSOR)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=True)])
    texts = sp_style_texts(12, ["<think>"]) + ["<think>x</think>", " <think> y", "<think>"]
    save_style("metaspace_first_style", tok, sp_config(), texts)


def metaspace_always_style():
    """Metaspace prepending to every section, split into words, the Metaspace decoder (which
    leaves byte tokens as they are spelled), ignore_merges with whole words no merge makes, and
    no <0x9F> token: characters whose UTF-8 has that byte (most emoji) become one fused <unk>."""
    spec = train_text_pieces(700, 120, split=True)
    vocab = spec["model"]["vocab"]
    for word in [METASPACE + "zzqx", "qqqq", METASPACE + "Hello"]:
        vocab.setdefault(word, len(vocab))
    missing = vocab.pop("<0x9F>")
    vocab["<0x9F>-retired"] = missing  # keeps the ids dense
    spec["model"]["ignore_merges"] = True
    tok = with_pipeline(spec, None, metaspace("always", True), metaspace("always", True))
    texts = sp_style_texts(13) + [" zzqx", "zzqx", "zzqxy", "qqqq", "qqqqq", "😀x😀😀",
                                  "\u2581Hello Hello"]
    save_style("metaspace_always_style", tok, sp_config(), texts)


def metaspace_never_style():
    """A Sequence: digits split off, then Metaspace that never prepends but splits; a decoder
    that replaces runs of "▁" by a regex after the byte fallback, and no Strip (Strip's stop
    panics in the library on an empty text)."""
    # Trained without split: here merges may cross the "▁" between words.
    spec = train_text_pieces(700, 150, split=False)
    pre_tokenizer = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated",
         "invert": False},
        metaspace("never", True)]}
    decoder = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"},
        {"type": "Replace", "pattern": {"Regex": METASPACE + "+"}, "content": " "},
        {"type": "Fuse"}]}
    tok = with_pipeline(spec, None, pre_tokenizer, decoder)
    save_style("metaspace_never_style", tok, sp_config(), sp_style_texts(14))


def fuzz_seeds():
    """Small tokenizer.json inputs for the fuzz target: tiny vocabularies (the byte alphabet and
    a few merges) in each supported shape, and broken variants of them."""
    FUZZ_CORPUS.mkdir(parents=True, exist_ok=True)
    tiny_llama3 = train(LLAMA3_PATTERN, 290, ignore_merges=True, add_prefix_space=False)
    tiny_llama3.add_special_tokens([AddedToken("<|eot_id|>", special=True, normalized=False)])
    tiny_gpt2 = train(None, 280, ignore_merges=False, add_prefix_space=False,
                      special_tokens=["<|endoftext|>"])
    tiny_gpt2.add_tokens([AddedToken("[SEP]", special=False, lstrip=True, rstrip=True)])
    tiny_gpt2 = legacy_merges(tiny_gpt2)
    tiny_qwen2 = train(QWEN2_PATTERN, 270, ignore_merges=False, add_prefix_space=True)
    seeds = {
        "valid_llama3.json": json.loads(tiny_llama3.to_str()),
        "valid_gpt2_legacy_merges.json": json.loads(tiny_gpt2.to_str()),
        "valid_qwen2_prefix_space.json": json.loads(tiny_qwen2.to_str()),
    }
    base = json.loads(tiny_llama3.to_str())

    def variant(change):
        spec = json.loads(json.dumps(base))
        change(spec)
        return spec

    seeds["valid_normalizer_sequence.json"] = variant(lambda s: s.__setitem__("normalizer", {
        "type": "Sequence", "normalizers": [
            {"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Prepend", "prepend": "_"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}]}))
    seeds["valid_whitespace_split.json"] = variant(
        lambda s: s["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "WhitespaceSplit"}))
    seeds["invalid_regex.json"] = variant(
        lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].__setitem__("Regex", "(a"))
    seeds["invalid_normalizer_bert.json"] = variant(
        lambda s: s.__setitem__("normalizer", {"type": "BertNormalizer"}))
    seeds["invalid_model_wordpiece.json"] = variant(
        lambda s: s["model"].__setitem__("type", "WordPiece"))
    seeds["valid_word_pattern.json"] = variant(
        lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].__setitem__("Regex", r"\w+"))
    seeds["invalid_merge_unknown_token.json"] = variant(
        lambda s: s["model"]["merges"].append(["zz", "top"]))
    seeds["valid_byte_fallback.json"] = variant(
        lambda s: s["model"].__setitem__("byte_fallback", True))
    tiny_pieces = train_text_pieces(300, 30, split=True)
    seeds["valid_metaspace.json"] = json.loads(
        with_pipeline(tiny_pieces, None, metaspace("first", True), LLAMA2_DECODER).to_str())
    for name, spec in seeds.items():
        write_json(FUZZ_CORPUS / name, spec)
    # Two malformed-JSON inputs, and vocab/merges with unusual entries.
    (FUZZ_CORPUS / "invalid_truncated.json").write_text(
        json.dumps(base, separators=(",", ":"))[:300], encoding="utf-8")
    (FUZZ_CORPUS / "valid_minimal.json").write_text(
        '{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"\\u0120":3},"merges":["a b"],'
        '"unk_token":"a","fuse_unk":true},'
        '"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":true},'
        '"decoder":{"type":"ByteLevel"},'
        '"added_tokens":[{"id":4,"content":"<s>","special":true,"lstrip":true,"rstrip":true}]}\n',
        encoding="utf-8")
    print("fuzz corpus: %d files" % len(list(FUZZ_CORPUS.iterdir())))


def main():
    print("tokenizers %s, Python %s" % (tokenizers.__version__, sys.version.split()[0]))
    llama3_style()
    gpt2_style()
    qwen2_style()
    o200k_style()
    normalized_style()
    behaviors_style()
    byte_fallback_style()
    sp_legacy_style()
    metaspace_first_style()
    metaspace_always_style()
    metaspace_never_style()
    fuzz_seeds()


if __name__ == "__main__":
    main()
