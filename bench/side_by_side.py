#!/usr/bin/env python3
"""lomo against PyTorch + the official LOMO optimizer, same model, tokens and threads.

Run through bench/side_by_side.sh, which provides the Python environment (torch, lomo-optim,
transformers) and the paths of the built programs. What it does:

1. Writes one randomly initialised LLaMA in Hugging Face layout (transformers' LlamaForCausalLM,
   seeded) and one file of random token ids (uint16, B*T+1 of them: B rows of T inputs and their
   next-token targets, the rows lomo's `tokens` data format cuts).
2. For each repetition and precision, alternating which side goes first: runs
   - lomo: the real binary path, `lomo-worker train SPEC` (data.format tokens, optimizer lomo,
     precision.dtype fp32, precision.matmul fp32|bf16); the step times are its metrics.jsonl's
     step_seconds (batch + forward + fused LOMO backward/update);
   - PyTorch: `side_by_side.py torch-run` in its own process: LlamaForCausalLM from the same
     directory, lomo_optim.Lomo (its fused update runs in per-parameter gradient hooks during
     backward), `optimizer.fused_backward(loss, lr)` each step; bf16 = torch.autocast("cpu",
     bfloat16) around the forward, fp32 weights, as lomo's bf16 matmul mode keeps them.
   Both with OMP_NUM_THREADS=threads (and torch.set_num_threads). Peak RSS is each process's
   ru_maxrss (os.wait4).
3. Measures the GEMM roofline with the library lomo uses (oneDNN, `engine_bench --steps 0`: best
   of 5 at 2048^3, fp32 and bf16), once per repetition, and keeps the best.

Prints tokens/s (each run's median step; the best and the median run), peak RSS (the largest),
the ratios lomo/PyTorch, the losses of both sides (the same weights and tokens give the same
first loss: the check that both run the same model), and the fraction of the GEMM roofline that
each side's executed matmul FLOPs reach.
"""

import argparse
import array
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", required=True, help="the lomo-worker program")
    parser.add_argument("--engine-bench", required=True, help="the engine_bench program")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first, not measured")
    parser.add_argument("--reps", type=int, default=3, help="alternating runs of each side")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0))
                        or os.cpu_count())
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 or fp32,bf16")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="default: a temporary directory, removed at the end")
    args = parser.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p]
    for precision in args.precisions:
        if precision not in ("fp32", "bf16"):
            parser.error(f"--precisions: expected fp32 and/or bf16, got {precision}")
    if args.steps < 1 or args.warmup < 0 or args.reps < 1 or args.threads < 1:
        parser.error("--steps, --reps and --threads must be >= 1, --warmup >= 0")
    return args


def thread_env(threads):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_measured(command, env, log_path):
    """Runs a command; returns (exit status, peak RSS in MiB, wall seconds). Output to log_path.

    The peak is the child's ru_maxrss, which counts the pages it shares with this process between
    fork and exec: so this driver imports neither torch nor numpy (it stays at ~10 MiB)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024.0, time.monotonic() - start


def fail(what, log_path):
    with open(log_path) as log:
        tail = log.read()[-3000:]
    sys.exit(f"side_by_side: {what} failed; the end of {log_path}:\n{tail}")


# --- the shared inputs ---------------------------------------------------------------------------

def write_model_main(argv):
    """Writes the random LLaMA (in its own process: the driver stays small, see run_measured)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    for flag in ("--vocab", "--hidden", "--intermediate", "--layers", "--heads", "--kv-heads",
                 "--seq", "--seed"):
        parser.add_argument(flag, type=int, required=True)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(args.dir, safe_serialization=True)


def write_model(args, workdir, directory):
    command = [sys.executable, os.path.abspath(__file__), "write-model", "--dir", directory]
    for flag in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "seq", "seed"):
        command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    log_path = os.path.join(workdir, "write-model.log")
    status, _, _ = run_measured(command, os.environ, log_path)
    if status != 0:
        fail("writing the model", log_path)


