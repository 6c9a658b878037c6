"""The published JSON Schema of the job spec (docs/job-spec.schema.json) against lomo's own
validator (jobspec/job_spec.cc, reached through `lomoctl submit`, which validates before it
dials the coordinator):

- every examples/*.yaml, and the job file of README.md's "Fine-tune a Hugging Face model", is
  valid under the schema, and lomo accepts it too;
- every spec of the invalid corpus below (the rules of tests/unit/job_spec_test.cc's
  kRejections that a schema can express, by the same names) is refused by the schema AND by
  lomo, naming the same field.

usage: job_spec_schema_check.py LOMOCTL SOURCE_DIR
"""
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import jsonschema
import yaml


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's core schema for numbers, as yaml-cpp reads them: PyYAML (YAML 1.1) takes
    "1e-30" for a string and "0x10" for an integer."""


Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers
          if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def with_sections(**sections):
    """The minimal valid spec with `sections` replaced (None removes one), as the C++ test's s()."""
    spec = {"model": {"path": "m"}, "data": {"train": ["a.txt"]}, "training": {"steps": 10}}
    for key, value in sections.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


# (name in kRejections, spec, the field lomo names)
INVALID = [
    ("UnknownTopLevelKey", with_sections(lr=1), "lr"),
    ("UnknownOptimizerKey", with_sections(optimizer={"lrr": 1}), "optimizer.lrr"),
    ("UnknownAdaLomoKey", with_sections(optimizer={"adalomo": {"eps3": 1}}), "optimizer.adalomo.eps3"),
    ("UnknownLossScaleKey", with_sections(precision={"loss_scale": {"init": 1}}),
     "precision.loss_scale.init"),
    ("UnknownResourcesKey", with_sections(resources={"gpus": 8}), "resources.gpus"),
    ("SectionIsAList", with_sections(optimizer=["lomo"]), "optimizer"),
    ("SectionIsAScalar", with_sections(model="out/tiny"), "model"),
    ("NumberIsAString", with_sections(optimizer={"lr": "fast"}), "optimizer.lr"),
    ("NumberIsQuoted", with_sections(optimizer={"lr": "3e-4"}), "optimizer.lr"),
    ("NumberIsAList", with_sections(optimizer={"lr": [1]}), "optimizer.lr"),
    ("NumberIsNull", with_sections(optimizer={"lr": None}), "optimizer.lr"),
    ("IntegerIsAFloat", with_sections(training={"steps": 1.5}), "training.steps"),
    ("IntegerIsHuge", with_sections(priority=9223372036854775808), "priority"),
    ("PriorityIsAFloat", with_sections(priority=1.5), "priority"),
    ("BoolIsYes", with_sections(optimizer={"weight_decay_on_norms": "yes"}),
     "optimizer.weight_decay_on_norms"),
    ("BoolIsANumber", with_sections(training={"steps": 1, "activation_checkpointing": 1}),
     "training.activation_checkpointing"),
    ("StringIsAList", with_sections(name=["a"]), "name"),
    ("StringIsNull", with_sections(tokenizer={"path": None}), "tokenizer.path"),
    ("SeedIsNegative", with_sections(training={"steps": 1, "seed": -1}), "training.seed"),
    ("SeedIsHuge", with_sections(training={"steps": 1, "seed": 18446744073709551616}),
     "training.seed"),
    ("ModelMissing", with_sections(model=None), "model.path"),
    ("ModelPathEmpty", with_sections(model={"path": ""}), "model.path"),
    ("TokenizerKindUnknown", with_sections(tokenizer={"kind": "sentencepiece"}), "tokenizer.kind"),
    ("DataFormatUnknown", with_sections(data={"format": "jsonl", "train": ["a.txt"]}), "data.format"),
    ("DataFormatEvalOnly", with_sections(data={"format": "multiple_choice", "train": ["a.jsonl"]}),
     "data.format"),
    ("DataEvalFormatUnknown", with_sections(data={"train": ["a.txt"], "eval_format": "choices"}),
     "data.eval_format"),
    # A chat format without a template is valid (auto: the model's own), but not with the bytes
    # tokenizer of the base spec, which has no special tokens.
    ("DataChatWithBytesTokenizer", with_sections(data={"format": "chat", "train": ["a.jsonl"]}),
     "tokenizer.kind"),
    ("DataEvalChatWithBytesTokenizer",
     with_sections(data={"format": "jsonl_text", "eval_format": "chat", "train": ["a.jsonl"]}),
     "tokenizer.kind"),
    ("DataChatTemplateUnknown",
     with_sections(data={"format": "chat", "chat_template": "vicuna", "train": ["a.jsonl"]}),
     "data.chat_template"),
    ("DataChatTemplateWithoutChat",
     with_sections(data={"format": "alpaca", "chat_template": "chatml", "train": ["a.jsonl"]}),
     "data.chat_template"),
    ("DataChatWithBytes",
     with_sections(data={"format": "chat", "chat_template": "chatml", "train": ["a.jsonl"]}),
     "tokenizer.kind"),
    ("DataTrainOnPromptWithoutPrompt",
     with_sections(data={"format": "jsonl_text", "train_on_prompt": True, "train": ["a.jsonl"]}),
     "data.train_on_prompt"),
    ("DataPackingOfAStream", with_sections(data={"format": "tokens", "packing": True, "train": ["a"]}),
     "data.packing"),
    ("DataTokenDtypeUnknown",
     with_sections(data={"format": "tokens", "token_dtype": "int32", "train": ["a"]}),
     "data.token_dtype"),
    ("DataOnBadRecordUnknown", with_sections(data={"on_bad_record": "ignore", "train": ["a"]}),
     "data.on_bad_record"),
    ("DataTrainMissing", with_sections(data={"eval": ["b.txt"]}), "data.train"),
    ("DataTrainEmptyList", with_sections(data={"train": []}), "data.train"),
    ("DataTrainIsAMap", with_sections(data={"train": {"a": "b"}}), "data.train"),
    ("DataTrainElementEmpty", with_sections(data={"train": ["a.txt", ""]}), "data.train[1]"),
    ("DataEvalElementEmpty", with_sections(data={"train": ["a.txt"], "eval": [""]}), "data.eval[0]"),
    ("MaxLengthOne", with_sections(data={"train": ["a.txt"], "max_length": 1}), "data.max_length"),
    ("OptimizerNameUnknown", with_sections(optimizer={"name": "adam"}), "optimizer.name"),
    ("LrZero", with_sections(optimizer={"lr": 0}), "optimizer.lr"),
    ("LrNegative", with_sections(optimizer={"lr": -1e-3}), "optimizer.lr"),
    ("ScheduleUnknown", with_sections(optimizer={"schedule": "step"}), "optimizer.schedule"),
    ("WarmupStepsNegative", with_sections(optimizer={"warmup_steps": -1}), "optimizer.warmup_steps"),
    ("WarmupRatioOne", with_sections(optimizer={"warmup_ratio": 1}), "optimizer.warmup_ratio"),
    ("WarmupBoth", with_sections(optimizer={"warmup_steps": 10, "warmup_ratio": 0.1}),
     "optimizer.warmup_ratio"),
    ("WeightDecayNegative", with_sections(optimizer={"weight_decay": -0.01}), "optimizer.weight_decay"),
    ("ClipGradNormZero", with_sections(optimizer={"clip_grad_norm": 0}), "optimizer.clip_grad_norm"),
    ("StochasticRoundingWithoutBf16", with_sections(optimizer={"stochastic_rounding": True}),
     "optimizer.stochastic_rounding"),
    ("StochasticRoundingWithFp16",
     with_sections(optimizer={"stochastic_rounding": True}, precision={"dtype": "fp16"}),
     "optimizer.stochastic_rounding"),
    ("Beta1One", with_sections(optimizer={"beta1": 1}), "optimizer.beta1"),
    ("EpsZero", with_sections(optimizer={"eps": 0}), "optimizer.eps"),
    ("AdaLomoEps1Zero", with_sections(optimizer={"adalomo": {"eps1": 0}}), "optimizer.adalomo.eps1"),
    ("AdaLomoDecayRateZero", with_sections(optimizer={"adalomo": {"decay_rate": 0}}),
     "optimizer.adalomo.decay_rate"),
    ("DtypeUnknown", with_sections(precision={"dtype": "fp8"}), "precision.dtype"),
    ("LossScaleGrowthIntervalZero", with_sections(precision={"loss_scale": {"growth_interval": 0}}),
     "precision.loss_scale.growth_interval"),
    ("LossScaleFactorOne", with_sections(precision={"loss_scale": {"factor": 1}}),
     "precision.loss_scale.factor"),
    ("BatchSizeZero", with_sections(training={"steps": 1, "batch_size": 0}), "training.batch_size"),
    ("NeitherStepsNorEpochs", with_sections(training={"batch_size": 4}), "training.steps"),
    ("TrainingMissing", with_sections(training=None), "training.steps"),
    ("BothStepsAndEpochs", with_sections(training={"steps": 10, "epochs": 1}), "training.epochs"),
    ("StepsZero", with_sections(training={"steps": 0}), "training.steps"),
    ("StepsQuoted", with_sections(training={"steps": "10"}), "training.steps"),
    ("GradientAccumulation", with_sections(training={"steps": 10, "gradient_accumulation_steps": 4}),
     "training.gradient_accumulation_steps"),
    ("EvalBatchesZero", with_sections(training={"steps": 10, "eval_batches": 0}),
     "training.eval_batches"),
    ("LogEveryZero", with_sections(training={"steps": 10, "log_every": 0}), "training.log_every"),
    ("EvalPromptEmpty", with_sections(training={"steps": 10, "eval_prompts": ["a", ""]}),
     "training.eval_prompts[1]"),
    ("EvalMaxNewTokensZero", with_sections(training={"steps": 10, "eval_max_new_tokens": 0}),
     "training.eval_max_new_tokens"),
    ("OutputDirEmpty", with_sections(output={"dir": ""}), "output.dir"),
    ("WorldSizeZero", with_sections(resources={"world_size": 0}), "resources.world_size"),
    ("PackingWithSeveralRanks",
     with_sections(data={"format": "alpaca", "train": ["a.jsonl"], "packing": True},
                   training={"steps": 10, "batch_size": 4}, resources={"world_size": 2}),
     "data.packing"),
    ("DeviceUnknown", with_sections(resources={"device": "tpu"}), "resources.device"),
    ("MaxRestartsNegative", with_sections(resources={"max_restarts": -1}), "resources.max_restarts"),
    ("CollectiveTimeoutZero", with_sections(resources={"collective_timeout_seconds": 0}),
     "resources.collective_timeout_seconds"),
    ("CollectiveTimeoutOverADay", with_sections(resources={"collective_timeout_seconds": 86401}),
     "resources.collective_timeout_seconds"),
    ("RetriesAndMaxRestartsTogether", with_sections(resources={"retries": 1, "max_restarts": 2}),
     "resources.retries"),
]


