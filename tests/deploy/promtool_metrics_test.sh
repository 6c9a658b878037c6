#!/usr/bin/env bash
# Both daemons' real /metrics pass `promtool check metrics` while a job trains, and no series
# carries a label named job or instance: Prometheus attaches those to every target itself, and a
# scraped one would be renamed exported_job (issue 13).
# usage: promtool_metrics_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$(realpath "$1")
source_dir=$(realpath "$2")
. "$source_dir/tests/deploy/lib.sh"
if ! command -v promtool >/dev/null; then
  echo "SKIP: promtool is not installed (scripts/setup.sh installs Debian's prometheus package)"
  exit 77
fi
export OMP_NUM_THREADS=1
deploy_scratch "$build" promtool-metrics
cd "$scratch"

deploy_start coordinator.log "$build/server/lomo-coordinator" --grpc-listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 --data-dir data --ready-file ready.json --init
deploy_wait 60 "coordinator ready file" test -s ready.json
grpc=$(deploy_ready_field ready.json grpc)
http=$(deploy_ready_field ready.json http)
worker_port=$(deploy_free_port)
deploy_start worker.log "$build/worker/lomo-worker" serve --coordinator "$grpc" --device cpu \
  --work-dir work --metrics-listen "127.0.0.1:$worker_port" --worker-id w-promtool

"$build/worker/lomo-worker" init-model model --preset tiny >/dev/null
# Long enough to be scraped while it runs; the script stops it.
cat >job.yaml <<SPEC
name: promtool-metrics
model: {path: $scratch/model}
tokenizer: {kind: bytes}
data: {format: text, train: [$source_dir/README.md], max_length: 64}
optimizer: {name: lomo, lr: 1.0e-3}
training: {batch_size: 2, steps: 100000, log_every: 1, checkpoint_every: 100000}
output: {dir: $scratch/out}
resources: {device: cpu}
SPEC
"$build/client/lomoctl" --coordinator "$grpc" submit job.yaml

has_series() { curl -sf "$1" >scrape.txt && grep -q "$2" scrape.txt; }
deploy_wait 120 "per-job series on the coordinator" \
  has_series "http://$http/metrics" '^lomo_job_step{job_id="'
deploy_wait 120 "training steps on the worker" \
  has_series "http://127.0.0.1:$worker_port/metrics" '^lomo_worker_steps_total [1-9]'

status=0
for target in "coordinator http://$http/metrics" "worker http://127.0.0.1:$worker_port/metrics"; do
  set -- $target
  curl -sf -D "$1.headers" "$2" >"$1.txt"
  echo "== $1: $(grep -c '^[a-z]' "$1.txt") samples"
  if ! promtool check metrics <"$1.txt"; then
    echo "FAIL: promtool check metrics on the $1's /metrics"
    status=1
  fi
  if grep -E '[{,](job|instance)="' "$1.txt"; then
    echo "FAIL: the $1 exposes series labelled job or instance (above)"
    status=1
  fi
  if ! grep -qi '^content-type: text/plain; version=0.0.4; charset=utf-8' "$1.headers"; then
    echo "FAIL: the $1's /metrics content type: $(grep -i '^content-type' "$1.headers")"
    status=1
  fi
  for series in lomo_build_info process_cpu_seconds_total process_resident_memory_bytes \
                process_start_time_seconds process_open_fds; do
    grep -q "^$series[{ ]" "$1.txt" || { echo "FAIL: no $series on the $1"; status=1; }
  done
done
grep -q '^lomo_job_loss{job_id="' coordinator.txt || { echo "FAIL: no lomo_job_loss{job_id}"; status=1; }
[ "$status" -eq 0 ] && echo "PASS: both /metrics are promtool-clean, without job or instance labels"
exit "$status"
