#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for the moment a GPU machine is available: the
# backend kernel suite on the GPU, the gpu-labelled tests (whole model and optimizers GPU vs CPU,
# NCCL), the kernel suite under compute-sanitizer, and the GPU benchmark rows of
# docs/PERFORMANCE.md; then a short summary. Sized to finish within 8 minutes on one H100.
#
#   scripts/gpu_check.sh                      build with CUDA here (needs scripts/setup.sh's packages)
#   scripts/gpu_check.sh --bundle B.tar.xz    use binaries from scripts/gpu_bundle.sh (a GPU machine
#                                             without the build dependencies)
#   options: --out DIR (logs; default gpu-check-out), --quick (tests only, no benchmark),
#            --no-torch (no PyTorch rows: they take a minute, and one run per card is enough)
set -uo pipefail
cd "$(dirname "$0")/.."

bundle="" out="gpu-check-out" quick=0 torch_rows=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --no-torch) torch_rows=0; shift ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
say() { echo "$*" | tee -a "$log"; }

say "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  say "gpu_check: no NVIDIA GPU here (nvidia-smi -L failed): nothing to check"
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$log"

if [[ -n "$bundle" ]]; then
  bin="$(mktemp -d)/lomo-gpu"
  mkdir -p "$bin"
  tar -xJf "$bundle" -C "$bin" || { say "gpu_check: cannot unpack $bundle"; exit 2; }
  # CUDA's own libraries come from the machine: the toolkit's, or the ones pip installed.
  cuda_dirs=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib \
    /usr/lib/x86_64-linux-gnu /opt /usr/local/lib -maxdepth 7 \
    \( -name 'libcublasLt.so.13' -o -name 'libnccl.so.2' -o -name 'libcudart.so.13' \) \
    -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
  export LD_LIBRARY_PATH="$bin/lib:${cuda_dirs}:${LD_LIBRARY_PATH:-}"
  tests="$bin" benches="$bin" programs="$bin"
else
  build=build-gpu
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOMO_CUDA=ON -DLOMO_WERROR=ON \
    >>"$log" 2>&1 || { say "gpu_check: configure failed (see $log)"; exit 2; }
  cmake --build "$build" -j"$(nproc)" --target backend_kernels_test gpu_model_test \
    gpu_generation_test rmsnorm_cuda_test gpu_bench lomo-worker lomo-workerd lomo-coordinator lomoctl \
    $(grep -q nccl_communicator_test tests/CMakeLists.txt && echo nccl_communicator_test) \
    >>"$log" 2>&1 || { say "gpu_check: build failed (see $log)"; exit 2; }
  tests="$build/tests" benches="$build/bench" programs="$(mktemp -d)"
  ln -s "$PWD/$build/worker/lomo-worker" "$PWD/$build/worker/lomo-workerd" \
    "$PWD/$build/server/lomo-coordinator" "$PWD/$build/client/lomoctl" "$programs/"
fi

failures=0
run() {  # run NAME TIMEOUT COMMAND...: logs to $out/NAME.log, one summary line
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local tail_line
  tail_line=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$name.log" | tr '\n' ' ')
  say "$(printf '%-28s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$tail_line")"
  if [[ $rc -ne 0 ]]; then
    failures=$((failures + 1))
    grep -E 'FAILED|Failure|error|Error|what\(\)' "$out/$name.log" | head -40 | tee -a "$log"
  fi
}

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
say "== tests"
run backend_kernels 300 "$tests/backend_kernels_test"
run gpu_model 300 "$tests/gpu_model_test"
run gpu_generation 120 "$tests/gpu_generation_test"
run rmsnorm_cuda 120 "$tests/rmsnorm_cuda_test"
[[ -x "$tests/nccl_communicator_test" ]] && run nccl_communicator 180 "$tests/nccl_communicator_test"
grep -hE '^\[[A-Za-z0-9]+\] ' "$out/gpu_model.log" | tee -a "$log"

say "== end to end: the product's entry points on the GPU (examples/tiny-lomo.yaml, 60 steps)"
e2e="$(mktemp -d)"
"$programs/lomo-worker" init-model "$e2e/tiny-llama" --preset tiny >>"$log" 2>&1
spec=(examples/tiny-lomo.yaml --set "model.path=$e2e/tiny-llama" --set training.steps=60
  --set training.checkpoint_every=30)