def lomo_verdict(lomoctl, spec_file):
    """lomo's own answer: None when the spec validates (lomoctl then fails to dial port 1), else
    the output naming the problem."""
    run = subprocess.run([lomoctl, "--coordinator", "127.0.0.1:1", "--timeout", "2", "submit",
                          str(spec_file)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    if run.returncode == 3 and f"{spec_file}: " in output:
        return output
    return None


def readme_job(source_dir, scratch):
    """The job file README.md's walkthrough shows: the indented block that starts "name:"."""
    text = (source_dir / "README.md").read_text()
    section = text.split("## Fine-tune a Hugging Face model", 1)[-1].split("\n## ", 1)[0]
    match = re.search(r"^( +)name: .*?(?=\n\n)", section, re.M | re.S)
    if not match:
        return None
    indent = len(match.group(1))
    path = scratch / "readme-walkthrough.yaml"
    path.write_text("\n".join(line[indent:] for line in match.group(0).splitlines()) + "\n")
    return path


def main():
    lomoctl, source_dir = sys.argv[1], pathlib.Path(sys.argv[2])
    schema = json.loads((source_dir / "docs/job-spec.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    failures = []

    scratch_dir = tempfile.TemporaryDirectory()
    examples = sorted((source_dir / "examples").glob("*.yaml"))
    if not examples:
        failures.append("no examples/*.yaml found")
    walkthrough = readme_job(source_dir, pathlib.Path(scratch_dir.name))
    if walkthrough is None:
        failures.append("README.md: no job file in \"Fine-tune a Hugging Face model\"")
    else:
        examples.append(walkthrough)
    for path in examples:
        spec = yaml.load(path.read_text(), Loader=Yaml12Loader)
        errors = [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                  for e in validator.iter_errors(spec)]
        if errors:
            failures.append(f"{path.name}: the schema refuses an example: {errors}")
        refused = lomo_verdict(lomoctl, path)
        if refused:
            failures.append(f"{path.name}: lomo refuses an example: {refused}")
        print(f"example {path.name}: valid under the schema and lomo")

    with tempfile.TemporaryDirectory() as scratch:
        for name, spec, field in INVALID:
            if validator.is_valid(spec):
                failures.append(f"{name}: the schema accepts a spec lomo refuses ({field})")
            spec_file = pathlib.Path(scratch) / f"{name}.json"
            spec_file.write_text(json.dumps(spec))
            refused = lomo_verdict(lomoctl, spec_file)
            if not refused or f": {field}: " not in refused:
                failures.append(f"{name}: lomo does not refuse it naming {field}: {refused}")
    print(f"invalid corpus: {len(INVALID)} specs refused by the schema and by lomo")

    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
