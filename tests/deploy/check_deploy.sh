#!/usr/bin/env bash
# Offline checks of deploy/ (issue 13, CI). One check per ctest test:
#   manifests   render every overlay with `kubectl kustomize`, validate it against the Kubernetes
#               schema (kubernetes-validate, strict, in a venv made under the build directory)
#               and lint it and deploy/ with yamllint; check the references between its objects
#               (tests/deploy/manifest_references.py: selectors, ports, volumes, the ServiceMonitor)
#   units       systemd-analyze verify on deploy/systemd (binaries mapped to the build dir)
#   prometheus  promtool check config / check rules / test rules on deploy/prometheus
# usage: check_deploy.sh CHECK BUILD_DIR SOURCE_DIR   (exit 77: skipped, with the reason printed)
set -euo pipefail
check=$1
build=$(realpath "$2")
source_dir=$(realpath "$3")
deploy="$source_dir/deploy"
. "$source_dir/tests/deploy/lib.sh"
# The Kubernetes release whose schema the manifests must satisfy (the oldest one supported).
kubernetes_version=1.30.0
kubernetes_validate_pin="kubernetes-validate==1.37.0"

need() {
  command -v "$1" >/dev/null || { echo "SKIP: $1 is not installed ($2)"; exit 77; }
}

# The venv with kubernetes-validate, made once per build directory.
validator() {
  local venv="$build/deploy-venv"
  if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv" >/dev/null
    if ! timeout 300 "$venv/bin/pip" install -q "$kubernetes_validate_pin" >"$venv.log" 2>&1; then
      if ! timeout 20 "$venv/bin/pip" download -q --no-deps -d "$scratch" pip >/dev/null 2>&1; then
        echo "SKIP: PyPI is unreachable, so kubernetes-validate cannot be installed:"
        tail -3 "$venv.log"
        rm -rf "$venv"
        exit 77
      fi
      cat "$venv.log"
      echo "FAIL: pip install $kubernetes_validate_pin"
      exit 1
    fi
  fi
  echo "$venv/bin/kubernetes-validate"
}

check_manifests() {
  need kubectl "it renders deploy/k8s"
  need yamllint "scripts/setup.sh installs it"
  deploy_scratch "$build" deploy-manifests
  local validate status=0 overlay name
  validate=$(validator) || exit $?
  # The venv's Python has PyYAML (kubernetes-validate needs it) for the cross-reference check.
  references=("$(dirname "$validate")/python" "$source_dir/tests/deploy/manifest_references.py")
  "${references[@]}" --self-test || status=1
  yamllint -s -c "$deploy/.yamllint" "$deploy" || status=1
  for overlay in "$deploy"/k8s/overlays/*/; do
    name=$(basename "$overlay")
    kubectl kustomize "$overlay" >"$scratch/$name.yaml"
    echo "== $name: $(grep -c '^kind:' "$scratch/$name.yaml") objects"
    yamllint -s -c "$deploy/.yamllint" "$scratch/$name.yaml" || status=1
    # Kinds the schema does not know (the ServiceMonitor CRD) are warnings; --strict rejects any
    # field the schema lacks.
    "$validate" --strict --quiet -k "$kubernetes_version" "$scratch/$name.yaml" || status=1
    # What no schema sees: selectors that select nothing, ports and volumes named but not there.
    "${references[@]}" "$scratch/$name.yaml" || status=1
  done
  [ "$status" -eq 0 ] && echo "PASS: every overlay renders, validates, lints and its references resolve"
  return "$status"
}

check_units() {
  need systemd-analyze "systemd"
  deploy_scratch "$build" deploy-units
  local unit out
  # verify needs the programs to exist: /usr/local/bin is where the images and README put them.
  for unit in "$deploy"/systemd/*.service; do
    sed -e "s#/usr/local/bin/lomo-coordinator#$build/server/lomo-coordinator#" \
        -e "s#/usr/local/bin/lomo-worker#$build/worker/lomo-worker#" \
        "$unit" >"$scratch/$(basename "$unit")"
  done
  # verify reports unknown keys and bad values on stderr and still exits 0: any output fails.
  out=$(cd "$scratch" && systemd-analyze verify lomo-coordinator.service lomo-worker@0.service \
          lomo-worker@cpu.service 2>&1) || true
  if [ -n "$out" ]; then
    echo "$out"
    echo "FAIL: systemd-analyze verify"
    return 1
  fi
  echo "PASS: systemd-analyze verify lomo-coordinator.service lomo-worker@{0,cpu}.service"
}

check_prometheus() {
  need promtool "scripts/setup.sh installs Debian's prometheus package"
  # The scrape config reads the coordinator's viewer token from lomo-viewer.token beside it, as
  # an operator installs it (docs/SECURITY.md); check a copy with such a file in place.
  local scratch
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' RETURN
  cp "$deploy/prometheus/prometheus.yml" "$deploy/prometheus/alerts.yaml" "$scratch/"
  head -c 32 /dev/urandom | base64 | tr -d '\n' > "$scratch/lomo-viewer.token"
  (cd "$scratch" && promtool check config prometheus.yml)
  cd "$deploy/prometheus"
  promtool check rules alerts.yaml
  promtool test rules alerts_test.yaml
  python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$deploy/grafana/lomo.json"
  echo "PASS: scrape config, rules and their unit tests; the dashboard is JSON"
}

case "$check" in
  manifests) check_manifests ;;
  units) check_units ;;
  prometheus) check_prometheus ;;
  *) echo "unknown check $check" >&2; exit 2 ;;
esac