def parameter_count(args):
    head_dim = args.hidden // args.heads
    per_layer = (args.hidden * head_dim * (2 * args.heads + 2 * args.kv_heads)
                 + 3 * args.hidden * args.intermediate + 2 * args.hidden)
    return args.layers * per_layer + 2 * args.vocab * args.hidden + args.hidden


def write_tokens(args, path):
    """B*T+1 uniform random ids (a seeded Python RNG: the driver imports no numpy or torch)."""
    rng = random.Random(args.seed)
    ids = array.array("H", (rng.randrange(args.vocab) for _ in range(args.batch * args.seq + 1)))
    if sys.byteorder != "little":
        ids.byteswap()
    with open(path, "wb") as f:
        ids.tofile(f)


def matmul_flops_per_step(args):
    """Executed matmul FLOPs of one step (forward + backward), as engine_bench counts them: 6 x
    every weight but the embedding (a lookup) x tokens, plus attention's full T x T square."""
    head_dim = args.hidden // args.heads
    per_layer = (args.hidden * head_dim * (2 * args.heads + 2 * args.kv_heads)
                 + 3 * args.hidden * args.intermediate)
    weights = args.layers * per_layer + args.vocab * args.hidden  # the LM head
    tokens = args.batch * args.seq
    attention = 12.0 * args.layers * args.batch * args.heads * args.seq * args.seq * head_dim
    return 6.0 * weights * tokens + attention


# --- one run of each side ------------------------------------------------------------------------

def lomo_run(args, precision, workdir, model_dir, tokens_path, tag):
    out_dir = os.path.join(workdir, f"lomo-{tag}")
    shutil.rmtree(out_dir, ignore_errors=True)
    spec = {
        "name": f"side-by-side-{tag}",
        "model": {"path": model_dir},
        "tokenizer": {"kind": "bytes"},
        "data": {"format": "tokens", "train": [tokens_path], "token_dtype": "uint16",
                 "max_length": args.seq, "shuffle": False},
        "optimizer": {"name": "lomo", "lr": args.lr, "schedule": "constant",
                      "clip_grad_norm": None},
        "precision": {"dtype": "fp32", "matmul": precision},
        "training": {"batch_size": args.batch, "steps": args.warmup + args.steps,
                     "log_every": 1, "seed": args.seed, "activation_checkpointing": False},
        "output": {"dir": out_dir},
        "resources": {"device": "cpu"},
    }
    spec_path = os.path.join(workdir, f"lomo-{tag}.yaml")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)  # JSON is YAML
    log_path = os.path.join(workdir, f"lomo-{tag}.log")
    status, rss, wall = run_measured([args.worker, "train", spec_path], thread_env(args.threads),
                                     log_path)
    if status != 0:
        fail(f"lomo-worker train {spec_path} (exit {status})", log_path)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {"step_seconds": [line["step_seconds"] for line in lines],
            "losses": [line["loss"] for line in lines], "rss_mib": rss, "wall": wall}


def torch_run(args, precision, workdir, model_dir, tokens_path, tag):
    result_path = os.path.join(workdir, f"torch-{tag}.json")
    command = [sys.executable, os.path.abspath(__file__), "torch-run", "--model", model_dir,
               "--tokens", tokens_path, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.warmup + args.steps), "--threads", str(args.threads),
               "--precision", precision, "--lr", str(args.lr), "--out", result_path]
    log_path = os.path.join(workdir, f"torch-{tag}.log")
    status, rss, wall = run_measured(command, thread_env(args.threads), log_path)
    if status != 0:
        fail(f"the PyTorch run (exit {status})", log_path)
    with open(result_path) as f:
        result = json.load(f)
    result.update(rss_mib=rss, wall=wall)
    return result