step60() {  # the loss at step 60 of a run's metrics.jsonl
  grep -E '"step": ?60[,}]' "$1/metrics.jsonl" | head -1 | grep -oE '"loss": ?[0-9.e+-]+' |
    cut -d: -f2
}
# fp32 on both devices (the GPU in full fp32 products), then bf16 weights with stochastic rounding
# (the GPU then multiplies in TF32): the step-60 losses must agree to 1e-4 and 2e-2 relative.
for dtype in fp32 bf16; do
  for device in cpu cuda; do
    run "train_${dtype}_$device" 120 "$programs/lomo-worker" train "${spec[@]}" \
      --set "resources.device=$device" --set "precision.dtype=$dtype" \
      --set optimizer.stochastic_rounding=$([[ $dtype == bf16 ]] && echo true || echo false) \
      --set "output.dir=$e2e/train-$dtype-$device"
  done
  cpu_loss=$(step60 "$e2e/train-$dtype-cpu") cuda_loss=$(step60 "$e2e/train-$dtype-cuda")
  tolerance=$([[ $dtype == fp32 ]] && echo 1e-4 || echo 2e-2)
  if awk -v a="$cpu_loss" -v b="$cuda_loss" -v t="$tolerance" \
    'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && b != "" && d <= t * a) }'; then
    say "  $dtype step-60 loss: cpu $cpu_loss, cuda $cuda_loss (within $tolerance relative)"
  else
    say "  $dtype step-60 loss: cpu $cpu_loss, cuda $cuda_loss: NOT within $tolerance relative"
    failures=$((failures + 1))
  fi
done
# A GPU gang rank's path on one GPU: a world of one rank started as a gang rank reduces its
# gradients over NCCL (and host values over Gloo): the same step-60 loss as the plain run, exactly
# (a one-rank NCCL sum is a copy). Two ranks need two GPUs (tests labelled gpu-multi).
run train_fp32_cuda_nccl_rank 120 "$programs/lomo-worker" train "${spec[@]}" \
  --set resources.device=cuda --set precision.dtype=fp32 --set optimizer.stochastic_rounding=false \
  --set "output.dir=$e2e/train-fp32-cuda-nccl" --rank 0 --world-size 1 \
  --rendezvous "$(mktemp -d)"
nccl_loss=$(step60 "$e2e/train-fp32-cuda-nccl") cuda_loss=$(step60 "$e2e/train-fp32-cuda")
if [[ -n "$nccl_loss" && "$nccl_loss" == "$cuda_loss" ]]; then
  say "  fp32 step-60 loss as a one-rank NCCL gang: $nccl_loss (the same as the plain run)"
else
  say "  fp32 step-60 loss as a one-rank NCCL gang: '$nccl_loss' vs plain '$cuda_loss': DIFFERENT"
  failures=$((failures + 1))
fi
grep -hoE '"tokens_per_second": ?[0-9.e+-]+' "$e2e/train-fp32-cuda/metrics.jsonl" | tail -1 |
  sed 's/^/  fp32 cuda /' | tee -a "$log"
# The GPU run's checkpoint in transformers (the image's python has torch and transformers).
if python3 -c 'import transformers, torch' 2>/dev/null; then
  run transformers_load 120 python3 - "$e2e/train-fp32-cuda/checkpoints/step-00000060" <<'PY'
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor([list(b"lomo trains on the GPU")])
out = model(input_ids=ids, labels=ids)
assert torch.isfinite(out.logits).all(), "non-finite logits"
print(f"transformers loaded {sys.argv[1]}: {type(model).__name__}, loss {out.loss.item():.4f}")
PY
  cat "$out/transformers_load.log" | tee -a "$log"
fi
# Through the control plane: coordinator, a worker daemon on GPU 0, lomoctl submit --watch.
# Ports the kernel says are free now (a fixed pair could be taken on a shared machine); the trap
# stops both servers however this script ends.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
grpc_port=$(free_port) http_port=$(free_port)
"$programs/lomo-coordinator" --grpc-listen "127.0.0.1:$grpc_port" \
  --http-listen "127.0.0.1:$http_port" --data-dir "$e2e/coordinator" --init >"$out/coordinator.log" 2>&1 &
coordinator=$!
"$programs/lomo-worker" serve --coordinator "127.0.0.1:$grpc_port" --device 0 --worker-id gpu0 \
  --work-dir "$e2e/worker" >"$out/worker.log" 2>&1 &
worker=$!
trap 'kill "$worker" "$coordinator" 2>/dev/null' EXIT
sleep 3
run lomoctl_submit_cuda 150 "$programs/lomoctl" --coordinator "127.0.0.1:$grpc_port" submit "${spec[@]}" \
  --set resources.device=cuda --set "output.dir=$e2e/ignored" --watch
