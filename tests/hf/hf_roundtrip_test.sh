#!/usr/bin/env bash
# The Hugging Face round trip, with the real transformers: for Llama (attention and MLP biases),
# Qwen2 and Mistral (sliding window), a model saved by transformers is fine-tuned by lomo-worker
# and its checkpoint loaded back with AutoModelForCausalLM and AutoTokenizer; the logits must equal
# lomo's (tests/hf/hf_roundtrip.py says exactly what is checked).
#
#   hf_roundtrip_test.sh LOMO_WORKER CHECKPOINT_LOGITS SOURCE_DIR
#
# Python packages come from scripts/python-requirements.txt (torch from PyPI pulls the CUDA wheels,
# ~4 GiB; everything here runs on the CPU), in a virtual environment this script creates OUTSIDE
# the clone and reuses: $LOMO_HF_VENV, default ~/.cache/lomo/hf-venv-<first 12 hex digits of the
# requirements file's SHA-256>, so a changed requirements file gets a fresh one. The first run
# installs (about 2-3 minutes on a fast link); later runs start at once. A lock serialises
# concurrent runs (two build trees' ctest); an installation is used only once complete.
#
# Exit status: 0 passed, 1 failed, 77 skipped (ctest's SKIP_RETURN_CODE) only when the package
# index cannot be reached and no complete environment exists; the reason is printed.
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 LOMO_WORKER CHECKPOINT_LOGITS SOURCE_DIR" >&2
  exit 2
fi
worker=$1
logits=$2
source_dir=$(cd "$3" && pwd)
requirements="$source_dir/scripts/python-requirements.txt"
digest=$(sha256sum "$requirements" | cut -c1-12)
venv=${LOMO_HF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lomo/hf-venv-$digest}
mkdir -p "$(dirname "$venv")"

# The index pip would use (pip.conf or PIP_INDEX_URL), reachable within 20 s?
index_reachable() {
  python3 - <<'PY'
import subprocess, sys, urllib.request
url = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                     capture_output=True, text=True).stdout.strip()
import os
url = os.environ.get("PIP_INDEX_URL") or url or "https://pypi.org/simple/"
try:
    urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=20).read(1)
except Exception as error:  # any failure to reach it is the reason to skip
    print(f"{url}: {error}")
    sys.exit(1)
PY
}

install_venv() {
  local partial="$venv.partial"
  rm -rf "$partial"
  python3 -m venv "$partial"
  "$partial/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  # Renamed into place once complete: its bin/ scripts keep the old path in their #! lines, so
  # only bin/python3 is used (python3 -m ...), which finds the environment from where it lies.
  touch "$partial/.complete"
  rm -rf "$venv"
  mv "$partial" "$venv"
}

exec 9>"$venv.lock"
flock 9
if [[ ! -f "$venv/.complete" ]]; then
  if ! reason=$(index_reachable); then
    echo "SKIPPED: the Python package index is unreachable ($reason), and no complete" \
         "environment exists at $venv"
    exit 77
  fi
  echo "installing scripts/python-requirements.txt into $venv (once; ~4 GiB)"
  install_venv
fi
flock -u 9

python="$venv/bin/python3"
workdir=$(mktemp -d "${TMPDIR:-/tmp}/lomo_hf_roundtrip.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$python" "$source_dir/tests/hf/hf_roundtrip.py" --worker "$worker" --logits "$logits" \
  --source "$source_dir" --workdir "$workdir"