def torch_run_main(argv):
    """The PyTorch side, in its own process (so its peak RSS is its own)."""
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--tokens", "--precision", "--out"):
        parser.add_argument(flag, required=True)
    for flag in ("--batch", "--seq", "--steps", "--threads"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from lomo_optim import Lomo
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                             attn_implementation="sdpa")
    model.train()
    optimizer = Lomo(model, lr=args.lr)
    tokens = torch.from_numpy(np.fromfile(args.tokens, dtype=np.uint16).astype(np.int64))
    rows = [tokens[r * args.seq:r * args.seq + args.seq + 1] for r in range(args.batch)]
    batch = torch.stack(rows)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    # The update must be LOMO's: every parameter carries its gradient hook, no .grad survives a
    # step, and the weights move.
    params = [p for p in model.parameters() if p.requires_grad]
    hooked = sum(1 for p in params if p._backward_hooks)
    probe = model.model.layers[0].self_attn.q_proj.weight
    before = probe.detach().clone()

    step_seconds, losses = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        optimizer.fused_backward(loss, args.lr)
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        del logits, loss
        if step == 0:
            leftover = sum(1 for p in params if p.grad is not None)
            moved = not torch.equal(before, probe.detach())
            if hooked != len(params) or leftover or not moved:
                sys.exit(f"not a LOMO step: {hooked}/{len(params)} parameters hooked, "
                         f"{leftover} .grad left, weights moved: {moved}")
    with open(args.out, "w") as f:
        json.dump({"step_seconds": step_seconds, "losses": losses, "torch": torch.__version__,
                   "hooked": hooked, "parameters": len(params),
                   "threads": torch.get_num_threads(),
                   "bf16_gemm": torch.backends.mkldnn.is_available()}, f)


# --- the roofline ---------------------------------------------------------------------------------

def gemm_rooflines(args, workdir):
    """GFLOP/s at 2048^3 from engine_bench --steps 0 (oneDNN, lomo's library), fp32 and bf16."""
    log_path = os.path.join(workdir, "engine_bench.log")
    command = [args.engine_bench, "--steps", "0", "--batch", str(args.batch), "--seq",
               str(args.seq)]
    if "bf16" in args.precisions:
        command += ["--precision", "bf16"]
    status, _, _ = run_measured(command, thread_env(args.threads), log_path)
    if status != 0:
        fail("engine_bench --steps 0", log_path)
    text = open(log_path).read()
    rates = {"fp32": float(re.search(r"sgemm 2048\^3: ([\d.]+)", text).group(1))}
    bf16 = re.search(r"bf16 matmul \(([^)]*)\): 2048\^3 ([\d.]+)", text)
    if bf16:
        rates["bf16"] = float(bf16.group(2))
    kernel = re.search(r"gemm: (.*)", text).group(1)
    return rates, kernel


# --- the report -----------------------------------------------------------------------------------

def tokens_per_second(args, run):
    measured = run["step_seconds"][args.warmup:]
    return args.batch * args.seq / statistics.median(measured)


def cpu_model():
    with open("/proc/cpuinfo") as f:
        match = re.search(r"model name\s*:\s*(.*)", f.read())
    return match.group(1) if match else "unknown"