"$programs/lomoctl" --coordinator "127.0.0.1:$grpc_port" list 2>&1 | tee -a "$log"
curl -s "http://127.0.0.1:$http_port/v1/jobs" 2>/dev/null | head -c 1500 | tee -a "$log"
echo | tee -a "$log"
kill "$worker" "$coordinator" 2>/dev/null
wait "$worker" "$coordinator" 2>/dev/null
grep -iE 'cuda|H100|error' "$out/worker.log" | head -5 | tee -a "$log"

if [[ $quick -eq 0 ]]; then
  say "== benchmark (bench/gpu_bench; random weights, real shapes)"
  bench() {  # bench NAME ARGS...
    local name="$1"
    shift
    run "bench_$name" 240 "$benches/gpu_bench" "$@"
    grep -vE '^\s*$' "$out/bench_$name.log" | tee -a "$log"
  }
  # bf16 weights multiply as stored on bf16 tensor cores (Backend::MatmulPrecision::kBf16), as
  # the trainer's precision.matmul auto does on a GPU; one TF32 row (the earlier default) compares.
  bench 7b_s512_b8_ckpt_lomo --model 7b --seq 512 --batch 8 --checkpointing on --steps 2
  bench 7b_s512_b8_ckpt_lomo_tf32 --model 7b --seq 512 --batch 8 --checkpointing on --steps 2 \
    --matmul tf32
  bench 7b_s1024_b1_lomo --model 7b --seq 1024 --batch 1 --checkpointing off --steps 3
  bench 7b_s1024_b1_lomo_clip --model 7b --seq 1024 --batch 1 --checkpointing off --steps 3 \
    --optimizer lomo-clip
  bench 7b_s1024_b1_adalomo --model 7b --seq 1024 --batch 1 --checkpointing off --steps 3 \
    --optimizer adalomo
  bench 7b_s1024_b1_profile --model 7b --seq 1024 --batch 1 --checkpointing off --steps 2 \
    --profile-ops
  bench 7b_s1024_b8_ckpt_lomo --model 7b --seq 1024 --batch 8 --checkpointing on --steps 1
  bench 7b_s1024_b4_lomo --model 7b --seq 1024 --batch 4 --checkpointing off --steps 2
  # PyTorch with the official LOMO optimizer on the same card and shapes (bench/gpu_torch_lomo.py;
  # needs torch with CUDA, transformers and lomo-optim: skipped, saying so, where they are absent).
  if [[ $torch_rows -eq 0 ]]; then
    say "  torch_lomo: skipped (--no-torch)"
  elif python3 -c 'import torch, transformers, lomo_optim' 2>/dev/null; then
    for row in "--seq 1024 --batch 1 --checkpointing off" "--seq 512 --batch 8 --checkpointing on" \
      "--seq 1024 --batch 4 --checkpointing off"; do
      name="torch_lomo_$(echo "$row" | tr -d '-' | tr ' ' '_')"
      # shellcheck disable=SC2086  # the row is a list of flags
      run "$name" 240 python3 bench/gpu_torch_lomo.py --model 7b $row --steps 2
      grep '^torch_lomo' "$out/$name.log" | tee -a "$log"
    done
  else
    say "  torch_lomo: skipped (python3 lacks torch, transformers or lomo_optim)"
  fi
  # Too large on purpose: the out-of-memory error names the device and the memory in use by kind.
  # A missing message counts as a failure (the probe proves the message, not only the refusal).
  # Its output goes to a file first: gpu_bench exits non-zero here, by design.
  timeout 120 "$benches/gpu_bench" --model 7b --seq 4096 --batch 16 --checkpointing off \
    --steps 1 >"$out/oom_message.log" 2>&1
  oom_line=$(grep -E 'out of memory on cuda:[0-9]+ allocating .* in use .*parameters' \
    "$out/oom_message.log" | head -1)
  if [[ -n "$oom_line" ]]; then
    say "$oom_line"
  else
    say "FAIL oom_message: no 'out of memory on cuda:N allocating ... in use ... parameters' line"
    failures=$((failures + 1))
  fi
fi
# Out-of-bounds accesses and races the comparisons could miss (slow: after the main figures).
if command -v compute-sanitizer >/dev/null; then
  run sanitizer_memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$tests/backend_kernels_test" --gtest_filter='*cuda*'
fi
if [[ $quick -eq 0 ]]; then
  bench 13b_s512_b8_ckpt_lomo --model 13b --seq 512 --batch 8 --checkpointing on --steps 1
  bench 30b_s512_b8_ckpt_lomo --model 30b --seq 512 --batch 8 --checkpointing on --steps 1
fi

say "== summary: $failures failing step(s); logs in $out/"
[[ $failures -eq 0 ]]
