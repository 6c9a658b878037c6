#!/usr/bin/env python3
"""Renders the chat templates under tests/data/chat_templates/ with jinja2 in the environment
transformers' apply_chat_template uses, for lomo's C++ Jinja subset (worker/data/jinja.cc) to match.

The environment is transformers' (utils/chat_template_utils.py, _compile_jinja_template):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols
extension, raise_exception() as a global and tojson replaced by json.dumps(ensure_ascii=False).
transformers itself needs torch; jinja2 renders the same template the same way. strftime_now is
not defined here or in lomo, so templates use their default date.

Writes tests/data/chat_templates/fixtures.json: [{template, context, rendered | error}].
Run with a virtual environment that has jinja2 (3.1):
    /work/venv-tokjinja/bin/python scripts/make_chat_template_fixtures.py
"""
import json
import pathlib
import sys

import jinja2
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "chat_templates"

# Each template with the special tokens of its model family.
TEMPLATES = {
    "llama3.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3_1.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral.jinja": ("<s>", "</s>"),
    "qwen2_5.jinja": (None, "<|im_end|>"),
    "chatml.jinja": (None, "<|im_end|>"),
    "gemma.jinja": ("<bos>", "<eos>"),
    "phi3.jinja": ("<s>", "<|endoftext|>"),
    "features.jinja": ("<s>", "</s>"),
    "macros.jinja": ("<s>", "</s>"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, \"now\".",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "user", "content": "What's 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "  You are terse.\n"},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": " Blue \n\n"},
     {"role": "user", "content": "Another, with an x."},
     {"role": "assistant", "content": "Saxe blue."}],
    [{"role": "user", "content": "Ünïcödé — 中文 😀\ttab"},
     {"role": "assistant", "content": "\"Quoted\" {braces} {{ not a tag }} {% nor this %}"}],
    [{"role": "user", "content": "first"}, {"role": "user", "content": "second in a row"}],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    [{"role": "system", "content": "Only a system message."}],
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 C, sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
]


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' definition: no HTML escaping, unlike jinja2's own tojson.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def raise_exception(message):
    raise TemplateError(message)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def contexts(bos, eos):
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            yield {"messages": messages, "bos_token": bos, "eos_token": eos,
                   "add_generation_prompt": add_generation_prompt}
    yield {"messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL], "bos_token": bos,
           "eos_token": eos, "add_generation_prompt": False}
    yield {"messages": TOOL_CONVERSATION[:2], "tools": [WEATHER_TOOL],
           "tools_in_user_message": False, "bos_token": bos, "eos_token": eos,
           "add_generation_prompt": True}


def main():
    env = environment()
    cases = []
    for name, (bos, eos) in TEMPLATES.items():
        template = env.from_string((DATA / name).read_text(encoding="utf-8"))
        for context in contexts(bos, eos):
            context = {k: v for k, v in context.items() if v is not None}
            case = {"template": name, "context": context}
            try:
                case["rendered"] = template.render(**context)
            except TemplateError as error:
                case["error"] = str(error)
            cases.append(case)
    header = {"generator": "scripts/make_chat_template_fixtures.py",
              "jinja2_version": jinja2.__version__, "python_version": sys.version.split()[0]}
    lines = [json.dumps(case, ensure_ascii=False, separators=(",", ":")) for case in cases]
    (DATA / "fixtures.json").write_text(
        json.dumps(header, separators=(",", ":"))[:-1] + ',"cases":[\n' + ",\n".join(lines) +
        "\n]}\n", encoding="utf-8")
    print("%d cases, %d errors" % (len(cases), sum("error" in c for c in cases)))


if __name__ == "__main__":
    main()