def report(args, results, rooflines, kernel, parameters):
    flops = matmul_flops_per_step(args)
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} CPUs visible, {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"model: LLaMA {parameters / 1e6:.2f}M parameters (vocab {args.vocab}, hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
          f"{args.intermediate}, untied head), batch {args.batch} x {args.seq}, LOMO lr {args.lr}")
    print(f"steps per run: {args.warmup} warm-up + {args.steps} measured; {args.reps} alternating "
          f"runs per side; a run's tokens/s is its median step's; best and median over runs "
          f"(ratios and roofline from the best: other load on the machine only slows a run)")
    print(f"GEMM roofline (oneDNN via engine_bench, best at 2048^3; {kernel}): " +
          ", ".join(f"{p} {r:.1f} GFLOP/s" for p, r in rooflines.items()))
    print(f"executed matmul FLOPs per step: {flops / 1e9:.1f} G (embedding excluded, full "
          f"attention square)\n")
    header = (f"{'precision':9} {'side':18} {'best tok/s':>10} {'median':>7} {'runs':>16} "
              f"{'peak RSS MiB':>12} {'roofline':>8} {'first loss':>10} {'last loss':>10}")
    print(header)
    print("-" * len(header))
    summary = {}
    for precision in args.precisions:
        for side, label in (("lomo", "lomo"), ("torch", "PyTorch+lomo-optim")):
            runs = results[precision][side]
            rates = [tokens_per_second(args, run) for run in runs]
            rate = max(rates)
            rss = max(run["rss_mib"] for run in runs)
            fraction = flops * rate / (args.batch * args.seq) / 1e9 / rooflines[precision]
            summary[(precision, side)] = (rate, rss)
            print(f"{precision:9} {label:18} {rate:10.1f} {statistics.median(rates):7.1f} "
                  f"{' '.join(f'{r:.0f}' for r in rates):>16} {rss:12.1f} {fraction:8.1%} "
                  f"{runs[0]['losses'][0]:10.4f} {runs[0]['losses'][-1]:10.4f}")
    print()
    for precision in args.precisions:
        rate_l, rss_l = summary[(precision, "lomo")]
        rate_t, rss_t = summary[(precision, "torch")]
        print(f"{precision}: lomo / PyTorch tokens/s {rate_l / rate_t:.2f}x, peak RSS "
              f"{rss_l / rss_t:.2f}x")
    if "fp32" in args.precisions and "bf16" in args.precisions:
        lomo_bf16 = summary[("bf16", "lomo")][0]
        print(f"lomo bf16 / PyTorch fp32 tokens/s "
              f"{lomo_bf16 / summary[('fp32', 'torch')][0]:.2f}x; "
              f"lomo bf16 / PyTorch bf16 {lomo_bf16 / summary[('bf16', 'torch')][0]:.2f}x")
    first = results[args.precisions[0]]["torch"][0]
    print(f"PyTorch {first['torch']} ({first['threads']} intra-op threads, oneDNN "
          f"{'on' if first['bf16_gemm'] else 'off'}): lomo_optim.Lomo's gradient hook on "
          f"{first['hooked']}/{first['parameters']} parameters, no .grad left after a step")


def main(argv):
    args = parse_args(argv)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs before the runs: other work "
              f"competes for the cores; repeat on a quiet machine before trusting the figures")
    workdir = args.workdir or tempfile.mkdtemp(prefix="lomo_side_by_side.")
    os.makedirs(workdir, exist_ok=True)
    try:
        model_dir = os.path.join(workdir, "model")
        tokens_path = os.path.join(workdir, "tokens.u16")
        write_model(args, workdir, model_dir)
        parameters = parameter_count(args)
        write_tokens(args, tokens_path)
        results = {p: {"lomo": [], "torch": []} for p in args.precisions}
        rooflines, kernel = {}, ""
        for rep in range(args.reps):
            rates, kernel = gemm_rooflines(args, workdir)
            for precision, rate in rates.items():
                rooflines[precision] = max(rooflines.get(precision, 0.0), rate)
            for precision in args.precisions:
                sides = ("lomo", "torch") if rep % 2 == 0 else ("torch", "lomo")
                for side in sides:
                    run = lomo_run if side == "lomo" else torch_run
                    result = run(args, precision, workdir, model_dir, tokens_path,
                                 f"{precision}-{rep}")
                    results[precision][side].append(result)
                    print(f"rep {rep + 1}/{args.reps} {precision} {side:5}: "
                          f"{tokens_per_second(args, result):7.1f} tokens/s, peak RSS "
                          f"{result['rss_mib']:.0f} MiB, losses "
                          f"{' '.join(f'{l:.4f}' for l in result['losses'])}", flush=True)
        report(args, results, rooflines, kernel, parameters)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "torch-run":
        torch_run_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "write-model":
        write_model_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
