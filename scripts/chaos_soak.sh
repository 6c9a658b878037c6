#!/usr/bin/env bash
# The chaos soak (issue 10; not in CI): runs tests/integration/chaos_test.cc's seeded schedule for
# many seeds, each a real coordinator + three `lomo-worker serve` daemons training a 2-rank job hit
# by faults, and sums what it printed: faults injected, restarts, preemptions, steps recomputed,
# and every seed that failed or diverged from the uninterrupted run (with its replay line).
#
#   scripts/chaos_soak.sh [--build DIR] [--seeds FIRST:LAST] [--faults N] [--kinds LIST] [--out DIR]
#     --build   a build directory with chaos_test built (default build)
#     --seeds   the seeds to run, inclusive (default 1:20)
#     --faults  faults per run (LOMO_CHAOS_COUNT; default 6)
#     --kinds   LOMO_CHAOS_FAULTS (default trainer,daemon,drain,coordinator)
#     --out     where each seed's log goes (default chaos-soak-out)
# Replay one seed: LOMO_CHAOS_SEED=N LOMO_CHAOS_COUNT=K LOMO_CHAOS_FAULTS=... DIR/tests/chaos_test
set -uo pipefail
cd "$(dirname "$0")/.."

build="build" seeds="1:20" faults=6 kinds="trainer,daemon,drain,coordinator" out="chaos-soak-out"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --faults) faults="$2"; shift 2 ;;
    --kinds) kinds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "chaos_soak: unknown argument $1" >&2; exit 2 ;;
  esac
done
binary="$build/tests/chaos_test"
if [[ ! -x "$binary" ]]; then
  echo "chaos_soak: $binary not found; build it: cmake --build $build --target chaos_test" >&2
  exit 2
fi
mkdir -p "$out"
export OMP_NUM_THREADS=1

runs=0 failed=0 injected=0 restarts=0 preempted=0 recomputed=0 diverged=0
failures=()
for ((seed = ${seeds%%:*}; seed <= ${seeds##*:}; seed++)); do
  log="$out/seed-$seed.log"
  start=$(date +%s)
  LOMO_CHAOS_SEED=$seed LOMO_CHAOS_COUNT=$faults LOMO_CHAOS_FAULTS=$kinds \
    timeout 600 "$binary" >"$log" 2>&1
  rc=$?
  runs=$((runs + 1))
  # chaos: seed S faults I of N restarts R preempted P steps_recomputed C state STATE
  summary=$(grep -m1 '^chaos: seed .* faults ' "$log")
  read -r i r p c <<<"$(sed -E 's/.* faults ([0-9]+) of [0-9]+ restarts ([0-9]+) preempted ([0-9]+) steps_recomputed ([0-9]+).*/\1 \2 \3 \4/' <<<"${summary:-}")"
  injected=$((injected + ${i:-0})) restarts=$((restarts + ${r:-0}))
  preempted=$((preempted + ${p:-0})) recomputed=$((recomputed + ${c:-0}))
  grep -q 'differs from the uninterrupted run' "$log" && diverged=$((diverged + 1))
  printf 'seed %3d  rc %d  %4ds  %s\n' "$seed" "$rc" $(($(date +%s) - start)) \
    "${summary:-no summary (see $log)}"
  if [[ $rc -ne 0 ]]; then
    failed=$((failed + 1))
    failures+=("seed $seed: $(grep -m1 '^chaos schedule' "$log") ($log)")
  fi
done

echo
echo "runs $runs  failed $failed  faults injected $injected  restarts $restarts  preempted $preempted"
echo "steps recomputed $recomputed  runs with divergent weights $diverged"
for f in "${failures[@]}"; do echo "FAILED $f"; done
[[ $failed -eq 0 ]]
